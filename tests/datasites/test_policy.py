"""Policy files: load TOML/YAML, validate with errors naming the key, stable hash."""

from __future__ import annotations

import pytest
import yaml

from fedmtl.datasites.policy import ADVISORY_ID, Policy, PolicyError, Template, code_hash
from fedmtl.errors import ConfigError

import compliance_helpers as H  # registered by tests/datasites/conftest.py


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
