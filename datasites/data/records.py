"""Records: load a hospital's CSV or Parquet export and check it against its schema.

``load_records(path, schema)`` reads the file, checks every row and column against the
:class:`~fedmtl.schema.Schema` and returns a typed ``pandas.DataFrame``. It
writes nothing. If anything is wrong it raises one
:class:`~fedmtl.errors.RecordsValidationError` whose ``problems`` list *every* problem
found: missing, extra or repeated columns, non-numeric values in numeric columns,
binary values other than 0/1, categories the schema does not list (compared as text,
whole numbers as integers: a cell ``2.0`` is the category ``"2"``, see
:func:`fedmtl.schema.category_key`), values outside the
schema's range, missing values where the schema does not allow them, duplicate patient
ids, an empty file, a file that is not UTF-8 and a malformed CSV (ragged rows, an
unterminated quote).

Each problem names the column and gives example rows. Row numbers are as in the file:
for a CSV they are the file's line numbers (the header is row 1, so the first patient is
row 2, as a spreadsheet shows it); for Parquet they count records from 1.

Returned dtypes: ``numeric`` and ``binary`` columns are ``float64`` (binary holds 0.0/1.0,
NaN where missing), ``categorical`` columns are pandas categoricals whose categories are
the schema's, the id column is ``int64`` when every id is a whole number (else
``float64``; a categorical id stays text). Columns come in schema order.

``label_counts(df, schema)`` and ``describe_dataset(schema, df)`` summarise the records
for a dataset description without showing any record value.

``add_test_split(df, schema, test_fraction, seed)`` adds a seeded train/test column
(stratified by the first label) to records whose export has none;
``range_warnings(df, schema)`` names the numeric features whose declared range is far
wider than the data.

This module imports neither syft nor torch.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedmtl.errors import DatasiteError, RecordsValidationError, SchemaError
from fedmtl.schema import Column, Schema, apply_transform, category_key

__all__ = [
    "SUFFIXES",
    "NA_TOKENS",
    "load_records",
    "read_export",
    "validate_frame",
    "label_counts",
    "describe_dataset",
    "add_test_split",
    "range_warnings",
    "task_kind",
]

#: File suffixes ``load_records`` reads, by format.
SUFFIXES: dict[str, str] = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}

#: Cell texts read as "missing" (compared case-insensitively, after stripping spaces).
NA_TOKENS: frozenset[str] = frozenset({"", "na", "n/a", "nan", "null", "none", "<na>", "#n/a"})

_EXAMPLES = 5  # example rows shown per problem


# -- public API -----------------------------------------------------------------------


def load_records(path: str | Path, schema: Schema) -> pd.DataFrame:
    """Read a CSV or Parquet export, validate it against ``schema``, return typed records.

    Raises :class:`RecordsValidationError` listing every problem found; writes nothing.
    """
    raw, rownums, problems, source = _read_export(Path(path))
    if raw is None:  # unreadable: nothing further can be checked
        raise RecordsValidationError(problems, source)
    return validate_frame(raw, schema, rownums=rownums, source=source, prior_problems=problems)


def read_export(path: str | Path) -> tuple[pd.DataFrame, list[int]]:
    """Read a CSV or Parquet export without a schema: ``(frame, row numbers)``.

    CSV cells stay text (missing cells are NA tokens, see :data:`NA_TOKENS`); Parquet
    columns keep their types. Raises :class:`RecordsValidationError` if the file cannot
    be read or is malformed (the same checks as :func:`load_records`).
    """
    raw, rownums, problems, source = _read_export(Path(path))
    if raw is None or problems:
        raise RecordsValidationError(problems, source)
    return raw, rownums


def _read_export(path: Path) -> tuple[pd.DataFrame | None, list[int], list[str], str]:
    source = f"records file {path}"
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise RecordsValidationError(
            [
                f"unsupported file type {path.suffix or '(no suffix)'!r}: export the records "
                f"as CSV (.csv) or Parquet (.parquet, .pq)"
            ],
            source,
        )
    if not path.is_file():
        raise RecordsValidationError(
            [f"{path} does not exist or is not a file; check the path"], source
        )
    if path.stat().st_size == 0:
        raise RecordsValidationError(
            ["the file is empty (0 bytes): export the records with a header row and one row per patient"],
            source,
        )
    if fmt == "csv":
        raw, rownums, problems = _read_csv(path.read_bytes())
    else:
        raw, rownums, problems = _read_parquet(path)
    return raw, rownums, problems, source


def validate_frame(
    raw: pd.DataFrame,
    schema: Schema,
    *,
    rownums: Sequence[int] | None = None,
    source: str = "records",
    prior_problems: Sequence[str] = (),
) -> pd.DataFrame:
    """Validate an untyped frame (cells as text or as Parquet values) against ``schema``.

    ``rownums`` gives each row's number as the user sees it (default: 1, 2, ...).
    Returns the typed frame or raises :class:`RecordsValidationError` with every problem
    (``prior_problems`` first).
    """
    problems = list(prior_problems)
    rows = np.asarray(rownums if rownums is not None else range(1, len(raw) + 1))
    header = [str(c) for c in raw.columns]
    dupes = sorted(n for n, k in Counter(header).items() if k > 1)
    for name in dupes:
        problems.append(f"column {name!r} appears more than once in the header; keep one")
    expected = schema.names
    missing_cols = [n for n in expected if n not in header]
    extra_cols = [n for n in header if n not in expected and n not in dupes]
    if missing_cols:
        problems.append(
            f"missing column(s) {missing_cols}: the schema declares them; add them to the "
            "export (empty cells are fine where the schema allows missing values)"
        )
    if extra_cols:
        problems.append(
            f"extra column(s) {extra_cols} not in the schema: drop them from the export or "
            "declare them in the schema"
        )
    if len(raw) == 0:
        problems.append(
            "the file has a header but no rows: export at least one patient"
            if len(header)
            else "the file has no header and no rows"
        )
        raise RecordsValidationError(problems, source)

    typed: dict[str, pd.Series] = {}
    for col in schema.columns:
        if col.name not in header or col.name in dupes:
            continue
        series, col_problems = _check_column(raw[col.name], col, rows)
        typed[col.name] = series
        problems.extend(col_problems)
    id_name = schema.id_column
    if id_name in typed:
        problems.extend(_check_duplicates(typed[id_name], rows, id_name))
    if problems:
        raise RecordsValidationError(problems, source)
    out = pd.DataFrame({c.name: typed[c.name] for c in schema.columns})
    out.index = pd.RangeIndex(len(out))
    return out


def task_kind(col: Column) -> str:
    """The task kind a label column defines: ``binary``, ``multiclass`` or ``regression``."""
    return {"binary": "binary", "categorical": "multiclass", "numeric": "regression"}[col.type]


def label_counts(df: pd.DataFrame, schema: Schema) -> dict[str, dict[str, Any]]:
    """Per task (label column): how many patients are labelled, and the label balance.

    - binary: ``{"kind", "labelled", "missing", "positive", "negative"}``
    - multiclass: ``{"kind", "labelled", "missing", "classes": {category: n}}``
    - regression: ``{"kind", "labelled", "missing", "mean"}`` (``mean`` is None if unlabelled)

    Only counts and a mean: no record value. Plain Python types (JSON-ready).
    """
    out: dict[str, dict[str, Any]] = {}
    for col in schema.labels:
        s = df[col.name]
        labelled = int(s.notna().sum())
        entry: dict[str, Any] = {
            "kind": task_kind(col),
            "labelled": labelled,
            "missing": int(len(s) - labelled),
        }
        if col.type == "binary":
            v = pd.to_numeric(s, errors="coerce")
            entry["positive"] = int((v == 1).sum())
            entry["negative"] = int((v == 0).sum())
        elif col.type == "categorical":
            vc = s.astype("object").value_counts()
            entry["classes"] = {str(c): int(vc.get(c, 0)) for c in (col.categories or ())}
        else:
            v = pd.to_numeric(s, errors="coerce")
            entry["mean"] = float(v.mean()) if labelled else None
        out[col.name] = entry
    return out


def describe_dataset(schema: Schema, df: pd.DataFrame) -> str:
    """A markdown description for a dataset: schema table, split sizes, label counts.

    Shows aggregate counts only (rows, missing counts, label balance), never a record.
    """
    n = len(df)
    lines = [f"# {schema.name}", ""]
    if schema.description:
        lines += [schema.description, ""]
    lines += [f"{n} patients (one row each)."]
    split = schema.split_column
    if split is not None and split in df:
        vc = df[split].astype("object").value_counts()
        sizes = ", ".join(f"{c}: {int(vc.get(c, 0))}" for c in schema.column(split).categories or ())
        lines += [f"Split ({split!r}): {sizes}."]
    lines += [
        "",
        "## Columns",
        "",
        "| column | role | type | allowed values | missing allowed | missing | description |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in schema.columns:
        if c.type == "categorical":
            allowed = ", ".join(c.categories or ())
        elif c.type == "binary":
            allowed = "0, 1"
        else:
            lo = "" if c.min is None else _fmt(c.min)
            hi = "" if c.max is None else _fmt(c.max)
            allowed = f"[{lo}, {hi}]" if (lo or hi) else "any number"
        n_miss = int(df[c.name].isna().sum()) if c.name in df else 0
        lines.append(
            f"| {c.name} | {c.role} | {c.type} | {allowed} | {'yes' if c.missing else 'no'} "
            f"| {n_miss} | {c.description} |"
        )
    counts = label_counts(df, schema)
    lines += [
        "",
        "## Tasks (label counts)",
        "",
        "| task | kind | labelled | missing | balance |",
        "| --- | --- | --- | --- | --- |",
    ]
    for task, e in counts.items():
        if e["kind"] == "binary":
            bal = f"positive {e['positive']}, negative {e['negative']}"
        elif e["kind"] == "multiclass":
            bal = ", ".join(f"{k} {v}" for k, v in e["classes"].items())
        else:
            bal = "mean " + ("n/a" if e["mean"] is None else f"{e['mean']:.4g}")
        lines.append(f"| {task} | {e['kind']} | {e['labelled']} | {e['missing']} | {bal} |")
    if split is not None and split in df:
        lines += ["", "Labelled patients per split:", ""]
        lines += ["| task | " + " | ".join(schema.column(split).categories or ()) + " |"]
        lines += ["| --- |" + " --- |" * len(schema.column(split).categories or ())]
        for col in schema.labels:
            cells = [
                str(int(df.loc[df[split].astype("object") == cat, col.name].notna().sum()))
                for cat in schema.column(split).categories or ()
            ]
            lines.append(f"| {col.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: A declared range wider than this many times the observed span draws a warning ...
RANGE_SPAN_FACTOR = 20.0  # observed span < 5% of the declared span
#: ... and so does a declared max above this many times the observed max.
RANGE_MAX_FACTOR = 10.0
#: The column :func:`add_test_split` adds (``fedmtl_split`` if the export uses the name).
SPLIT_COLUMN = "split"


def add_test_split(
    df: pd.DataFrame, schema: Schema, test_fraction: float, seed: int = 0
) -> tuple[pd.DataFrame, Schema, dict[str, Any]]:
    """Add a train/test column to typed records whose schema declares none.

    About ``test_fraction`` of the patients go to ``test``: ``round(n * test_fraction)``
    in all, shared out over the strata of the first label column in proportion to their
    sizes (largest remainders), drawn at random within each stratum with
    ``numpy.random.default_rng(seed)``. The strata of a binary or categorical label are its
    values, of a numeric label its quartiles; unlabelled patients are one more stratum.
    Without a label column the draw is not stratified. Deterministic given the arguments.

    Returns the new records and schema (the split column last, its description saying how
    it was made) and the split's metadata ``{"column", "source": "launch",
    "test_fraction", "seed", "stratified_by"}``. Writes nothing.
    """
    if schema.split_column is not None:
        raise DatasiteError(
            f"the schema already declares the split column {schema.split_column!r}; a test "
            "fraction applies only to records without one: drop --test-fraction, or remove "
            "the split column from the export and the schema"
        )
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not (
        0.0 < float(test_fraction) < 1.0
    ):
        raise DatasiteError(f"the test fraction must be a number between 0 and 1 (e.g. 0.2), got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DatasiteError(f"the split seed must be a whole number >= 0, got {seed!r}")
    f, n = float(test_fraction), len(df)
    n_test = int(round(n * f))
    if n_test < 1 or n_test > n - 1:
        raise DatasiteError(
            f"a test fraction of {f:g} of {n} patients leaves "
            + ("no test patient" if n_test < 1 else "no training patient")
            + "; choose another --test-fraction"
        )
    column = SPLIT_COLUMN if SPLIT_COLUMN not in schema.names else "fedmtl_split"
    if column in schema.names:
        raise DatasiteError(
            f"the schema has columns named {SPLIT_COLUMN!r} and 'fedmtl_split' that are not a "
            "split column; rename one so that launch can add the train/test column"
        )
    label = schema.labels[0] if schema.labels else None
    strata = _strata(df[label.name], label) if label is not None else np.zeros(n, dtype=object)
    keys = sorted(set(strata.tolist()), key=str)
    sizes = np.array([int((strata == k).sum()) for k in keys])
    quota = sizes * n_test / n
    take = np.floor(quota).astype(int)
    order = sorted(range(len(keys)), key=lambda i: (-(quota[i] - take[i]), i))
    for i in order[: n_test - int(take.sum())]:
        take[i] += 1
    rng = np.random.default_rng(seed)
    is_test = np.zeros(n, dtype=bool)
    for k, t in zip(keys, take):
        members = np.flatnonzero(strata == k)
        is_test[rng.permutation(members)[:t]] = True
    how = f"stratified by {label.name!r}" if label is not None else "not stratified (no label column)"
    col = Column(
        column, "split", "categorical", categories=("train", "test"),
        description=f"train/test split made at launch: test fraction {f:g}, seed {seed}, {how}",
    )
    out = df.copy()
    out[column] = pd.Categorical(np.where(is_test, "test", "train"), categories=["train", "test"])
    new_schema = Schema(columns=(*schema.columns, col), name=schema.name,
                        description=schema.description, extra=dict(schema.extra))
    info = {
        "column": column,
        "source": "launch",
        "test_fraction": f,
        "seed": int(seed),
        "stratified_by": label.name if label is not None else None,
    }
    return out[new_schema.names], new_schema, info


def _strata(s: pd.Series, col: Column) -> np.ndarray:
    """One stratum key per patient: the label value (numeric: its quartile), or "missing"."""
    out = np.full(len(s), "missing", dtype=object)
    present = s.notna().to_numpy()
    if col.type == "numeric":
        v = pd.to_numeric(s, errors="coerce")
        if present.sum() >= 4:
            bins = pd.qcut(v[present], 4, labels=False, duplicates="drop")
            out[present] = [f"q{int(b)}" for b in bins]
        else:
            out[present] = "value"
    else:
        out[present] = [str(x) for x in s[present].astype(object)]
    return out


def range_warnings(df: pd.DataFrame, schema: Schema) -> list[str]:
    """One message per numeric feature whose declared range is far wider than its values,
    compared as the model sees them (after the column's ``transform``): the observed span
    covers under 5% of the declared span, or the declared max is over 10 times the
    observed max. Under ``scaling = "range"`` such a feature is squeezed into a sliver of
    [0, 1]; under ``scaling = "standard"`` (the default) the noise of the released feature
    statistics grows with the declared range, so its mean/std come out noisy. A
    right-skewed column without a transform is told about ``transform = "log1p"``."""
    out: list[str] = []
    for c in schema.features:
        if c.type != "numeric" or c.name not in df or (c.min is None and c.max is None):
            continue
        x = pd.to_numeric(df[c.name], errors="coerce").dropna()
        x = x[np.isfinite(x)]
        if x.empty:
            continue
        t = pd.Series(np.asarray(apply_transform(c.transform, x.clip(lower=c.min).to_numpy(dtype=float))))
        tmin = None if c.min is None else float(apply_transform(c.transform, float(c.min)))
        tmax = None if c.max is None else float(apply_transform(c.transform, float(c.max)))
        lo, hi = float(t.min()), float(t.max())
        how = f" after {c.transform}" if c.transform else ""
        why = ""
        if tmin is not None and tmax is not None and tmax > tmin:
            share = (hi - lo) / (tmax - tmin)
            if share * RANGE_SPAN_FACTOR < 1.0:
                why = f"the values cover {share:.1%} of the declared span{how}"
        if not why and tmax is not None and hi > 0 and tmax > RANGE_MAX_FACTOR * hi:
            why = f"the declared max is {tmax / hi:.0f} times the largest value{how}"
        if why:
            declared = f"[{'' if c.min is None else _fmt(c.min)}, {'' if c.max is None else _fmt(c.max)}]"
            skewed = (c.transform is None and c.min is not None and c.min > -1 and len(x) > 2
                      and float(x.skew()) > 1.0)
            hint = (f" The values are right-skewed (skewness {float(x.skew()):.1f}): transform = \"log1p\" "
                    "in the schema often fits such a column." if skewed else "")
            out.append(
                f"column {c.name!r}: declared range {declared} is far wider than the data "
                f"(observed {float(x.min()):.4g} .. {float(x.max()):.4g}; {why}). With scaling = 'range' "
                f"the feature varies only within a sliver of [0, 1] (poorly conditioned training); with "
                f"scaling = 'standard' (the default) the noise of the released feature statistics grows "
                f"with the declared range, so its mean and std come out noisy. Declare the plausible range "
                f"in the schema; see docs/schema.md (Ranges).{hint}"
            )
    return out


# -- reading --------------------------------------------------------------------------


def _read_csv(data: bytes) -> tuple[pd.DataFrame | None, list[int], list[str]]:
    """Decode and parse CSV bytes into a frame of text cells plus each row's line number."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        return (
            None,
            [],
            [
                f"the file is not UTF-8 text: byte 0x{data[e.start]:02x} at row {line} "
                f"(byte offset {e.start}) cannot be decoded; re-export the file as UTF-8"
            ],
        )
    if not text.strip():
        return None, [], ["the file holds only blank space: export a header row and one row per patient"]
    if not any(ch in text for ch in _CSV_SPECIAL):
        return _read_plain_csv(text)
    return _read_csv_module(text)


