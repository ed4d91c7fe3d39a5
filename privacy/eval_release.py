"""Differentially private release of evaluation statistics (the Gaussian mechanism).

A datasite evaluates the global model on its test split and returns the metrics'
sufficient statistics (:class:`fedmtl.models.metrics.TaskMetrics`, flattened in sorted
state-key order). Those sums are a function of the site's records, so by the trust model
they may leave the site only noised and charged. This module is the pure mechanism:

1. build the statistics with :class:`ReleaseStatistics` (:func:`eval_metrics` for the
   tasks that are not binary: regression errors clipped, so that one record moves the
   state by a bounded amount). A *binary* task releases one pair of logit histograms of
   its test split (:mod:`fedmtl.models.binned`: every metric, the calibration and the
   intervals are read from that pair) and, when the records have a split column, the same
   pair for its training split (the *calibration split* the researcher fits each task's
   Platt recalibration on). A record is in one split or the other, so it moves one count
   of one pair by 1 per task: the pair costs sensitivity 1 per binary task, whatever is
   read from it;
2. :func:`noise_statistics` adds, per coordinate ``i``, Gaussian noise of standard
   deviation ``noise_multiplier * sensitivity(tasks) * w[i]``
   (``w = metric_scales(tasks, n_bins=...)``);
3. charge :func:`privacy_record` (the Gaussian mechanism, one step at sample rate 1) to
   the ledger *before* step 2 runs.

Steps 2 and 3 are :class:`EvaluationRelease`, a
:class:`~fedmtl.privacy.gaussian_release.GaussianRelease` (the statistics release is the
other one).

Why this is (epsilon, delta)-DP: divide the state elementwise by ``w``. For any record
added to or removed from the evaluated set, that scaled state moves by at most
``sensitivity(tasks)`` in L2 (derivation in :func:`sensitivity`). Adding
``N(0, (sigma * sensitivity)^2)`` per scaled coordinate is the Gaussian mechanism with
noise multiplier ``sigma``: Renyi DP ``alpha / (2 sigma^2)`` at every order ``alpha``
(Mironov 2017, Prop. 7), i.e. ``PrivacyRecord(sigma, sample_rate=1.0, steps=1)`` in
:mod:`fedmtl.privacy.accounting`. Anything computed from the noisy vector afterwards
(rounding, clipping counts at 0, summing under secure aggregation, the metric values) is
post-processing and costs nothing more.

The neighbouring relation is add/remove one record (the one DP-SGD's accounting uses).
A record counts in every task it has a label for, so the bound sums over all tasks.

Pure: imports numpy and ``fedmtl.models``/``fedmtl.privacy`` only (no syft, no torch).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from fedmtl.models.binned import RELEASE_BINS, histograms
from fedmtl.models.metrics import TaskMetrics, flatten_state
from fedmtl.models.tasks import TaskSpec, check_tasks
from fedmtl.privacy.accounting import PrivacyRecord
from fedmtl.privacy.gaussian_release import GaussianRelease, check_noise_multiplier, gaussian_record

#: A regression task's per-record absolute error is capped at this many ``TaskSpec.scale``
#: units. ``scale`` is half the declared label range (see ``tasks_from_schema``), so 2.0
#: is the full range: a prediction inside the declared range is never clipped.
REGRESSION_CLIP_SCALES = 2.0

#: Squared per-record contribution, in ``w``-scaled units, of each kind of task.
_BINARY_SQ = 1.0  # one count of the test or the calibration split's histograms
_REGRESSION_SQ = 3.0  # abs_err 1, sq_err 1, total 1


def regression_clips(tasks: Sequence[TaskSpec]) -> dict[str, float]:
    """``{regression task: max |error| per record}`` = ``REGRESSION_CLIP_SCALES * scale``
    (label units), the ``clip`` that :func:`eval_metrics` passes to ``TaskMetrics``."""
    return {t.name: REGRESSION_CLIP_SCALES * t.scale for t in check_tasks(tasks) if t.kind == "regression"}


def eval_metrics(tasks: Sequence[TaskSpec], *, n_bins: int) -> TaskMetrics:
    """The :class:`TaskMetrics` whose statistics may be released with
    :func:`noise_statistics`: regression errors clipped to :func:`regression_clips`.

    Use this (not a plain ``TaskMetrics``) on the datasite: the sensitivity bound for a
    regression task holds only for clipped errors."""
    return TaskMetrics(check_tasks(tasks), n_bins=n_bins, clip=regression_clips(tasks))


def _task_sq(task: TaskSpec) -> float:
    if task.kind == "binary":
        return _BINARY_SQ
    if task.kind == "multiclass":
        return 2.0 * task.out_dim + 4.0
    return _REGRESSION_SQ


def sensitivity(tasks: Sequence[TaskSpec]) -> float:
    """L2 sensitivity of the ``w``-scaled statistics vector to adding or removing one
    record: ``sqrt(sum over tasks of s_t^2)`` with (per-record changes, after dividing
    by :func:`metric_scales`):

    * binary: the record adds 1 to exactly one bin of ``test/pos`` or ``test/neg`` (a test
      record) or of ``fit/pos`` or ``fit/neg`` (a training record); weight 1, so
      ``s^2 <= 1``. (The calibration split must not share records with the test split:
      :class:`ReleaseStatistics` releases it only when the records have a split column.)
    * multiclass with C classes (one-vs-rest): per class, 1 to one bin of pos or neg, in
      both the AUROC and the AUPRC histograms (2C coordinates of 1); 0/1 to correct; 1 to
      each of the two totals; ``sum_k (p_k - [y=k])^2 <= C`` to ``brier/sq_err`` (each
      ``p_k`` is in [0, 1] -- ``TaskMetrics`` refuses other scores; 2 if they sum to 1,
      but C holds for anything accepted), weighted by C. So ``s^2 <= 2C + 4``.
    * regression with clip ``c`` (:func:`regression_clips`): ``|err| <= c`` to
      ``abs_err`` (weight c), ``err^2 <= c^2`` to ``sq_err`` (weight c^2), 1 to ``total``.
      So ``s^2 <= 3``.

    A record without a label for a task (mask False) changes nothing of that task; the
    worst record is labelled for every task, hence the sum over tasks.
    """
    return float(math.sqrt(sum(_task_sq(t) for t in check_tasks(tasks))))


def _coordinate_scale(task: TaskSpec, metric: str, key: str, clips: Mapping[str, float]) -> float:
    if task.kind == "binary":
        return 1.0  # histogram counts
    if task.kind == "regression":
        c = clips[task.name]
        return {"abs_err": c, "sq_err": c * c, "total": 1.0}[key]
    if metric == "brier" and key == "sq_err":
        return float(task.out_dim) if task.kind == "multiclass" else 1.0
    return 1.0  # histogram bins, correct, totals: counts that move by at most 1


def metric_scales(tasks: Sequence[TaskSpec], *, n_bins: int, calibration: bool = False) -> np.ndarray:
    """Per-coordinate scale ``w`` of the flattened :class:`ReleaseStatistics` state (same
    length and order as its :meth:`~ReleaseStatistics.vector`): 1 for counts and binary
    histograms, C for a C-class Brier sum, ``c`` / ``c**2`` for a regression task's
    clipped ``abs_err`` / ``sq_err`` (``c`` from :func:`regression_clips`)."""
    tasks = check_tasks(tasks)
    by_name = {t.name: t for t in tasks}
    clips = regression_clips(tasks)
    shapes = ReleaseStatistics(tasks, n_bins=n_bins, calibration=calibration).state_shapes()
    parts = []
    for k in sorted(shapes):
        task, metric, key = k.split("/")
        n = int(np.prod(shapes[k]))
        parts.append(np.full(n, _coordinate_scale(by_name[task], metric, key, clips)))
    return np.concatenate(parts) if parts else np.zeros(0)


class ReleaseStatistics:
    """The evaluation statistics one site releases for the job's tasks, as one summable
    state (keys ``"<task>/<part>/<key>"``, flattened in sorted key order).

    * binary task: ``<task>/test/pos|neg``, the logit histograms of the test split
      (:func:`fedmtl.models.binned.histograms`); with ``calibration``, also
      ``<task>/fit/pos|neg`` of the training split;
    * other tasks: the :func:`eval_metrics` state (AUROC/AUPRC histograms, accuracy,
      Brier for multiclass; clipped errors for regression).

    Args:
        tasks: the evaluated tasks.
        n_bins: the histogram bins of the tasks that are not binary.
        calibration: release the training split's histograms too (only when the records
            have a split column: the two splits must not share a record).
    """

    def __init__(self, tasks: Sequence[TaskSpec], *, n_bins: int, calibration: bool) -> None:
        self.tasks = check_tasks(tasks)
        self.binary = [t for t in self.tasks if t.kind == "binary"]
        others = [t for t in self.tasks if t.kind != "binary"]
        self.calibration = bool(calibration) and bool(self.binary)
        #: the :func:`eval_metrics` of the tasks that are not binary (None: all binary)
        self.others = eval_metrics(others, n_bins=n_bins) if others else None
        parts = ("test", "fit") if self.calibration else ("test",)
        self._hist = {f"{t.name}/{part}/{key}": np.zeros(RELEASE_BINS)
                      for t in self.binary for part in parts for key in ("pos", "neg")}

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {k: (RELEASE_BINS,) for k in self._hist}
        if self.others is not None:
            shapes.update(self.others.state_shapes())
        return shapes

    def _add(self, part: str, predictions: Mapping[str, np.ndarray], Y: Any, mask: Any) -> None:
        Y, mask = np.asarray(Y), np.asarray(mask).astype(bool)
        for j, t in enumerate(self.tasks):
            if t.kind != "binary":
                continue
            if t.name not in predictions:
                raise KeyError(f"no predictions for task {t.name!r}")
            m = mask[:, j]
            pos, neg = histograms(np.asarray(predictions[t.name])[m], Y[m, j] == 1)
            self._hist[f"{t.name}/{part}/pos"] += pos
            self._hist[f"{t.name}/{part}/neg"] += neg

    def update(self, predictions: Mapping[str, np.ndarray], Y: Any, mask: Any) -> "ReleaseStatistics":
        """Add the test split's predictions (``MultiTaskNet.predict`` output, made finite
        with :func:`~fedmtl.models.metrics.finite_predictions`), labels and label mask."""
        self._add("test", predictions, Y, mask)
        if self.others is not None:
            names = [t.name for t in self.others.tasks]
            idx = [i for i, t in enumerate(self.tasks) if t.name in names]
            self.others.update({k: v for k, v in predictions.items() if k in names},
                                np.asarray(Y)[:, idx], np.asarray(mask)[:, idx])
        return self

    def update_calibration(self, predictions: Mapping[str, np.ndarray], Y: Any, mask: Any) -> "ReleaseStatistics":
        """Add the training split's predictions to the calibration histograms (no-op
        without ``calibration``)."""
        if self.calibration:
            self._add("fit", predictions, Y, mask)
        return self

    def state(self) -> dict[str, np.ndarray]:
        st = dict(self._hist)
        if self.others is not None:
            st.update(self.others.state())
        return st

    def vector(self) -> np.ndarray:
        """The flattened state, float64 (what :class:`EvaluationRelease` noises)."""
        return flatten_state(self.state()).astype(np.float64)


class EvaluationRelease(GaussianRelease):
    """One site's evaluation-statistics release: the flattened :func:`eval_metrics` state,
    sensitivity :func:`sensitivity`, noise scaled per coordinate by :func:`metric_scales`.

    Args:
        tasks: the evaluated tasks.
        n_bins: the metrics' histogram bins.
        noise_multiplier: a finite number > 0 (checked first).

    Raises:
        ValueError: a bad noise multiplier or bad tasks.
    """

    released = "evaluation statistics"

    def __init__(self, tasks: Sequence[TaskSpec], *, n_bins: int, noise_multiplier: Any,
                 calibration: bool = False) -> None:
        super().__init__(noise_multiplier=noise_multiplier)
        self.tasks = check_tasks(tasks)
        self.n_bins = n_bins
        self.calibration = calibration
        self._scales = metric_scales(self.tasks, n_bins=n_bins, calibration=calibration)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._scales.shape

    @property
    def sensitivity(self) -> float:
        return sensitivity(self.tasks)

    def describe(self) -> str:
        return f"these tasks with n_bins={self.n_bins}"

    def scales(self) -> np.ndarray:
        return self._scales


def noise_statistics(
    vec: np.ndarray,
    tasks: Sequence[TaskSpec],
    *,
    n_bins: int,
    noise_multiplier: float,
    calibration: bool = False,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """``vec + w * N(0, (noise_multiplier * sensitivity(tasks))^2)`` per coordinate.

    Args:
        vec: the :meth:`ReleaseStatistics.vector` (``tasks``, ``n_bins``, ``calibration``).
        tasks: the evaluated tasks.
        n_bins: the metrics' histogram bins.
        noise_multiplier: a finite number > 0.
        rng: the generator; default seeded with 128 bits from the OS CSPRNG. Pass one
            only in tests.

    Returns:
        The noised vector, float64.

    Raises:
        ValueError: a bad ``noise_multiplier``, or a ``vec`` of the wrong shape or with
            non-finite entries (nothing is noised or returned then).
    """
    return EvaluationRelease(tasks, n_bins=n_bins, noise_multiplier=noise_multiplier,
                             calibration=calibration).noise(vec, rng=rng)


def privacy_record(noise_multiplier: float) -> PrivacyRecord:
    """What one :func:`noise_statistics` release costs: the Gaussian mechanism with
    noise multiplier ``sigma``, i.e. one step at sample rate 1 (RDP ``alpha/(2 sigma^2)``).

    Args:
        noise_multiplier: a finite number > 0.

    Returns:
        ``PrivacyRecord(sigma, 1.0, 1)``.

    Raises:
        ValueError: a bad noise multiplier.
    """
    return gaussian_record(noise_multiplier, released=EvaluationRelease.released)


__all__ = [
    "EvaluationRelease",
    "REGRESSION_CLIP_SCALES",
    "ReleaseStatistics",
    "check_noise_multiplier",
    "eval_metrics",
    "metric_scales",
    "noise_statistics",
    "privacy_record",
    "regression_clips",
    "sensitivity",
]
