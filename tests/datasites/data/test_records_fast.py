"""The whole-column fast paths of fedmtl.datasites.data.records against their per-cell
definitions: the quote-free CSV reader against ``csv.reader``, and column typing against
a cell-by-cell reference (the rules of the module docstring, applied one cell at a time)."""

from __future__ import annotations

import math
import random

import numpy as np
import pandas as pd
import pytest

from fedmtl.datasites.data.records import (
    NA_TOKENS,
    _read_csv,
    _read_csv_module,
    _read_plain_csv,
    load_records,
    missing_mask,
    validate_frame,
)
from fedmtl.errors import RecordsValidationError
from fedmtl.schema import Schema, category_key

ATOMS = ["a", "1", " ", ",", "\n", "NA", "2.5", "\t", ",,", "\n\n", "x y", "\x0c", "é", "-0", " 7 "]


def _same_parse(text: str) -> None:
    fast, slow = _read_plain_csv(text), _read_csv_module(text)
    assert fast[1] == slow[1]  # line numbers
    assert fast[2] == slow[2]  # problems, word for word
    assert (fast[0] is None) == (slow[0] is None)
    if fast[0] is not None:
        assert list(fast[0].columns) == list(slow[0].columns)
        assert fast[0].shape == slow[0].shape
        assert fast[0].to_numpy().tolist() == slow[0].to_numpy().tolist()


def test_quote_free_reader_parses_like_the_csv_module_on_random_text():
    # Prepare: random short texts of cells, commas, spaces, blank and ragged lines
    rng = random.Random(0)
    texts = ["".join(rng.choice(ATOMS) for _ in range(rng.randint(1, 30))) for _ in range(3000)]
    # Execute / Assert: frame, line numbers and problems are identical
    for text in texts:
        if text.strip():
            _same_parse(text)


@pytest.mark.parametrize(
    "text",
    [
        "a,b\n1,2\n",
        "a,b\n1,2",  # no final line end
        "\n\n a , b\n1,2\n\n3,4\n",  # blank lines before the header and between rows
        "a,b\n1,2,3\n4\n5,6\n7,8,9\n",  # ragged rows of two widths
        "a,b\n   \n,\n",  # a line of spaces (blank) and a line of two empty cells (a row)
        "a,a,b\n1,2,3\n",  # a repeated header name
        "a\n\n",
    ],
)
def test_quote_free_reader_edge_cases(text):
    _same_parse(text)


def test_quotes_carriage_returns_and_nul_take_the_csv_module():
    # Prepare: texts the quote-free reader would split wrongly
    for text in ('a,b\n"1,5",2\n', "a,b\r\n1,2\r\n", 'a,b\n"x\ny",2\n', "a,b\n1,\x002\n"):
        # Execute / Assert: _read_csv gives what csv.reader gives
        got, want = _read_csv(text.encode()), _read_csv_module(text)
        assert got[1:] == want[1:]
        assert got[0].to_numpy().tolist() == want[0].to_numpy().tolist()


# -- column typing against a cell-by-cell reference ------------------------------------


def _ref_missing(v) -> bool:
    if v is None or v is pd.NA or v is pd.NaT:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return isinstance(v, str) and v.strip().lower() in NA_TOKENS


def _ref_number(v) -> float | None:
    """A text cell as a number, or None when it is not one (pandas' to_numeric rules)."""
    out = pd.to_numeric(pd.Series([v.strip()], dtype=object), errors="coerce").iloc[0]
    return None if pd.isna(out) else float(out)


SCHEMA = Schema.from_dict(
    {
        "dataset": {"name": "fuzz"},
        "columns": [
            {"name": "pid", "role": "id", "type": "numeric"},
            {"name": "x", "role": "feature", "type": "numeric", "min": -5, "max": 5, "missing": True},
            {"name": "flag", "role": "feature", "type": "binary", "missing": True},
            {"name": "grp", "role": "label", "type": "categorical", "categories": ["1", "2", "b"], "missing": True},
        ],
    }
)
CELLS = {
    "x": ["1", " 2.5", "-7", "abc", "", "NA", " nan ", "inf", "4", "1e0", "3.0", "N/A", "-0"],
    "flag": ["0", "1", "2", " 1 ", "", "yes", "1.0", "NULL"],
    "grp": ["1", "2", "2.0", "b", "B", "", "none", " 1", "3"],
}


