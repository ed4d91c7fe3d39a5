"""Policy files: load TOML/YAML, validate with errors naming the key, stable hash."""

from __future__ import annotations

import compliance_helpers as H  # registered by tests/datasites/conftest.py
import pytest
import yaml

from fedmtl.datasites.rules.policy import ADVISORY_ID, Peer, Policy, PolicyError, Template, code_hash
from fedmtl.errors import ConfigError

TOML = f"""
[review]
approval = "auto"
templates_only = true
release_per_site_metrics = false

[privacy]
accountant = "rdp"
delta = 1e-5
min_noise_multiplier = 0.8
max_grad_norm = 2.0
max_epsilon_per_job = 3.0
dataset_epsilon_budget = 10.0
researcher_epsilon_budget = 5.0

[training]
allowed_tasks = ["diabetes_5y", "fibrosis"]
min_sites = 3
min_secagg_threshold = 2
max_rounds = 20
max_local_epochs = 2

[[templates]]
name = "fedmtl.round.v1"
sha256 = "{H.TEMPLATE_HASH}"
"""


def test_load_toml_and_yaml_agree(tmp_path):
    # Prepare
    (tmp_path / "policy.toml").write_text(TOML)
    p = Policy.load(tmp_path / "policy.toml")
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(p.to_dict()))
    # Execute
    q = Policy.load(tmp_path / "policy.yaml")
    # Assert
    assert p == q and p.hash() == q.hash()
    assert p.allowed_tasks == ("diabetes_5y", "fibrosis") and p.max_rounds == 20
    assert p.template_for(H.TEMPLATE_HASH) == Template("fedmtl.round.v1", H.TEMPLATE_HASH)
    assert p.template_for(code_hash("other")) is None


def test_round_trip_and_stable_hash(tmp_path):
    p = H.make_policy()
    assert Policy.from_dict(p.to_dict()) == p
    p.save(tmp_path / "p.toml")
    assert Policy.load(tmp_path / "p.toml").hash() == p.hash()
    # key order in the file does not matter
    d = p.to_dict()
    reordered = {k: dict(reversed(list(v.items()))) if isinstance(v, dict) else v for k, v in reversed(list(d.items()))}
    assert Policy.from_dict(reordered).hash() == p.hash()
    # a pinned value: the hash is sha256 over canonical JSON and must not drift between runs
    assert len(p.hash()) == 64 and p.hash() == H.make_policy().hash()
    assert H.make_policy(max_rounds=6).hash() != p.hash()


def test_default_is_templates_only_and_auto():
    p = Policy.default(allowed_tasks=["y"])
    assert p.templates_only is True and p.approval == "auto" and p.release_per_site_metrics is False
    assert ADVISORY_ID == "PYSEC-2026-546"


@pytest.mark.parametrize(
    "section,key,value,expected",
    [
        ("privacy", "delta", 2, "privacy.delta: must be a number in (0, 1)"),
        ("privacy", "min_noise_multiplier", -1, "privacy.min_noise_multiplier: must be a finite number > 0"),
        ("privacy", "max_grad_norm", "big", "privacy.max_grad_norm"),
        ("privacy", "accountant", "moments", "privacy.accountant: must be one of ['rdp', 'prv']"),
        ("privacy", "max_epsilon_per_job", 50.0, "privacy.max_epsilon_per_job: 50 is larger than privacy.researcher_epsilon_budget"),
        ("privacy", "researcher_epsilon_budget", 11.0, "is larger than privacy.dataset_epsilon_budget 10"),
        ("review", "approval", "sometimes", "review.approval: must be one of ['auto', 'manual']"),
        ("review", "templates_only", "yes", "review.templates_only: must be true or false"),
        ("training", "max_rounds", 0, "training.max_rounds: must be an integer >= 1, got 0"),
        ("training", "max_local_epochs", 1.5, "training.max_local_epochs: must be an integer"),
        ("training", "min_sites", True, "training.min_sites: must be an integer"),
        ("training", "min_secagg_threshold", 4, "training.min_secagg_threshold: 4 is larger than training.min_sites 3"),
        ("training", "allowed_tasks", "diabetes_5y", "training.allowed_tasks: must be a list"),
        ("training", "allowed_tasks", ["a", "a"], "training.allowed_tasks: lists a column twice"),
        ("privacy", "min_noise", 1.0, "privacy.min_noise: unknown key"),
    ],
)
def test_each_bad_value_names_its_key(section, key, value, expected):
    # Prepare
    d = H.make_policy(max_epsilon_per_job=3.0, researcher_epsilon_budget=5.0, dataset_epsilon_budget=10.0).to_dict()
    d[section][key] = value
    # Execute
    with pytest.raises(PolicyError) as info:
        Policy.from_dict(d)
    # Assert
    assert expected in str(info.value), str(info.value)
    assert isinstance(info.value, ConfigError)


