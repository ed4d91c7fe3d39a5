"""Draft a records schema from an export nobody has described yet.

``fedmtl datasite schema infer --records FILE`` calls :func:`infer_file`; the result is a
:class:`Draft` whose :meth:`Draft.toml` is a schema in the format
:meth:`fedmtl.schema.Schema.load` reads, with TOML comments telling the owner what to check.
It is a draft: every guess is marked ``CHECK``.

What is guessed, per column (rules in the order they apply):

- **split**: a column named ``split``, or one whose values are only ``train``/``test``.
- **id**: one column whose values are unique, never missing and whole numbers or text;
  a name like ``id``, ``pid``, ``mrn``, ``*_id``, ``patient*`` or ``subject*`` is preferred,
  otherwise the first such column is taken and flagged. Text ids get ``type =
  "categorical"`` with no ``categories`` (the list would publish every id).
- **type**: every value a number: ``binary`` when the values are only 0/1,
  ``categorical`` when they are whole numbers with few distinct values (integer codes,
  written as TOML integers: see :func:`fedmtl.schema.category_key`), else ``numeric``.
  Text: ``categorical`` with few distinct values, else unusable (the column is written
  commented out, and listed as a problem).
- **min/max** (numeric): the observed range rounded outward to a round step (5 in the
  range's second digit: 18.3 .. 93.7 becomes 15 .. 95), so that the data fit and the
  published bounds are round numbers rather than the records' exact extremes.
- **missing**: ``true`` when any value is missing (an empty cell or an NA token such as
  ``NA``, ``NaN``, ``null``: :data:`fedmtl.datasites.data.records.NA_TOKENS`).
- **label** (suggested): a binary column whose name looks like an outcome (ends in
  ``_5y``, ``_30d``, ``_event``, ``_status``; contains ``outcome``, ``death``,
  ``mortality``, ``readmission``, ...), unless it names a history (``hx_``, ``prior_``).
  Everything else is a ``feature``.

This module imports pandas and numpy, no syft and no torch; it writes nothing (the
command line writes :meth:`Draft.toml`).
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedmtl.datasites.data.records import missing_mask, read_export
from fedmtl.errors import SchemaError
from fedmtl.schema import Schema

__all__ = ["DraftColumn", "Draft", "infer_schema", "infer_file", "dataset_name"]

#: Whole-number columns with at most this many distinct values are drafted as categories.
MAX_INT_CATEGORIES = 10
#: Text columns with at most this many distinct values are drafted as categories.
MAX_TEXT_CATEGORIES = 20
#: A category with fewer patients than this is flagged (the categories are published).
RARE_CATEGORY = 5

_ID_NAME = re.compile(
    r"(id|pid|uid|mrn|nhs(_?no|_?number)?|.*[_ .-]id|id[_ .-].*|patient.*|subject.*)",
    re.IGNORECASE,
)
_CAMEL_ID = re.compile(r"[a-z]+(Id|ID)")  # patientId, recordID
_OUTCOME_NAME = re.compile(
    r"(_\d+_?(y|yr|yrs|year|years|d|day|days|m|mo|month|months|w|wk|weeks)$"
    r"|_?event$|_?status$|_label$|^label$|^target$|outcome|death|died|mortality|dead"
    r"|readmi|relapse|recurren|surviv|complication)",
    re.IGNORECASE,
)
_HISTORY_NAME = re.compile(r"^(hx|history|prior|prev|previous|baseline|pre)_", re.IGNORECASE)
_YES_NO = ({"yes", "no"}, {"y", "n"}, {"true", "false"}, {"t", "f"})


@dataclass
class DraftColumn:
    """One column of the draft: the schema keys and the comments written above it."""

    name: str
    role: str
    type: str
    min: float | int | None = None
    max: float | int | None = None
    categories: list[int | str] | None = None
    missing: bool = False
    notes: list[str] = field(default_factory=list)  # comment lines above the table
    usable: bool = True  # False: written commented out (the owner must act)
    observed: tuple[float, float] | None = None  # numeric: observed min and max
    n_missing: int = 0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "role": self.role, "type": self.type}
        if self.min is not None:
            d["min"] = self.min
        if self.max is not None:
            d["max"] = self.max
        if self.categories is not None:
            d["categories"] = list(self.categories)
        d["missing"] = self.missing
        return d


@dataclass
class Draft:
    """A drafted schema: its columns, what blocks a launch, and the file it came from."""

    name: str
    columns: list[DraftColumn]
    n_rows: int
    source: str = ""
    problems: list[str] = field(default_factory=list)  # must be fixed before a launch

    def column(self, name: str) -> DraftColumn:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def id_column(self) -> str | None:
        return next((c.name for c in self.columns if c.usable and c.role == "id"), None)

    @property
    def labels(self) -> list[str]:
        return [c.name for c in self.columns if c.usable and c.role == "label"]

    @property
    def split_column(self) -> str | None:
        return next((c.name for c in self.columns if c.usable and c.role == "split"), None)

    def to_dict(self) -> dict[str, Any]:
        """The draft as a schema table (unusable columns left out)."""
        return {
            "dataset": {"name": self.name, "description": ""},
            "columns": [c.to_dict() for c in self.columns if c.usable],
        }

    def schema(self) -> Schema:
        """The draft as a :class:`Schema`; raises :class:`SchemaError` while it has problems
        (no id, no label, ...) that the owner must fix in the file."""
        return Schema.from_dict(self.to_dict(), source="the drafted schema")

    def toml(self) -> str:
        """The draft as a commented TOML schema file."""
        out = [
            f"# DRAFT records schema for {self.source or 'an export'} ({self.n_rows} rows, "
            f"{len(self.columns)} columns),",
            "# written by `fedmtl datasite schema infer`. Every value below is a guess from the data:",
            "# read each column before you launch. Reference: docs/schema.md.",
            "#",
            "# What to check:",
            "#  - role: exactly one \"id\" column (one row per patient); \"label\" columns are the",
            "#    prediction tasks researchers may train on; \"feature\" columns are model inputs;",
            "#    an optional \"split\" column holds train/test.",
            "#  - min/max (numeric): a value outside the range is rejected at launch. A job",
            "#    standardises each numeric feature with a mean and standard deviation from its",
            "#    statistics pass (each site's sums, noised and charged to its privacy budget); the",
            "#    range bounds one patient's share of those sums, so the noise grows with it: declare",
            "#    the plausible clinical range, not far wider than the data. The schema is published",
            "#    to researchers: the range shows the extremes of your records (they are rounded",
            "#    outward here; widen them to a clinical range if the extremes are sensitive).",
            "#  - transform = \"log1p\" (numeric features, min > -1): the model sees ln(1 + x), for",
            "#    skewed values such as many lab results; the export keeps its values and units.",
            "#  - categories: every allowed value; the list is published too. Whole numbers are",
            "#    compared as integers (2, 2.0 and \"2\" are the same category).",
            "#  - missing = true where a value may be empty; a missing label means \"not labelled\".",
            "#  - lines marked CHECK are guesses that need your decision.",
        ]
        if self.problems:
            out += ["#", "# TO FIX before a launch accepts this schema:"]
            for p in self.problems:
                out += textwrap.wrap(p, 90, initial_indent="#  - ", subsequent_indent="#    ", break_on_hyphens=False)
        if self.split_column is None:
            out += [
                "#",
                "# No split column: `fedmtl datasite launch ... --test-fraction 0.2` holds out a",
                "# seeded test split, stratified by the first label (without one, evaluation",
                "# has no held-out records).",
            ]
        out += ["", "[dataset]", f"name = {_toml_str(self.name)}",
                'description = ""  # CHECK: a line researchers will read (cohort, period, site)']
        for c in self.columns:
            out.append("")
            for note in c.notes:
                out += textwrap.wrap(note, 90, initial_indent="# ", subsequent_indent="#   ", break_on_hyphens=False)
            table = ["[[columns]]"] + [f"{k} = {_toml_value(v)}" for k, v in c.to_dict().items()]
            table.append('description = ""')
            out += table if c.usable else [f"# {line}" for line in table]
        return "\n".join(out) + "\n"


# -- inference --------------------------------------------------------------------------


def infer_file(path: str | Path, name: str | None = None) -> Draft:
    """Draft a schema for a CSV or Parquet export (read as :func:`load_records` reads it)."""
    path = Path(path)
    raw, _ = read_export(path)
    return infer_schema(raw, name=name or dataset_name(path.stem), source=str(path))


def dataset_name(text: str) -> str:
    """A datasite-style name from free text: lower case, digits and '-'."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (s or "records")[:63]


