"""A binary task's metrics, calibration and their intervals from one pair of score
histograms (the statistics a datasite releases for a binary task).

A datasite releases, per binary task, how many positive and how many negative records of
a split fall in each of ``RELEASE_BINS`` bins of the model's *logit* (the log-odds of its
predicted risk; :func:`release_edges`). One record moves exactly one count by 1, so the
pair has L2 sensitivity 1 however many metrics are read from it
(:mod:`fedmtl.privacy.eval_release`). From the pair alone this module computes
(:func:`binary_metrics`):

* ``auroc`` and ``auprc`` (the binned ranking metrics of :mod:`fedmtl.models.metrics`);
* ``accuracy`` at risk 0.5, ``brier``, ``mean_predicted`` against ``observed_rate``
  (calibration in the large) and ``ece`` (expected calibration error over the bins), each
  reading a record's risk as its bin's centre; optionally after a Platt recalibration
  ``logit -> a * logit + b`` (:func:`fit_platt`), which changes the risks but not the
  ranking;
* ``n``, the labelled records.

**Intervals** (:func:`binary_intervals`): the released counts carry Gaussian noise of a
public standard deviation. A parametric bootstrap re-noises the released counts (as they
are) with that standard deviation and recomputes every metric as a raw ratio (unclipped);
the basic bootstrap interval ``[2 m - q_hi, 2 m - q_lo]`` around the raw released value
``m`` is clipped to [0, 1] and then
widened by how far the metric of the *unbinned* scores can be from the binned one
(:func:`binning_slack`: ties within a bin for AUROC, the position of each risk within its bin
for the risk-based metrics). The interval is meant to cover the value the exact scores give
on the same records; ``benchmarks/release_coverage.py`` checks by simulation that the stated
95% intervals do so in at least 90% of runs.

Pure numpy.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

#: bins of a released score histogram, equal on the logit over
#: [``RELEASE_LOGIT_LO``, ``RELEASE_LOGIT_HI``]; logits beyond fall in the end bins
RELEASE_BINS = 16
RELEASE_LOGIT_LO = -6.0
RELEASE_LOGIT_HI = 2.0
#: width of a bin on the logit (0.5): the logit 0 (risk 0.5) is an edge, so accuracy at
#: risk 0.5 reads exactly off the histogram
RELEASE_WIDTH = (RELEASE_LOGIT_HI - RELEASE_LOGIT_LO) / RELEASE_BINS
#: a bin is in a class's support when its count in the calibration split's (noised)
#: histogram exceeds this many noise standard deviations (:func:`support`)
SUPPORT_SDS = 2.0
#: a released AUROC interval wider than this (half-width) comes with a warning
AUROC_WARN_HALF_WIDTH = 0.05
#: the slope of a Platt fit is kept in [1 / PLATT_MAX_SLOPE, PLATT_MAX_SLOPE]
PLATT_MAX_SLOPE = 5.0
#: and its intercept within [-PLATT_MAX_SHIFT, PLATT_MAX_SHIFT]
PLATT_MAX_SHIFT = 10.0

METRICS = ("auroc", "auprc", "accuracy", "brier", "mean_predicted", "observed_rate", "ece")


def release_edges() -> np.ndarray:
    """The ``RELEASE_BINS + 1`` bin edges on the logit (the ends are -inf and +inf)."""
    e = np.linspace(RELEASE_LOGIT_LO, RELEASE_LOGIT_HI, RELEASE_BINS + 1)
    e[0], e[-1] = -np.inf, np.inf
    return e


def _centres() -> np.ndarray:
    e = np.linspace(RELEASE_LOGIT_LO, RELEASE_LOGIT_HI, RELEASE_BINS + 1)
    return (e[:-1] + e[1:]) / 2


def read_range() -> tuple[float, float]:
    """The logits the lowest and the highest release bins are read at (their centres: each
    end bin is open, and holds every logit beyond it)."""
    c = _centres()
    return float(c[0]), float(c[-1])


def logit_bins(risk: np.ndarray) -> np.ndarray:
    """The release bin of each predicted risk in [0, 1] (0 and 1 fall in the end bins)."""
    p = np.clip(np.asarray(risk, dtype=np.float64), 1e-12, 1 - 1e-12)
    z = np.log(p) - np.log1p(-p)
    b = np.floor((z - RELEASE_LOGIT_LO) / RELEASE_WIDTH).astype(np.int64)
    return np.clip(b, 0, RELEASE_BINS - 1)


def histograms(risk: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(pos, neg)``: per release bin, how many records with label 1 / 0 have their risk
    there (float64 counts)."""
    b = logit_bins(risk)
    y = np.asarray(y).astype(bool)
    return (np.bincount(b[y], minlength=RELEASE_BINS).astype(np.float64),
            np.bincount(b[~y], minlength=RELEASE_BINS).astype(np.float64))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40.0, 40.0)))


