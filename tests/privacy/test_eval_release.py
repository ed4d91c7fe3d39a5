"""DP release of evaluation statistics: the sensitivity bound, the noise, the accounting."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from fedmtl.contract import protocol
from fedmtl.models import TaskSpec
from fedmtl.models.metrics import RegressionError, TaskMetrics, flatten_state
from fedmtl.privacy.accounting import RDP_ORDERS, PrivacyRecord, epsilon_of
from fedmtl.privacy.eval_release import (
    REGRESSION_CLIP_SCALES,
    ReleaseStatistics,
    eval_metrics,
    metric_scales,
    noise_statistics,
    privacy_record,
    regression_clips,
    sensitivity,
)

DELTA = 1e-5
N_BINS = 20

BIN = TaskSpec(name="dia", kind="binary", label="dia")
BIN2 = TaskSpec(name="htn", kind="binary", label="htn")
MC3 = TaskSpec(name="stage", kind="multiclass", label="stage", classes=("F0", "F1", "F2"))
MC4 = TaskSpec(name="grade", kind="multiclass", label="grade", classes=("a", "b", "c", "d"))
REG = TaskSpec(name="alt", kind="regression", label="alt", shift=30.0, scale=30.0)
REG1 = TaskSpec(name="ldl", kind="regression", label="ldl")
ALL = [BIN, MC3, REG, BIN2, MC4, REG1]


def _random_case(tasks, n, rng):
    """Predictions, labels and masks like MultiTaskNet.predict + labels_of would give,
    with a few extreme scores (exact 0/1, bin edges) and wild regression predictions."""
    Y = np.zeros((n, len(tasks)))
    M = rng.random((n, len(tasks))) < 0.8
    pred = {}
    for j, t in enumerate(tasks):
        if t.kind == "binary":
            Y[:, j] = rng.integers(0, 2, n)
            s = rng.random(n)
            s[rng.random(n) < 0.2] = rng.choice([0.0, 1.0, 0.5, 0.05, 0.95])
            pred[t.name] = s
        elif t.kind == "multiclass":
            C = t.out_dim
            Y[:, j] = rng.integers(0, C, n)
            logits = rng.normal(0, 1, (n, C)) * rng.choice([0.1, 1.0, 30.0])
            p = np.exp(logits - logits.max(1, keepdims=True))
            pred[t.name] = p / p.sum(1, keepdims=True)
        else:
            Y[:, j] = t.shift + t.scale * rng.uniform(-1, 1, n)
            out = t.shift + t.scale * rng.normal(0, 1, n) * rng.choice([0.5, 3.0, 1e6])
            out[rng.random(n) < 0.05] = rng.choice([np.nan, np.inf, -np.inf])
            pred[t.name] = out
    return pred, Y, M


def _stats(tasks, pred, Y, M, *, n_bins=N_BINS, metrics=None, fit=None):
    """The released vector, the records where ``fit`` is True in the training
    (calibration) split, the rest in the test split (default: every third record from the third);
    ``metrics`` (a TaskMetrics class) instead: its plain state."""
    if metrics is not None:
        tm = metrics(tasks, n_bins=n_bins)
        tm.update(pred, Y, M)
        return flatten_state(tm.state())
    fit = np.arange(Y.shape[0]) % 3 == 2 if fit is None else fit
    rel = ReleaseStatistics(tasks, n_bins=n_bins, calibration=True)
    rel.update({k: v[~fit] for k, v in pred.items()}, Y[~fit], M[~fit])
    rel.update_calibration({k: v[fit] for k, v in pred.items()}, Y[fit], M[fit])
    return rel.vector()


def _drop(pred, Y, M, i):
    keep = np.arange(Y.shape[0]) != i
    return {k: v[keep] for k, v in pred.items()}, Y[keep], M[keep]


def _scaled_change(tasks, case, i, n_bins=N_BINS):
    pred, Y, M = case
    fit = np.arange(Y.shape[0]) % 3 == 2  # record i stays in its split when another is dropped
    full = _stats(tasks, pred, Y, M, n_bins=n_bins, fit=fit)
    less = _stats(tasks, *_drop(pred, Y, M, i), n_bins=n_bins, fit=np.delete(fit, i))
    return float(np.linalg.norm((full - less) / metric_scales(tasks, n_bins=n_bins, calibration=True)))


# -- the sensitivity bound ------------------------------------------------------
@pytest.mark.parametrize(
    "tasks", [[BIN], [MC3], [REG], [BIN, BIN2], ALL], ids=["binary", "multiclass", "regression", "two-binary", "mixed"]
)
def test_one_record_moves_the_scaled_statistics_by_at_most_the_sensitivity(tasks):
    # Prepare
    rng = np.random.default_rng(7)
    bound = sensitivity(tasks)
    worst = 0.0
    # Execute: remove every record of many random sets (= add it to the rest)
    for _ in range(40):
        case = _random_case(tasks, int(rng.integers(1, 25)), rng)
        for i in range(case[1].shape[0]):
            worst = max(worst, _scaled_change(tasks, case, i))
    # Assert
    assert 0 < worst <= bound + 1e-9


def test_worst_case_records_stay_within_the_bound_and_regression_is_tight():
    # Prepare: one record labelled for every task, as wrong as it can be
    tasks = ALL
    pred = {
        "dia": np.array([0.0]),  # y=1 scored 0: brier 1, incorrect
        "htn": np.array([0.5]),  # y=1 scored 0.5: correct, brier 0.25
        "stage": np.array([[0.0, 1.0, 0.0]]),  # y=0 all mass elsewhere: brier 2
        "grade": np.array([[0.0, 0.0, 0.0, 1.0]]),
        "alt": np.array([1e12]),  # error far beyond the clip
        "ldl": np.array([np.nan]),  # non-finite prediction counts as the clip
    }
    Y = np.array([[1.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    M = np.ones((1, 6), dtype=bool)
    # Execute
    per_task = {t.name: _scaled_change([t], ({t.name: pred[t.name]}, Y[:, [j]], M[:, [j]]), 0) for j, t in enumerate(tasks)}
    together = _scaled_change(tasks, (pred, Y, M), 0)
    # Assert
    assert per_task["alt"] == pytest.approx(math.sqrt(3)) and per_task["ldl"] == pytest.approx(math.sqrt(3))
    assert per_task["dia"] == pytest.approx(1.0) and per_task["htn"] == pytest.approx(1.0)
    assert per_task["stage"] <= math.sqrt(2 * 3 + 4) and per_task["grade"] <= math.sqrt(2 * 4 + 4)
    assert together <= sensitivity(tasks) + 1e-9
    assert together == pytest.approx(math.sqrt(sum(v * v for v in per_task.values())))


def test_sensitivity_sums_the_per_task_bounds():
    assert sensitivity([BIN]) == pytest.approx(1.0)
    assert sensitivity([MC3]) == pytest.approx(math.sqrt(10))
    assert sensitivity([REG]) == pytest.approx(math.sqrt(3))
    assert sensitivity([BIN] * 1 + [BIN2]) == pytest.approx(math.sqrt(2))
    assert sensitivity(ALL) == pytest.approx(math.sqrt(1 + 10 + 3 + 1 + 12 + 3))
    with pytest.raises(ValueError):
        sensitivity([])


def test_unclipped_regression_statistics_would_break_the_bound():
    # Prepare: the plain TaskMetrics (no clip) on a wild prediction
    case = ({"alt": np.array([1e6, 1.0])}, np.array([[0.0], [0.0]]), np.ones((2, 1), dtype=bool))
    full = _stats([REG], *case, metrics=TaskMetrics)
    less = _stats([REG], *_drop(*case, 0), metrics=TaskMetrics)
    # Execute
    change = np.linalg.norm((full - less) / metric_scales([REG], n_bins=N_BINS))
    # Assert: why eval_metrics clips
    assert change > 100 * sensitivity([REG])


def test_scales_follow_the_flattened_state_order():
    # Prepare: a state whose every entry names its own key
    tasks = ALL
    shapes = ReleaseStatistics(tasks, n_bins=N_BINS, calibration=True).state_shapes()
    keys = sorted(shapes)
    marked = flatten_state({k: np.full(shapes[k], float(i)) for i, k in enumerate(keys)})
    # Execute
    w = metric_scales(tasks, n_bins=N_BINS, calibration=True)
    # Assert
    assert w.shape == marked.shape
    assert metric_scales(tasks, n_bins=protocol.N_BINS).size == protocol.metric_size(tasks)
    assert w.size == protocol.metric_size(tasks, calibration=True)
    assert {"dia/fit/pos", "dia/test/neg", "htn/fit/neg"} <= set(keys)
    clips = regression_clips(tasks)
    assert clips == {"alt": REGRESSION_CLIP_SCALES * 30.0, "ldl": REGRESSION_CLIP_SCALES * 1.0}
    expect = {
        "alt/regression/abs_err": clips["alt"],
        "alt/regression/sq_err": clips["alt"] ** 2,
        "ldl/regression/abs_err": clips["ldl"],
        "ldl/regression/sq_err": clips["ldl"] ** 2,
        "stage/brier/sq_err": 3.0,
        "grade/brier/sq_err": 4.0,
    }
    for i, k in enumerate(keys):
        assert np.all(w[marked == i] == expect.get(k, 1.0)), k


# -- the clip option of the metrics -----------------------------------------------
def test_regression_clip_caps_errors_and_default_is_unchanged():
    # Prepare
    s, y = np.array([0.0, 5.0, np.inf, np.nan]), np.array([1.0, 0.0, 0.0, 0.0])
    # Execute
    exact = RegressionError().update(s[:2], y[:2]).state()
    clipped = RegressionError(clip=2.0).update(s, y).state()
    # Assert
    assert exact["abs_err"] == 6.0 and exact["sq_err"] == 26.0 and exact["total"] == 2.0
    assert clipped["abs_err"] == 1 + 2 + 2 + 2 and clipped["sq_err"] == 1 + 4 + 4 + 4 and clipped["total"] == 4
    with pytest.raises(ValueError, match="clip"):
        RegressionError(clip=0.0)
    with pytest.raises(ValueError, match="clip"):
        RegressionError(clip=float("nan"))
    with pytest.raises(ValueError, match="not regression tasks"):
        TaskMetrics([BIN, REG], clip={"dia": 1.0})
    assert eval_metrics([REG], n_bins=N_BINS).metrics["alt"]["regression"].clip == 60.0


# -- the noise ----------------------------------------------------------------------
def test_noise_has_the_calibrated_std_per_coordinate():
    # Prepare
    tasks = [BIN, MC3, REG]
    sigma = 1.7
    w = metric_scales(tasks, n_bins=10)
    vec = np.abs(np.random.default_rng(1).normal(50, 10, w.shape))
    rng = np.random.default_rng(2024)  # fixed in the test only
    # Execute
    draws = np.stack([noise_statistics(vec, tasks, n_bins=10, noise_multiplier=sigma, rng=rng) for _ in range(4000)])
    z = (draws - vec) / (w * sigma * sensitivity(tasks))
    # Assert: unit normal per coordinate
    assert np.all(np.abs(z.mean(axis=0)) < 0.08)
    assert np.all(np.abs(z.std(axis=0) - 1) < 0.06)
    assert abs(z.std() - 1) < 0.01
    corr = np.corrcoef(z[:, :6].T)
    assert np.all(np.abs(corr - np.eye(6)) < 0.08)


def test_default_generator_is_fresh_each_call():
    # Prepare
    tasks = [BIN]
    vec = np.zeros(metric_scales(tasks, n_bins=N_BINS).shape)
    # Execute
    np.random.seed(0)
    a = noise_statistics(vec, tasks, n_bins=N_BINS, noise_multiplier=1.0)
    np.random.seed(0)
    b = noise_statistics(vec, tasks, n_bins=N_BINS, noise_multiplier=1.0)
    # Assert: not numpy's global state, not a fixed seed
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), -float("inf"), True, "2", None])
def test_bad_noise_multipliers_are_refused(bad):
    vec = np.zeros(metric_scales([BIN], n_bins=N_BINS).shape)
    with pytest.raises(ValueError, match="noise_multiplier"):
        noise_statistics(vec, [BIN], n_bins=N_BINS, noise_multiplier=bad)
    with pytest.raises(ValueError, match="noise_multiplier"):
        privacy_record(bad)


def test_wrong_or_non_finite_vectors_are_refused():
    n = metric_scales([BIN], n_bins=N_BINS).size
    with pytest.raises(ValueError, match="shape"):
        noise_statistics(np.zeros(n + 1), [BIN], n_bins=N_BINS, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="shape"):  # the calibration histograms are missing
        noise_statistics(np.zeros(n), [BIN], n_bins=N_BINS, calibration=True, noise_multiplier=1.0)
    m = metric_scales([MC3], n_bins=N_BINS).size
    with pytest.raises(ValueError, match="shape"):  # a multiclass task's bins are the spec's
        noise_statistics(np.zeros(m), [MC3], n_bins=N_BINS + 1, noise_multiplier=1.0)
    bad = np.zeros(n)
    bad[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        noise_statistics(bad, [BIN], n_bins=N_BINS, noise_multiplier=1.0)


# -- the accounting ---------------------------------------------------------------------
def _analytic_rdp_epsilon(sigma: float, delta: float) -> float:
    """The Gaussian mechanism's RDP alpha/(2 sigma^2), converted at the best order as
    Opacus does (Balle et al. 2020, Thm 21)."""
    return min(
        a / (2 * sigma**2) - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a) for a in RDP_ORDERS
    )


def _exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """The tight (epsilon, delta) of the Gaussian mechanism (Balle & Wang 2018), by bisection."""

    def phi(x):
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def delta_of(eps):
        return phi(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * phi(-1 / (2 * sigma) - eps * sigma)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("sigma", [0.8, 1.0, 2.0, 5.0, 10.0])
def test_privacy_record_is_the_gaussian_mechanism(sigma):
    # Execute
    rec = privacy_record(sigma)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the best order may sit at the end of the grid
        eps = epsilon_of([rec], delta=DELTA)
        eps_prv = epsilon_of([rec], delta=DELTA, accountant="prv")  # q=1: Opacus warns on log(1-q)
    # Assert
    assert rec == PrivacyRecord(noise_multiplier=sigma, sample_rate=1.0, steps=1) and not rec.is_free
    assert eps == pytest.approx(_analytic_rdp_epsilon(sigma, DELTA), rel=1e-9)
    simple = min(a / (2 * sigma**2) + math.log(1 / DELTA) / (a - 1) for a in RDP_ORDERS)  # Mironov's conversion
    exact = _exact_gaussian_epsilon(sigma, DELTA)
    assert exact <= eps <= simple
    assert exact <= eps_prv <= exact + 0.011  # PRV is tight up to its eps_error 0.01


def test_releases_compose_with_training_records():
    # Prepare
    train = [PrivacyRecord(1.1, 0.01, 300)]
    # Execute
    both = epsilon_of(train + [privacy_record(2.0)] * 3, delta=DELTA)
    # Assert
    assert both > epsilon_of(train, delta=DELTA)
    assert both == pytest.approx(epsilon_of(train + [PrivacyRecord(2.0, 1.0, 3)], delta=DELTA))


# -- after the noise: the researcher's compute step ----------------------------------------
def test_noisy_realistic_split_gives_auroc_in_unit_interval():
    # Prepare: 3000 test records, 5 binary tasks, the protocol's bins, sigma 2
    rng = np.random.default_rng(3)
    tasks = [TaskSpec(name=f"t{i}", kind="binary", label=f"t{i}") for i in range(5)]
    n = 3000
    Y = (rng.random((n, 5)) < 0.12).astype(float)
    M = rng.random((n, 5)) < 0.95
    pred = {t.name: 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 1.5 * Y[:, j] - 1.5))) for j, t in enumerate(tasks)}
    tm = protocol.task_metrics(tasks)
    tm.update(pred, Y, M)
    vec = protocol.metric_vector(tm)
    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(5):
            noisy = noise_statistics(vec, tasks, n_bins=protocol.N_BINS, noise_multiplier=2.0, rng=np.random.default_rng(seed))
            out = protocol.compute_metrics(noisy, tasks)
            # Assert
            for t in tasks:
                assert 0.0 <= out[t.name]["auroc"] <= 1.0
                assert 0.0 <= out[t.name]["auprc"] <= 1.0
                assert math.isfinite(out[t.name]["accuracy"]) and out[t.name]["brier"] >= 0


def test_compute_copes_with_tiny_noisy_splits_of_every_kind():
    # Prepare: 3 records, heavy noise: totals, sums and bins go negative before clamping
    rng = np.random.default_rng(5)
    tasks = [BIN, MC3, REG]
    pred, Y, M = _random_case(tasks, 3, rng)
    tm = protocol.task_metrics(tasks)
    tm.update(pred, Y, M)
    vec = protocol.metric_vector(tm)
    # Execute / Assert: no crash, no division warning, values in range or NaN
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(30):
            noisy = noise_statistics(vec, tasks, n_bins=protocol.N_BINS, noise_multiplier=5.0, rng=np.random.default_rng(seed))
            out = protocol.compute_metrics(noisy, tasks)
            for name in ("dia", "stage"):
                for m in ("auroc", "auprc"):
                    v = out[name][m]
                    assert math.isnan(v) or 0.0 <= v <= 1.0
                assert math.isnan(out[name]["brier"]) or out[name]["brier"] >= 0
            assert math.isnan(out["alt"]["rmse"]) or out["alt"]["rmse"] >= 0
            assert math.isnan(out["alt"]["mae"]) or out["alt"]["mae"] >= 0