def test_all_problems_at_once_and_file_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        '[privacy]\ndelta = 3\n[training]\nmax_rounds = 0\n[extra]\nx = 1\n'
        '[[templates]]\nname = "t"\nsha256 = "NOTHEX"\n'
    )
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    msg = str(info.value)
    assert str(path) in msg
    for part in ("extra: unknown section", "training.allowed_tasks: required", "privacy.delta",
                 "training.max_rounds", "templates[0].sha256: must be 64 lowercase hex"):
        assert part in msg, msg
    assert len(info.value.problems) == 5


def test_unparsable_and_missing_files(tmp_path):
    (tmp_path / "p.toml").write_text("[privacy\n")
    with pytest.raises(PolicyError, match="cannot parse"):
        Policy.load(tmp_path / "p.toml")
    with pytest.raises(PolicyError, match="no policy file"):
        Policy.load(tmp_path / "nope.toml")


def test_default_rejects_unknown_override_and_duplicate_template_names():
    with pytest.raises(PolicyError, match="unknown policy field"):
        Policy.default(allowed_tasks=["y"], max_round=3)
    with pytest.raises(PolicyError, match="listed twice"):
        Policy.default(allowed_tasks=["y"], templates=[Template("t", "a" * 64), Template("t", "b" * 64)])


# ----------------------------------------------------------------------------- limits


def test_limits_defaults_and_their_section():
    p = Policy.default(allowed_tasks=["y"])
    assert (p.max_model_params, p.max_memory_mb, p.max_local_steps, p.max_eval_passes) == (2_000_000, 2048, 5000, 1)
    assert (p.min_eval_noise_multiplier, p.max_secagg_clip, p.min_secagg_clip) == (2.0, 10.0, 1e-3)
    assert p.allowed_clipping == ("flat", "per_layer") and p.max_sample_rate == 0.5
    assert (p.max_batch_size, p.max_width, p.max_layers) == (4096, 1024, 8)
    d = p.to_dict()
    assert d["limits"]["allowed_clipping"] == ["flat", "per_layer"] and d["limits"]["max_layers"] == 8
    assert "max_rounds" in d["training"] and "max_rounds" not in d["limits"]  # existing keys stay put


def test_max_abs_weight_default_is_far_above_trained_models_and_hashes_alike():
    # a demo model trained 50 rounds (DP or not) keeps every |weight| below 3
    p = H.make_policy()
    assert p.max_abs_weight == 1000.0 and p.to_dict()["limits"]["max_abs_weight"] == 1000.0
    d = p.to_dict()
    d["limits"]["max_abs_weight"] = 1000  # an int in the file is the same policy
    q = Policy.from_dict(d)
    assert isinstance(q.max_abs_weight, float) and q.hash() == p.hash()
    assert H.make_policy(max_abs_weight=10.0).hash() != p.hash()
    del d["limits"]["max_abs_weight"]  # a policy recorded before the key loads with the default
    assert Policy.from_dict(d).max_abs_weight == 1000.0


