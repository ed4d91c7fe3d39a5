"""load_records: every validation failure is reported clearly, nothing is written."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmtl.datasites.data.records import describe_dataset, label_counts, load_records
from fedmtl.errors import RecordsValidationError

HEADER = "pid,age,sex,bmi,smoker,diabetes,stage,los,split"
GOOD = "1,34,F,22.5,0,0,a,3,train"


def _rows(*rows: str) -> str:
    return "\n".join([HEADER, *rows]) + "\n"


def _snapshot(folder: Path) -> dict[str, tuple[int, float]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime)
        for p in folder.rglob("*")
    }


def _fail(path: Path, schema) -> RecordsValidationError:
    """Load, expect a validation error, and check nothing in the folder changed."""
    before = _snapshot(path.parent)
    with pytest.raises(RecordsValidationError) as info:
        load_records(path, schema)
    assert _snapshot(path.parent) == before, "validation must not create or change files"
    assert "nothing was written" in str(info.value)
    return info.value


# -- happy path -------------------------------------------------------------------------


def test_valid_csv_loads_typed(write_file, small_schema, small_csv):
    # Prepare
    path = write_file("records.csv", small_csv)
    # Execute
    df = load_records(path, small_schema)
    # Assert
    assert list(df.columns) == small_schema.names
    assert len(df) == 6
    assert df["pid"].dtype == np.int64
    for c in ("age", "bmi", "smoker", "diabetes", "los"):
        assert df[c].dtype == np.float64, c
    assert isinstance(df["sex"].dtype, pd.CategoricalDtype)
    assert list(df["sex"].cat.categories) == ["F", "M"]
    assert list(df["split"].cat.categories) == ["train", "test"]
    assert df["bmi"].isna().tolist() == [False, False, True, False, False, True]  # '' and NaN
    assert df["diabetes"].isna().sum() == 2  # '' and 'NA'
    assert set(df["smoker"].dropna()) == {0.0, 1.0}


def test_columns_in_any_order_and_bom_and_blank_lines(write_file, small_schema, small_csv):
    lines = small_csv.splitlines()
    cols = lines[0].split(",")
    order = list(reversed(range(len(cols))))
    shuffled = [",".join(line.split(",")[i] for i in order) for line in lines]
    text = "\ufeff" + "\n".join(shuffled[:3]) + "\n\n" + "\n".join(shuffled[3:]) + "\n"
    df = load_records(write_file("r.csv", text), small_schema)
    assert list(df.columns) == small_schema.names
    assert df["pid"].tolist() == [1, 2, 3, 4, 5, 6]


def test_valid_parquet_loads_like_csv(write_file, small_schema, small_csv, tmp_path):
    csv_df = load_records(write_file("r.csv", small_csv), small_schema)
    raw = pd.read_csv(tmp_path / "r.csv")
    raw.to_parquet(tmp_path / "r.parquet")
    pq_df = load_records(tmp_path / "r.parquet", small_schema)
    pd.testing.assert_frame_equal(pq_df, csv_df)


# -- each failure class -----------------------------------------------------------------

CASES = {
    "missing column": (
        "pid,age,sex,smoker,diabetes,stage,los,split\n1,34,F,0,0,a,3,train\n",
        ["missing column(s) ['bmi']"],
    ),
    "extra column": (
        HEADER + ",ward\n" + GOOD + ",7\n",
        ["extra column(s) ['ward']"],
    ),
    "repeated column": (
        HEADER + ",age\n" + GOOD + ",34\n",
        ["column 'age' appears more than once"],
    ),
    "non-numeric": (
        _rows(GOOD, "2,abc,M,22,0,0,a,3,train", "3,40,M,twenty,0,0,a,3,train"),
        ["column 'age' (numeric): 1 value(s) are not numbers", "row 3: 'abc'",
         "column 'bmi' (numeric)", "row 4: 'twenty'"],
    ),
    "binary not 0/1": (
        _rows(GOOD, "2,40,M,22,2,0,a,3,train", "3,40,M,22,0,yes,a,3,train"),
        ["column 'smoker' (binary): 1 value(s) are not 0 or 1", "row 3: '2'",
         "column 'diabetes' (binary): 1 value(s) are not numbers", "row 4: 'yes'"],
    ),
    "unknown category": (
        _rows(GOOD, "2,40,X,22,0,0,a,3,train", "3,40,M,22,0,0,a,3,validation"),
        ["column 'sex' (categorical): 1 value(s) not in categories ['F', 'M']", "row 3: 'X'",
         "column 'split'", "row 4: 'validation'"],
    ),
    "out of range": (
        _rows(GOOD, "2,40,M,22,0,0,a,3,train", "3,40,M,22,0,0,a,3,train",
              "4,-3,M,22,0,0,a,3,train", "5,130,M,22,0,0,a,3,train",
              "6,40,M,22,0,0,a,3,train", "7,-1,M,22,0,0,a,3,train"),
        ["column 'age': 2 value(s) below min 0, e.g. row 5: -3, row 8: -1",
         "column 'age': 1 value(s) above max 120, e.g. row 6: 130"],
    ),
    "not finite": (
        _rows(GOOD, "2,inf,M,22,0,0,a,3,train"),
        ["column 'age': 1 value(s) are not finite", "row 3: 'inf'"],
    ),
    "missing where not allowed": (
        _rows(GOOD, "2,,M,22,0,0,a,3,train", "3,NaN,M,22,0,0,a,3,train", "4,40,,22,0,0,a,3,"),
        ["column 'age': 2 missing (empty/NaN) value(s), e.g. rows 3, 4",
         "column 'sex': 1 missing", "row 5", "column 'split': 1 missing"],
    ),
    "missing id": (
        _rows(GOOD, ",40,M,22,0,0,a,3,train"),
        ["column 'pid': 1 missing (empty/NaN) value(s), e.g. row 3"],
    ),
    "duplicate ids": (
        _rows(GOOD, "2,40,M,22,0,0,a,3,train", "1,50,M,22,0,0,a,3,train", "2,41,F,22,0,0,a,3,test"),
        ["column 'pid' (patient id): 2 id(s) appear more than once",
         "id 1 in rows 2, 4", "id 2 in rows 3, 5"],
    ),
    "header only": (HEADER + "\n", ["the file has a header but no rows"]),
    "blank text only": ("\n  \n", ["only blank space"]),
    "ragged rows": (
        _rows(GOOD, "2,40,M,22,0,0,a,3", "3,40,M,22,0,0,a,3,train,extra", "4,40,M,22,0,0,a,3"),
        ["malformed CSV: 2 row(s) have 8 field(s) but the header (row 1) has 9: rows 3, 5",
         "malformed CSV: 1 row(s) have 10 field(s)", "has 9: row 4;"],
    ),
    "unterminated quote": (
        _rows(GOOD, '2,40,"M,22,0,0,a,3,train', "3,40,M,22,0,0,a,3,train"),
        ["malformed CSV at row 3", "unterminated quote"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_failure_is_named_with_rows_and_nothing_written(case, write_file, small_schema):
    # Prepare
    text, expected = CASES[case]
    path = write_file("records.csv", text)
    # Execute
    err = _fail(path, small_schema)
    # Assert
    msg = str(err)
    for part in expected:
        assert part in msg, f"{case}: {part!r} not in\n{msg}"


def test_zero_byte_file(write_file, small_schema):
    err = _fail(write_file("records.csv", b""), small_schema)
    assert "the file is empty (0 bytes)" in str(err)


def test_non_utf8_file(write_file, small_schema):
    text = _rows(GOOD, "2,40,M,22,0,0,a,3,train").encode() + "3,40,F,22,0,0,a,3,train # é\n".encode("latin-1")
    err = _fail(write_file("records.csv", text), small_schema)
    assert "not UTF-8" in str(err) and "byte 0xe9 at row 4" in str(err)
    assert "re-export the file as UTF-8" in str(err)


def test_unsupported_suffix_and_missing_file(write_file, small_schema, tmp_path):
    err = _fail(write_file("records.xlsx", b"PK\x03\x04"), small_schema)
    assert "unsupported file type '.xlsx'" in str(err) and "CSV" in str(err)
    with pytest.raises(RecordsValidationError, match="does not exist"):
        load_records(tmp_path / "nope.csv", small_schema)


def test_corrupt_and_empty_parquet(write_file, small_schema, tmp_path):
    err = _fail(write_file("r.parquet", b"not parquet at all"), small_schema)
    assert "not a readable Parquet file" in str(err)
    empty = pd.read_csv(pd.io.common.StringIO(HEADER + "\n"))
    empty.to_parquet(tmp_path / "e.parquet")
    err = _fail(tmp_path / "e.parquet", small_schema)
    assert "header but no rows" in str(err)


def test_parquet_problems_count_rows_from_one(tmp_path, small_schema, small_csv, write_file):
    raw = pd.read_csv(write_file("r.csv", small_csv))
    raw.loc[2, "age"] = 500  # third record
    raw.loc[4, "pid"] = 1  # duplicate of the first
    raw.to_parquet(tmp_path / "r.parquet")
    msg = str(_fail(tmp_path / "r.parquet", small_schema))
    assert "column 'age': 1 value(s) above max 120, e.g. row 3: 500" in msg
    assert "id 1 in rows 1, 5" in msg


def test_every_problem_in_one_error(write_file, small_schema):
    # Prepare: one file with many different problems
    text = (
        "pid,age,sex,bmi,smoker,diabetes,stage,los,ward\n"
        "1,34,F,22.5,0,0,a,3,x\n"
        "1,abc,Q,5,3,0,z,-1,y\n"
        "3,200,M,22,0,0,a,3\n"
    )
    # Execute
    err = _fail(write_file("records.csv", text), small_schema)
    # Assert
    msg = str(err)
    for part in [
        "missing column(s) ['split']", "extra column(s) ['ward']", "column 'age' (numeric)",
        "column 'sex' (categorical)", "column 'bmi': 1 value(s) below min 10",
        "column 'smoker' (binary)", "column 'stage' (categorical)", "column 'los': 1 value(s) below min 0",
        "id 1 in rows 2, 3", "malformed CSV: 1 row(s) have 8 field(s)",
    ]:
        assert part in msg, f"{part!r} not in\n{msg}"
    assert len(err.problems) >= 10


def test_many_bad_rows_show_examples_and_count(write_file, small_schema):
    rows = [f"{i},{-i},F,22,0,0,a,3,train" for i in range(1, 51)]
    msg = str(_fail(write_file("r.csv", _rows(*rows)), small_schema))
    assert "column 'age': 50 value(s) below min 0, e.g. row 2: -1, row 3: -2" in msg
    assert "row 6: -5, ..." in msg and "row 7:" not in msg


# -- summaries --------------------------------------------------------------------------


def test_label_counts_per_kind(write_file, small_schema, small_csv):
    df = load_records(write_file("r.csv", small_csv), small_schema)
    counts = label_counts(df, small_schema)
    assert counts["diabetes"] == {"kind": "binary", "labelled": 4, "missing": 2, "positive": 2, "negative": 2}
    assert counts["stage"] == {
        "kind": "multiclass", "labelled": 4, "missing": 2, "classes": {"a": 2, "b": 1, "c": 1}
    }
    assert counts["los"]["kind"] == "regression" and counts["los"]["labelled"] == 4
    assert counts["los"]["mean"] == pytest.approx((3 + 12.5 + 0 + 7) / 4)


def test_label_counts_all_missing_task(write_file, small_schema, small_csv):
    df = load_records(write_file("r.csv", small_csv), small_schema)
    df["los"] = np.nan
    assert label_counts(df, small_schema)["los"] == {
        "kind": "regression", "labelled": 0, "missing": 6, "mean": None
    }


def test_describe_dataset_has_schema_counts_and_no_values(write_file, small_schema, small_csv):
    df = load_records(write_file("r.csv", small_csv), small_schema)
    text = describe_dataset(small_schema, df)
    assert text.startswith("# tiny")
    assert "6 patients" in text and "train: 4, test: 2" in text
    assert "| bmi | feature | numeric | [10, 80] | yes | 2 |" in text
    assert "| diabetes | binary | 4 | 2 | positive 2, negative 2 |" in text
    assert "| stage | multiclass | 4 | 2 | a 2, b 1, c 1 |" in text
    assert "31.4159" not in text and "12.5" not in text  # no record values


def test_nothing_created_in_folder_on_success(write_file, small_schema, small_csv, tmp_path):
    path = write_file("r.csv", small_csv)
    before = sorted(os.listdir(tmp_path))
    load_records(path, small_schema)
    assert sorted(os.listdir(tmp_path)) == before
