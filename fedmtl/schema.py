"""The records schema: what each column of a hospital's export is and may hold.

A schema is a TOML file::

    [dataset]
    name = "st-mary"
    description = "NAFLD cohort, St Mary's"

    [[columns]]
    name = "id"
    role = "id"            # id | feature | label
    type = "numeric"       # numeric | categorical | binary
    missing = false

    [[columns]]
    name = "age"
    role = "feature"
    type = "numeric"
    min = 18
    max = 100
    missing = false

    [[columns]]
    name = "alt"
    role = "feature"
    type = "numeric"
    min = 0
    max = 6000
    transform = "log1p"    # skewed: the model sees log(1 + x) (numeric features only, min > -1)

    [[columns]]
    name = "sex"
    role = "feature"
    type = "categorical"
    categories = ["F", "M"]

    [[columns]]
    name = "diabetes_5y"
    role = "label"         # a task label: the column name is the task's label column
    type = "binary"
    missing = true         # labels are partial: a missing label means "not labelled"

An optional ``split`` column (categorical, categories ``["train", "test"]``) assigns
each patient to the site's own train or test split.

Categories are compared as text after one normalisation (:func:`category_key`): a value
that is a whole number, written as ``1``, ``1.0``, ``"1"`` or ``"1.0"`` in the schema or
in the records, is the category ``"1"``; any other value is its text with surrounding
spaces removed (so ``"01"`` and ``"1"`` differ, and ``"1.5"`` stays ``"1.5"``). Integer
codes (tumour size 1, 2, 3) may therefore be written as TOML integers and match the
records whether the export wrote ``2`` or ``2.0``. Booleans are not categories: use
``type = "binary"`` for a 0/1 column. An ``id`` column of type ``categorical`` (text ids)
needs no ``categories``: any text is allowed.

``transform = "log1p"`` (numeric features only; needs a declared ``min > -1``) makes the
model see ``ln(1 + x)`` instead of ``x``: the records keep their values and ranges, and
the preprocessing applies the transform (to the values and to the declared bounds) before
scaling (:func:`apply_transform`, :mod:`fedmtl.models.preprocessing`).

``binary`` columns hold 0/1. A ``label`` column of type ``categorical`` is a
multiclass task, of type ``numeric`` a regression task. Exactly one ``id`` column.

This module imports neither syft nor torch.
"""

from __future__ import annotations

import math
import numbers
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedmtl.errors import SchemaError

Role = Literal["id", "feature", "label", "split"]
ColType = Literal["numeric", "categorical", "binary"]
ROLES: tuple[str, ...] = ("id", "feature", "label", "split")
TYPES: tuple[str, ...] = ("numeric", "categorical", "binary")
#: per-column transforms a numeric feature may declare (``transform = "log1p"``)
TRANSFORMS: tuple[str, ...] = ("log1p",)

_WHOLE_NUMBER = re.compile(r"[+-]?(0|[1-9][0-9]*)(\.0+)?")


def category_key(value: Any) -> str:
    """The text a category value is compared as, in the schema and in the records.

    Whole numbers become their integer text, however written: ``1``, ``1.0``, ``"1"``,
    ``" 1.0 "``, ``"+1"`` are all ``"1"`` (the form a spreadsheet or pandas may export an
    integer code in). Any other value is ``str(value)`` with surrounding spaces stripped:
    ``"01"`` stays ``"01"`` (a leading zero is part of a code), ``1.5`` is ``"1.5"``.
    Raises :class:`~fedmtl.errors.SchemaError` for a boolean (use a binary column).
    """
    if isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", "") == "b":
        raise SchemaError(
            f"{value!r} is a boolean, not a category: declare the column as type 'binary' "
            "(values 0/1), or write the categories as text"
        )
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        v = float(value)
        if math.isfinite(v) and v.is_integer():
            return str(int(v))
        return str(v)
    text = str(value).strip()
    if _WHOLE_NUMBER.fullmatch(text):
        return str(int(float(text)))
    return text


