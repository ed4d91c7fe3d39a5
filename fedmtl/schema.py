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

The sites of a federation share one schema: :func:`schema_differences` says, column by
column and key by key, how schemas differ (``fedmtl datasite schema diff`` and every refusal
of differing sites use it), and :func:`merge_schemas` makes the sites' drafts one
(``fedmtl datasite schema merge``).

This module imports neither syft nor torch.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from fedmtl.errors import SchemaError

Role = Literal["id", "feature", "label", "split"]
ColType = Literal["numeric", "categorical", "binary"]
ROLES: tuple[str, ...] = ("id", "feature", "label", "split")
TYPES: tuple[str, ...] = ("numeric", "categorical", "binary")
#: per-column transforms a numeric feature may declare (``transform = "log1p"``)
TRANSFORMS: tuple[str, ...] = ("log1p",)

#: the dataset name of a schema whose ``[dataset]`` table names none
DEFAULT_NAME = "records"

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
    name: str = DEFAULT_NAME
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
            name=str(ds.get("name", DEFAULT_NAME)),
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


# -- one schema for the federation: differences and merge ------------------------------

#: the column keys compared across schemas, in the order differences are reported
COLUMN_KEYS: tuple[str, ...] = ("role", "type", "transform", "min", "max", "categories", "missing", "description")
#: the keys of a column whose values must agree for a merge (a union would change what the column means)
MERGE_MUST_AGREE: tuple[str, ...] = ("role", "type", "transform")
#: the one command line that makes the sites' schemas one (quoted by every refusal)
MERGE_HINT = (
    "merge the sites' drafts with `fedmtl datasite schema merge A.toml B.toml ... --out shared.toml` "
    "and launch every datasite with shared.toml (a datasite's schema is set at its first launch; "
    "docs/schema.md, 'One schema for the federation')"
)


@dataclass(frozen=True)
class SchemaDifference:
    """One way two or more schemas differ: one key of one column, or of the ``[dataset]`` table.

    Attributes:
        column: the column's name; ``None`` for the ``[dataset]`` table and the column order.
        key: a column key (:data:`COLUMN_KEYS`), ``"present"`` (the column is in some schemas
            only: ``values`` are ``True``/``False``), a ``[dataset]`` key, or ``"order"`` (the
            shared columns come in another order: ``values`` are name tuples).
        values: each schema's value, in the order the schemas were given; ``None`` where a
            schema declares none (or lacks the column).
    """

    column: str | None
    key: str
    values: tuple[Any, ...]

    @property
    def where(self) -> str:
        """``column 'age' key 'max'``, ``column 'bmi'``, ``[dataset] key 'name'`` or ``the column order``."""
        if self.key == "order":
            return "the column order"
        if self.column is None:
            return f"[dataset] key {self.key!r}"
        if self.key == "present":
            return f"column {self.column!r}"
        return f"column {self.column!r} key {self.key!r}"

    def describe(self, labels: Sequence[str] | None = None) -> str:
        """The difference in one line.

        Args:
            labels: one name per schema (file names, site names). Without them (two schemas
                only) the values are written ``(90 vs 85)``.

        Returns:
            e.g. ``column 'age' key 'max': a.toml says 90, b.toml says 85``, or ``column 'age'
            key 'max' (90 vs 85)``, or ``column 'bmi': in a.toml, not in b.toml`` (without labels:
            ``column 'bmi' (declared vs absent)``).
        """
        if self.key == "present":
            if labels is None:
                return f"{self.where} ({' vs '.join('declared' if v else 'absent' for v in self.values)})"
            has = [lab for lab, v in zip(labels, self.values) if v]
            lacks = [lab for lab, v in zip(labels, self.values) if not v]
            return f"{self.where}: in {', '.join(has)}, not in {', '.join(lacks)}"
        shown = [_show(v) for v in self.values]
        if labels is None:
            return f"{self.where} ({' vs '.join(shown)})"
        return f"{self.where}: " + ", ".join(f"{lab} says {s}" for lab, s in zip(labels, shown))