def test_column_typing_matches_the_cell_by_cell_rules():
    # Prepare: 400 rows drawn from cells of every kind (valid, missing, bad, out of range)
    rng = np.random.default_rng(1)
    n = 400
    raw = pd.DataFrame(
        {"pid": [str(i) for i in range(1, n + 1)], **{c: rng.choice(v, n).tolist() for c, v in CELLS.items()}},
        dtype=object,
    )
    # Execute
    with pytest.raises(RecordsValidationError) as e:
        validate_frame(raw, SCHEMA)
    problems = "\n".join(e.value.problems)
    # Assert: each problem count equals the count by the per-cell rules
    x = raw["x"].tolist()
    na = [_ref_missing(v) for v in x]
    num = [None if m else _ref_number(v) for v, m in zip(x, na)]
    bad = sum(1 for v, m in zip(num, na) if not m and v is None)
    assert f"column 'x' (numeric): {bad} value(s) are not numbers" in problems
    nonfinite = sum(1 for v in num if v is not None and not math.isfinite(v))
    assert f"column 'x': {nonfinite} value(s) are not finite" in problems
    low = sum(1 for v in num if v is not None and math.isfinite(v) and v < -5)
    assert f"column 'x': {low} value(s) below min -5" in problems
    flag = [None if _ref_missing(v) else _ref_number(v) for v in raw["flag"]]
    not01 = sum(1 for v in flag if v is not None and v not in (0.0, 1.0))
    assert f"column 'flag' (binary): {not01} value(s) are not 0 or 1" in problems
    grp = [None if _ref_missing(v) else category_key(v) for v in raw["grp"]]
    unknown = sum(1 for v in grp if v is not None and v not in ("1", "2", "b"))
    assert f"column 'grp' (categorical): {unknown} value(s) not in categories" in problems
    assert missing_mask(raw["x"]).tolist() == na


def test_clean_column_values_match_the_cell_by_cell_rules(tmp_path):
    # Prepare: only valid cells, many repeats, as a CSV file
    rng = np.random.default_rng(2)
    n = 300
    ok = {"x": ["1", " 2.5", "", "NA", "4", "-0", "3.25"], "flag": ["0", "1", "", " 1 ", "1.0"], "grp": ["1", "2.0", "b", "", "none"]}
    cols = {c: rng.choice(v, n).tolist() for c, v in ok.items()}
    text = "pid,x,flag,grp\n" + "".join(
        f"{i + 1},{cols['x'][i]},{cols['flag'][i]},{cols['grp'][i]}\n" for i in range(n)
    )
    path = tmp_path / "r.csv"
    path.write_text(text)
    # Execute
    df = load_records(path, SCHEMA)
    # Assert
    assert df["pid"].dtype == np.int64 and df["pid"].tolist() == list(range(1, n + 1))
    for c in ("x", "flag"):
        want = [np.nan if _ref_missing(v) else _ref_number(v) for v in cols[c]]
        np.testing.assert_array_equal(df[c].to_numpy(), np.array(want, dtype=float))
    want_grp = [None if _ref_missing(v) else category_key(v) for v in cols["grp"]]
    assert [None if pd.isna(v) else v for v in df["grp"].astype(object)] == want_grp
    assert list(df["grp"].cat.categories) == ["1", "2", "b"]


def test_typed_parquet_column_missing_mask_is_isna():
    s = pd.Series([1.0, np.nan, 3.0])
    assert missing_mask(s).tolist() == [False, True, False]
    assert missing_mask(pd.Series([1, None, 3], dtype="Int64")).tolist() == [False, True, False]
    assert missing_mask(pd.Series(["a", None, " NA ", float("nan")], dtype=object)).tolist() == [
        False, True, True, True
    ]