def _read_csv_module(text: str) -> tuple[pd.DataFrame | None, list[int], list[str]]:
    """Parse CSV text with ``csv.reader`` (quotes, any line end): text cells, line numbers."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[list[str]] = []
    linenos: list[int] = []
    header: list[str] | None = None
    header_line = 0
    problems: list[str] = []
    ragged: dict[int, list[int]] = {}
    start = 1
    try:
        for fields in reader:
            line = start
            start = reader.line_num + 1
            if not fields or all(f.strip() == "" for f in fields) and len(fields) <= 1:
                continue  # blank line
            if header is None:
                header = [f.strip() for f in fields]
                header_line = line
                continue
            if len(fields) != len(header):
                ragged.setdefault(len(fields), []).append(line)
                continue
            rows.append(fields)
            linenos.append(line)
    except csv.Error as e:
        problems.append(
            f"malformed CSV at row {start}: {e} (check for an unterminated quote or a "
            "stray quote character); rows after it were not read"
        )
    if header is None:
        return None, [], problems or ["the file has no header row"]
    for n_fields, lines in sorted(ragged.items()):
        problems.append(
            f"malformed CSV: {len(lines)} row(s) have {n_fields} field(s) but the header "
            f"(row {header_line}) has {len(header)}: {_rowlist(lines)}; "
            "check for unquoted commas or missing cells"
        )
    frame = pd.DataFrame(rows, columns=header, dtype=object) if rows else pd.DataFrame(columns=header)
    return frame, linenos, problems


#: Characters that make the csv module's parse differ from a split on commas and newlines
#: (quotes, other line ends, NUL): a file with any of them is read with ``csv.reader``.
_CSV_SPECIAL = ('"', "\r", "\x00")


def _read_plain_csv(text: str) -> tuple[pd.DataFrame | None, list[int], list[str]]:
    """:func:`_read_csv` for text without quotes, carriage returns or NUL characters.

    Without them every physical line is one record and its fields are the line split on
    commas, exactly what ``csv.reader`` yields; this is the same parse done with a few
    whole-file operations (1M rows in about a second instead of seven)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final line end
    n_commas = np.fromiter((ln.count(",") for ln in lines), dtype=np.int64, count=len(lines))
    # csv.reader's blank line: no field, or one field of spaces only
    blank = n_commas == 0
    if blank.any():
        idx = np.flatnonzero(blank)
        blank[idx] = [not lines[i].strip() for i in idx]
    nonblank = np.flatnonzero(~blank)
    if nonblank.size == 0:
        return None, [], ["the file has no header row"]
    first = int(nonblank[0])
    header = [f.strip() for f in lines[first].split(",")]
    width = len(header)
    body = nonblank[1:]
    fields = n_commas[body] + 1
    good = body[fields == width]
    problems: list[str] = []
    bad = body[fields != width]
    if bad.size:
        ragged: dict[int, list[int]] = {}
        for i, k in zip(bad.tolist(), (n_commas[bad] + 1).tolist()):
            ragged.setdefault(k, []).append(i + 1)
        for n_fields, rows in sorted(ragged.items()):
            problems.append(
                f"malformed CSV: {len(rows)} row(s) have {n_fields} field(s) but the header "
                f"(row {first + 1}) has {width}: {_rowlist(rows)}; "
                "check for unquoted commas or missing cells"
            )
    linenos = (good + 1).tolist()
    if not linenos:
        return pd.DataFrame(columns=header), [], problems
    if good.size == len(lines) - first - 1:  # no blank or ragged line after the header
        cells = text[len(lines[first]) + 1 + sum(len(ln) + 1 for ln in lines[:first]):]
        cells = cells[:-1] if cells.endswith("\n") else cells
        flat = cells.replace("\n", ",").split(",")
    else:
        flat = ",".join([lines[i] for i in good.tolist()]).split(",")
    grid = np.empty(len(flat), dtype=object)
    grid[:] = flat
    frame = pd.DataFrame(grid.reshape(len(linenos), width), columns=header, dtype=object)
    return frame, linenos, problems