def _show(v: Any) -> str:
    if v is None:
        return "nothing"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, tuple) and all(isinstance(x, str) for x in v):
        return "[" + ", ".join(v) + "]"
    return json.dumps(v, ensure_ascii=False) if isinstance(v, str) else str(v)


def schema_differences(schemas: Sequence[Schema], *, columns_only: bool = False) -> list[SchemaDifference]:
    """Every way ``schemas`` differ, column by column and key by key.

    The one comparison behind ``fedmtl datasite schema diff``, the merge's conflicts and
    every refusal of sites whose schemas differ. Columns are reported in the order the
    first schema declares them (then columns only later schemas have), keys in
    :data:`COLUMN_KEYS` order; a column some schemas lack is one ``"present"`` difference.

    Args:
        schemas: two or more schemas (one alone has no differences).
        columns_only: leave out the ``[dataset]`` table (name, description, other keys):
            what a job needs the sites to share is the columns.

    Returns:
        The differences; empty when the schemas declare the same columns (and, unless
        ``columns_only``, the same ``[dataset]`` table).
    """
    out: list[SchemaDifference] = []
    if len(schemas) < 2:
        return out
    if not columns_only:
        tables = [{"name": s.name, "description": s.description, **s.extra} for s in schemas]
        for key in _ordered_union(list(t) for t in tables):
            vals = tuple(t.get(key) for t in tables)
            if len(set(map(repr, vals))) > 1:
                out.append(SchemaDifference(None, key, vals))
    by_name = [{c.name: c for c in s.columns} for s in schemas]
    names = _ordered_union(s.names for s in schemas)
    for name in names:
        cols = [b.get(name) for b in by_name]
        if any(c is None for c in cols):
            out.append(SchemaDifference(name, "present", tuple(c is not None for c in cols)))
            continue
        for key in COLUMN_KEYS:
            vals = tuple(getattr(c, key) for c in cols)
            if len(set(vals)) > 1:
                out.append(SchemaDifference(name, key, vals))
    common = [n for n in names if all(n in b for b in by_name)]
    orders = tuple(tuple(n for n in s.names if n in common) for s in schemas)
    if len(set(orders)) > 1:
        out.append(SchemaDifference(None, "order", orders))
    return out


def describe_differences(diffs: Sequence[SchemaDifference], labels: Sequence[str] | None = None,
                         *, limit: int = 6, sep: str = "; ") -> str:
    """``diffs`` in one text, at most ``limit`` of them (then ``and N more``).

    Args:
        diffs: from :func:`schema_differences`.
        labels: one name per schema compared (see :meth:`SchemaDifference.describe`).
        limit: how many to write out.
        sep: what goes between two.

    Returns:
        The text; empty for no differences.
    """
    parts = [d.describe(labels) for d in diffs[:limit]]
    if len(diffs) > limit:
        parts.append(f"and {len(diffs) - limit} more (`fedmtl datasite schema diff` lists them all)")
    return sep.join(parts)


