"""Metrics as summable sufficient statistics, checked against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    mean_absolute_error,
    mean_squared_error,
    roc_auc_score,
)

from fedmtl.models import TaskSpec
from fedmtl.models.metrics import (
    EVAL_N_BINS,
    Accuracy,
    BinnedAUPRC,
    BinnedAUROC,
    BrierScore,
    Calibration,
    RegressionError,
    TaskMetrics,
    evaluation_metrics,
    flatten_state,
    sum_states,
    unflatten_state,
)


def _binary(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    s = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 1.2 * y - 0.5)))
    return s, y


def _multiclass(n=2000, C=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    logits = rng.normal(0, 1, (n, C)) + 1.5 * np.eye(C)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return p, y


def test_binned_auroc_is_exact_on_binned_scores_and_within_tie_bound_of_raw():
    # Prepare
    s, y = _binary()
    m = BinnedAUROC(n_bins=1000)
    # Execute
    auc = m.update(s, y).compute()
    # Assert
    binned = np.floor(s * 1000)
    assert auc == pytest.approx(roc_auc_score(y, binned), abs=1e-12)
    bound = m.tie_bound()[0]
    assert 0 < bound < 0.002
    assert abs(auc - roc_auc_score(y, s)) <= bound


def test_binned_auprc_is_exact_on_binned_scores_and_close_to_raw():
    # Prepare
    s, y = _binary(seed=1)
    m = BinnedAUPRC(n_bins=1000)
    # Execute
    ap = m.update(s, y).compute()
    # Assert
    assert ap == pytest.approx(average_precision_score(y, np.floor(s * 1000)), abs=1e-12)
    assert ap == pytest.approx(average_precision_score(y, s), abs=0.01)


def test_multiclass_auroc_is_macro_one_vs_rest():
    # Prepare
    p, y = _multiclass()
    m = BinnedAUROC(n_classes=3, n_bins=1000)
    # Execute
    m.update(p, y)
    # Assert
    ref = roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert abs(m.compute() - ref) <= m.tie_bound().max()
    per = m.per_class()
    for c in range(3):
        assert per[c] == pytest.approx(roc_auc_score(y == c, p[:, c]), abs=m.tie_bound()[c] + 1e-12)


def test_summed_site_states_equal_the_pooled_metric():
    # Prepare: three sites of different sizes
    s, y = _binary(3000, seed=2)
    parts = np.split(np.arange(3000), [500, 1700])
    pooled = BinnedAUROC().update(s, y)
    # Execute
    states = [BinnedAUROC().update(s[i], y[i]).state() for i in parts]
    summed = sum_states(states)
    # Assert
    assert np.array_equal(summed["pos"], pooled.state()["pos"])
    assert BinnedAUROC().compute(summed) == pooled.compute()
    vec = flatten_state(summed)
    back = unflatten_state(vec, BinnedAUROC().state_shapes())
    assert BinnedAUROC().compute(back) == pooled.compute()
    merged = BinnedAUROC()
    for st in states:
        merged.merge(st)
    assert merged.compute() == pooled.compute()


def test_masked_samples_are_ignored():
    # Prepare
    s, y = _binary(500)
    mask = np.arange(500) % 3 != 0
    y_garbage = y.copy()
    y_garbage[~mask] = 7  # unlabelled entries hold junk
    # Execute
    a = Accuracy().update(s, y_garbage, mask).compute()
    auc = BinnedAUROC().update(s, y_garbage, mask).compute()
    # Assert
    assert a == pytest.approx(accuracy_score(y[mask], s[mask] >= 0.5))
    assert auc == pytest.approx(roc_auc_score(y[mask], np.floor(s[mask] * 1000)))


def test_accuracy_and_brier_match_sklearn():
    # Prepare
    s, y = _binary(seed=3)
    p, yc = _multiclass(seed=3)
    # Execute / Assert
    assert Accuracy().update(s, y).compute() == pytest.approx(accuracy_score(y, s >= 0.5))
    assert Accuracy().update(p, yc).compute() == pytest.approx(accuracy_score(yc, p.argmax(1)))
    assert BrierScore().update(s, y).compute() == pytest.approx(brier_score_loss(y, s))
    onehot = np.eye(3)[yc]
    assert BrierScore().update(p, yc).compute() == pytest.approx(((p - onehot) ** 2).sum(1).mean())


def test_regression_error_matches_sklearn():
    # Prepare
    rng = np.random.default_rng(4)
    y = rng.normal(10, 3, 400)
    pred = y + rng.normal(0, 1, 400)
    # Execute
    r = RegressionError().update(pred, y).compute()
    # Assert
    assert r["mae"] == pytest.approx(mean_absolute_error(y, pred))
    assert r["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y, pred)))


def test_task_metrics_collects_every_task_in_one_flat_state():
    # Prepare
    tasks = [
        TaskSpec("a", "binary", "a"),
        TaskSpec("b", "multiclass", "b", classes=("x", "y", "z")),
        TaskSpec("c", "regression", "c"),
    ]
    s, y = _binary(600)
    p, yc = _multiclass(600)
    reg = np.linspace(0, 1, 600)
    Y = np.stack([y, yc, reg], 1).astype(np.float32)
    mask = np.ones((600, 3), dtype=bool)
    mask[::2, 2] = False
    preds = {"a": s, "b": p, "c": reg + 0.1}
    tm = TaskMetrics(tasks, n_bins=200)
    # Execute
    st = tm.update(preds, Y, mask).state()
    res = TaskMetrics(tasks, n_bins=200).compute(unflatten_state(flatten_state(st), tm.state_shapes()))
    # Assert
    assert set(res) == {"a", "b", "c"}
    assert set(res["a"]) == {"auroc", "auprc", "accuracy", "brier", "n"} and res["a"]["n"] == 600
    assert res["c"]["mae"] == pytest.approx(0.1) and res["c"]["n"] == 300
    assert res["b"]["auroc"] == pytest.approx(roc_auc_score(yc, p, multi_class="ovr"), abs=0.01)


def test_metrics_reject_bad_inputs_and_mismatched_states():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        BinnedAUROC().update(np.array([0.2, 1.5]), np.array([0, 1]))
    with pytest.raises(ValueError, match="n_classes"):
        BinnedAUROC(n_classes=2)
    with pytest.raises(ValueError, match="shape"):
        BinnedAUROC(n_bins=10).compute({"pos": np.zeros((1, 20)), "neg": np.zeros((1, 20))})
    with pytest.raises(ValueError, match="different keys"):
        sum_states([{"a": np.zeros(1)}, {"b": np.zeros(1)}])
    with pytest.raises(ValueError, match=r"need \(2,\)"):
        unflatten_state(np.zeros(3), {"a": (2,)})
    assert np.isnan(BinnedAUROC().update(np.array([0.3, 0.6]), np.array([1, 1])).compute())


def _bunched(n=3500, seed=0, spread=0.02, centre=0.2, signal=0.6):
    """Scores like a DP-trained model's: every P(y=1) within a few hundredths of ``centre``."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < centre).astype(int)
    z = rng.normal(0, 1, n) + signal * y
    logit0 = np.log(centre / (1 - centre))
    s = 1 / (1 + np.exp(-(logit0 + spread * 4 * z)))
    return s.astype(np.float32).astype(float), y