def _auroc(pos: np.ndarray, neg: np.ndarray, clip: bool = True) -> float:
    # bilinear in (pos, neg): with independent zero-mean noise on each count the numerator
    # and P * N stay unbiased, so noised counts are used as they are (not clamped)
    P, N = pos.sum(), neg.sum()
    if P <= 0 or N <= 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg
    v = float((pos * (neg_below + 0.5 * neg)).sum() / (P * N))
    return float(np.clip(v, 0.0, 1.0)) if clip else v


def _auprc(pos: np.ndarray, neg: np.ndarray) -> float:
    # from the top bin down: cumulative counts (clamped at 0 and kept non-decreasing, as
    # exact ones are), then the step-wise average precision of scikit-learn
    tp = np.maximum.accumulate(np.maximum(np.cumsum(pos[::-1]), 0.0))
    fp = np.maximum.accumulate(np.maximum(np.cumsum(neg[::-1]), 0.0))
    P = tp[-1]
    if P <= 0:
        return float("nan")
    dtp = np.diff(np.r_[0.0, tp])
    keep = (tp + fp) > 0
    precision = np.where(keep, tp / np.where(keep, tp + fp, 1.0), 0.0)
    return float(np.clip((dtp / P * precision).sum(), 0.0, 1.0))


def _risk_metrics(pos: np.ndarray, neg: np.ndarray, risk: np.ndarray, clip: bool = True) -> dict[str, float]:
    """Accuracy, Brier, mean predicted, ECE with every record at ``risk`` of its bin:
    sums linear in the counts (unbiased under zero-mean noise), ratios clipped to [0, 1]."""
    n = pos.sum() + neg.sum()
    if n <= 0:
        return {k: float("nan") for k in ("accuracy", "brier", "mean_predicted", "observed_rate", "ece")}
    above = risk >= 0.5

    def ratio(x: float) -> float:
        return float(np.clip(x / n, 0.0, 1.0)) if clip else float(x / n)

    return {
        "accuracy": ratio(pos[above].sum() + neg[~above].sum()),
        "brier": ratio(((pos * (1 - risk) ** 2) + neg * risk ** 2).sum()),
        "mean_predicted": ratio(((pos + neg) * risk).sum()),
        "observed_rate": ratio(pos.sum()),
        "ece": ratio(np.abs(pos - (pos + neg) * risk).sum()),
    }


class Support:
    """Where each class's scores lie, read off the calibration split's noised histograms
    (:func:`support`): the ranking metrics count the test split's positives and negatives
    only in these bins, because a bin that holds (nearly) no record still carries its full
    noise, and the noise of an empty bin at the top of the positives' histogram moves the
    AUROC by ``noise / P``. What the mask may drop is bounded in :attr:`dropped`.

    Attributes:
        pos: the bins of the positives' support.
        neg: the bins of the negatives'.
        dropped: ``(positives, negatives)``: a high-probability upper bound of the test
            split's records outside the support (from the calibration split's counts
            there, scaled by the test/calibration size ratio).
    """

    def __init__(self, pos: np.ndarray, neg: np.ndarray, dropped: tuple[float, float]) -> None:
        self.pos, self.neg, self.dropped = pos, neg, dropped