def merge_schemas(schemas: Sequence[Schema], labels: Sequence[str] | None = None, *,
                  name: str | None = None, description: str | None = None) -> Schema:
    """One shared schema every site's records fit: the union of the sites' drafts.

    Per column: the numeric range is the union (the least ``min``, the greatest ``max``),
    ``categories`` the union (the first schema's order, then new ones as they come),
    ``missing`` is true if any schema allows it, ``description`` the first non-empty one.
    ``role``, ``type`` and ``transform`` must agree, a label's ``categories`` (its classes)
    too, every column must be in every schema, and a ``min``/``max``/``categories`` that one
    schema declares the others must declare as well: anything else is a conflict.

    The ``[dataset]`` table: ``name`` and ``description`` as given, else the schemas' own
    when they all agree, else none (each site then publishes ``SITE-records``); other
    ``[dataset]`` keys are kept where the schemas agree.

    Args:
        schemas: the sites' schemas (drafts), two or more.
        labels: one name per schema for the messages (file names); default ``#1``, ``#2``, ...
        name: the shared dataset name.
        description: the shared dataset description.

    Returns:
        The merged schema (valid: it loads as any schema does).

    Raises:
        SchemaError: fewer than two schemas, or conflicts (each named: the column, the key,
            which schema says what, and what to fix).
    """
    if len(schemas) < 2:
        raise SchemaError("merging needs two or more schemas")
    labels = list(labels) if labels is not None else [f"#{i}" for i in range(1, len(schemas) + 1)]
    if len(labels) != len(schemas):
        raise ValueError(f"{len(labels)} labels for {len(schemas)} schemas")
    problems: list[str] = []
    blocked: set[str | None] = set()  # columns whose role/type/transform differ: the rest follows
    for d in schema_differences(schemas, columns_only=True):
        fix = "" if d.column in blocked else _conflict_fix(d, schemas)
        if fix:
            problems.append(f"{d.describe(labels)}: {fix}")
            if d.key in MERGE_MUST_AGREE:
                blocked.add(d.column)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise SchemaError(
            f"the schemas {', '.join(labels)} cannot be merged; fix these in the drafts (or the exports), "
            f"then merge again:\n{lines}"
        )
    first = schemas[0]
    cols = [_merge_column([s.column(c.name) for s in schemas]) for c in first.columns]
    tables = [{"name": s.name, "description": s.description, **s.extra} for s in schemas]
    agreed = {k: tables[0][k] for k in tables[0] if all(k in t and t[k] == tables[0][k] for t in tables)}
    merged = {
        "dataset": {
            **{k: v for k, v in agreed.items() if k not in ("name", "description")},
            "name": name if name is not None else agreed.get("name", DEFAULT_NAME),
            "description": description if description is not None else agreed.get("description", ""),
        },
        "columns": [c.to_dict() for c in cols],
    }
    return Schema.from_dict(_drop_none(merged), source="the merged schema")


def _conflict_fix(d: SchemaDifference, schemas: Sequence[Schema]) -> str:
    """What to do about difference ``d`` before a merge; empty when the merge resolves it."""
    if d.key == "present":
        return ("every site's export needs the same columns: add the column to the exports that lack it, "
                "or drop it from the others and their drafts")
    if d.key in MERGE_MUST_AGREE:
        return f"the {d.key} must be the same in every draft: decide which is right and write it in all of them"
    if any(v is None for v in d.values) and d.key in ("min", "max", "categories"):
        return f"declared in some drafts only: declare {d.key} in every draft (or in none)"
    if d.key == "categories" and schemas[0].column(d.column).role == "label":
        return ("a label's categories are the task's classes: agree on one list of classes and write it in "
                "every draft (recode the exports if the codes mean different things)")
    return ""


def _merge_column(cols: Sequence[Column]) -> Column:
    """The union of one column's declarations (their role, type and transform agree)."""
    c0 = cols[0]
    lo = min(c.min for c in cols) if c0.min is not None else None
    hi = max(c.max for c in cols) if c0.max is not None else None
    cats = None
    if c0.categories is not None:
        cats = tuple(_ordered_union(c.categories or () for c in cols))
    return Column(
        name=c0.name, role=c0.role, type=c0.type, min=lo, max=hi, categories=cats,
        missing=any(c.missing for c in cols), transform=c0.transform,
        description=next((c.description for c in cols if c.description), ""),
    )


def _ordered_union(seqs: Any) -> list[Any]:
    out: list[Any] = []
    seen: set[Any] = set()
    for seq in seqs:
        for x in seq:
            if x not in seen:
                seen.add(x)
                out.append(x)
    return out
