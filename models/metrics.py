"""Metrics as sufficient statistics + a compute step (torchmetrics style).

Each metric keeps a *state*: a dict of float64 numpy arrays of fixed shape that are
**sums** over samples. States from several sites add up elementwise
(:func:`sum_states`), so they can be summed under secure aggregation and the metric
computed from the sum alone. ``flatten_state`` / ``unflatten_state`` turn a state into
one vector and back, in a fixed order (sorted keys).

Every metric ignores samples whose label is missing (``mask`` False).

Binned ranking metrics (AUROC, AUPRC) keep per-class histograms of scores in
``n_bins`` bins, split by label. ``scale="linear"`` (default) makes equal bins over
[0, 1]; ``scale="logit"`` makes equal bins over the log-odds ``log(p / (1 - p))`` in
[-``LOGIT_RANGE``, ``LOGIT_RANGE``] (scores beyond fall in the end bins). Models whose
scores bunch (DP-trained ones often keep every P(y=1) within a few hundredths) put most
records in a handful of equal-probability bins; on the logit scale the bins are narrow
exactly where the scores are dense, so the same statistics (plain counts, summable
under secure aggregation) rank them far more finely. From the histograms they compute
the *exact* AUROC / average precision of the scores rounded down to their bin (ties
within a bin count one half for AUROC, as scikit-learn counts ties). Against
scikit-learn on the raw scores:

* AUROC differs by at most ``0.5 * sum_b pos_b * neg_b / (P * N)`` (the share of
  positive/negative pairs that fall in the same bin, halved) -- :meth:`BinnedAUROC.tie_bound`.
* AUPRC differs by a few 1e-3 for 1000 bins on smooth score distributions (no closed
  bound; the tests use 0.01).

Accuracy, Brier score, MAE and RMSE are exact (sums of per-sample terms).

:class:`Calibration` (binary tasks) keeps, per equal-probability bin, the count, the
sum of predicted probabilities and the sum of labels: from their sums it gives the mean
predicted probability against the observed rate (calibration-in-the-large), the
expected calibration error and the reliability curve (:meth:`Calibration.curve`).

:func:`evaluation_metrics` is the one evaluator for comparing models on held-out records
(the demo and every baseline use it): logit-scale AUROC/AUPRC with ``EVAL_N_BINS`` bins
(within 0.002 of scikit-learn on the demo's models, DP or not), Brier score and a
``EVAL_CALIBRATION_BINS``-bin reliability curve. The statistics the datasites *release*
are another, coarser and noised, set (:mod:`fedmtl.privacy.eval_release`).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from fedmtl.models.tasks import TaskSpec

State = dict[str, np.ndarray]


def _as_np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _select(scores, y, mask) -> tuple[np.ndarray, np.ndarray]:
    s, t = _as_np(scores).astype(float), _as_np(y)
    if mask is not None:
        m = _as_np(mask).astype(bool)
        if m.shape[0] != s.shape[0]:
            raise ValueError(f"mask has {m.shape[0]} entries for {s.shape[0]} scores")
        s, t = s[m], t[m]
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"{s.shape[0]} scores but {t.shape[0]} labels")
    return s, t


class Metric:
    """Base: ``update`` adds to the state, ``compute`` reads a (possibly summed) state."""

    name = "metric"

    def __init__(self) -> None:
        self._state: State = {k: np.zeros(shape) for k, shape in self.state_shapes().items()}

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def update(self, scores, y, mask=None) -> "Metric":
        raise NotImplementedError

    def state(self) -> State:
        """A copy of the current state."""
        return {k: v.copy() for k, v in self._state.items()}

    def merge(self, other: Mapping[str, np.ndarray]) -> "Metric":
        """Add another party's state to this one."""
        self._check(other)
        for k in self._state:
            self._state[k] = self._state[k] + np.asarray(other[k], dtype=float)
        return self

    def reset(self) -> "Metric":
        for k in self._state:
            self._state[k] = np.zeros_like(self._state[k])
        return self

    def _check(self, state: Mapping[str, np.ndarray]) -> None:
        shapes = self.state_shapes()
        if set(state) != set(shapes):
            raise ValueError(f"{self.name} state needs keys {sorted(shapes)}, got {sorted(state)}")
        for k, shp in shapes.items():
            if np.shape(state[k]) != shp:
                raise ValueError(f"{self.name} state[{k!r}] must have shape {shp}, got {np.shape(state[k])}")

    def compute(self, state: Mapping[str, np.ndarray] | None = None):
        """The metric from ``state`` (default: this object's own state)."""
        st = self._state if state is None else state
        self._check(st)
        return self._compute({k: np.asarray(v, dtype=float) for k, v in st.items()})

    def _compute(self, st: State):
        raise NotImplementedError