def infer_schema(raw: pd.DataFrame, name: str = "records", source: str = "") -> Draft:
    """Draft a schema for ``raw`` (CSV cells as text, or typed Parquet columns)."""
    problems: list[str] = []
    n = len(raw)
    header = [str(c) for c in raw.columns]
    if n == 0:
        problems.append("the export has no rows: nothing could be inferred from values")
    cols = [_infer_column(str(h), raw.iloc[:, i], n) for i, h in enumerate(header)]

    # one id column: a unique, complete column, preferring an id-like name
    candidates = [c for c in cols if c.role == "id"]
    for c in candidates:
        c.role = "feature"
    id_col = next((c for c in candidates if _ID_NAME.fullmatch(c.name) or _CAMEL_ID.fullmatch(c.name)), None)
    if id_col is None and candidates:
        id_col = candidates[0]
        id_col.notes.insert(0, "CHECK: chosen as the patient id from its values only (unique, never "
                            "missing); its name does not look like an id")
    if id_col is not None:
        id_col.role = "id"
        _as_id(id_col)
        for c in candidates:
            if c is not id_col and c.type == "categorical" and c.categories is None:
                c.usable = False
                c.notes.append(f"unique text per row like the id {id_col.name!r}: not a usable feature "
                               "(a second identifier?). Remove it from the export.")
                problems.append(f"column {c.name!r} holds unique text per row: remove it from the export")
            elif c is not id_col:
                c.notes.append(f"CHECK: unique per row like the id {id_col.name!r}; if it is another "
                               "identifier, remove it from the export")
    else:
        problems.append(
            "no id column found (unique, never missing, whole numbers or text): add a patient id "
            "column to the export, then set its role = \"id\""
        )

    # suggested labels: binary, outcome-like names
    n_labels = 0
    for c in cols:
        if c.role != "feature" or not c.usable:
            continue
        outcome = bool(_OUTCOME_NAME.search(c.name)) and not _HISTORY_NAME.match(c.name)
        if outcome and c.type == "binary":
            c.role = "label"
            n_labels += 1
            c.notes.insert(0, "CHECK: suggested label (a prediction task): binary, and the name looks "
                           "like an outcome. If it is an input, set role = \"feature\".")
        elif outcome:
            c.notes.insert(0, "CHECK: the name looks like an outcome; if it is a task, set role = "
                           "\"label\" (a categorical label is a multiclass task, a numeric one a regression)")
    if n_labels == 0:
        problems.append(
            "no label column suggested (no binary column named like an outcome): set role = \"label\" "
            "on each column that is a prediction task"
        )
    if not any(c.role == "feature" and c.usable for c in cols):
        problems.append("no feature column: the model needs at least one input column")
    splits = [c for c in cols if c.role == "split"]
    for extra in splits[1:]:
        extra.role = "feature"
        problems.append(f"more than one train/test column; {splits[0].name!r} is the split, "
                        f"{extra.name!r} was made a feature: keep one")
    problems += [f"column {c.name!r}: {c.notes[-1]}" for c in cols if not c.usable and c.role != "id"
                 and not any(p.startswith(f"column {c.name!r}") for p in problems)]
    return Draft(name=dataset_name(name), columns=cols, n_rows=n, source=source, problems=problems)


