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
the columns and dtypes :func:`~fedmtl.datasites.data.records.load_records` returns and passes
its validation against the same schema.

This module imports neither syft nor torch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from fedmtl.errors import MockError
from fedmtl.schema import Column, Schema

__all__ = ["MockError", "make_mock", "real_row_overlap"]

_MAX_REDRAWS = 50


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
        real = _RowSet(df[compare])
        clash = real.contains(out[compare])
        for _ in range(_MAX_REDRAWS):
            if not clash.any():
                break
            where = np.flatnonzero(clash)
            for name in compare:
                redrawn = samplers[name](rng, len(where))
                col = out[name].copy()
                col.iloc[where] = redrawn.to_numpy()
                out[name] = col
            # only the redrawn rows can have changed
            clash = np.zeros(n, dtype=bool)
            clash[where] = real.contains(out[compare].iloc[where])
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
    return int(_RowSet(df[compare]).contains(mock[compare]).sum())


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


class _RowSet:
    """The rows of a frame as a set, for "is this row one of them?" asked of many rows at once.

    Rows are compared value by value: text and categories as text (``str``), numbers as
    floats (-0.0 equal to 0.0), every missing value (None, NaN) equal to every other, column by column
    as vectors: each column becomes integer codes into the real column's distinct values
    (-1 missing, -2 a value the real column never has), rows are hashed on their codes,
    and a hash match is confirmed by comparing the codes, so the answer is exact."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.columns = list(frame.columns)
        self._vocab: list[tuple[str, pd.Index]] = []
        codes = []
        for name in self.columns:
            kind, vals, na = _keyed(frame[name])
            uniq = pd.unique(vals[~na])
            index = pd.Index(uniq, dtype=object if kind == "text" else "float64")
            self._vocab.append((kind, index))
            codes.append(self._codes(kind, index, vals, na))
        real = np.column_stack(codes) if codes else np.zeros((len(frame), 0), np.int64)
        hashes = _hash_rows(real)
        order = np.argsort(hashes, kind="stable")
        self._hashes = hashes[order]  # sorted; rows with one hash are adjacent in _real
        self._real = real[order]

    @staticmethod
    def _codes(kind: str, index: pd.Index, vals: np.ndarray, na: np.ndarray) -> np.ndarray:
        out = np.full(len(vals), -1, dtype=np.int64)
        if (~na).any():
            found = index.get_indexer(vals[~na]).astype(np.int64)
            found[found < 0] = -2
            out[~na] = found
        return out

    def contains(self, frame: pd.DataFrame) -> np.ndarray:
        """One bool per row of ``frame`` (same columns): does it equal some row of the set?"""
        n = len(frame)
        codes = []
        for name, (kind, index) in zip(self.columns, self._vocab):
            k, vals, na = _keyed(frame[name])
            if k != kind:  # text never equals a number; missing equals missing
                codes.append(np.where(na, -1, -2).astype(np.int64))
            else:
                codes.append(self._codes(kind, index, vals, na))
        mat = np.column_stack(codes) if codes else np.zeros((n, 0), np.int64)
        hashes = _hash_rows(mat)
        lo = np.searchsorted(self._hashes, hashes, side="left")
        hi = np.searchsorted(self._hashes, hashes, side="right")
        out = np.zeros(n, dtype=bool)
        for i in np.flatnonzero((hi > lo) & ~(mat == -2).any(axis=1)).tolist():
            # confirm the hash match value by value
            out[i] = bool((self._real[lo[i]:hi[i]] == mat[i]).all(axis=1).any())
        return out


def _keyed(s: pd.Series) -> tuple[str, np.ndarray, np.ndarray]:
    """A column as rows are compared: ``(kind, values, missing)``; kind ``"text"``
    (values as str) or ``"number"`` (float64, -0.0 as 0.0)."""
    if isinstance(s.dtype, pd.CategoricalDtype) or s.dtype == object:
        obj = s.astype("object").to_numpy()
        na = np.fromiter(
            (v is None or (isinstance(v, float) and math.isnan(v)) for v in obj), dtype=bool, count=len(obj)
        ) if s.dtype == object else s.isna().to_numpy()
        vals = np.empty(len(obj), dtype=object)
        vals[~na] = [str(v) for v in obj[~na]] if s.dtype == object else _category_strings(s)[~na]
        return "text", vals, na
    arr = s.to_numpy(dtype=float)
    na = np.isnan(arr)
    return "number", arr + 0.0, na


def _category_strings(s: pd.Series) -> np.ndarray:
    """Each cell of a categorical column as ``str(category)`` (missing cells: None)."""
    cats = np.array([str(c) for c in s.cat.categories] + [None], dtype=object)
    return cats[s.cat.codes.to_numpy()]  # code -1 (missing) picks the trailing None


def _hash_rows(codes: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row of an integer matrix (equal rows, equal hashes)."""
    h = np.full(len(codes), 0x9E3779B97F4A7C15, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(codes.shape[1]):
            h ^= codes[:, j].astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) + (h << np.uint64(6)) + (
                h >> np.uint64(2)
            )
            h *= np.uint64(0xFF51AFD7ED558CCD)
    return h