def support(test_pos: np.ndarray, test_neg: np.ndarray, fit_pos: np.ndarray, fit_neg: np.ndarray, *,
            noise_sd: float) -> Support | None:
    """The :class:`Support` of each class from the calibration split's noised histograms
    (``None``: no noise, or no calibration split with a positive size).

    Post-processing of released counts: it costs nothing more. The test and the
    calibration split come from the same records split at random, so a bin empty in the
    (larger) calibration split is nearly empty in the test split.
    """
    if noise_sd <= 0:
        return None
    fp, fn = np.asarray(fit_pos, dtype=np.float64), np.asarray(fit_neg, dtype=np.float64)
    n_fit = fp.sum() + fn.sum()
    n_test = float(np.sum(test_pos) + np.sum(test_neg))
    if n_fit <= 0 or n_test <= 0:
        return None
    ratio = float(np.clip(n_test / n_fit, 0.0, 20.0))
    mp, mn = fp > SUPPORT_SDS * noise_sd, fn > SUPPORT_SDS * noise_sd
    if not mp.any() or not mn.any():
        return None

    def bound(f: np.ndarray, m: np.ndarray) -> float:
        k = int((~m).sum())
        return max(float(f[~m].sum()) + 2.0 * noise_sd * math.sqrt(k), 0.0) * ratio if k else 0.0

    return Support(mp, mn, (bound(fp, mp), bound(fn, mn)))


def binary_metrics(pos: np.ndarray, neg: np.ndarray, *, platt: tuple[float, float] = (1.0, 0.0),
                   support: Support | None = None, clip: bool = True) -> dict[str, float]:
    """Every metric of one binary task from its (possibly noised) histograms.

    Noised counts are used as they are (a negative count is noise around a small one):
    every metric but AUPRC and ECE is a ratio of sums linear or bilinear in the counts,
    which zero-mean noise leaves unbiased; each value is clipped to [0, 1].

    Args:
        pos: per release bin, the positive records (``RELEASE_BINS`` entries).
        neg: the negative records.
        platt: ``(a, b)``: read each bin's risk as ``sigmoid(a * centre + b)``
            (``(1, 0)``: the model as it is).
        support: count the ranking metrics (AUROC, AUPRC) only there (:func:`support`).
        clip: clip each value to [0, 1] (``False``: the raw ratios, for the bootstrap).

    Returns:
        ``{metric: value}`` for :data:`METRICS` plus ``n``; NaN where undefined (no
        positives, say).
    """
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    a, b = float(platt[0]), float(platt[1])
    risk = _sigmoid(a * _centres() + b)
    rp, rn = (pos * support.pos, neg * support.neg) if support is not None else (pos, neg)
    out = {"auroc": _auroc(rp, rn, clip), "auprc": _auprc(rp, rn), **_risk_metrics(pos, neg, risk, clip)}
    out["n"] = float(max(np.rint(pos.sum() + neg.sum()), 0.0))
    return out


def binning_slack(pos: np.ndarray, neg: np.ndarray, *, platt: tuple[float, float] = (1.0, 0.0),
                  support: Support | None = None) -> dict[str, float]:
    """How far each metric of the unbinned scores can be from :func:`binary_metrics`'s
    (both directions), given the counts.

    * ``auroc``: the pairs of a positive and a negative in the same bin count one half.
      The worst case is half their share (``tie_bound``); the slack is ``tie_bound *
      min(1, max(a, 1) * RELEASE_WIDTH / 2)``, three times what a risk that is logistic in
      the logit with slope ``a`` (the Platt fit's) puts on the pairs of a bin
      (``tie_bound * a * width / 6``). Plus, with a ``support``, what the records it may
      drop can move: ``dropped positives / P + dropped negatives / N``;
    * ``accuracy``: the records of a bin that holds risk 0.5 inside it (only after a
      recalibration that moves 0.5 off an edge);
    * ``brier``, ``mean_predicted``: the largest change from moving every record anywhere
      within its bin (the end bins are open: up to risk 0 and 1);
    * ``ece``: that of ``mean_predicted`` bin by bin;
    * ``auprc``: the ties' share, like ``auroc`` (no closed bound; documented as such);
    * ``observed_rate``: 0 (the labels are counted exactly).
    """
    pos = np.maximum(np.asarray(pos, dtype=np.float64), 0.0)
    neg = np.maximum(np.asarray(neg, dtype=np.float64), 0.0)
    n = pos.sum() + neg.sum()
    if n <= 0:
        return {k: float("nan") for k in METRICS}
    a, b = float(platt[0]), float(platt[1])
    e = np.linspace(RELEASE_LOGIT_LO, RELEASE_LOGIT_HI, RELEASE_BINS + 1)
    lo = np.r_[0.0, _sigmoid(a * e[1:-1] + b)]
    hi = np.r_[_sigmoid(a * e[1:-1] + b), 1.0]
    mid = _sigmoid(a * _centres() + b)
    rp, rn = (pos * support.pos, neg * support.neg) if support is not None else (pos, neg)
    Pr, Nr = rp.sum(), rn.sum()
    ties = 0.5 * float((rp * rn).sum() / (Pr * Nr)) if Pr > 0 and Nr > 0 else float("nan")
    ties *= min(1.0, max(a, 1.0) * RELEASE_WIDTH / 2.0)
    if support is not None and Pr > 0 and Nr > 0:
        ties += support.dropped[0] / Pr + support.dropped[1] / Nr
    # a bin with risk 0.5 strictly inside it: its records may be on either side
    zs = -b / a
    e_lo, e_hi = np.r_[-np.inf, e[1:-1]], np.r_[e[1:-1], np.inf]
    straddle = (e_lo < zs) & (zs < e_hi)
    acc = float((pos + neg)[straddle].sum() / n)
    # Brier per record: (r - y)^2 over r in [lo, hi]; the largest move from the centre's value
    br_pos = np.maximum(np.abs((1 - lo) ** 2 - (1 - mid) ** 2), np.abs((1 - hi) ** 2 - (1 - mid) ** 2))
    br_neg = np.maximum(np.abs(lo ** 2 - mid ** 2), np.abs(hi ** 2 - mid ** 2))
    mp = np.maximum(mid - lo, hi - mid)
    return {
        "auroc": ties, "auprc": ties, "accuracy": acc,
        "brier": float((pos * br_pos + neg * br_neg).sum() / n),
        "mean_predicted": float(((pos + neg) * mp).sum() / n),
        "observed_rate": 0.0,
        "ece": float(((pos + neg) * mp).sum() / n),
    }


