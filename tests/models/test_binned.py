"""A binary task's metrics, Platt fit and intervals from its released logit histograms
(:mod:`fedmtl.models.binned`), checked against scikit-learn on the unbinned scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from fedmtl.models import TaskSpec, binned, build_model, model_to_vector, vector_to_model
from fedmtl.models.binned import (
    METRICS,
    RELEASE_BINS,
    binary_intervals,
    binary_metrics,
    binning_slack,
    fit_platt,
    histograms,
    logit_bins,
    support,
)
from fedmtl.models.nets import model_from_config


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _cohort(n: int, seed: int, a: float = 1.0, b: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Model logits spread over the release range and labels drawn from
    ``sigmoid(a * logit + b)`` (calibrated when ``(a, b) = (1, 0)``)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-2.0, 1.5, n)
    y = (rng.random(n) < _sigmoid(a * z + b)).astype(int)
    return z, y


def _exact(z: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The metrics of the unbinned risks (no recalibration); ECE over the release bins with
    each record at its own risk."""
    r = _sigmoid(z)
    bins = logit_bins(r)
    ece = sum(abs(y[bins == k].sum() - r[bins == k].sum()) for k in range(RELEASE_BINS)) / len(y)
    return {
        "auroc": roc_auc_score(y, z),
        "auprc": average_precision_score(y, z),
        "accuracy": float(np.mean((r >= 0.5) == (y == 1))),
        "brier": float(np.mean((r - y) ** 2)),
        "mean_predicted": float(r.mean()),
        "observed_rate": float(y.mean()),
        "ece": float(ece),
    }


def test_exact_histograms_give_sklearn_auroc_within_the_tie_slack() -> None:
    # Prepare
    z, y = _cohort(4000, seed=1)
    pos, neg = histograms(_sigmoid(z), y)
    # Execute
    m = binary_metrics(pos, neg)
    slack = binning_slack(pos, neg)
    # Assert
    assert pos.sum() + neg.sum() == len(y) and pos.sum() == y.sum()
    assert m["n"] == len(y)
    assert abs(m["auroc"] - roc_auc_score(y, z)) <= slack["auroc"] + 1e-12
    assert 0 < slack["auroc"] < 0.1
    assert m["observed_rate"] == pytest.approx(y.mean())


def test_platt_fit_recovers_a_known_recalibration() -> None:
    # Prepare: labels follow sigmoid(0.6 * logit - 0.7), a model too sure and too high
    z, y = _cohort(200_000, seed=2, a=0.6, b=-0.7)
    pos, neg = histograms(_sigmoid(z), y)
    # Execute
    a, b = fit_platt(pos, neg)
    # Assert
    assert a == pytest.approx(0.6, abs=0.05)
    assert b == pytest.approx(-0.7, abs=0.1)
    # a calibrated model is left (nearly) as it is
    z1, y1 = _cohort(200_000, seed=3)
    a1, b1 = fit_platt(*histograms(_sigmoid(z1), y1))
    assert a1 == pytest.approx(1.0, abs=0.05) and b1 == pytest.approx(0.0, abs=0.1)


def test_intervals_without_noise_contain_the_exact_values() -> None:
    # Prepare
    z, y = _cohort(3000, seed=4)
    pos, neg = histograms(_sigmoid(z), y)
    exact = _exact(z, y)
    # Execute
    iv = binary_intervals(pos, neg, noise_sd=0.0)
    # Assert (AUPRC has no closed bound on its binning error: binning_slack uses the ties'
    # share, which can fall short of the step-wise AP's move; not asserted here)
    for k in (m for m in METRICS if m != "auprc"):
        lo, hi = iv[k]
        assert lo <= exact[k] <= hi, (k, lo, exact[k], hi)


def test_intervals_cover_the_exact_auroc_under_moderate_noise() -> None:
    # Prepare: 5,000 records, noise sd 3 on each of the 32 counts
    z, y = _cohort(5000, seed=5)
    pos, neg = histograms(_sigmoid(z), y)
    exact = roc_auc_score(y, z)
    rng = np.random.default_rng(6)
    # Execute
    hits = []
    for _ in range(50):
        p, q = pos + rng.normal(0, 3.0, pos.shape), neg + rng.normal(0, 3.0, neg.shape)
        lo, hi = binary_intervals(p, q, noise_sd=3.0, draws=100)["auroc"]
        hits.append(lo <= exact <= hi)
        assert hi - lo < 0.2  # an interval that says something
    # Assert
    assert np.mean(hits) >= 0.8


