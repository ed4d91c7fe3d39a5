"""JobSpec: construction checks, files, hashing, schema validation, privacy planning."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedmtl.contract.jobspec import RECIPES, JobSpec, JobSpecError, StrategyConfig, TaskConfig
from fedmtl.errors import ConfigError
from fedmtl.models import model_to_vector
from fedmtl.privacy.accounting import PrivacyRecord, epsilon_of
from fedmtl.privacy.dp import effective_sample_rate, train_local
from fedmtl.schema import Schema

SCHEMA = {
    "dataset": {"name": "toy"},
    "columns": [
        {"name": "id", "role": "id", "type": "numeric"},
        {"name": "age", "role": "feature", "type": "numeric", "min": 18, "max": 90},
        {"name": "sex", "role": "feature", "type": "categorical", "categories": ["F", "M"]},
        {"name": "diabetes", "role": "label", "type": "binary", "missing": True},
        {"name": "stage", "role": "label", "type": "categorical", "categories": ["F0", "F1", "F2"], "missing": True},
        {"name": "alt", "role": "label", "type": "numeric", "min": 0, "max": 200, "missing": True},
        {"name": "split", "role": "split", "type": "categorical", "categories": ["train", "test"]},
    ],
}


def _schema(**changes) -> Schema:
    d = json.loads(json.dumps(SCHEMA))
    for name, col in changes.items():
        d["columns"] = [c for c in d["columns"] if c["name"] != name] + ([col] if col else [])
    return Schema.from_dict(d)


def _spec(**kw) -> JobSpec:
    base = dict(name="nafld", tasks=[{"label": "diabetes"}, {"label": "stage", "weight": 0.5}], noise_multiplier=1.1)
    base.update(kw)
    return JobSpec(**base)


SITES = {"a": _schema(), "b": _schema(), "c": _schema()}


# -- construction -------------------------------------------------------------------------
def test_defaults_and_nested_mappings_are_coerced():
    # Execute
    spec = _spec(model={"widths": [16, 8]}, strategy="fedprox", secagg={"threshold": 3.0})
    # Assert
    assert spec.tasks == (TaskConfig(label="diabetes"), TaskConfig(label="stage", weight=0.5))
    assert spec.model.widths == (16, 8) and spec.model.trunk == "mlp" and spec.model.dropout == 0.0
    assert spec.strategy == StrategyConfig(name="fedprox", mu=0.01, server_lr=1.0)
    assert spec.secagg.threshold == 3 and isinstance(spec.secagg.threshold, int)
    assert spec.local_epochs == 2.0 and spec.local_steps is None
    assert spec.client_config()["fedprox_mu"] == 0.01


@pytest.mark.parametrize("privacy, expected", [
    ({"noise_multiplier": 1.1}, RECIPES["dp"]),
    ({"noise_multiplier": None, "target_epsilon": 3.0}, RECIPES["dp"]),
    ({"dp": False, "noise_multiplier": None}, RECIPES["no_dp"]),
])
def test_recipe_defaults_follow_the_privacy_mode(privacy, expected):
    # Execute
    spec = _spec(**privacy)
    # Assert: the recipe of the spec's privacy mode (docs/models.md, "Recipe")
    assert (spec.lr, spec.momentum, spec.local_epochs, spec.max_grad_norm) == (
        expected["lr"], expected["momentum"], expected["local_epochs"], expected["max_grad_norm"])
    assert spec.rounds == 5 and spec.client_config()["lr"] == expected["lr"]


def test_given_recipe_values_are_kept_and_a_saved_spec_pins_the_defaults(tmp_path):
    # Prepare
    given = _spec(dp=False, noise_multiplier=None, lr=0.05, momentum=0.0, local_steps=7)
    defaulted = _spec()
    # Execute
    defaulted.save(tmp_path / "job.toml")
    loaded = JobSpec.load(tmp_path / "job.toml")
    # Assert: what was given stays; a file holds the resolved values, so its hash does not move
    assert (given.lr, given.momentum, given.local_steps, given.local_epochs) == (0.05, 0.0, 7, None)
    assert f"lr = {RECIPES['dp']['lr']}" in (tmp_path / "job.toml").read_text()
    assert loaded == defaulted and loaded.spec_hash() == defaulted.spec_hash()


def test_keyword_only_construction():
    with pytest.raises(TypeError):
        JobSpec("nafld", [{"label": "diabetes"}])  # type: ignore[misc]


def test_every_static_problem_is_listed_at_once():
    # Execute
    with pytest.raises(JobSpecError) as ei:
        JobSpec(
            name="",
            tasks=[{"label": "x", "kind": "ordinal", "colour": "red"}],
            rounds=0,
            sample_rate=1.5,
            lr=0.0,
            local_epochs=1.0,
            local_steps=10,
            noise_multiplier=1.0,
            target_epsilon=3.0,
            clipping="l1",
            strategy={"name": "fedsgd"},
            secagg={"threshold": 1},
        )
    # Assert
    e = ei.value
    assert isinstance(e, ConfigError)
    text = "\n".join(e.problems)
    for needle in (
        "name must be a non-empty string",
        "unknown key(s) ['colour']",
        "kind 'ordinal' is not one of",
        "rounds must be >= 1",
        "sample_rate must be in (0, 1]",
        "lr must be > 0",
        "local_epochs or local_steps, not both",
        "exactly one of noise_multiplier and target_epsilon (both",
        "clipping 'l1'",
        "strategy.name 'fedsgd' is unknown; choose one of ['fedavg', 'fedprox', 'fedadam', 'fedper']",
        "secagg.threshold must be >= 2",
    ):
        assert needle in text, needle
    assert f"{len(e.problems)} problem(s)" in str(e)


def test_dp_needs_exactly_one_of_noise_and_target():
    with pytest.raises(JobSpecError, match=r"neither was given"):
        _spec(noise_multiplier=None)
    with pytest.raises(JobSpecError, match=r"both were given"):
        _spec(target_epsilon=2.0)
    with pytest.raises(JobSpecError, match="dp is off"):
        _spec(dp=False)
    assert _spec(noise_multiplier=None, dp=False).noise_for_site(100) == 0.0


def test_threshold_against_named_sites_and_strategy_options():
    with pytest.raises(JobSpecError, match=r"threshold 3 is larger than the 2 site\(s\) named"):
        _spec(sites=["a", "b"], secagg={"threshold": 3})
    with pytest.raises(JobSpecError, match="mu only applies to fedprox"):
        _spec(strategy={"name": "fedavg", "mu": 0.1})
    with pytest.raises(JobSpecError, match="beta2 must be in"):
        _spec(strategy={"name": "fedadam", "beta2": 1.0})
    with pytest.raises(JobSpecError, match="unknown; registered trunks"):
        _spec(model={"trunk": "transformer"})


# -- files and hashing ----------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".yml", ".json"])
def test_save_load_round_trip(tmp_path, suffix):
    # Prepare
    spec = _spec(sites=["a", "b"], target_epsilon=3.0, noise_multiplier=None, local_steps=7,
                 strategy={"name": "fedadam", "server_lr": 0.05}, per_site_metrics=True)
    # Execute
    path = spec.save(tmp_path / f"job{suffix}")
    back = JobSpec.load(path)
    # Assert
    assert back == spec
    assert back.spec_hash() == spec.spec_hash()


def test_hash_is_stable_and_sensitive():
    # Prepare
    a = _spec(lr=1)
    b = JobSpec.from_dict(json.loads(json.dumps(a.to_dict())))
    # Assert
    assert a.lr == 1.0 and isinstance(a.lr, float)  # 1 and 1.0 hash the same
    assert a.spec_hash() == b.spec_hash() == _spec(lr=1.0).spec_hash()
    assert len(a.spec_hash()) == 64
    assert a.spec_hash() != _spec(lr=1.0, rounds=4).spec_hash()
    assert a.spec_hash() != _spec(lr=1.0, tasks=[{"label": "diabetes"}]).spec_hash()


def test_load_rejects_bad_files(tmp_path):
    # unknown suffix
    with pytest.raises(ConfigError, match="must end in one of"):
        _spec().save(tmp_path / "job.ini")
    # missing file
    with pytest.raises(ConfigError, match="does not exist"):
        JobSpec.load(tmp_path / "nope.toml")
    # broken TOML
    (tmp_path / "bad.toml").write_text("name = \n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        JobSpec.load(tmp_path / "bad.toml")
    # a typo'd key is reported with the file name and the allowed keys
    (tmp_path / "typo.toml").write_text(
        'name = "j"\nnoise_multipler = 1.0\n[[tasks]]\nlabel = "diabetes"\n', encoding="utf-8"
    )
    with pytest.raises(JobSpecError, match=r"(?s)typo.toml.*unknown key\(s\) \['noise_multipler'\]") as ei:
        JobSpec.load(tmp_path / "typo.toml")
    # the typo and its consequence are reported together
    assert any("neither was given" in p for p in ei.value.problems)
    # a required key missing
    (tmp_path / "short.json").write_text('{"name": "j"}', encoding="utf-8")
    with pytest.raises(JobSpecError, match="'tasks' is required"):
        JobSpec.load(tmp_path / "short.json")


# -- validation against schemas -------------------------------------------------------------------
def test_valid_spec_passes_validation():
    spec = _spec(tasks=[{"label": "diabetes"}, {"label": "stage"}, {"label": "alt", "kind": "regression"}])
    assert spec.validate(SITES) is spec
    assert spec.problems(SITES) == []


def test_validation_lists_every_schema_problem():
    # Prepare
    spec = _spec(
        tasks=[{"label": "diabtes"}, {"label": "stage", "kind": "binary"}, {"label": "age"}],
        sites=["a", "b", "zed"],
        secagg={"threshold": 3},
    )
    # Execute
    with pytest.raises(JobSpecError) as ei:
        spec.validate(SITES)
    # Assert
    text = "\n".join(ei.value.problems)
    assert "site(s) ['zed'] are named in sites but not connected; connected sites are ['a', 'b', 'c']" in text
    assert "has no column 'diabtes'; its label columns are ['diabetes', 'stage', 'alt']" in text
    assert "declared kind 'binary', but label column 'stage' of site 'a' is categorical" in text
    assert "column 'age' of site 'a' is a feature column, not a label" in text


def test_threshold_larger_than_connected_sites():
    spec = _spec(secagg={"threshold": 4})
    with pytest.raises(JobSpecError, match=r"threshold 4 is larger than the 3 connected site\(s\)"):
        spec.validate(SITES)
    spec.validate({**SITES, "d": _schema()})  # four sites: fine


def test_sites_must_agree_on_features_and_labels():
    # Prepare
    other = _schema(age={"name": "age", "role": "feature", "type": "numeric", "min": 0, "max": 120},
                    stage={"name": "stage", "role": "label", "type": "categorical", "categories": ["F0", "F4"]})
    other = Schema.from_dict({**other.to_dict(), "columns": [c.to_dict() for c in other.columns
                                                             if c.name != "sex"] + [{"name": "sex", "role": "feature", "type": "binary"}]})
    # Execute
    problems = _spec().problems({"a": _schema(), "b": other})
    # Assert
    text = "\n".join(problems)
    assert "feature columns differ" in text
    assert "different categories for 'stage'" in text


def test_both_scalings_need_declared_ranges():
    # range scaling scales by them; standard scaling's statistics release bounds its noise by them
    sch = _schema(age={"name": "age", "role": "feature", "type": "numeric"})
    for scaling in ("range", "standard"):
        problems = _spec(scaling=scaling).problems({"a": sch, "b": sch})
        assert any(f"scaling = {scaling!r} needs min and max" in p and "'age'" in p for p in problems), problems
    assert _spec(scaling="standard").problems({"a": _schema(), "b": _schema()}) == []


def test_standard_scaling_adds_a_statistics_pass_priced_everywhere():
    # Prepare
    std, rng = _spec(scaling="standard", rounds=3, eval_every=2), _spec(scaling="range", rounds=3, eval_every=2)
    # Execute / Assert: pass layout
    assert (std.n_passes(), rng.n_passes()) == (5, 4)
    assert [std.training_round(p) for p in range(1, 6)] == [None, 1, 2, 3, None]
    assert [rng.training_round(p) for p in range(1, 5)] == [1, 2, 3, None]
    assert std.eval_passes() == [2, 4, 5] and rng.eval_passes() == [1, 3, 4]  # same rounds evaluated
    assert std.pass_records(500, 1) == [std.stats_record()]
    # every record of the range job plus the statistics release, and the epsilon grows by it
    recs = std.job_records(500)
    assert len(recs) == len(rng.job_records(500)) + 1 and recs[0] == std.stats_record()
    assert std.epsilon_for_site(500) > rng.epsilon_for_site(500)
    # target_epsilon calibrates the training noise with the statistics release included
    cal = _spec(scaling="standard", noise_multiplier=None, target_epsilon=3.0)
    assert cal.epsilon_for_site(800) <= 3.0 + 1e-6
    assert cal.noise_for_site(800) > _spec(scaling="range", noise_multiplier=None, target_epsilon=3.0).noise_for_site(800)


def test_no_connected_sites():
    with pytest.raises(JobSpecError, match="no sites are connected"):
        _spec().validate({})


def test_task_specs_infer_kinds_and_classes():
    # Execute
    tasks = _spec(tasks=[{"label": "diabetes"}, {"label": "stage", "weight": 2},
                         {"label": "alt", "name": "alt_u_l"}]).task_specs(_schema())
    # Assert
    assert [(t.name, t.kind, t.label, t.weight) for t in tasks] == [
        ("diabetes", "binary", "diabetes", 1.0),
        ("stage", "multiclass", "stage", 2.0),
        ("alt_u_l", "regression", "alt", 1.0),
    ]
    assert tasks[1].classes == ("F0", "F1", "F2")
    with pytest.raises(JobSpecError, match="not a label column"):
        _spec(tasks=[{"label": "sex"}]).task_specs(_schema())


def test_task_name_must_be_an_identifier():
    with pytest.raises(JobSpecError, match=r"not an identifier.*'name' such as 'alt_u_l'"):
        _spec(tasks=[{"label": "alt-u/l"}])
    with pytest.raises(JobSpecError, match="task names must be unique"):
        _spec(tasks=[{"label": "diabetes"}, {"label": "stage", "name": "diabetes"}])


def test_build_model_is_deterministic():
    spec = _spec()
    a, b = spec.build_model(_schema()), spec.build_model(_schema())
    np.testing.assert_array_equal(model_to_vector(a), model_to_vector(b))
    assert a.config["n_features"] == 3 and [t.name for t in a.tasks] == ["diabetes", "stage"]
    assert not np.array_equal(model_to_vector(a), model_to_vector(_spec(seed=1).build_model(_schema())))


# -- privacy planning ------------------------------------------------------------------------------
def test_steps_follow_opacus_effective_sample_rate():
    # n=30, sample_rate 0.05: batch round(1.5)=2, 15 batches, q = 1/15, one epoch = 15 steps
    spec = _spec(sample_rate=0.05, local_epochs=1.0)
    assert spec.sample_rate_for_site(30) == effective_sample_rate(0.05, 30)[0] == pytest.approx(1 / 15)
    assert spec.steps_per_round(30) == 15
    assert _spec(local_epochs=2.5).steps_per_round(1000) == 50
    assert _spec(local_steps=7).steps_per_round(1000) == 7
    with pytest.raises(ValueError, match="n_train"):
        spec.steps_per_round(0)


@pytest.mark.slow  # importing Opacus alone takes several seconds on a loaded machine
def test_spec_agrees_with_train_local():
    # Prepare: what train_local actually records for the same settings
    spec = _spec(sample_rate=0.1, local_epochs=0.5, noise_multiplier=1.3)
    n = 37
    torch.manual_seed(0)
    X, Y = torch.randn(n, 3), torch.randint(0, 2, (n, 1)).float()
    tasks = spec.build_model(_schema()).tasks[:1]
    from fedmtl.models import build_model

    net = build_model(n_features=3, tasks=tasks, widths=[4], seed=0)
    # Execute
    res = train_local(model=net, X=X, Y=Y, mask=torch.ones(n, 1, dtype=torch.bool), tasks=tasks,
                      epochs=0.5, sample_rate=0.1, lr=0.1, noise_multiplier=spec.noise_for_site(n), seed=0)
    # Assert
    assert spec.privacy_records(n, rounds=1) == res.privacy_records


def test_target_epsilon_is_calibrated_over_all_rounds():
    # Prepare
    spec = _spec(noise_multiplier=None, target_epsilon=2.0, rounds=5, sample_rate=0.02, local_epochs=1.0)
    n = 2000
    # Execute
    sigma = spec.noise_for_site(n)
    records = spec.privacy_records(n)
    eps = spec.epsilon_for_site(n)
    # Assert
    assert len(records) == 5 and all(r == records[0] for r in records)
    assert records[0] == PrivacyRecord(noise_multiplier=sigma, sample_rate=0.02, steps=50)
    assert 2.0 - 0.05 < eps <= 2.0
    # the target covers the statistics release (standard scaling), training AND the final
    # evaluation release, in charging order
    assert spec.job_records(n) == [spec.stats_record(), *records, spec.eval_record()]
    assert eps == pytest.approx(epsilon_of([spec.stats_record(), *records, spec.eval_record()], delta=1e-5))
    # one round alone costs less; more rounds at the same target need more noise
    assert spec.epsilon_for_site(n, rounds=1) < eps
    assert _spec(noise_multiplier=None, target_epsilon=2.0, rounds=10, sample_rate=0.02, local_epochs=1.0).noise_for_site(n) > sigma


def test_fixed_noise_and_no_dp_epsilon():
    spec = _spec(noise_multiplier=1.0, rounds=2)
    assert spec.noise_for_site(500) == 1.0
    assert spec.epsilon_for_site(500) == pytest.approx(epsilon_of(spec.job_records(500), delta=spec.delta))
    assert spec.epsilon_for_site(500, rounds=2) == pytest.approx(
        epsilon_of(spec.privacy_records(500), delta=spec.delta))
    assert spec.privacy_records(500, rounds=0) == []
    assert math.isinf(_spec(noise_multiplier=None, dp=False).epsilon_for_site(500))
    with pytest.raises(ValueError, match="rounds"):
        spec.privacy_records(500, rounds=-1)


def test_can_run_with_partial_approval():
    strict, partial = _spec(secagg={"threshold": 2}), _spec(secagg={"threshold": 2}, allow_partial=True)
    assert strict.can_run(approved=3, participating=3)
    assert not strict.can_run(approved=2, participating=3)
    assert partial.can_run(approved=2, participating=3)
    assert not partial.can_run(approved=1, participating=3)


def test_client_config_keys_are_train_local_parameters():
    import inspect

    params = inspect.signature(train_local).parameters
    for spec in (_spec(), _spec(strategy={"name": "fedprox", "mu": 0.3}), _spec(noise_multiplier=None, dp=False)):
        cfg = spec.client_config()
        assert set(cfg) <= set(params), set(cfg) - set(params)
    assert _spec(strategy={"name": "fedprox", "mu": 0.3}).client_config()["fedprox_mu"] == 0.3
    assert _spec(noise_multiplier=None, dp=False).client_config()["delta"] is None


def test_passes_charge_training_then_evaluation_in_order():
    # Prepare: 3 rounds, final evaluation only (the default) and every 2 rounds; range
    # scaling (no statistics pass: see the standard-scaling test above)
    final_only = _spec(noise_multiplier=1.0, rounds=3, scaling="range")
    every2 = _spec(noise_multiplier=1.0, rounds=3, eval_every=2, scaling="range")
    # Execute / Assert
    assert final_only.eval_passes() == [4]
    assert every2.eval_passes() == [1, 3, 4]
    train = final_only.privacy_records(500, rounds=1)
    assert final_only.pass_records(500, 1) == train
    assert final_only.pass_records(500, 4) == [final_only.eval_record()]
    assert every2.pass_records(500, 1) == [*train, every2.eval_record()]
    assert final_only.eval_record() == PrivacyRecord(noise_multiplier=5.0, sample_rate=1.0, steps=1)
    with pytest.raises(ConfigError, match="eval_noise_multiplier"):
        _spec(noise_multiplier=1.0, eval_noise_multiplier=0.0)


def test_grad_sample_mode_defaults_to_the_fastest_correct_one():
    # flat clipping: ghost clipping (no per-sample gradients); per-layer: hooks
    assert _spec(noise_multiplier=1.0).client_config()["grad_sample_mode"] == "ghost"
    assert _spec(noise_multiplier=1.0, clipping="per_layer").client_config()["grad_sample_mode"] == "hooks"
    assert _spec(noise_multiplier=1.0, grad_sample_mode="functorch").effective_grad_sample_mode() == "functorch"
    with pytest.raises(ConfigError, match="ghost' needs clipping = 'flat'"):
        _spec(noise_multiplier=1.0, clipping="per_layer", grad_sample_mode="ghost")
    with pytest.raises(ConfigError, match="grad_sample_mode 'fast'"):
        _spec(noise_multiplier=1.0, grad_sample_mode="fast")
