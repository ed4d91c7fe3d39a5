"""Schema-defined preprocessing, identical at every site.

Features (schema columns with role ``feature``, in schema order) become columns of X:

* numeric: scaled. ``scaling="range"`` uses the schema's declared ``min``/``max``:
  ``(x - min) / (max - min)``. ``scaling="standard"`` uses a mean and standard
  deviation computed from *aggregated* per-site sufficient statistics (counts, sums,
  sums of squares: :meth:`Preprocessor.local_stats`, summed across sites -- also under
  secure aggregation -- then :meth:`Preprocessor.from_stats`). Statistics never come
  from pooled raw records.
* binary: 0/1 as is.
* categorical: one-hot over the schema's categories (declared order).
* A column whose schema says ``missing = true`` also gets a ``<name>__missing``
  indicator (1 where missing). A missing value is imputed with 0 after scaling: the
  mean under standard scaling, the schema minimum under range scaling, "no category" for
  one-hot, 0 for binary.

Output column names are in ``feature_names``. Two sites with the same schema (and the
same summed statistics) produce the same columns in the same order.

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
from fedmtl.schema import Column, Schema

SCALINGS = ("range", "standard")
STAT_KEYS = ("count", "sum", "sumsq")


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
        """Standard-scaling preprocessor from summed :meth:`local_stats` of all sites."""
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
                if self.scaling == "range":
                    lo, hi = float(c.min), float(c.max)  # type: ignore[arg-type]
                    z = (x - lo) / (hi - lo) if hi > lo else x - lo
                else:
                    z = (x - self.mean[c.name]) / self.std[c.name]
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
    order). Sites' results add up elementwise (:func:`sum_stats`), so they can be
    securely aggregated; :meth:`Preprocessor.from_stats` turns the sum into a
    preprocessor. Needs no declared ranges."""
    numeric = [c.name for c in schema.features if c.type == "numeric"]
    Preprocessor._check_columns(df, numeric)
    count, s, ss = np.zeros(len(numeric)), np.zeros(len(numeric)), np.zeros(len(numeric))
    for i, name in enumerate(numeric):
        x = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float)
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