def sum_states(states: Sequence[Mapping[str, np.ndarray]]) -> State:
    """Elementwise sum of several parties' states (same keys and shapes)."""
    if not states:
        raise ValueError("no states to sum")
    keys = set(states[0])
    for s in states[1:]:
        if set(s) != keys:
            raise ValueError(f"states have different keys: {sorted(keys)} vs {sorted(s)}")
    return {k: np.sum([np.asarray(s[k], dtype=float) for s in states], axis=0) for k in sorted(keys)}


def flatten_state(state: Mapping[str, np.ndarray]) -> np.ndarray:
    """One float64 vector: the arrays of ``state`` in sorted-key order, row-major."""
    return np.concatenate([np.asarray(state[k], dtype=float).reshape(-1) for k in sorted(state)]) if state else np.zeros(0)


def unflatten_state(vec: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> State:
    """Inverse of :func:`flatten_state` given the state's shapes."""
    vec = np.asarray(vec, dtype=float)
    need = sum(int(np.prod(shapes[k])) for k in shapes)
    if vec.shape != (need,):
        raise ValueError(f"vector has shape {vec.shape}; these shapes need ({need},)")
    out, pos = {}, 0
    for k in sorted(shapes):
        n = int(np.prod(shapes[k]))
        out[k] = vec[pos : pos + n].reshape(shapes[k])
        pos += n
    return out


# -- ranking metrics -----------------------------------------------------------
#: bin scales of the ranking metrics
SCALES = ("linear", "logit")
#: the logit scale spans log-odds in [-LOGIT_RANGE, LOGIT_RANGE] (P in [1.1e-7, 1 - 1.1e-7])
LOGIT_RANGE = 16.0


def _check_probabilities(scores: np.ndarray) -> None:
    if scores.size and (np.isnan(scores).any() or scores.min() < 0 or scores.max() > 1):
        raise ValueError("scores must be probabilities in [0, 1] (apply a sigmoid/softmax first)")


def _bin(scores: np.ndarray, n_bins: int, scale: str = "linear") -> np.ndarray:
    _check_probabilities(scores)
    if scale == "logit":
        p = np.clip(scores.astype(np.float64), 1e-300, 1.0)
        with np.errstate(divide="ignore"):
            z = np.log(p) - np.log1p(-np.minimum(p, 1.0 - 1e-16))
        u = (z + LOGIT_RANGE) / (2.0 * LOGIT_RANGE)
        return np.clip(np.floor(u * n_bins), 0, n_bins - 1).astype(int)
    return np.minimum((scores * n_bins).astype(int), n_bins - 1)


def _check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {list(SCALES)}, got {scale!r}")
    return scale


class _BinnedRanking(Metric):
    """Per-class positive/negative score histograms; binary = 1 class."""

    def __init__(self, *, n_classes: int = 1, n_bins: int = 1000, scale: str = "linear") -> None:
        if n_classes < 1 or n_classes == 2:
            raise ValueError("n_classes is 1 for a binary task (scores = P(y=1)) or >= 3 for multiclass")
        if n_bins < 2:
            raise ValueError(f"n_bins must be >= 2, got {n_bins}")
        self.n_classes, self.n_bins, self.scale = n_classes, n_bins, _check_scale(scale)
        super().__init__()

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"pos": (self.n_classes, self.n_bins), "neg": (self.n_classes, self.n_bins)}

    def update(self, scores, y, mask=None) -> "Metric":
        """Binary: ``scores`` (n,) P(y=1), ``y`` 0/1. Multiclass: ``scores`` (n, C)
        class probabilities, ``y`` class indices (one-vs-rest per class)."""
        s, t = _select(scores, y, mask)
        if self.n_classes == 1:
            s = s.reshape(-1, 1)
            onehot = (t.reshape(-1, 1) == 1)
        else:
            if s.ndim != 2 or s.shape[1] != self.n_classes:
                raise ValueError(f"multiclass scores must be (n, {self.n_classes}), got {s.shape}")
            onehot = t.astype(int).reshape(-1, 1) == np.arange(self.n_classes)
        b = _bin(s, self.n_bins, self.scale)
        for c in range(self.n_classes):
            self._state["pos"][c] += np.bincount(b[onehot[:, c], c], minlength=self.n_bins)
            self._state["neg"][c] += np.bincount(b[~onehot[:, c], c], minlength=self.n_bins)
        return self

    def _per_class(self, st: State) -> np.ndarray:
        raise NotImplementedError

    def _compute(self, st: State) -> float:
        """Binary: the metric. Multiclass: macro average over classes that have both
        positives and negatives (NaN if none)."""
        vals = self._per_class(st)
        ok = ~np.isnan(vals)
        return float(vals[ok].mean()) if ok.any() else float("nan")

    def per_class(self, state: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        st = self._state if state is None else state
        self._check(st)
        return self._per_class({k: np.asarray(v, dtype=float) for k, v in st.items()})


class BinnedAUROC(_BinnedRanking):
    """Area under the ROC curve from binned score histograms (one-vs-rest for multiclass)."""

    name = "auroc"

    def _per_class(self, st: State) -> np.ndarray:
        out = np.full(self.n_classes, np.nan)
        for c in range(self.n_classes):
            pos, neg = st["pos"][c], st["neg"][c]
            P, N = pos.sum(), neg.sum()
            if P == 0 or N == 0:
                continue
            neg_below = np.cumsum(neg) - neg  # negatives in strictly lower bins
            out[c] = float((pos * (neg_below + 0.5 * neg)).sum() / (P * N))
        return out

    def tie_bound(self, state: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Per class: the largest possible gap to the AUROC of the unbinned scores."""
        st = self._state if state is None else state
        P, N = st["pos"].sum(axis=1), st["neg"].sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return 0.5 * (np.asarray(st["pos"]) * np.asarray(st["neg"])).sum(axis=1) / (P * N)


class BinnedAUPRC(_BinnedRanking):
    """Average precision (area under the precision-recall curve, step-wise as in
    scikit-learn's ``average_precision_score``) from binned score histograms."""

    name = "auprc"

    def _per_class(self, st: State) -> np.ndarray:
        out = np.full(self.n_classes, np.nan)
        for c in range(self.n_classes):
            pos, neg = st["pos"][c][::-1], st["neg"][c][::-1]  # high scores first
            P = pos.sum()
            if P == 0:
                continue
            tp, fp = np.cumsum(pos), np.cumsum(neg)
            keep = (pos + neg) > 0  # thresholds that exist
            tp, fp, dtp = tp[keep], fp[keep], pos[keep]
            precision = tp / (tp + fp)
            out[c] = float((dtp / P * precision).sum())
        return out


# -- pointwise metrics ---------------------------------------------------------
class Accuracy(Metric):
    """Share of correct predictions: P(y=1) >= ``threshold`` for binary, argmax for multiclass."""

    name = "accuracy"

    def __init__(self, *, threshold: float = 0.5) -> None:
        self.threshold = threshold
        super().__init__()

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"correct": (), "total": ()}

    def update(self, scores, y, mask=None) -> "Metric":
        s, t = _select(scores, y, mask)
        pred = s.argmax(axis=1) if s.ndim == 2 else (s >= self.threshold).astype(int)
        self._state["correct"] = self._state["correct"] + float((pred == t.astype(int)).sum())
        self._state["total"] = self._state["total"] + float(t.shape[0])
        return self

    def _compute(self, st: State) -> float:
        return float(st["correct"] / st["total"]) if st["total"] > 0 else float("nan")


class BrierScore(Metric):
    """Mean squared error of probabilities. Binary: (p - y)^2 (scikit-learn's
    ``brier_score_loss``). Multiclass: sum over classes of (p_k - [y = k])^2."""

    name = "brier"

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"sq_err": (), "total": ()}

    def update(self, scores, y, mask=None) -> "Metric":
        s, t = _select(scores, y, mask)
        if s.ndim == 2:
            onehot = t.astype(int).reshape(-1, 1) == np.arange(s.shape[1])
            err = ((s - onehot) ** 2).sum(axis=1)
        else:
            err = (s - t) ** 2
        self._state["sq_err"] = self._state["sq_err"] + float(err.sum())
        self._state["total"] = self._state["total"] + float(t.shape[0])
        return self

    def _compute(self, st: State) -> float:
        return float(st["sq_err"] / st["total"]) if st["total"] > 0 else float("nan")


class Calibration(Metric):
    """Reliability of a binary task's probabilities, from per-bin sums.

    ``n_bins`` equal bins over [0, 1] of the predicted P(y=1); per bin the state holds
    ``count`` (records), ``sum_p`` (their predicted probabilities) and ``sum_y`` (their
    labels), all sums, so sites' states add up. ``compute`` gives ``mean_predicted`` and
    ``observed_rate`` over all records (calibration-in-the-large) and ``ece``, the
    expected calibration error ``sum_b count_b |mean_p_b - rate_b| / N`` of the bins;
    :meth:`curve` gives the reliability curve bin by bin."""

    name = "calibration"

    def __init__(self, *, n_bins: int = 10) -> None:
        if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
            raise ValueError(f"calibration n_bins must be a whole number >= 1, got {n_bins!r}")
        self.n_bins = int(n_bins)
        super().__init__()

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"count": (self.n_bins,), "sum_p": (self.n_bins,), "sum_y": (self.n_bins,)}

    def update(self, scores, y, mask=None) -> "Metric":
        s, t = _select(scores, y, mask)
        if s.ndim != 1:
            raise ValueError(f"calibration is for binary tasks: scores must be (n,) P(y=1), got {s.shape}")
        b = _bin(s, self.n_bins)
        t = t.astype(float)
        self._state["count"] += np.bincount(b, minlength=self.n_bins)
        self._state["sum_p"] += np.bincount(b, weights=s, minlength=self.n_bins)
        self._state["sum_y"] += np.bincount(b, weights=t, minlength=self.n_bins)
        return self

    def _compute(self, st: State) -> dict[str, float]:
        n = st["count"].sum()
        if n <= 0:
            return {"mean_predicted": float("nan"), "observed_rate": float("nan"), "ece": float("nan")}
        ece = float(np.abs(st["sum_p"] - st["sum_y"]).sum() / n)  # = sum_b n_b |p_b - y_b| / N
        return {"mean_predicted": float(st["sum_p"].sum() / n), "observed_rate": float(st["sum_y"].sum() / n),
                "ece": ece}

    def curve(self, state: Mapping[str, np.ndarray] | None = None) -> dict[str, list[float | None]]:
        """Per bin: ``lower``/``upper`` edges, ``count``, ``mean_predicted`` and
        ``observed_rate`` (``None`` for an empty bin)."""
        st = self._state if state is None else state
        self._check(st)
        c, sp, sy = (np.asarray(st[k], dtype=float) for k in ("count", "sum_p", "sum_y"))
        edges = np.linspace(0.0, 1.0, self.n_bins + 1)
        return {
            "lower": [float(x) for x in edges[:-1]],
            "upper": [float(x) for x in edges[1:]],
            "count": [float(x) for x in c],
            "mean_predicted": [float(a / n) if n > 0 else None for a, n in zip(sp, c)],
            "observed_rate": [float(a / n) if n > 0 else None for a, n in zip(sy, c)],
        }