@dataclass(frozen=True)
class Column:
    name: str
    role: Role
    type: ColType
    min: float | None = None
    max: float | None = None
    categories: tuple[str, ...] | None = None
    missing: bool = False
    description: str = ""
    #: per-column transform applied before scaling (numeric features only): see TRANSFORMS
    transform: str | None = None

    def __post_init__(self) -> None:
        if self.categories is not None:  # the one comparison rule, also for code-built columns
            object.__setattr__(self, "categories", tuple(category_key(c) for c in self.categories))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["categories"] is not None:
            d["categories"] = list(d["categories"])
        return {k: v for k, v in d.items() if v is not None and v != ""}


@dataclass(frozen=True)
class Schema:
    columns: tuple[Column, ...]
    name: str = "records"
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    # -- views ---------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def id_column(self) -> str:
        return next(c.name for c in self.columns if c.role == "id")

    @property
    def features(self) -> list[Column]:
        return [c for c in self.columns if c.role == "feature"]

    @property
    def labels(self) -> list[Column]:
        return [c for c in self.columns if c.role == "label"]

    @property
    def split_column(self) -> str | None:
        return next((c.name for c in self.columns if c.role == "split"), None)

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise SchemaError(
            f"column {name!r} is not in schema {self.name!r}; its columns are {self.names}"
        )

    # -- (de)serialisation ---------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": {"name": self.name, "description": self.description, **self.extra},
            "columns": [c.to_dict() for c in self.columns],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "schema") -> "Schema":
        problems: list[str] = []
        if not isinstance(data, dict):
            raise SchemaError(f"{source}: expected a table with [dataset] and [[columns]]")
        ds = data.get("dataset", {}) or {}
        if not isinstance(ds, dict):
            problems.append("[dataset] must be a table")
            ds = {}
        raw_cols = data.get("columns")
        if not isinstance(raw_cols, list) or not raw_cols:
            raise SchemaError(
                f"{source}: no [[columns]] entries; declare one [[columns]] table per column"
            )
        cols: list[Column] = []
        seen: dict[str, int] = {}
        allowed_keys = {"name", "role", "type", "min", "max", "categories", "missing", "description", "transform"}
        for i, rc in enumerate(raw_cols, start=1):
            where = f"[[columns]] #{i}"
            if not isinstance(rc, dict):
                problems.append(f"{where}: must be a table")
                continue
            name = rc.get("name")
            if not isinstance(name, str) or not name:
                problems.append(f"{where}: needs a non-empty string 'name'")
                continue
            where = f"column {name!r}"
            if name in seen:
                problems.append(
                    f"{where} is named twice (entries #{seen[name]} and #{i}); "
                    "each column must appear once"
                )
                continue
            seen[name] = i
            unknown = set(rc) - allowed_keys
            if unknown:
                problems.append(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed_keys)}")
            role, ctype = rc.get("role"), rc.get("type")
            if role not in ROLES:
                problems.append(f"{where}: role {role!r} is not one of {list(ROLES)}")
            if ctype not in TYPES:
                problems.append(f"{where}: type {ctype!r} is not one of {list(TYPES)}")
            lo, hi = rc.get("min"), rc.get("max")
            for key, v in (("min", lo), ("max", hi)):
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    problems.append(f"{where}: {key} must be a number, got {v!r}")
            if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo > hi:
                problems.append(f"{where}: min {lo} is greater than max {hi}")
            cats = rc.get("categories")
            if ctype == "categorical" and role == "id" and cats is None:
                pass  # text ids: any text, no list (it would publish every id)
            elif ctype == "categorical":
                if not isinstance(cats, list) or not cats:
                    problems.append(f"{where}: a categorical column needs a non-empty 'categories' list")
                    cats = None
                else:
                    cats, cat_problem = _category_list(cats)
                    if cat_problem:
                        problems.append(f"{where}: {cat_problem}")
            elif cats is not None:
                problems.append(f"{where}: 'categories' only applies to categorical columns")
                cats = None
            if ctype != "numeric" and (lo is not None or hi is not None):
                problems.append(f"{where}: min/max only apply to numeric columns")
            missing = rc.get("missing", False)
            if not isinstance(missing, bool):
                problems.append(f"{where}: 'missing' must be true or false")
                missing = False
            if role == "id" and missing:
                problems.append(f"{where}: the id column cannot allow missing values")
            transform = rc.get("transform")
            if transform is not None:
                problems += _transform_problems(where, transform, role, ctype, lo)
            if problems:
                continue
            cols.append(
                Column(
                    name=name,
                    role=role,
                    type=ctype,
                    min=float(lo) if lo is not None else None,
                    max=float(hi) if hi is not None else None,
                    categories=tuple(cats) if cats else None,
                    missing=missing,
                    description=str(rc.get("description", "")),
                    transform=transform,
                )
            )
        if not problems:
            n_id = sum(c.role == "id" for c in cols)
            if n_id != 1:
                problems.append(f"exactly one column must have role 'id' (found {n_id})")
            if not any(c.role == "label" for c in cols):
                problems.append("no column has role 'label': declare at least one task label")
            if not any(c.role == "feature" for c in cols):
                problems.append("no column has role 'feature'")
            splits = [c for c in cols if c.role == "split"]
            if len(splits) > 1:
                problems.append("at most one column may have role 'split'")
            for c in splits:
                if c.type != "categorical" or set(c.categories or ()) != {"train", "test"}:
                    problems.append(
                        f"split column {c.name!r} must be categorical with categories ['train', 'test']"
                    )
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise SchemaError(f"{source} is invalid; fix these:\n{lines}")
        extra = {k: v for k, v in ds.items() if k not in ("name", "description")}
        return cls(
            columns=tuple(cols),
            name=str(ds.get("name", "records")),
            description=str(ds.get("description", "")),
            extra=extra,
        )

    @classmethod
    def load(cls, path: str | Path) -> "Schema":
        path = Path(path)
        if not path.is_file():
            raise SchemaError(f"schema file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise SchemaError(f"schema file {path} is not UTF-8 text: {e}") from e
        except tomllib.TOMLDecodeError as e:
            raise SchemaError(f"schema file {path} is not valid TOML: {e}") from e
        return cls.from_dict(data, source=f"schema file {path}")

    def dumps(self) -> str:
        import tomli_w

        return tomli_w.dumps(_drop_none(self.to_dict()))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.dumps(), encoding="utf-8")


