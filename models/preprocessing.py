"""Schema-defined preprocessing, identical at every site.

Features (schema columns with role ``feature``, in schema order) become columns of X:

* numeric: first the column's declared ``transform`` (``"log1p"``: ``ln(1 + x)``; none:
  ``x``), then clipped to the transformed declared range (``[t(min), t(max)]``, where
  declared), then scaled:

  - ``scaling="range"``: by the transformed declared bounds, ``(t - t(min)) / (t(max) -
    t(min))``;
  - ``scaling="standard"``: ``(t - mean) / std`` with a mean and standard deviation *of
    the transformed values*. They come from aggregated per-site sufficient statistics,
    never from pooled raw records: exact ones (:func:`local_stats` per site, summed with
    :func:`sum_stats`, then :meth:`Preprocessor.from_stats`: the baselines and
    simulations that hold every site's table), or, in a federated job, the statistics
    every site releases with Gaussian noise through secure aggregation
    (:mod:`fedmtl.privacy.stats_release`), turned into ``mean``/``std`` by the
    researcher and sent back to every site.
* binary: 0/1 as is.
* categorical: one-hot over the schema's categories (declared order).
* A column whose schema says ``missing = true`` also gets a ``<name>__missing``
  indicator (1 where missing). A missing value is imputed with 0 after scaling: the
  mean under standard scaling, the schema minimum under range scaling, "no category" for
  one-hot, 0 for binary.

The statistics API, in the order a user needs it::

    stats = sum_stats([local_stats(schema, df) for df in site_tables])   # exact, per site
    pre = Preprocessor.from_stats(schema, stats)        # standard scaling from the sums
    X = pre.transform(df)                               # float32 (n, pre.n_features)
    pre = Preprocessor(schema, scaling="standard", mean={...}, std={...})  # given mean/std
    pre = Preprocessor(schema)                          # range scaling (declared bounds)

:func:`transformed_values` is the per-column transform plus clip that all of these use;
:func:`transformed_bounds` the transformed declared range of a numeric column.

Output column names are in ``feature_names``. Two sites with the same schema (and the
same mean/std) produce the same columns in the same order; the width does not depend on
the scaling.

Labels: :meth:`Preprocessor.labels` gives ``(Y, mask)``, float32 ``(n, T)`` and bool
``(n, T)``, one column per task: 0/1 for binary, the class index for multiclass, the
value for regression; ``mask`` is False where the label is missing (NaN/None/empty).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from fedmtl.models.tasks import TaskSpec
from fedmtl.schema import TRANSFORMS, Column, Schema, apply_transform

SCALINGS = ("range", "standard")
STAT_KEYS = ("count", "sum", "sumsq")


def transformed_bounds(col: Column) -> tuple[float, float] | None:
    """The declared ``[min, max]`` of numeric column ``col`` after its transform, or
    ``None`` when it declares no range."""
    if col.min is None or col.max is None:
        return None
    return float(apply_transform(col.transform, float(col.min))), float(apply_transform(col.transform, float(col.max)))


def transformed_values(col: Column, x: np.ndarray) -> np.ndarray:
    """Numeric values ``x`` (float, NaN where missing) of ``col`` as the model sees them
    before scaling: transformed, then clipped to :func:`transformed_bounds` (records
    validated against the schema are inside the range already; the clip makes every
    per-record bound of the statistics release hold whatever arrives)."""
    x = np.asarray(x, dtype=float)
    if col.transform == "log1p":
        # below the domain of log1p: the declared min (which the schema requires > -1)
        x = np.where(x <= -1.0, float(col.min) if col.min is not None else np.nan, x)
    t = np.asarray(apply_transform(col.transform, x), dtype=float)
    b = transformed_bounds(col)
    return np.clip(t, b[0], b[1]) if b is not None else t


def _is_missing(s: pd.Series) -> np.ndarray:
    m = s.isna().to_numpy()
    if s.dtype == object:
        m = m | s.map(lambda v: isinstance(v, str) and v.strip() == "").to_numpy()
    return m


class Preprocessor:
    """Turns a records DataFrame into a float32 feature tensor, the same way everywhere."""

    def __init__(
        self,
        schema: Schema,
        *,
        scaling: str = "range",
        mean: Mapping[str, float] | None = None,
        std: Mapping[str, float] | None = None,
    ) -> None:
        if scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {scaling!r}; choose one of {list(SCALINGS)}")
        self.schema = schema
        self.scaling = scaling
        self.columns: list[Column] = list(schema.features)
        self.numeric: list[str] = [c.name for c in self.columns if c.type == "numeric"]
        self.mean = {k: float(v) for k, v in (mean or {}).items()}
        self.std = {k: float(v) for k, v in (std or {}).items()}
        problems = []
        for c in self.columns:
            if c.transform is not None and (c.type != "numeric" or c.transform not in TRANSFORMS):
                problems.append(f"column {c.name!r}: transform {c.transform!r} needs a numeric feature and one of "
                                f"{list(TRANSFORMS)}")
            if c.type != "numeric":
                continue
            if scaling == "range":
                if c.min is None or c.max is None:
                    problems.append(
                        f"numeric feature {c.name!r} declares no min/max in the schema; declare them "
                        "or use scaling='standard' with aggregated statistics (Preprocessor.from_stats)"
                    )
            else:
                if c.name not in self.mean or c.name not in self.std:
                    problems.append(f"no mean/std for numeric feature {c.name!r}; build with Preprocessor.from_stats")
                elif not (math.isfinite(self.mean[c.name]) and math.isfinite(self.std[c.name])):
                    problems.append(f"mean/std of {c.name!r} must be finite, got {self.mean[c.name]}, {self.std[c.name]}")
                elif not self.std[c.name] > 0:
                    problems.append(f"std of {c.name!r} must be > 0, got {self.std[c.name]}")
        if problems:
            raise ValueError("cannot build the preprocessor:\n" + "\n".join(f"  - {p}" for p in problems))
        names: list[str] = []
        for c in self.columns:
            if c.type == "categorical":
                names += [f"{c.name}={cat}" for cat in c.categories or ()]
            else:
                names.append(c.name)
            if c.missing:
                names.append(f"{c.name}__missing")
        self.feature_names: list[str] = names

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    # -- statistics ----------------------------------------------------------
    def local_stats(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        """This site's sufficient statistics for standard scaling (see :func:`local_stats`)."""
        return local_stats(self.schema, df)

    @classmethod
    def from_stats(cls, schema: Schema, stats: Mapping[str, np.ndarray]) -> "Preprocessor":
        """Standard-scaling preprocessor from summed :meth:`local_stats` of all sites (exact
        statistics: mean and population std of the transformed, clipped values; a std of
        0 becomes 1). Noised statistics go through
        :func:`fedmtl.privacy.stats_release.derive_scaling` instead, which clamps them."""
        missing = [k for k in STAT_KEYS if k not in stats]
        if missing:
            raise ValueError(f"stats lack {missing}; expected keys {list(STAT_KEYS)} as from local_stats")
        numeric = [c.name for c in schema.features if c.type == "numeric"]
        count, s, ss = (np.asarray(stats[k], dtype=float) for k in STAT_KEYS)
        if not (count.shape == s.shape == ss.shape == (len(numeric),)):
            raise ValueError(
                f"stats arrays must each have {len(numeric)} entries (one per numeric feature "
                f"{numeric}); got {count.shape}, {s.shape}, {ss.shape}"
            )
        mean, std, empty = {}, {}, []
        for i, name in enumerate(numeric):
            if count[i] <= 0:
                empty.append(name)
                continue
            mu = s[i] / count[i]
            var = max(ss[i] / count[i] - mu * mu, 0.0)
            mean[name] = float(mu)
            std[name] = float(math.sqrt(var)) if var > 1e-12 else 1.0
        if empty:
            raise ValueError(f"no observed values for numeric feature(s) {empty}; cannot standardise them")
        return cls(schema, scaling="standard", mean=mean, std=std)

    # -- transforms ----------------------------------------------------------
    @staticmethod
    def _check_columns(df: pd.DataFrame, names: Sequence[str]) -> None:
        absent = [n for n in names if n not in df.columns]
        if absent:
            raise ValueError(f"records lack column(s) {absent} that the schema declares")

    def transform(self, df: pd.DataFrame) -> torch.Tensor:
        """Features of ``df`` as a float32 tensor ``(len(df), n_features)``."""
        self._check_columns(df, [c.name for c in self.columns])
        n = len(df)
        blocks: list[np.ndarray] = []
        problems: list[str] = []
        for c in self.columns:
            col = df[c.name]
            miss = _is_missing(col)
            if miss.any() and not c.missing:
                problems.append(f"column {c.name!r} has {int(miss.sum())} missing value(s) but the schema says missing = false")
            if c.type == "numeric":
                x = pd.to_numeric(col, errors="coerce").to_numpy(dtype=float)
                bad = np.isnan(x) & ~miss
                if bad.any():
                    problems.append(f"column {c.name!r} has {int(bad.sum())} non-numeric value(s)")
                t = transformed_values(c, x)
                if self.scaling == "range":
                    lo, hi = transformed_bounds(c)  # type: ignore[misc] - checked in __init__
                    z = (t - lo) / (hi - lo) if hi > lo else t - lo
                else:
                    z = (t - self.mean[c.name]) / self.std[c.name]
                blocks.append(np.where(miss, 0.0, z)[:, None])
            elif c.type == "binary":
                x = pd.to_numeric(col, errors="coerce").to_numpy(dtype=float)
                bad = ~miss & ~np.isin(x, (0.0, 1.0))
                if bad.any():
                    problems.append(f"binary column {c.name!r} has {int(bad.sum())} value(s) other than 0/1")
                blocks.append(np.where(miss, 0.0, x)[:, None])
            else:
                cats = list(c.categories or ())
                vals = col.astype(object).where(~miss, None).map(lambda v: None if v is None else str(v))
                onehot = np.zeros((n, len(cats)))
                idx = {k: i for i, k in enumerate(cats)}
                unknown = sorted({v for v in vals if v is not None and v not in idx})
                if unknown:
                    problems.append(f"categorical column {c.name!r} has value(s) {unknown[:5]} outside its categories {cats}")
                for r, v in enumerate(vals):
                    if v is not None and v in idx:
                        onehot[r, idx[v]] = 1.0
                blocks.append(onehot)
            if c.missing:
                blocks.append(miss.astype(float)[:, None])
        if problems:
            raise ValueError("records do not fit the schema:\n" + "\n".join(f"  - {p}" for p in problems))
        X = np.concatenate(blocks, axis=1) if blocks else np.zeros((n, 0))
        return torch.from_numpy(X.astype(np.float32))

    def labels(self, df: pd.DataFrame, tasks: Sequence[TaskSpec]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Y, mask)`` for ``tasks`` (see module docs)."""
        return labels_of(df, tasks)

    # -- (de)serialisation ---------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema.to_dict(),
            "scaling": self.scaling,
            "mean": dict(self.mean),
            "std": dict(self.std),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocessor":
        return cls(Schema.from_dict(d["schema"]), scaling=d["scaling"], mean=d.get("mean"), std=d.get("std"))


def local_stats(schema: Schema, df: pd.DataFrame) -> dict[str, np.ndarray]:
    """A site's sufficient statistics for standard scaling: float64 arrays ``count``,
    ``sum``, ``sumsq`` over the non-missing values of each numeric feature (schema
    order), *after* the column's transform and clip (:func:`transformed_values`: the
    values the preprocessor standardises). Sites' results add up elementwise
    (:func:`sum_stats`); :meth:`Preprocessor.from_stats` turns the sum into a
    preprocessor. Exact: for code that holds the tables (baselines, simulations); what a
    datasite releases is :mod:`fedmtl.privacy.stats_release`. Needs no declared ranges."""
    numeric = [c.name for c in schema.features if c.type == "numeric"]
    Preprocessor._check_columns(df, numeric)
    count, s, ss = np.zeros(len(numeric)), np.zeros(len(numeric)), np.zeros(len(numeric))
    for i, name in enumerate(numeric):
        x = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float)
        x = transformed_values(schema.column(name), x)
        x = x[~np.isnan(x)]
        count[i], s[i], ss[i] = x.size, x.sum(), (x * x).sum()
    return {"count": count, "sum": s, "sumsq": ss}


def sum_stats(stats: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Elementwise sum of several sites' :meth:`Preprocessor.local_stats`."""
    if not stats:
        raise ValueError("no statistics to sum")
    return {k: np.sum([np.asarray(s[k], dtype=float) for s in stats], axis=0) for k in STAT_KEYS}