def _read_parquet(path: Path) -> tuple[pd.DataFrame | None, list[int], list[str]]:
    try:
        frame = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        return None, [], [f"not a readable Parquet file ({type(e).__name__}: {e}); re-export it"]
    frame = frame.reset_index(drop=True)
    return frame, list(range(1, len(frame) + 1)), []


# -- column checks --------------------------------------------------------------------


def _check_column(raw: pd.Series, col: Column, rows: np.ndarray) -> tuple[pd.Series, list[str]]:
    """Type one column and list its problems (type, category, range, missing)."""
    problems: list[str] = []
    where = f"column {col.name!r}"
    cells = _distinct_text(raw)
    is_na = missing_mask(raw, _cells=cells)
    if col.type in ("numeric", "binary"):
        values, bad = _to_float(raw, is_na, cells)
        if bad.any():
            problems.append(
                f"{where} ({col.type}): {int(bad.sum())} value(s) are not numbers, e.g. "
                f"{_examples(rows, raw, bad)}; use plain numbers"
                + (" (0 or 1)" if col.type == "binary" else "")
            )
        nonfinite = ~bad & ~is_na & ~np.isfinite(values)
        if nonfinite.any():
            problems.append(
                f"{where}: {int(nonfinite.sum())} value(s) are not finite, e.g. "
                f"{_examples(rows, raw, nonfinite)}; leave the cell empty if unknown"
            )
        ok = ~bad & ~is_na & ~nonfinite
        if col.type == "binary":
            not01 = ok & ~np.isin(values, (0.0, 1.0))
            if not01.any():
                problems.append(
                    f"{where} (binary): {int(not01.sum())} value(s) are not 0 or 1, e.g. "
                    f"{_examples(rows, raw, not01)}; code it as 0/1"
                )
        else:
            if col.min is not None:
                low = ok & (values < col.min)
                if low.any():
                    problems.append(
                        f"{where}: {int(low.sum())} value(s) below min {_fmt(col.min)}, e.g. "
                        f"{_examples(rows, raw, low, quote=False)}"
                    )
            if col.max is not None:
                high = ok & (values > col.max)
                if high.any():
                    problems.append(
                        f"{where}: {int(high.sum())} value(s) above max {_fmt(col.max)}, e.g. "
                        f"{_examples(rows, raw, high, quote=False)}"
                    )
        values = np.where(ok, values, np.nan)
        series = pd.Series(values, dtype="float64", name=col.name)
        if col.role == "id" and not series.isna().any():
            if np.all(np.mod(values, 1) == 0) and np.all(np.abs(values) < 2**53):
                series = series.astype("int64")
    else:
        # one comparison rule (fedmtl.schema.category_key): text, whole numbers as
        # integers, so a code exported as 2 or 2.0 is the category "2"
        if cells is not None:  # each distinct cell text once
            codes, uniques = cells
            text_u = np.empty(len(uniques), dtype=object)
            text_u[:] = [None if u.strip().lower() in NA_TOKENS else _category_text(u) for u in uniques]
            text = pd.Series(text_u[codes], dtype=object, name=col.name)
        else:
            text = pd.Series(
                [None if m else _category_text(v) for v, m in zip(raw, is_na)], dtype=object, name=col.name
            )
        cats = set(col.categories or ())
        if col.role == "id" and col.categories is None:
            unknown = np.zeros(len(text), dtype=bool)  # text ids: any text
        else:
            unknown = ~is_na & ~text.isin(cats).to_numpy()
        if unknown.any():
            problems.append(
                f"{where} (categorical): {int(unknown.sum())} value(s) not in categories "
                f"{list(col.categories or ())}, e.g. {_examples(rows, raw, unknown)}; recode "
                "them or add the category to the schema"
            )
        text[is_na | unknown] = None
        if col.role == "id":
            series = text.astype("object")
        else:
            series = pd.Series(
                pd.Categorical(text, categories=list(col.categories or ())), name=col.name
            )
    if not col.missing and is_na.any():
        problems.append(
            f"{where}: {int(is_na.sum())} missing (empty/NaN) value(s), e.g. "
            f"{_rowlist(rows[is_na])}; the schema does not allow missing values here: fill "
            "them" + ("" if col.role == "id" else ", or set missing = true in the schema")
        )
    return series, problems