def _infer_column(name: str, raw: pd.Series, n: int) -> DraftColumn:
    na = missing_mask(raw)
    present = raw[~na]
    n_missing = int(na.sum())
    col = DraftColumn(name=name, role="feature", type="numeric", missing=n_missing > 0, n_missing=n_missing)
    if n_missing:
        col.notes.append(f"{n_missing} of {n} values missing, so missing = true")
    if len(present) == 0:
        col.usable = False
        col.notes.append("every value is missing: nothing to learn from; remove the column from the export")
        return col
    numbers = _as_numbers(present)
    texts = [str(v).strip() for v in present]
    distinct_text = set(texts)
    lower = {t.lower() for t in distinct_text}

    # the split column
    if name.lower() == "split" or (lower <= {"train", "test"} and numbers is None):
        if lower <= {"train", "test"}:
            col.role, col.type, col.categories = "split", "categorical", ["train", "test"]
            if distinct_text - {"train", "test"}:
                col.usable = False
                col.notes.append("the split values must be written train and test in lower case: "
                                 "recode them in the export")
            elif n_missing:
                col.notes.append("CHECK: patients with no split value are in neither train nor test")
            else:
                col.notes.append("the site's own train/test split")
            return col
        col.notes.append("CHECK: named split, but its values are not only train/test, so it is "
                         "drafted as an ordinary column; a split column holds train and test")

    unique = len(distinct_text) == len(present) and n_missing == 0 and len(present) > 1
    whole = numbers is not None and bool(np.all(np.mod(numbers, 1) == 0))
    if unique and (numbers is None or whole):
        col.role = "id"  # a candidate; infer_schema keeps one
        col.type = "numeric" if numbers is not None else "categorical"
        if numbers is not None:
            col.observed = (float(numbers.min()), float(numbers.max()))
            col.min, col.max = _bounds(*col.observed, whole=True)
        return col

    if numbers is not None:
        finite = numbers[np.isfinite(numbers)]
        if len(finite) < len(numbers):
            col.notes.append(f"CHECK: {len(numbers) - len(finite)} value(s) are not finite (inf): "
                             "launch rejects them; leave such cells empty")
        if len(finite) == 0:
            col.usable = False
            col.notes.append("no finite number in the column: recode it")
            return col
        distinct = np.unique(finite)
        if set(distinct.tolist()) <= {0.0, 1.0}:
            col.type = "binary"
            if len(distinct) == 1:
                col.notes.append(f"CHECK: every value is {int(distinct[0])}: the column carries no "
                                 "information here")
            return col
        if whole and len(distinct) <= MAX_INT_CATEGORIES and len(finite) >= 2 * len(distinct):
            col.type = "categorical"
            col.categories = [int(v) for v in distinct]
            col.notes.append(
                f"CHECK: {len(distinct)} whole-number codes, drafted as categories (one-hot). If the "
                "codes are a count or a measurement whose distances mean something, make it "
                "type = \"numeric\" with min/max instead."
            )
            if len(distinct) == 2:
                col.notes.append("two codes: recoding them as 0/1 makes it a binary column")
            _rare(col, pd.Series(finite).value_counts())
            return col
        lo, hi = float(finite.min()), float(finite.max())
        col.observed = (lo, hi)
        col.min, col.max = _bounds(lo, hi, whole=whole)
        col.notes.append(
            f"observed {_fmt(lo)} .. {_fmt(hi)}; CHECK min/max: the declared range bounds this "
            "feature's released statistics (their noise grows with it), so keep it close to the "
            "plausible values"
        )
        if hi > lo and len(finite) >= 30:
            med = float(np.median(finite))
            share = (med - lo) / (hi - lo)
            skew = float(pd.Series(finite).skew())
            if skew > 2.0 or share < 0.1:
                col.notes.append(
                    f"CHECK: skewed (skewness {skew:.1f}): half of the values lie below {_fmt(med)}, "
                    f"in the lowest {share:.0%} of the range, so scaling squeezes most patients "
                    "together; consider adding transform = \"log1p\" to this column (the model then "
                    "sees ln(1 + x); the export keeps its values)"
                    + ("" if col.min is not None and col.min > -1 else ", which needs min > -1")
                )
        return col

    # text
    if len(lower) == 2 and any(lower == yn for yn in _YES_NO):
        col.type = "categorical"
        col.categories = sorted(distinct_text)
        col.notes.append("CHECK: two text values (yes/no style): recode them as 0/1 in the export to "
                         "make it a binary column (needed for a binary label)")
        return col
    if len(distinct_text) <= MAX_TEXT_CATEGORIES and len(distinct_text) < max(len(present), 2):
        col.type = "categorical"
        col.categories = sorted(distinct_text)
        if len(distinct_text) != len({t.lower() for t in distinct_text}):
            col.notes.append("CHECK: some categories differ only in upper/lower case: recode them "
                             "consistently in the export")
        _rare(col, pd.Series(texts).value_counts())
        return col
    col.type = "categorical"
    col.usable = False
    col.notes.append(
        f"{len(distinct_text)} distinct text values: neither a number nor a short list of "
        "categories (free text, dates?). Remove the column from the export, or recode it as a "
        "number or a few categories, then draft again"
    )
    return col