class RegressionError(Metric):
    """MAE and RMSE of a regression task: ``compute`` returns ``{"mae", "rmse"}``.

    ``clip`` (optional, > 0): each sample's absolute error is capped at ``clip`` before it
    is summed (``abs_err`` gains at most ``clip``, ``sq_err`` at most ``clip**2`` per
    sample), and a non-finite prediction counts as the capped error ``clip``. This bounds
    one sample's effect on the state, which a differentially private release of the
    state needs (:mod:`fedmtl.privacy.eval_release`). ``None`` (default) sums the exact
    errors.
    """

    name = "regression"

    def __init__(self, *, clip: float | None = None) -> None:
        if clip is not None:
            if isinstance(clip, bool) or not isinstance(clip, (int, float, np.floating)) or not (
                math.isfinite(clip) and clip > 0
            ):
                raise ValueError(f"clip must be a finite number > 0 (or None), got {clip!r}")
            clip = float(clip)
        self.clip = clip
        super().__init__()

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"abs_err": (), "sq_err": (), "total": ()}

    def update(self, scores, y, mask=None) -> "Metric":
        s, t = _select(scores, y, mask)
        d = s.reshape(-1) - t.astype(float).reshape(-1)
        a = np.abs(d)
        if self.clip is not None:
            a = np.where(np.isnan(a), self.clip, np.minimum(a, self.clip))
        self._state["abs_err"] = self._state["abs_err"] + float(a.sum())
        self._state["sq_err"] = self._state["sq_err"] + float((a * a).sum())
        self._state["total"] = self._state["total"] + float(d.size)
        return self

    def _compute(self, st: State) -> dict[str, float]:
        n = st["total"]
        if n <= 0:
            return {"mae": float("nan"), "rmse": float("nan")}
        return {"mae": float(st["abs_err"] / n), "rmse": float(np.sqrt(st["sq_err"] / n))}