def _check_duplicates(ids: pd.Series, rows: np.ndarray, name: str) -> list[str]:
    dup = ids.duplicated(keep=False).to_numpy() & ids.notna().to_numpy()
    if not dup.any():
        return []
    groups: dict[Any, list[int]] = {}
    for v, r in zip(ids[dup], rows[dup]):
        groups.setdefault(v, []).append(int(r))
    shown = "; ".join(
        f"id {_fmt(v)} in {_rowlist(rs)}" for v, rs in list(groups.items())[:_EXAMPLES]
    )
    more = f" (and {len(groups) - _EXAMPLES} more)" if len(groups) > _EXAMPLES else ""
    return [
        f"column {name!r} (patient id): {len(groups)} id(s) appear more than once: "
        f"{shown}{more}; each patient must have one row"
    ]


def _all_text(raw: pd.Series) -> bool:
    return raw.dtype == object and pd.api.types.infer_dtype(raw, skipna=False) in ("string", "empty")


def _distinct_text(raw: pd.Series) -> tuple[np.ndarray, np.ndarray] | None:
    """For a column of text cells, ``(codes, uniques)`` with ``raw == uniques[codes]``
    (each distinct text once, so per-cell checks run once per distinct value); else None."""
    if not _all_text(raw):
        return None
    codes, uniques = pd.factorize(raw.to_numpy(dtype=object), use_na_sentinel=False)
    return codes.astype(np.intp, copy=False), np.asarray(uniques, dtype=object)