def _transform_problems(where: str, transform: Any, role: Any, ctype: Any, lo: Any) -> list[str]:
    """Why ``transform`` does not fit a column (empty when it does)."""
    if transform not in TRANSFORMS:
        return [f"{where}: transform {transform!r} is not one of {list(TRANSFORMS)}"]
    if role != "feature" or ctype != "numeric":
        return [f"{where}: transform {transform!r} applies to numeric features only (this column is a "
                f"{ctype} {role}); remove it"]
    if transform == "log1p":
        if not isinstance(lo, (int, float)) or isinstance(lo, bool):
            return [f"{where}: transform 'log1p' needs a declared min > -1 (log1p(x) = ln(1 + x) is defined "
                    "for x > -1); declare min"]
        if lo <= -1:
            return [f"{where}: transform 'log1p' needs min > -1 (log1p(x) = ln(1 + x) is defined for x > -1), "
                    f"got min {lo}; raise min or remove the transform"]
    return []


def apply_transform(transform: str | None, x):
    """``transform`` applied to the numeric array (or number) ``x``: the identity for
    ``None``, ``numpy.log1p`` for ``"log1p"``. The one place a transform is computed
    (values, declared bounds and predictions all go through it)."""
    if transform is None:
        return x
    if transform == "log1p":
        import numpy as np

        return np.log1p(x)
    raise SchemaError(f"unknown transform {transform!r}; choose one of {list(TRANSFORMS)}")


def _category_list(cats: list[Any]) -> tuple[list[str] | None, str]:
    """The normalised categories (see :func:`category_key`) or a problem."""
    keys: list[str] = []
    for c in cats:
        if isinstance(c, (list, dict)):
            return None, f"'categories' must list strings or numbers, got {c!r}"
        try:
            keys.append(category_key(c))
        except SchemaError as e:
            return None, f"'categories': {e}"
    if any(k == "" for k in keys):
        return None, "'categories' has an empty category; an empty cell means a missing value"
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        return None, (
            f"'categories' has duplicates {dupes} (compared as text, whole numbers as "
            "integers: 1, 1.0 and \"1\" are the same category)"
        )
    return keys, ""


def _drop_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_none(v) for v in obj]
    return obj
