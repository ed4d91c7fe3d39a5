"""Differentially private release of feature statistics for standard scaling (the
Gaussian mechanism), and the checks on what comes back.

A job with ``scaling = "standard"`` starts with a *statistics pass*: every site releases,
through secure aggregation, the count, sum and sum of squares of every numeric feature of
its training split, and the researcher turns the noised sum into a global mean and
standard deviation per feature (:func:`derive_scaling`), which it sends with every later
pass; each site checks them (:func:`check_scaling`) before it scales with them. The sums
are a function of the site's records, so they leave the site only noised and charged.

The statistics are computed on the values the model sees before scaling: the column's
transform, then clipped to the transformed declared range ``[lo, hi]``
(:func:`fedmtl.models.preprocessing.transformed_values`), and expressed in *unit* form
``u = (t - c) / h`` with ``c = (lo + hi) / 2`` and ``h = (hi - lo) / 2``, so ``|u| <= 1``.
The released vector (:func:`site_statistics`, ``3 * F`` entries for ``F`` numeric
features) is ``[count_1..F, sum(u)_1..F, sum(u^2)_1..F]`` over each feature's non-missing
values.

Why this is (epsilon, delta)-DP: adding or removing one record changes, per feature, the
count by at most 1, ``sum(u)`` by ``|u| <= 1`` and ``sum(u^2)`` by ``u^2 <= 1``; over all
features the vector moves by at most ``sqrt(3 F)`` in L2 (:func:`sensitivity`; a record
missing a feature moves less). :func:`noise_statistics` adds ``N(0, (sigma *
sqrt(3 F))^2)`` to every entry: the Gaussian mechanism with noise multiplier ``sigma``
(:class:`StatisticsRelease`, a :class:`~fedmtl.privacy.gaussian_release.GaussianRelease`),
``PrivacyRecord(sigma, sample_rate=1.0, steps=1)`` (:func:`privacy_record`), charged to
the ledger *before* the statistics are computed. Summing under secure aggregation,
dividing, clamping (:func:`derive_scaling`) is post-processing.

The bounds come from the schema's declared ranges, so every numeric feature needs a
``min`` and ``max``; a range far wider than the data costs accuracy here (the noise on
the sums scales with ``h`` and ``h^2``): ``fedmtl datasite launch`` warns about such
ranges, and ``transform = "log1p"`` tames skewed columns.

Pure: numpy, the schema and :mod:`fedmtl.models.preprocessing` (no syft, no torch calls).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import numpy as np

from fedmtl.models.preprocessing import Preprocessor, transformed_bounds, transformed_values
from fedmtl.privacy.accounting import PrivacyRecord
from fedmtl.privacy.gaussian_release import GaussianRelease, gaussian_record
from fedmtl.schema import Column, Schema

#: the smallest standard deviation :func:`derive_scaling` returns and :func:`check_scaling`
#: accepts, as a fraction of the half-width ``h`` of the transformed declared range
STD_MIN_FRACTION = 1e-3
_TOL = 1e-9


def numeric_features(schema: Schema) -> list[Column]:
    """The numeric feature columns, in schema order (the order of every array here)."""
    return [c for c in schema.features if c.type == "numeric"]


def unit_frame(schema: Schema) -> tuple[np.ndarray, np.ndarray]:
    """``(c, h)``: midpoint and half-width of each numeric feature's transformed declared
    range. Raises ``ValueError`` naming every numeric feature without ``min``/``max``."""
    cols = numeric_features(schema)
    undeclared = [c.name for c in cols if transformed_bounds(c) is None]
    if undeclared:
        raise ValueError(
            f"numeric feature(s) {undeclared} declare no min/max in the schema; the statistics release "
            "needs declared ranges to bound one record's influence: declare min and max"
        )
    b = np.array([transformed_bounds(c) for c in cols], dtype=float).reshape(-1, 2)
    return (b[:, 0] + b[:, 1]) / 2.0, (b[:, 1] - b[:, 0]) / 2.0


def size(schema: Schema) -> int:
    """Length of the released vector: ``3 * F``."""
    return 3 * len(numeric_features(schema))


def sensitivity(schema: Schema) -> float:
    """L2 sensitivity of :func:`site_statistics` to adding or removing one record:
    ``sqrt(3 F)`` (see the module docs)."""
    return float(math.sqrt(size(schema)))


def site_statistics(schema: Schema, df) -> np.ndarray:
    """This site's exact statistics in unit form (see the module docs), float64 ``(3F,)``.
    Never release this vector as is: :func:`noise_statistics` it first.

    Whatever a record holds (text, NaN, +-inf, values far outside the declared range) it
    adds at most 1 to a count and a unit value in [-1, 1] to each sum, so the vector is
    always finite and one record moves it by at most :func:`sensitivity`."""
    import pandas as pd

    cols = numeric_features(schema)
    c, h = unit_frame(schema)
    absent = [col.name for col in cols if col.name not in df.columns]
    if absent:
        raise ValueError(f"records lack column(s) {absent} that the schema declares")
    F = len(cols)
    out = np.zeros(3 * F)
    for i, col in enumerate(cols):
        t = transformed_values(col, pd.to_numeric(df[col.name], errors="coerce").to_numpy(dtype=float))
        t = t[~np.isnan(t)]
        # float64, every value inside [-1, 1] before it is summed: n values sum to at most
        # n, so no record can make the statistics overflow (or NaN) whatever it holds
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            u = (t - c[i]) / h[i] if h[i] > 0 else np.zeros_like(t)
        u = np.clip(np.nan_to_num(u, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
        out[i], out[F + i], out[2 * F + i] = u.size, u.sum(), (u * u).sum()
    return out


class StatisticsRelease(GaussianRelease):
    """One site's feature-statistics release: shape ``(3F,)``, sensitivity
    :func:`sensitivity`, the same noise on every entry.

    Args:
        schema: the site's schema (its numeric features fix the shape).
        noise_multiplier: a finite number > 0.

    Raises:
        ValueError: a bad noise multiplier.
    """

    released = "feature statistics"

    def __init__(self, schema: Schema, *, noise_multiplier: Any) -> None:
        super().__init__(noise_multiplier=noise_multiplier)
        self.schema = schema

    @property
    def shape(self) -> tuple[int, ...]:
        return (size(self.schema),)

    @property
    def sensitivity(self) -> float:
        return sensitivity(self.schema)

    def describe(self) -> str:
        return "this schema"


def noise_std(schema: Schema, noise_multiplier: float) -> float:
    """Standard deviation of the noise on each entry of one site's release.

    Args:
        schema: the site's schema.
        noise_multiplier: a finite number > 0.

    Returns:
        ``noise_multiplier * sensitivity(schema)``.

    Raises:
        ValueError: a bad noise multiplier.
    """
    return StatisticsRelease(schema, noise_multiplier=noise_multiplier).noise_std


def noise_statistics(vec: np.ndarray, schema: Schema, *, noise_multiplier: float,
                     rng: np.random.Generator | None = None) -> np.ndarray:
    """``vec + N(0, (noise_multiplier * sensitivity(schema))^2)`` per entry.

    Args:
        vec: :func:`site_statistics` of the site's records.
        schema: the site's schema.
        noise_multiplier: a finite number > 0.
        rng: the generator; default seeded with 128 bits from the OS CSPRNG. Pass one
            only in tests.

    Returns:
        The noised vector, float64 ``(3F,)``.

    Raises:
        ValueError: a bad noise multiplier, or a ``vec`` of the wrong shape or with
            non-finite entries (nothing is released then).
    """
    return StatisticsRelease(schema, noise_multiplier=noise_multiplier).noise(vec, rng=rng)


def privacy_record(noise_multiplier: float) -> PrivacyRecord:
    """What one :func:`noise_statistics` release costs: the Gaussian mechanism with noise
    multiplier ``sigma`` (one step at sample rate 1).

    Args:
        noise_multiplier: a finite number > 0.

    Returns:
        ``PrivacyRecord(sigma, 1.0, 1)``.

    Raises:
        ValueError: a bad noise multiplier.
    """
    return gaussian_record(noise_multiplier, released=StatisticsRelease.released)


def derive_scaling(summed: np.ndarray, schema: Schema, *, noise_multiplier: float,
                   n_sites: int) -> dict[str, dict[str, float]]:
    """``{"mean": {feature: m}, "std": {feature: s}}`` (transformed units) from the sum of
    ``n_sites`` sites' noised releases. Post-processing only; clamps so that noise never
    gives an impossible value:

    * the mean to the transformed declared range;
    * the variance (in unit form) to at most ``1 - mean^2`` (the largest a variable in
      ``[-1, 1]`` with that mean can have) and at least the standard error the noise puts
      on the variance estimate (``sqrt(n_sites) * noise_std / count``), and never below
      ``STD_MIN_FRACTION^2``;
    * a feature whose noised count is below the noise on it (too few values to say
      anything) gets mean ``c`` and std ``h`` (the declared range mapped to [-1, 1]);
    * a feature with ``min == max`` gets std 1.
    """
    cols = numeric_features(schema)
    F = len(cols)
    x = np.asarray(summed, dtype=np.float64)
    if x.shape != (3 * F,) or not np.all(np.isfinite(x)):
        raise ValueError(f"summed statistics must be {3 * F} finite numbers (3 per numeric feature), "
                         f"got shape {x.shape}")
    if isinstance(n_sites, bool) or not isinstance(n_sites, int) or n_sites < 1:
        raise ValueError(f"n_sites must be a whole number >= 1, got {n_sites!r}")
    c, h = unit_frame(schema)
    sd = math.sqrt(n_sites) * noise_std(schema, noise_multiplier)
    mean: dict[str, float] = {}
    std: dict[str, float] = {}
    for i, col in enumerate(cols):
        count, s, ss = x[i], x[F + i], x[2 * F + i]
        if h[i] <= 0:
            mean[col.name], std[col.name] = float(c[i]), 1.0
            continue
        if count < max(sd, 1.0):
            mean[col.name], std[col.name] = float(c[i]), float(h[i])
            continue
        mu = float(np.clip(s / count, -1.0, 1.0))
        floor = max(sd / count, STD_MIN_FRACTION**2)
        var = float(np.clip(ss / count - mu * mu, floor, max(1.0 - mu * mu, floor)))
        mean[col.name] = float(c[i] + h[i] * mu)
        std[col.name] = float(min(h[i] * math.sqrt(var), h[i]))
    return {"mean": mean, "std": std}


def check_scaling(scaling: Any, schema: Schema) -> dict[str, dict[str, float]]:
    """The site's check of the mean/std a researcher sends: a table ``{"mean": {...},
    "std": {...}}`` naming exactly the schema's numeric features, every value a finite
    number, each mean inside the transformed declared range and each std in
    ``[STD_MIN_FRACTION * h, h]`` (1 where ``min == max``). Returns the cleaned tables;
    raises ``ValueError`` listing every problem."""
    if not isinstance(scaling, Mapping) or set(scaling) != {"mean", "std"}:
        keys = sorted(map(str, scaling)) if isinstance(scaling, Mapping) else type(scaling).__name__
        raise ValueError(f"the scaling must be a table with exactly the keys ['mean', 'std'], got {keys}")
    cols = numeric_features(schema)
    names = [col.name for col in cols]
    c, h = unit_frame(schema)
    problems: list[str] = []
    out: dict[str, dict[str, float]] = {"mean": {}, "std": {}}
    for key in ("mean", "std"):
        table = scaling[key]
        if not isinstance(table, Mapping):
            problems.append(f"scaling.{key} must be a table of numeric feature -> number, got {type(table).__name__}")
            continue
        extra = sorted(str(k) for k in table if k not in names)
        missing = [n for n in names if n not in table]
        if extra or missing:
            problems.append(f"scaling.{key} must name exactly the numeric features {names}; "
                            f"unknown {extra}, missing {missing}")
            continue
        for i, n in enumerate(names):
            v = table[n]
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
                problems.append(f"scaling.{key}[{n!r}] must be a finite number, got {v!r}")
                continue
            v = float(v)
            lo, hi = c[i] - h[i], c[i] + h[i]
            tol = _TOL * (1.0 + abs(lo) + abs(hi))
            if key == "mean" and not lo - tol <= v <= hi + tol:
                problems.append(f"scaling.mean[{n!r}] = {v:g} is outside the feature's (transformed) declared "
                                f"range [{lo:g}, {hi:g}]")
            elif key == "std":
                smin, smax = (STD_MIN_FRACTION * h[i], h[i]) if h[i] > 0 else (1.0, 1.0)
                if not smin * (1 - 1e-6) - tol <= v <= smax + tol:
                    problems.append(f"scaling.std[{n!r}] = {v:g} is outside [{smin:g}, {smax:g}] (a std above "
                                    "half the declared range is impossible; below the floor it would blow up "
                                    "the feature)")
            out[key][n] = v
    if problems:
        raise ValueError("the scaling statistics are refused:\n" + "\n".join(f"  - {p}" for p in problems))
    return out


def preprocessor(schema: Schema, scaling: Any) -> Preprocessor:
    """The standard-scaling :class:`Preprocessor` of checked ``scaling`` (:func:`check_scaling`)."""
    ok = check_scaling(scaling, schema)
    return Preprocessor(schema, scaling="standard", mean=ok["mean"], std=ok["std"])


__all__ = [
    "STD_MIN_FRACTION",
    "StatisticsRelease",
    "check_scaling",
    "derive_scaling",
    "noise_statistics",
    "noise_std",
    "numeric_features",
    "preprocessor",
    "privacy_record",
    "sensitivity",
    "site_statistics",
    "size",
    "unit_frame",
]