def missing_mask(raw: pd.Series, *, _cells: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Which cells of an export column are missing (None, NaN, or an NA token such as "NA")."""
    cells = _cells if _cells is not None else _distinct_text(raw)
    if cells is not None:  # CSV cells: a missing cell is an NA token
        codes, uniques = cells
        na_u = np.array([u.strip().lower() in NA_TOKENS for u in uniques], dtype=bool)
        return na_u[codes]
    if raw.dtype != object and raw.dtype.kind in "biufcmM":  # typed (Parquet) column
        return pd.isna(raw).to_numpy(dtype=bool)
    mask = np.zeros(len(raw), dtype=bool)
    for i, v in enumerate(raw):
        if v is None or v is pd.NA or v is pd.NaT:
            mask[i] = True
        elif isinstance(v, (float, np.floating)) and math.isnan(v):
            mask[i] = True
        elif isinstance(v, str) and v.strip().lower() in NA_TOKENS:
            mask[i] = True
    return mask


def _to_float(
    raw: pd.Series, is_na: np.ndarray, cells: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Values as float64 and a mask of non-missing cells that are not numbers."""
    if raw.dtype.kind in "biuf":  # typed Parquet column
        values = raw.to_numpy(dtype=float, na_value=np.nan)
        return values, np.zeros(len(raw), dtype=bool)
    if cells is None and _all_text(raw):
        cells = _distinct_text(raw)
    if cells is not None:  # parse each distinct text once
        codes, uniques = cells
        na_u = np.array([u.strip().lower() in NA_TOKENS for u in uniques], dtype=bool)
        stripped = pd.Series([None if m else u.strip() for u, m in zip(uniques, na_u)], dtype=object)
        values_u = pd.to_numeric(stripped, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        values = values_u[codes]
        bad = ~is_na & np.isnan(values)
        return values, bad
    values = np.full(len(raw), np.nan)
    bad = np.zeros(len(raw), dtype=bool)
    for i, v in enumerate(raw):
        if is_na[i]:
            continue
        if isinstance(v, (bool, np.bool_, int, float, np.integer, np.floating)):
            values[i] = float(v)
            continue
        try:
            values[i] = float(str(v).strip())
        except ValueError:
            bad[i] = True
    return values, bad


def _category_text(v: Any) -> str:
    """A cell as its category text (:func:`fedmtl.schema.category_key`); a boolean cell
    stays ``"True"``/``"False"`` and so is reported as not in the categories."""
    try:
        return category_key(v)
    except SchemaError:
        return str(v)


def _examples(rows: np.ndarray, raw: pd.Series, mask: np.ndarray, quote: bool = True) -> str:
    idx = np.flatnonzero(mask)[:_EXAMPLES]
    show = repr if quote else (lambda v: str(v).strip())
    return ", ".join(f"row {int(rows[i])}: {show(raw.iloc[i])}" for i in idx) + (
        ", ..." if int(mask.sum()) > _EXAMPLES else ""
    )


def _rowlist(rows: Sequence[int] | np.ndarray) -> str:
    """``row 4`` or ``rows 3, 5, ...`` (at most five shown)."""
    rs = [int(r) for r in list(rows)[:_EXAMPLES]]
    more = ", ..." if len(rows) > _EXAMPLES else ""
    return ("row " if len(rows) == 1 else "rows ") + ", ".join(map(str, rs)) + more


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)
