"""Personalisation's statistics, without a server: the exact and bootstrapped AUROC, the
paired-bootstrap intervals, the validation split, fine-tuning that stops early without
ending worse than where it started, the local-only baseline's choice, and reading a
hospital's export with the split its datasite used (the export's column or the launch
record). The CLI and the library on whole comparisons: tests/researcher/test_personalise.py."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fedmtl.contract.jobspec import JobSpec
from fedmtl.datasites.data.records import add_test_split, load_records
from fedmtl.datasites.site import home as home_mod
from fedmtl.errors import ConfigError
from fedmtl.models import model_to_vector
from fedmtl.models.preprocessing import Preprocessor, labels_of
from fedmtl.models.tasks import TaskSpec
from fedmtl.researcher.personalise import (
    LOGREG_C,
    aurocs,
    finetune,
    finetune_early_stopping,
    local_only,
    paired_bootstrap,
    site_from_export,
    validation_split,
)
from fedmtl.schema import Schema

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BIN = TaskSpec(name="y", kind="binary", label="y")


def _scores(n: int, signal: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labels and two models' scores (the first with more signal), rounded so that ties occur."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(float)
    a = np.round(signal * y + rng.normal(0, 1, n), 1)
    b = np.round(0.5 * signal * y + rng.normal(0, 1, n), 1)
    return y[:, None], np.ones((n, 1), dtype=bool), a, b


def _spec_pre(schema):
    spec = JobSpec(name="toy", tasks=[{"label": "diabetes"}, {"label": "stage"}], model={"widths": [8]},
                   noise_multiplier=1.0, scaling="range", rounds=2)
    return spec, Preprocessor(schema), spec.task_specs(schema)


# -- AUROC and the intervals ------------------------------------------------------------------


def test_exact_auroc_matches_scikit_learn_and_weights_are_multiplicities():
    # Prepare: tied scores and a bootstrap-like count vector
    Y, M, a, _ = _scores(400, 1.0, seed=1)
    counts = np.random.default_rng(2).integers(0, 3, 400)
    # Execute
    plain = aurocs({"y": a}, Y, M, [BIN])["y"][0]
    weighted = aurocs({"y": a}, Y, M, [BIN], W=counts[None, :])["y"][0]
    repeated = roc_auc_score(np.repeat(Y[:, 0], counts), np.repeat(a, counts))
    # Assert: ties count one half, as scikit-learn counts them; weights act as repeated rows
    assert plain == pytest.approx(roc_auc_score(Y[:, 0], a), abs=1e-12)
    assert weighted == pytest.approx(repeated, abs=1e-12)
    # a diverged model (NaN scores) has no AUROC rather than an arbitrary one
    assert np.isnan(aurocs({"y": np.full(400, np.nan)}, Y, M, [BIN])["y"][0])


def test_paired_intervals_contain_the_estimate_and_shrink_with_n():
    widths = {}
    for n in (300, 3000):
        # Prepare
        Y, M, a, b = _scores(n, 1.0, seed=n)
        preds = {"a": {"y": a}, "b": {"y": b}}
        pairs = [("a - b", "a", "b"), ("b - a", "b", "a"), ("a - a", "a", "a")]
        # Execute
        d = paired_bootstrap(preds, Y, M, [BIN], pairs, n_boot=500, seed=0)
        # Assert: the point estimate is the exact difference, inside its interval
        ab = d["a - b"]["y"]
        exact = roc_auc_score(Y[:, 0], a) - roc_auc_score(Y[:, 0], b)
        assert ab["diff"] == pytest.approx(exact, abs=1e-12)
        assert ab["low"] <= ab["diff"] <= ab["high"]
        assert d["a - b"]["mean"] == ab  # one task: the mean is that task
        # antisymmetric, and a model against itself differs by exactly nothing in every resample
        assert d["b - a"]["y"]["diff"] == pytest.approx(-ab["diff"])
        ba = d["b - a"]["y"]
        assert ba["low"] == pytest.approx(-ab["high"]) and ba["high"] == pytest.approx(-ab["low"])
        assert d["a - a"]["y"] == {"diff": 0.0, "low": 0.0, "high": 0.0}
        widths[n] = ab["high"] - ab["low"]
    # ten times the patients: about sqrt(10) ~ 3.2 times narrower
    assert widths[3000] < 0.5 * widths[300]
    # the same seed, the same intervals
    Y, M, a, b = _scores(300, 1.0, seed=300)
    runs = [paired_bootstrap({"a": {"y": a}, "b": {"y": b}}, Y, M, [BIN], [("a - b", "a", "b")], n_boot=500, seed=s)
            for s in (0, 0, 1)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_paired_intervals_refuse_too_few_resamples_and_say_none_where_undefined():
    Y, M, a, b = _scores(50, 1.0, seed=3)
    with pytest.raises(ValueError, match="at least 100"):
        paired_bootstrap({"a": {"y": a}, "b": {"y": b}}, Y, M, [BIN], [("d", "a", "b")], n_boot=10)
    # a task with one class on these records has no AUROC, so no difference either
    d = paired_bootstrap({"a": {"y": a}, "b": {"y": b}}, np.zeros_like(Y), M, [BIN], [("d", "a", "b")], n_boot=100)
    assert d["d"]["y"] == {"diff": None, "low": None, "high": None}


# -- the validation split, early stopping, the baseline ---------------------------------------


def test_validation_split_is_carved_from_training_only(schema, make_site_records):
    df = make_site_records(400, seed=1)
    train = df[df["split"] == "train"].reset_index(drop=True)
    _, _, tasks = _spec_pre(schema)
    inner, val = validation_split(train, tasks, fraction=0.25, seed=0)
    assert set(inner["id"]).isdisjoint(val["id"]) and set(inner["id"]) | set(val["id"]) == set(train["id"])
    assert abs(len(val) - 0.25 * len(train)) <= 3  # rounded within each stratum
    # stratified by the first task's label: its rate is kept
    assert val["diabetes"].mean() == pytest.approx(train["diabetes"].mean(), abs=0.05)
    inner2, val2 = validation_split(train, tasks, fraction=0.25, seed=0)
    assert list(val2["id"]) == list(val["id"])  # seeded


def test_early_stopping_never_ends_worse_than_the_starting_model(schema, make_site_records):
    # Prepare: a 'federated' model that already learnt the signal elsewhere, and a harmful
    # fine-tuning (a learning rate far too large) at a hospital whose population is shifted
    spec, pre, tasks = _spec_pre(schema)
    start = spec.build_model(schema, n_features=pre.n_features)
    elsewhere = make_site_records(600, seed=2)
    start = finetune(start, pre, elsewhere, tasks, epochs=5, lr=0.1, seed=0)
    here = make_site_records(300, seed=3, shift=5.0)
    inner, val = validation_split(here, tasks, seed=0)
    Yv, Mv = (a.numpy() for a in labels_of(val, tasks))

    def val_score(m) -> float:
        return float(aurocs(m.predict(pre.transform(val)), Yv, Mv, tasks)["mean"][0])

    for lr in (0.05, 50.0):
        # Execute
        tuned, info = finetune_early_stopping(start, pre, inner, val, tasks, epochs=6, lr=lr, seed=0)
        # Assert: epoch 0 is the starting model; the kept epoch is the best seen, never below it
        hist = [-np.inf if v is None else v for v in info["validation"]]
        assert hist[0] == pytest.approx(val_score(start))
        assert val_score(tuned) == pytest.approx(hist[info["best_epoch"]]) and hist[info["best_epoch"]] == max(hist)
        assert val_score(tuned) >= val_score(start)
        assert 1 <= info["epochs_run"] <= 6
        if info["best_epoch"] == 0:
            np.testing.assert_array_equal(model_to_vector(tuned), model_to_vector(start))
    # the starting model is left as it was
    assert val_score(start) == pytest.approx(hist[0])


def test_local_only_baseline_is_the_better_on_validation(schema, make_site_records):
    # Prepare
    spec, pre, tasks = _spec_pre(schema)
    train = make_site_records(400, seed=4)
    inner, val = validation_split(train, tasks, seed=0)
    # Execute
    model, info = local_only(spec, schema, pre, train, inner, val, tasks, seed=0)
    # Assert: both candidates scored on the validation split, the higher one chosen and refitted
    scores = info["validation"]
    assert set(scores) == {"logistic regression", "job recipe, no DP"}
    assert info["chosen"] == max(scores, key=scores.get)
    assert set(info["C"]) == {"diabetes", "stage"} and set(info["C"].values()) <= set(LOGREG_C)
    preds = model.predict(pre.transform(val))
    assert preds["diabetes"].shape == (len(val),) and preds["stage"].shape == (len(val), 3)


# -- the hospital's export and its split ------------------------------------------------------


def _base(schema: Schema) -> Schema:
    return dataclasses.replace(schema, columns=tuple(c for c in schema.columns if c.role != "split"))


def test_export_without_split_column_needs_the_home(tmp_path, schema, make_site_records):
    make_site_records(200, seed=5).drop(columns=["split"]).to_csv(tmp_path / "export.csv", index=False)
    with pytest.raises(ConfigError, match="--home"):
        site_from_export(tmp_path / "export.csv", schema)


def test_split_made_at_launch_is_rebuilt_from_the_home_and_only_for_the_launched_file(tmp_path, schema,
                                                                                       make_site_records):
    # Prepare: an export without a split column and a home recording launch's split of it
    export = tmp_path / "export.csv"
    make_site_records(300, seed=6).drop(columns=["split"]).to_csv(export, index=False)
    base = _base(schema)
    launched, launched_schema, made = add_test_split(load_records(export, base), base, 0.25, 7)
    home = tmp_path / "home"
    home.mkdir()
    home_mod.write_config(home, {"split": made, "records_sha256": hashlib.sha256(export.read_bytes()).hexdigest(),
                                 "records_file": str(export)})
    launched_schema.save(home / "schema.toml")
    # Execute
    site, split = site_from_export(export, launched_schema, home=home, name="h1")
    # Assert: the datasite's own test patients, exactly
    assert split == made and split["source"] == "launch"
    assert sorted(site.test["id"]) == sorted(launched.loc[launched["split"] == "test", "id"])
    assert len(site.train) + len(site.test) == 300
    # another file (one value changed) would give another split: refused
    other = tmp_path / "other.csv"
    text = export.read_text().splitlines()
    cells = text[1].split(",")
    cells[1] = str(float(cells[1]) + 1.0)
    other.write_text("\n".join([text[0], ",".join(cells), *text[2:]]) + "\n")
    with pytest.raises(ConfigError, match="launched with"):
        site_from_export(other, launched_schema, home=home)
    # a datasite without a test split has no held-out records to compare on
    home_mod.write_config(home, {"split": {"column": None, "source": "none"}})
    with pytest.raises(ConfigError, match="no test split"):
        site_from_export(export, launched_schema, home=home)