# -- per-task collections ------------------------------------------------------
def metrics_for_task(
    task: TaskSpec,
    *,
    n_bins: int = 1000,
    clip: float | None = None,
    scale: str = "linear",
    calibration_bins: int = 0,
) -> dict[str, Metric]:
    """The standard metrics of a task: binary/multiclass -> auroc, auprc (``n_bins``
    bins on ``scale``), accuracy, brier, and for a binary task with
    ``calibration_bins > 0`` also calibration; regression -> regression (MAE and RMSE,
    per-sample error capped at ``clip`` when given; see :class:`RegressionError`)."""
    _check_scale(scale)
    if task.kind == "regression":
        return {"regression": RegressionError(clip=clip)}
    if clip is not None:
        raise ValueError(f"task {task.name!r}: clip only applies to regression tasks")
    c = 1 if task.kind == "binary" else task.out_dim
    out: dict[str, Metric] = {
        "auroc": BinnedAUROC(n_classes=c, n_bins=n_bins, scale=scale),
        "auprc": BinnedAUPRC(n_classes=c, n_bins=n_bins, scale=scale),
        "accuracy": Accuracy(),
        "brier": BrierScore(),
    }
    if calibration_bins and task.kind == "binary":
        out["calibration"] = Calibration(n_bins=calibration_bins)
    return out