def test_support_keeps_the_ranking_metrics_off_empty_bins_and_bounds_what_it_drops() -> None:
    # Prepare: test and calibration splits of one cohort; every count noised; the top bins hold
    # (nearly) no record but carry their noise, which moves a plain AUROC by noise / P
    z, y = _cohort(12000, seed=7)
    test, fit = slice(0, 2400), slice(2400, None)
    pos, neg = histograms(_sigmoid(z[test]), y[test])
    fpos, fneg = histograms(_sigmoid(z[fit]), y[fit])
    exact = roc_auc_score(y[test], z[test])
    errs_plain, errs_masked, covered = [], [], 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        sd = 15.0
        p, n, fp, fn = (h + rng.normal(0, sd, h.shape) for h in (pos, neg, fpos, fneg))
        sup = support(p, n, fp, fn, noise_sd=sd)
        # Execute
        errs_plain.append(binary_metrics(p, n)["auroc"] - exact)
        errs_masked.append(binary_metrics(p, n, support=sup)["auroc"] - exact)
        lo, hi = binary_intervals(p, n, noise_sd=sd, support=sup, draws=200)["auroc"]
        covered += lo <= exact <= hi
    # Assert: the mask cuts the error; the interval (noise, ties, what the mask may drop) covers
    assert sup is not None and sup.dropped[0] >= 0 and sup.dropped[1] >= 0
    assert np.std(errs_masked) < np.std(errs_plain)
    assert covered >= 36


def test_recalibrate_folds_platt_into_the_head_and_keeps_the_ranking() -> None:
    # Prepare
    tasks = [TaskSpec(name="dia", kind="binary", label="dia"), TaskSpec(name="alt", kind="regression", label="alt")]
    model = build_model(n_features=4, tasks=tasks, seed=0)
    x = torch.randn(50, 4)
    model.eval()  # as predict() runs it (no dropout)
    with torch.no_grad():
        before = model(x)["dia"][:, 0].numpy()
    # Execute
    model.recalibrate({"dia": (0.6, -0.7)})
    # Assert: every risk is sigmoid(0.6 * logit - 0.7); the order of the records is the same
    after = model.predict(x)["dia"]
    assert np.allclose(after, _sigmoid(0.6 * before - 0.7), atol=1e-6)
    assert (np.argsort(after) == np.argsort(before)).all()
    with pytest.raises(ValueError, match="not a binary task"):
        model.recalibrate({"alt": (1.0, 0.0)})
    with pytest.raises(ValueError, match="a > 0"):
        model.recalibrate({"dia": (0.0, 0.0)})


def test_recalibrated_risks_beyond_the_release_range_read_as_the_fit_read_them() -> None:
    """A logit below the lowest release bin's centre was read at that centre by the Platt
    fit; the recalibrated model predicts it (nearly) there, in the same order, and the
    range survives a save (model_from_config)."""
    # Prepare: logits from -12 to 4, beyond both ends of the release range
    tasks = [TaskSpec(name="dia", kind="binary", label="dia")]
    model = build_model(n_features=1, tasks=tasks, seed=0, widths=[4])
    x = torch.linspace(-1, 1, 200)[:, None]
    model.eval()
    with torch.no_grad():
        head = model.heads["dia"]
        raw = model(x)["dia"][:, 0]
        span = float(raw.max() - raw.min())
        head.weight.mul_(16.0 / span)
        head.bias.add_(-4.0 - float((model(x)["dia"][:, 0]).min()) - 8.0)
        z = model(x)["dia"][:, 0].numpy()
    assert z.min() < -11.5 and z.max() > 3.5
    lo, hi = binned.read_range()
    # Execute
    model.recalibrate({"dia": (0.7, 0.5)}, logit_range=(lo, hi))
    risk = model.predict(x)["dia"]
    again = model_from_config(json.loads(json.dumps(model.config)))
    vector_to_model(again, model_to_vector(model))
    # Assert: inside the range sigmoid(a z + b); beyond it within 0.01 logit * excess of the ends
    inside = (z >= lo) & (z <= hi)
    assert np.allclose(risk[inside], _sigmoid(0.7 * z[inside] + 0.5), atol=1e-6)
    low = _sigmoid(0.7 * lo + 0.5)
    assert np.all(np.abs(risk[z < lo] - low) <= low * 0.1)
    order = np.argsort(z, kind="stable")
    assert (np.diff(risk[order]) >= 0).all()
    assert len(np.unique(risk.astype(np.float64).round(9))) == len(np.unique(z.round(5)))  # no new ties
    assert np.allclose(again.predict(x)["dia"], risk, atol=1e-7)