@pytest.mark.parametrize("spread", [0.002, 0.02, 0.3])
def test_logit_scale_auroc_is_within_0002_of_sklearn_also_on_bunched_scores(spread):
    # Prepare: scores bunched within ~spread of 0.2 (DP-like) up to well spread ones
    s, y = _bunched(spread=spread)
    # Execute
    fine = BinnedAUROC(n_bins=EVAL_N_BINS, scale="logit").update(s, y)
    linear = BinnedAUROC(n_bins=1000).update(s, y)
    # Assert: the logit-scale histogram is exact on its binned scores and close to the raw ones
    ref = roc_auc_score(y, s)
    assert abs(fine.compute() - ref) <= 0.002
    assert abs(fine.compute() - ref) <= fine.tie_bound()[0] + 1e-12
    if spread <= 0.02:  # the equal-probability bins cannot rank bunched scores
        assert linear.tie_bound()[0] > 10 * fine.tie_bound()[0]


def test_logit_scale_auprc_is_close_to_sklearn_and_site_states_sum():
    # Prepare
    s, y = _bunched(spread=0.02, seed=3)
    parts = np.array_split(np.arange(s.size), 3)
    # Execute
    states = [BinnedAUPRC(n_bins=EVAL_N_BINS, scale="logit").update(s[i], y[i]).state() for i in parts]
    summed = BinnedAUPRC(n_bins=EVAL_N_BINS, scale="logit").compute(sum_states(states))
    # Assert
    assert summed == pytest.approx(average_precision_score(y, s), abs=0.005)


def test_logit_scale_puts_extreme_scores_in_the_end_bins():
    # Prepare: exact 0 and 1 (a saturated sigmoid) and ordinary scores
    s = np.array([0.0, 1e-30, 0.3, 0.7, 1.0 - 1e-9, 1.0])
    y = np.array([0, 0, 0, 1, 1, 1])
    # Execute
    m = BinnedAUROC(n_bins=100, scale="logit").update(s, y)
    # Assert
    pos, neg = m.state()["pos"][0], m.state()["neg"][0]
    assert neg[0] == 2 and pos[-1] == 2
    assert m.compute() == pytest.approx(1.0)


def test_unknown_scale_is_refused():
    # Execute / Assert
    with pytest.raises(ValueError, match="scale must be one of"):
        BinnedAUROC(scale="log")
    with pytest.raises(ValueError, match="scale must be one of"):
        TaskMetrics([TaskSpec("a", "binary", "a")], scale="probit")