class TaskMetrics:
    """All tasks' metrics together, with one flat, summable state.

    State keys are ``"<task>/<metric>/<key>"``. ``update`` takes the model's
    :meth:`~fedmtl.models.nets.MultiTaskNet.predict` output and ``(Y, mask)``.

    ``clip`` (optional): ``{regression task name: max absolute error per sample}``, passed
    to that task's :class:`RegressionError`; tasks not named keep exact errors.
    ``scale`` and ``calibration_bins``: see :func:`metrics_for_task`.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        *,
        n_bins: int = 1000,
        clip: Mapping[str, float] | None = None,
        scale: str = "linear",
        calibration_bins: int = 0,
    ) -> None:
        self.tasks = list(tasks)
        clip = dict(clip or {})
        kinds = {t.name: t.kind for t in self.tasks}
        bad = sorted(n for n in clip if kinds.get(n) != "regression")
        if bad:
            raise ValueError(f"clip names {bad}, which are not regression tasks among {sorted(kinds)}")
        self.metrics = {
            t.name: metrics_for_task(t, n_bins=n_bins, clip=clip.get(t.name), scale=scale,
                                     calibration_bins=calibration_bins)
            for t in self.tasks
        }

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            f"{t}/{m}/{k}": shp
            for t, ms in self.metrics.items()
            for m, metric in ms.items()
            for k, shp in metric.state_shapes().items()
        }

    def update(self, predictions: Mapping[str, np.ndarray], Y, mask) -> "TaskMetrics":
        Y, mask = _as_np(Y), _as_np(mask).astype(bool)
        for j, t in enumerate(self.tasks):
            if t.name not in predictions:
                raise KeyError(f"no predictions for task {t.name!r}")
            for metric in self.metrics[t.name].values():
                metric.update(predictions[t.name], Y[:, j], mask[:, j])
        return self

    def state(self) -> State:
        return {
            f"{t}/{m}/{k}": v
            for t, ms in self.metrics.items()
            for m, metric in ms.items()
            for k, v in metric.state().items()
        }

    def compute(self, state: Mapping[str, np.ndarray] | None = None) -> dict[str, dict[str, float]]:
        """``{task: {metric: value}}`` (regression: ``mae`` and ``rmse``), plus ``n`` labelled."""
        st = self.state() if state is None else state
        missing = set(self.state_shapes()) - set(st)
        if missing:
            raise ValueError(f"state lacks {sorted(missing)[:5]}...")
        out: dict[str, dict[str, float]] = {}
        for t, ms in self.metrics.items():
            res: dict[str, float] = {}
            for m, metric in ms.items():
                sub = {k: st[f"{t}/{m}/{k}"] for k in metric.state_shapes()}
                v = metric.compute(sub)
                if isinstance(v, dict):
                    res.update(v)
                else:
                    res[m] = v
                if "total" in sub:
                    res["n"] = float(np.asarray(sub["total"]))
            out[t] = res
        return out

    def reliability(self, state: Mapping[str, np.ndarray] | None = None) -> dict[str, dict[str, list]]:
        """``{task: Calibration.curve}`` for every task that has a calibration metric."""
        st = self.state() if state is None else state
        out = {}
        for t, ms in self.metrics.items():
            cal = ms.get("calibration")
            if isinstance(cal, Calibration):
                out[t] = cal.curve({k: st[f"{t}/calibration/{k}"] for k in cal.state_shapes()})
        return out


#: the comparison evaluator's AUROC/AUPRC bins (logit scale) and reliability bins
EVAL_N_BINS = 65536
EVAL_CALIBRATION_BINS = 10


def evaluation_metrics(tasks: Sequence[TaskSpec]) -> TaskMetrics:
    """The one evaluator that models are compared with on held-out records: AUROC and
    AUPRC from ``EVAL_N_BINS`` logit-scale bins, accuracy, Brier score and (binary
    tasks) an ``EVAL_CALIBRATION_BINS``-bin reliability curve. Its state is sums, so
    several test splits' states add up (:func:`sum_states`) to the pooled metrics."""
    return TaskMetrics(tasks, n_bins=EVAL_N_BINS, scale="logit", calibration_bins=EVAL_CALIBRATION_BINS)