def _as_id(col: DraftColumn) -> None:
    col.missing = False
    if col.type == "numeric":
        col.min = col.max = None  # ids are not scaled; no range needed
        col.notes.append("the patient id: unique and never missing; not a model input")
    else:
        col.categories = None
        col.notes.append("the patient id (text): unique and never missing; not a model input, "
                         "and no categories list (it would publish every id)")


def _rare(col: DraftColumn, counts: pd.Series) -> None:
    rare = int((counts < RARE_CATEGORY).sum())
    if rare:
        col.notes.append(
            f"CHECK: {rare} categor{'y has' if rare == 1 else 'ies have'} fewer than {RARE_CATEGORY} "
            "patients; the list is published, so consider merging rare categories"
        )


def _as_numbers(present: pd.Series) -> np.ndarray | None:
    """The values as floats, or None if any is not a number."""
    if present.dtype.kind in "biuf":
        return present.to_numpy(dtype=float)
    out = np.empty(len(present))
    for i, v in enumerate(present):
        if isinstance(v, (bool, np.bool_)):
            out[i] = float(v)
            continue
        if isinstance(v, (int, float, np.integer, np.floating)):
            out[i] = float(v)
            continue
        try:
            out[i] = float(str(v).strip())
        except ValueError:
            return None
    return out


def _bounds(lo: float, hi: float, whole: bool) -> tuple[float | int, float | int]:
    """``[lo, hi]`` rounded outward to a round step: half a tenth of the span's magnitude
    (18.3 .. 93.7 becomes 15 .. 95; 0.12 .. 48.7 becomes 0 .. 50)."""
    span = hi - lo if hi > lo else (abs(hi) or 1.0)
    exp = math.floor(math.log10(span)) - 1
    step = 5 * 10.0**exp
    if whole:
        step = max(step, 1.0)
    a, b = math.floor(lo / step) * step, math.ceil(hi / step) * step
    digits = max(0, -exp)
    a, b = round(a, digits), round(b, digits)
    if a > lo:  # float rounding
        a -= step
    if b < hi:
        b += step
    if whole or (float(a).is_integer() and float(b).is_integer() and step >= 1):
        return int(round(a)), int(round(b))
    return a, b


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.4g}"


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise SchemaError(f"cannot write {v!r} in a schema")
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v).__name__)