def test_calibration_matches_sklearns_reliability_curve_and_brier():
    # Prepare: miscalibrated scores (too confident)
    s, y = _binary(seed=5)
    # Execute
    cal = Calibration(n_bins=10).update(s, y)
    curve = cal.curve()
    res = cal.compute()
    # Assert: the non-empty bins are sklearn's uniform reliability curve
    prob_true, prob_pred = calibration_curve(y, s, n_bins=10, strategy="uniform")
    got_true = [v for v in curve["observed_rate"] if v is not None]
    got_pred = [v for v in curve["mean_predicted"] if v is not None]
    np.testing.assert_allclose(got_true, prob_true, atol=1e-12)
    np.testing.assert_allclose(got_pred, prob_pred, atol=1e-12)
    assert sum(curve["count"]) == s.size
    assert res["mean_predicted"] == pytest.approx(s.mean())
    assert res["observed_rate"] == pytest.approx(y.mean())
    counts = np.array(curve["count"])
    ok = counts > 0
    ece = (counts[ok] * np.abs(np.array(got_pred) - np.array(got_true))).sum() / counts.sum()
    assert res["ece"] == pytest.approx(ece)


def test_calibration_states_of_sites_sum_to_the_pooled_curve():
    # Prepare
    s, y = _binary(seed=6)
    parts = np.array_split(np.arange(s.size), 4)
    # Execute
    summed = sum_states([Calibration().update(s[i], y[i]).state() for i in parts])
    # Assert
    got, want = Calibration().curve(summed), Calibration().update(s, y).curve()
    for key in want:
        assert [v is None for v in got[key]] == [v is None for v in want[key]], key
        np.testing.assert_allclose([v for v in got[key] if v is not None],
                                   [v for v in want[key] if v is not None], rtol=1e-12, err_msg=key)


def test_calibration_refuses_multiclass_scores_and_bad_bins():
    # Execute / Assert
    p, y = _multiclass()
    with pytest.raises(ValueError, match="binary tasks"):
        Calibration().update(p, y)
    with pytest.raises(ValueError, match="whole number >= 1"):
        Calibration(n_bins=0)


def test_evaluation_metrics_give_auroc_brier_and_calibration_per_binary_task():
    # Prepare
    tasks = [TaskSpec("a", "binary", "a"), TaskSpec("m", "multiclass", "m", classes=("x", "y", "z"))]
    s, y = _bunched(n=2000, spread=0.02)
    p, c = _multiclass(n=2000)
    Y = np.stack([y, c], axis=1).astype(np.float32)
    M = np.ones_like(Y, dtype=bool)
    # Execute
    tm = evaluation_metrics(tasks).update({"a": s, "m": p}, Y, M)
    res = tm.compute()
    # Assert
    assert abs(res["a"]["auroc"] - roc_auc_score(y, s)) <= 0.002
    assert res["a"]["brier"] == pytest.approx(brier_score_loss(y, s))
    assert {"mean_predicted", "observed_rate", "ece"} <= set(res["a"])
    assert "ece" not in res["m"]  # calibration is for binary tasks
    assert set(tm.reliability()) == {"a"}


def test_finite_predictions_make_every_score_valid_the_same_way():
    from fedmtl.models.metrics import finite_predictions
    from fedmtl.privacy.eval_release import eval_metrics

    # Prepare: what a model whose weights overflow predicts (NaN, +-inf, out of range)
    tasks = [TaskSpec("b", "binary", "b"), TaskSpec("m", "multiclass", "m", classes=("x", "y", "z")),
             TaskSpec("r", "regression", "r", shift=10.0, scale=5.0)]
    nan, inf = float("nan"), float("inf")
    raw = {"b": np.array([0.2, nan, inf, -inf, 1.5], dtype=np.float32),
           "m": np.array([[0.2, 0.3, 0.5], [nan, nan, nan], [inf, 0.0, 0.0], [0.1, 0.1, 0.8], [1, 0, 0]]),
           "r": np.array([12.0, nan, inf, -inf, 100.0])}
    Y = np.array([[1, 0, 11.0], [0, 1, 9.0], [1, 2, 10.0], [0, 2, 14.0], [1, 0, 6.0]])
    mask = np.ones((5, 3), dtype=bool)
    with pytest.raises(ValueError):
        eval_metrics(tasks, n_bins=10).update(raw, Y, mask)  # what the datasite did before
    # Execute
    out = finite_predictions(raw, tasks)
    # Assert
    assert out["b"].tolist() == [pytest.approx(0.2), 0.5, 1.0, 0.0, 1.0]
    assert out["m"][1].tolist() == [pytest.approx(1 / 3)] * 3 and out["m"][2].tolist() == [pytest.approx(1 / 3)] * 3
    assert out["m"][0].tolist() == pytest.approx([0.2, 0.3, 0.5])
    assert out["r"].tolist() == [12.0, 10.0, 15.0, 5.0, 15.0]
    assert all(np.isfinite(v).all() and v.dtype == np.float64 for v in out.values())
    assert raw["b"][1] != raw["b"][1]  # the input is left as it was
    tm = eval_metrics(tasks, n_bins=10).update(out, Y, mask)
    assert all(np.isfinite(v).all() for v in tm.state().values())