def finite_predictions(predictions: Mapping[str, np.ndarray], tasks: Sequence[TaskSpec]) -> dict[str, np.ndarray]:
    """``predictions`` (as :meth:`~fedmtl.models.nets.MultiTaskNet.predict` returns them)
    made finite and inside the range each kind of score lives in, the same way for every
    record, so that no record can make a metric's update fail.

    * binary: NaN becomes 0.5, then every score is clipped to [0, 1];
    * multiclass: a row with any non-finite probability becomes the uniform
      distribution ``1 / C``, then every entry is clipped to [0, 1];
    * regression: NaN becomes the centre ``shift`` of the declared label range, then
      every value is clipped to that range ``[shift - scale, shift + scale]`` (+-inf to
      its ends).

    Args:
        predictions: ``{task name: scores}``; tasks not listed in ``tasks`` are dropped.
        tasks: the tasks to sanitise, each of which must have predictions.

    Returns:
        A new dict ``{task name: float64 array}`` of the same shapes.

    Raises:
        KeyError: a task of ``tasks`` has no predictions.
    """
    out: dict[str, np.ndarray] = {}
    for t in tasks:
        if t.name not in predictions:
            raise KeyError(f"no predictions for task {t.name!r}")
        s = np.array(predictions[t.name], dtype=np.float64)
        if t.kind == "binary":
            s = np.clip(np.where(np.isnan(s), 0.5, s), 0.0, 1.0)
        elif t.kind == "multiclass":
            if s.ndim == 2 and s.shape[1] > 0:
                s[~np.all(np.isfinite(s), axis=1)] = 1.0 / s.shape[1]
            s = np.clip(s, 0.0, 1.0)
        else:
            lo, hi = t.shift - abs(t.scale), t.shift + abs(t.scale)
            s = np.clip(np.where(np.isnan(s), t.shift, s), lo, hi)
        out[t.name] = s
    return out


__all__ = [
    "EVAL_CALIBRATION_BINS",
    "EVAL_N_BINS",
    "LOGIT_RANGE",
    "SCALES",
    "Accuracy",
    "BinnedAUPRC",
    "BinnedAUROC",
    "BrierScore",
    "Calibration",
    "Metric",
    "RegressionError",
    "TaskMetrics",
    "evaluation_metrics",
    "finite_predictions",
    "flatten_state",
    "metrics_for_task",
    "sum_states",
    "unflatten_state",
]