def test_a_policy_written_before_limits_and_peers_loads_with_the_defaults():
    # ledgers hold policies recorded before [limits] and [[peers]] existed
    d = H.make_policy().to_dict()
    del d["limits"], d["peers"]
    p = Policy.from_dict(d)
    assert p == H.make_policy() and p.peers == () and p.max_width == 1024


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("max_model_params", 0, "limits.max_model_params: must be an integer >= 1, got 0"),
        ("max_memory_mb", 512.5, "limits.max_memory_mb: must be an integer >= 1"),
        ("max_local_steps", True, "limits.max_local_steps: must be an integer >= 1"),
        ("max_eval_passes", -1, "limits.max_eval_passes: must be an integer >= 0, got -1"),
        ("min_eval_noise_multiplier", 0, "limits.min_eval_noise_multiplier: must be a finite number > 0"),
        ("max_secagg_clip", "10", "limits.max_secagg_clip: must be a finite number > 0"),
        ("min_secagg_clip", -1e-3, "limits.min_secagg_clip: must be a finite number > 0"),
        ("min_secagg_clip", 20.0, "limits.min_secagg_clip: 20 is larger than limits.max_secagg_clip 10"),
        ("allowed_clipping", "flat", "limits.allowed_clipping: must be a list of clipping modes"),
        ("allowed_clipping", [], "limits.allowed_clipping: is empty, so no job could run"),
        ("allowed_clipping", ["flat", "automatic"], "limits.allowed_clipping: unknown mode(s) ['automatic']"),
        ("allowed_clipping", ["flat", "flat"], "limits.allowed_clipping: lists a mode twice"),
        ("max_sample_rate", 0, "limits.max_sample_rate: must be a number in (0, 1], got 0"),
        ("max_sample_rate", 1.5, "limits.max_sample_rate: must be a number in (0, 1]"),
        ("max_batch_size", 0, "limits.max_batch_size: must be an integer >= 1"),
        ("max_width", "wide", "limits.max_width: must be an integer >= 1"),
        ("max_layers", 0, "limits.max_layers: must be an integer >= 1"),
        ("max_abs_weight", 0, "limits.max_abs_weight: must be a number in (0, 3.4e+38]"),
        ("max_abs_weight", float("inf"), "limits.max_abs_weight: must be a number in (0, 3.4e+38]"),
        ("max_abs_weight", 1e39, "limits.max_abs_weight: must be a number in (0, 3.4e+38]"),
        ("max_abs_weight", "1e3", "limits.max_abs_weight: must be a number in (0, 3.4e+38]"),
        ("max_params", 1, "limits.max_params: unknown key"),
    ],
)
def test_each_bad_limit_names_its_key(key, value, expected):
    d = H.make_policy().to_dict()
    d["limits"][key] = value
    with pytest.raises(PolicyError) as info:
        Policy.from_dict(d)
    assert expected in str(info.value), str(info.value)


def test_limit_edges_are_allowed_and_numbers_hash_alike(tmp_path):
    p = H.make_policy(max_eval_passes=0, max_sample_rate=1.0, min_secagg_clip=2.0, max_secagg_clip=2.0,
                      allowed_clipping=["per_layer"])
    assert p.allowed_clipping == ("per_layer",) and Policy.from_dict(p.to_dict()) == p
    # ``10`` in one file and ``10.0`` in another are the same policy, with the same hash
    d = H.make_policy().to_dict()
    d["limits"]["max_secagg_clip"] = 10
    d["privacy"]["max_grad_norm"] = 1
    q = Policy.from_dict(d)
    assert q.max_secagg_clip == 10.0 and isinstance(q.max_secagg_clip, float)
    assert q.hash() == H.make_policy().hash()


def test_every_limit_changes_the_hash():
    base = H.make_policy()
    changed = dict(max_model_params=10**6, max_memory_mb=1024, max_local_steps=100, max_eval_passes=3,
                   min_eval_noise_multiplier=3.0, max_secagg_clip=5.0, min_secagg_clip=0.01,
                   allowed_clipping=("flat",), max_sample_rate=0.1, max_batch_size=512, max_width=256,
                   max_layers=4)
    hashes = {base.hash()} | {H.make_policy(**{k: v}).hash() for k, v in changed.items()}
    assert len(hashes) == len(changed) + 1


# ----------------------------------------------------------------------------- peers

FP_A, FP_B, FP_C = "a1" * 32, "b2" * 32, "c3" * 32
PEERS_TOML = TOML + f"""
[limits]
max_model_params = 500_000
allowed_clipping = ["flat"]

[[peers]]
name = "general"
fingerprint = "{FP_A}"

[[peers]]
name = "mercy"
fingerprint = "{FP_B}"
"""


def test_peers_and_limits_round_trip_through_toml_yaml_and_dicts(tmp_path):
    # Prepare
    (tmp_path / "p.toml").write_text(PEERS_TOML)
    # Execute
    p = Policy.load(tmp_path / "p.toml")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(p.to_dict()))
    (tmp_path / "q.toml").write_text(p.dumps())
    # Assert
    assert p.peers == (Peer("general", FP_A), Peer("mercy", FP_B))
    assert p.max_model_params == 500_000 and p.allowed_clipping == ("flat",) and p.max_width == 1024
    assert p.to_dict()["peers"] == [{"name": "general", "fingerprint": FP_A}, {"name": "mercy", "fingerprint": FP_B}]
    for q in (Policy.load(tmp_path / "p.yaml"), Policy.load(tmp_path / "q.toml"), Policy.from_dict(p.to_dict())):
        assert q == p and q.hash() == p.hash()


