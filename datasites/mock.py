"""Mock records: a synthetic table a researcher may look at instead of the real one.

``make_mock(df, schema)`` draws every column independently from a smoothed version of
the real column's marginal distribution:

- numeric columns: a draw from the real values' quantile function between the 0.5th and
  99.5th percentiles (101 quantiles, linearly interpolated), plus Gaussian jitter of a
  Silverman bandwidth, clipped to the schema's range and to 3 bandwidths beyond those
  percentiles; rounded to whole numbers when every real value is whole; missing with
  the real missing rate (never where the schema forbids missing values);
- binary and categorical columns (features, labels, the split): the real frequencies of
  each value, missing included;
- the id column: fresh ids that are not real ids (numbers above every real id, shuffled,
  or ``mock-000001``-style text for a text id).

Columns are independent, so no joint structure (which patient has which combination of
values) leaks. No mock row equals a real row: rows whose non-id, non-split values equal
some real row's (NaN counts as equal to NaN) are redrawn until none does. The mock has
the columns and dtypes :func:`~fedmtl.datasites.records.load_records` returns and passes
its validation against the same schema.

This module imports neither syft nor torch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from fedmtl.errors import FedMTLError
from fedmtl.schema import Column, Schema

__all__ = ["MockError", "make_mock", "real_row_overlap"]

_MAX_REDRAWS = 50


class MockError(FedMTLError, ValueError):
    """A mock could not be made (for example, every possible row is a real row)."""


def make_mock(
    df: pd.DataFrame, schema: Schema, n: int | None = None, seed: int = 0
) -> pd.DataFrame:
    """A synthetic table like ``df`` (``n`` rows, default ``len(df)``), with no real row.

    ``df`` should be the output of :func:`load_records` for ``schema``.
    Deterministic given ``seed``.
    """
    missing = [c for c in schema.names if c not in df.columns]
    if missing:
        raise MockError(f"the records lack schema column(s) {missing}; load them with load_records first")
    n = len(df) if n is None else int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    samplers = {c.name: _sampler(df[c.name], c) for c in schema.columns if c.role != "id"}
    out = pd.DataFrame({name: s(rng, n) for name, s in samplers.items()})
    compare = [c.name for c in schema.columns if c.role not in ("id", "split")]
    if compare and n:
        real = set(_row_keys(df[compare]))
        for _ in range(_MAX_REDRAWS):
            clash = np.array([k in real for k in _row_keys(out[compare])], dtype=bool)
            if not clash.any():
                break
            k = int(clash.sum())
            for name in compare:
                redrawn = samplers[name](rng, k)
                col = out[name].copy()
                col.iloc[np.flatnonzero(clash)] = redrawn.to_numpy()
                out[name] = col
        else:
            raise MockError(
                f"could not draw {n} mock rows unlike every real row after {_MAX_REDRAWS} "
                "redraws: the schema's columns allow too few distinct rows; add a numeric "
                "feature or request fewer rows"
            )
    id_col = schema.column(schema.id_column)
    out.insert(0, id_col.name, _fresh_ids(df[id_col.name], n, rng))
    out = out[schema.names]
    for c in schema.columns:  # dtypes as load_records returns them
        if c.type == "categorical" and c.role != "id":
            out[c.name] = pd.Categorical(out[c.name], categories=list(c.categories or ()))
    return out.reset_index(drop=True)


def real_row_overlap(mock: pd.DataFrame, df: pd.DataFrame, schema: Schema) -> int:
    """How many mock rows equal a real row on every non-id, non-split column."""
    compare = [c.name for c in schema.columns if c.role not in ("id", "split")]
    real = set(_row_keys(df[compare]))
    return sum(k in real for k in _row_keys(mock[compare]))


# -- samplers -------------------------------------------------------------------------


def _sampler(real: pd.Series, col: Column):
    """A function ``(rng, k) -> Series`` drawing ``k`` values like ``real``."""
    na = real.isna().to_numpy()
    p_missing = float(na.mean()) if (col.missing and len(real)) else 0.0
    if col.type == "numeric":
        values = pd.to_numeric(real[~na], errors="coerce").to_numpy(dtype=float)
        values = values[np.isfinite(values)]
        return _numeric_sampler(values, col, p_missing)
    if col.type == "binary":
        obs = pd.to_numeric(real[~na], errors="coerce").dropna()
        cats: list[Any] = [0.0, 1.0]
        freq = np.array([(obs == 0).sum(), (obs == 1).sum()], dtype=float)
        dtype = "float64"
    else:
        obs = real[~na].astype("object")
        cats = list(col.categories or sorted(obs.unique()))
        vc = obs.value_counts()
        freq = np.array([vc.get(c, 0) for c in cats], dtype=float)
        dtype = "object"

    def draw(rng: np.random.Generator, k: int) -> pd.Series:
        if freq.sum() == 0:
            # nothing observed: all missing if allowed, else the first value
            fill = None if col.missing else cats[0]
            vals = np.array([fill] * k, dtype=object)
        else:
            vals = np.array(cats, dtype=object)[rng.choice(len(cats), size=k, p=freq / freq.sum())]
            vals[rng.random(k) < p_missing] = None
        s = pd.Series(vals, dtype=object)
        return s.astype("float64") if dtype == "float64" else s

    return draw


def _numeric_sampler(values: np.ndarray, col: Column, p_missing: float):
    lo = col.min if col.min is not None else -np.inf
    hi = col.max if col.max is not None else np.inf
    whole = bool(len(values)) and bool(np.all(np.mod(values, 1) == 0))
    if len(values):
        # quantile function between the 0.5th and 99.5th percentiles (the exact extremes of
        # the real data are never reproduced), smoothed by Gaussian jitter
        grid = np.linspace(0.0, 1.0, 101)
        quant = np.quantile(values, np.linspace(0.005, 0.995, 101))
        sd = float(values.std())
        iqr = float(np.quantile(values, 0.75) - np.quantile(values, 0.25))
        spread = min(sd, iqr / 1.34) if iqr > 0 else sd
        bw = 0.9 * spread * len(values) ** (-0.2) if spread > 0 else 0.0
        if bw == 0.0:  # constant column: jitter by a little so rows still differ
            bw = 0.01 * max(abs(float(values[0])), 1.0)
        lo = max(lo, float(quant[0]) - 3 * bw)
        hi = min(hi, float(quant[-1]) + 3 * bw)
    fallback = 0.0 if lo <= 0.0 <= hi else (lo if np.isfinite(lo) else hi)

    def draw(rng: np.random.Generator, k: int) -> pd.Series:
        if not len(values):
            out = np.full(k, np.nan if col.missing else fallback)
            return pd.Series(out, dtype="float64")
        x = np.interp(rng.random(k), grid, quant) + rng.normal(0.0, bw, size=k)
        if whole:
            x = np.round(x)
            x = np.clip(x, math.ceil(lo) if np.isfinite(lo) else lo, math.floor(hi) if np.isfinite(hi) else hi)
        x = np.clip(x, lo, hi)
        x[rng.random(k) < p_missing] = np.nan
        return pd.Series(x, dtype="float64")

    return draw


def _fresh_ids(real: pd.Series, n: int, rng: np.random.Generator) -> pd.Series:
    """``n`` distinct ids, none of them a real id."""
    num = pd.to_numeric(real, errors="coerce")
    if len(real) == 0 or num.notna().all():
        top = int(np.floor(num.max())) if len(real) else 0
        ids = top + 1 + rng.permutation(max(10 * n, 1))[:n]
        s = pd.Series(ids, dtype="int64")
        return s if real.dtype.kind in "iu" or len(real) == 0 else s.astype("float64")
    real_set = set(map(str, real))
    ids, i = [], 0
    while len(ids) < n:
        i += 1
        cand = f"mock-{i:06d}"
        if cand not in real_set:
            ids.append(cand)
    order = rng.permutation(n)
    return pd.Series(np.array(ids, dtype=object)[order], dtype=object)


def _row_keys(frame: pd.DataFrame) -> list[tuple]:
    """One hashable key per row; NaN/None as None, so missing equals missing."""
    cols = []
    for name in frame.columns:
        s = frame[name]
        if isinstance(s.dtype, pd.CategoricalDtype) or s.dtype == object:
            vals = [None if (v is None or (isinstance(v, float) and math.isnan(v))) else str(v) for v in s.astype("object")]
        else:
            arr = s.to_numpy(dtype=float)
            vals = [None if math.isnan(v) else float(v) for v in arr]
        cols.append(vals)
    return list(zip(*cols)) if cols else [() for _ in range(len(frame))]