def binary_intervals(pos: np.ndarray, neg: np.ndarray, *, noise_sd: float,
                     platt: tuple[float, float] = (1.0, 0.0), support: Support | None = None,
                     level: float = 0.95, draws: int = 400,
                     rng: np.random.Generator | None = None) -> dict[str, tuple[float, float]]:
    """The ``level`` interval of each metric of :func:`binary_metrics` for noised counts.

    Args:
        pos: the released (noised) positive counts per bin.
        neg: the negative counts.
        noise_sd: the standard deviation of the Gaussian noise on each count (public: the
            job's noise multiplier times the release's sensitivity, times the square root
            of the number of sites summed). 0: exact counts (the interval is the binning
            slack alone).
        platt: the recalibration the metrics are read under.
        support: the :func:`support` the ranking metrics are counted in (the same in
            every draw).
        level: the coverage asked for.
        draws: bootstrap draws.
        rng: the generator (default: a fixed seed, so the same release gives the same
            interval).

    Returns:
        ``{metric: (lo, hi)}``, clipped to [0, 1]; ``(0, 1)`` where the released value is
        undefined (a noised total at or below 0) or more than ``1 - level`` of the draws are.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    slack = binning_slack(pos, neg, platt=platt, support=support)
    base_p, base_n = pos, neg
    reps: dict[str, list[float]] = {k: [] for k in METRICS}
    if noise_sd > 0:
        for _ in range(int(draws)):
            r = binary_metrics(base_p + rng.normal(0.0, noise_sd, base_p.shape),
                               base_n + rng.normal(0.0, noise_sd, base_n.shape), platt=platt, support=support,
                               clip=False)
            for k in METRICS:
                reps[k].append(r[k])
    centre = binary_metrics(base_p, base_n, platt=platt, support=support, clip=False)
    alpha = (1.0 - float(level)) / 2.0
    out: dict[str, tuple[float, float]] = {}
    for k in METRICS:
        v, s = centre[k], slack[k]
        if not math.isfinite(v):  # e.g. a noised total at or below 0: nothing can be said
            out[k] = (0.0, 1.0)
            continue
        s = s if math.isfinite(s) else 1.0
        lo = hi = v
        if noise_sd > 0:
            x = np.asarray(reps[k], dtype=np.float64)
            if np.isnan(x).mean() > alpha:  # too noisy to say where it is
                out[k] = (0.0, 1.0)
                continue
            x = x[~np.isnan(x)]
            q_lo, q_hi = np.quantile(x, [alpha, 1.0 - alpha])
            # basic bootstrap around the released value, on the raw (unclipped) ratios:
            # the draws' spread about it stands for the release's spread about the truth;
            # only the final interval is clipped to [0, 1]
            lo, hi = 2.0 * v - q_hi, 2.0 * v - q_lo
            lo, hi = min(lo, v), max(hi, v)
        if k == "ece":
            # noise only adds to |pos - n * risk|: the released ECE is biased upwards, and
            # what can be said is how large it may be; its interval is [0, upper end]
            lo = 0.0
        out[k] = (float(np.clip(lo - s, 0.0, 1.0)), float(np.clip(hi + s, 0.0, 1.0)))
    return out


def fit_platt(pos: np.ndarray, neg: np.ndarray, *, min_count: float = 0.0) -> tuple[float, float]:
    """The Platt recalibration ``logit -> a * logit + b`` that best fits (maximum
    likelihood, with a weak pull towards ``(1, 0)``) the labels of histograms of a
    calibration split, each bin's records read at its centre.

    Args:
        pos: positive counts per release bin (noised ones: negatives are clamped at 0).
        neg: negative counts.
        min_count: bins whose (clamped) total is below this are left out (noise alone).
            With fewer than two bins left, only the intercept ``b`` is fitted (``a = 1``),
            on every bin.

    Returns:
        ``(a, b)``, ``a`` within [1/PLATT_MAX_SLOPE, PLATT_MAX_SLOPE] and ``|b| <=
        PLATT_MAX_SHIFT``; ``(1, 0)`` when the histograms hold no positive or no negative.
    """
    p_all = np.maximum(np.asarray(pos, dtype=np.float64), 0.0)
    q_all = np.maximum(np.asarray(neg, dtype=np.float64), 0.0)
    if p_all.sum() <= 0 or q_all.sum() <= 0:
        return 1.0, 0.0
    keep = (p_all + q_all) >= max(float(min_count), 1e-12)
    slope = int(keep.sum()) >= 2 and p_all[keep].sum() > 0 and q_all[keep].sum() > 0
    if not slope:
        keep = np.ones_like(keep)
    p, q, z = p_all[keep], q_all[keep], _centres()[keep]
    n = p + q
    X = np.stack([z, np.ones_like(z)], axis=1) if slope else np.ones((z.size, 1))
    offset = np.zeros_like(z) if slope else z  # intercept only: a stays 1
    prior = np.array([1.0, 0.0]) if slope else np.array([0.0])
    theta = prior.copy()
    for _ in range(100):
        r = _sigmoid(X @ theta + offset)
        grad = X.T @ (p - n * r) - (theta - prior)
        H = (X * (n * r * (1 - r))[:, None]).T @ X + np.eye(theta.size)
        step = np.linalg.solve(H, grad)
        step *= min(1.0, 2.0 / max(float(np.abs(step).max()), 1e-12))  # damped: at most 2 per step
        theta = theta + step
        if np.abs(step).max() < 1e-10:
            break
    a, b = (float(theta[0]), float(theta[1])) if slope else (1.0, float(theta[0]))
    return float(np.clip(a, 1.0 / PLATT_MAX_SLOPE, PLATT_MAX_SLOPE)), float(np.clip(b, -PLATT_MAX_SHIFT, PLATT_MAX_SHIFT))


def warn_wide(intervals: Mapping[str, tuple[float, float]]) -> bool:
    """Whether the AUROC interval is wider than +-``AUROC_WARN_HALF_WIDTH``."""
    lo, hi = intervals.get("auroc", (float("nan"), float("nan")))
    return not (math.isfinite(lo) and math.isfinite(hi)) or (hi - lo) / 2 > AUROC_WARN_HALF_WIDTH


__all__ = [
    "AUROC_WARN_HALF_WIDTH",
    "METRICS",
    "PLATT_MAX_SHIFT",
    "PLATT_MAX_SLOPE",
    "RELEASE_BINS",
    "RELEASE_LOGIT_HI",
    "RELEASE_LOGIT_LO",
    "RELEASE_WIDTH",
    "SUPPORT_SDS",
    "Support",
    "binary_intervals",
    "binary_metrics",
    "binning_slack",
    "fit_platt",
    "histograms",
    "logit_bins",
    "read_range",
    "release_edges",
    "support",
    "warn_wide",
]