def labels_of(df: pd.DataFrame, tasks: Sequence[TaskSpec]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Y, mask)``: float32 and bool tensors ``(len(df), len(tasks))``."""
    n = len(df)
    Y = np.zeros((n, len(tasks)), dtype=np.float32)
    M = np.zeros((n, len(tasks)), dtype=bool)
    problems = []
    for j, t in enumerate(tasks):
        if t.label not in df.columns:
            problems.append(f"task {t.name!r}: label column {t.label!r} is not in the records")
            continue
        col = df[t.label]
        miss = _is_missing(col)
        if t.kind == "multiclass":
            idx = {k: i for i, k in enumerate(t.classes or ())}
            vals = [None if m else str(v) for v, m in zip(col.tolist(), miss)]
            unknown = sorted({v for v in vals if v is not None and v not in idx})
            if unknown:
                problems.append(f"task {t.name!r}: labels {unknown[:5]} are not among its classes {list(t.classes or ())}")
                continue
            y = np.array([idx[v] if v is not None else 0 for v in vals], dtype=np.float32)
        else:
            x = pd.to_numeric(col, errors="coerce").to_numpy(dtype=float)
            bad = np.isnan(x) & ~miss
            if bad.any():
                problems.append(f"task {t.name!r}: {int(bad.sum())} non-numeric label(s) in {t.label!r}")
                continue
            if t.kind == "binary" and (~np.isin(x[~miss], (0.0, 1.0))).any():
                problems.append(f"task {t.name!r}: binary labels in {t.label!r} must be 0 or 1 (or missing)")
                continue
            y = np.where(miss, 0.0, x).astype(np.float32)
        Y[:, j] = y
        M[:, j] = ~miss
    if problems:
        raise ValueError("cannot build labels:\n" + "\n".join(f"  - {p}" for p in problems))
    return torch.from_numpy(Y), torch.from_numpy(M)