def test_peer_order_does_not_matter_but_peers_change_the_hash():
    a = H.make_policy(peers={"general": FP_A, "mercy": FP_B})
    b = H.make_policy(peers=[Peer("mercy", FP_B), Peer("general", FP_A)])
    assert a == b and a.hash() == b.hash()
    assert H.make_policy().hash() != a.hash()
    assert H.make_policy(peers={"general": FP_A, "mercy": FP_C}).hash() != a.hash()
    assert H.make_policy(peers={"general": FP_A, "st-mary": FP_B}).hash() != a.hash()


@pytest.mark.parametrize(
    "raw,expected",
    [
        ([{"name": "general", "fingerprint": FP_A.upper()}], "peers[0].fingerprint: must be 64 lowercase hex"),
        ([{"name": "general", "fingerprint": FP_A[:-2]}], "peers[0].fingerprint: must be 64 lowercase hex"),
        ([{"name": "general", "fingerprint": 7}], "peers[0].fingerprint: must be 64 lowercase hex"),
        ([{"name": "", "fingerprint": FP_A}], "peers[0].name: must be a datasite name"),
        ([{"name": "St Mary", "fingerprint": FP_A}], "peers[0].name: must be a datasite name"),
        ([{"name": "general", "fingerprint": FP_A}, {"name": "general", "fingerprint": FP_B}],
         "peers[1].name: 'general' is pinned twice (also peers[0])"),
        ([{"name": "general", "fingerprint": FP_A}, {"name": "mercy", "fingerprint": FP_A}],
         "peers[1].fingerprint: a1a1a1a1a1a1a1a1... is already pinned as peers[0] ('general')"),
        ([{"name": "general"}], "peers[0]: needs both name and fingerprint"),
        ([{"name": "general", "fingerprint": FP_A, "url": "http://x"}], "peers[0]: unknown key(s) ['url']"),
        (["general"], "peers[0]: must be a table with name and fingerprint"),
        ({"general": FP_A}, "peers: must be an array of tables"),
    ],
)
def test_each_bad_peer_is_named(raw, expected):
    d = H.make_policy().to_dict()
    d["peers"] = raw
    with pytest.raises(PolicyError) as info:
        Policy.from_dict(d)
    assert expected in str(info.value), str(info.value)


def test_peer_problems_are_reported_with_the_others(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        '[training]\nallowed_tasks = ["y"]\nmax_rounds = 0\n[limits]\nmax_width = 0\n'
        '[[peers]]\nname = "general"\nfingerprint = "NOTHEX"\n'
    )
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    assert len(info.value.problems) == 3, info.value.problems
    for part in ("training.max_rounds", "limits.max_width", "peers[0].fingerprint"):
        assert part in str(info.value)


def test_peer_queries_and_changes():
    p = H.make_policy(peers={"general": FP_A})
    assert p.peer_by_fingerprint(FP_A) == Peer("general", FP_A) and p.peer_by_fingerprint(FP_B) is None
    assert p.peer_by_name("general") == Peer("general", FP_A) and p.peer_by_name("mercy") is None
    q = p.with_peer("mercy", FP_B)
    assert q.peers == (Peer("general", FP_A), Peer("mercy", FP_B)) and p.peers == (Peer("general", FP_A),)
    r = q.with_peer("general", FP_C)  # re-pinning a name replaces its entry
    assert r.peers == (Peer("general", FP_C), Peer("mercy", FP_B))
    assert r.without_peer("general").peers == (Peer("mercy", FP_B),)
    # everything else is untouched
    assert r.without_peer("general").without_peer("mercy") == H.make_policy()
    with pytest.raises(PolicyError, match="no peer named 'st-mary' is pinned"):
        r.without_peer("st-mary")
    with pytest.raises(PolicyError, match="already pinned"):
        r.with_peer("st-mary", FP_B)
    with pytest.raises(PolicyError, match="peers\\[.\\].fingerprint: must be 64 lowercase hex"):
        r.with_peer("st-mary", "xyz")
