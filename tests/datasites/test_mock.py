"""make_mock: synthetic rows with the real marginals, no real row, valid records."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedmtl.datasites.mock import MockError, make_mock, real_row_overlap
from fedmtl.datasites.records import load_records
from fedmtl.schema import Schema


@pytest.fixture(scope="module")
def mocks(demo_records):
    return {name: make_mock(df, schema, seed=0) for name, (schema, df) in demo_records.items()}


def test_demo_mock_has_no_real_row(demo_records, mocks):
    for name, (schema, df) in demo_records.items():
        # Prepare
        mock = mocks[name]
        compare = [c.name for c in schema.columns if c.role not in ("id", "split")]
        # Execute: an independent check by merge on every non-id, non-split column
        real = df[compare].astype("object").where(df[compare].notna(), "<NA>").astype(str)
        fake = mock[compare].astype("object").where(mock[compare].notna(), "<NA>").astype(str)
        joined = fake.merge(real.drop_duplicates(), how="inner", on=compare)
        # Assert
        assert len(joined) == 0, name
        assert real_row_overlap(mock, df, schema) == 0
        assert not set(mock[schema.id_column]) & set(df[schema.id_column]), "ids must be fresh"
        assert mock[schema.id_column].is_unique


def test_demo_mock_passes_validation_with_same_dtypes(demo_records, mocks, tmp_path):
    for name, (schema, df) in demo_records.items():
        mock = mocks[name]
        assert list(mock.columns) == list(df.columns)
        assert mock.dtypes.astype(str).tolist() == df.dtypes.astype(str).tolist()
        # round-trip through both file formats and the validator
        mock.to_csv(tmp_path / f"{name}.csv", index=False)
        back = load_records(tmp_path / f"{name}.csv", schema)
        assert len(back) == len(df)
        mock.to_parquet(tmp_path / f"{name}.parquet")
        load_records(tmp_path / f"{name}.parquet", schema)


def test_demo_mock_marginals_are_plausible(demo_records, mocks):
    schema, df = demo_records["st-mary"]
    mock = mocks["st-mary"]
    for col in schema.columns:
        if col.role == "id":
            continue
        real_na, mock_na = df[col.name].isna().mean(), mock[col.name].isna().mean()
        assert abs(real_na - mock_na) < 0.03, col.name
        if col.type == "numeric" and df[col.name].notna().sum() > 200:
            r, m = df[col.name].dropna(), mock[col.name].dropna()
            assert abs(r.mean() - m.mean()) < 0.1 * r.std(), col.name
            for q in (0.1, 0.25, 0.5, 0.75, 0.9):
                assert abs(r.quantile(q) - m.quantile(q)) < 0.15 * r.std(), (col.name, q)
            assert m.min() >= col.min and m.max() <= col.max
        elif col.type == "binary" and df[col.name].notna().any():
            assert abs(df[col.name].mean() - mock[col.name].mean()) < 0.03, col.name
    # a task the site does not record stays unrecorded in its mock
    _, river = demo_records["riverside"]
    assert mocks["riverside"]["dyslipidemia_5y"].isna().all()
    assert river["dyslipidemia_5y"].isna().all()
    # whole-number columns stay whole numbers
    assert (mock["age"] % 1 == 0).all()


def test_mock_is_deterministic_and_sized(demo_records):
    schema, df = demo_records["riverside"]
    a = make_mock(df, schema, seed=3)
    b = make_mock(df, schema, seed=3)
    c = make_mock(df, schema, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)
    small = make_mock(df, schema, n=25, seed=0)
    assert len(small) == 25 and real_row_overlap(small, df, schema) == 0
    assert len(make_mock(df, schema, n=0)) == 0


def _binary_schema(n_features: int) -> Schema:
    cols = [{"name": "id", "role": "id", "type": "numeric"}]
    cols += [{"name": f"f{i}", "role": "feature", "type": "binary"} for i in range(n_features)]
    cols += [{"name": "y", "role": "label", "type": "binary"}]
    return Schema.from_dict({"dataset": {"name": "bin"}, "columns": cols})


def test_collisions_are_redrawn():
    # Prepare: 4 binary columns -> 16 possible rows, 12 of them real, so most draws clash
    schema = _binary_schema(3)
    combos = [[(k >> b) & 1 for b in range(4)] for k in range(12)]
    df = pd.DataFrame(combos, columns=["f0", "f1", "f2", "y"], dtype="float64")
    df.insert(0, "id", np.arange(1, 13, dtype="int64"))
    # Execute
    mock = make_mock(df, schema, n=200, seed=1)
    # Assert
    assert real_row_overlap(mock, df, schema) == 0
    keys = {tuple(r) for r in mock[["f0", "f1", "f2", "y"]].to_numpy().tolist()}
    assert keys <= {tuple(float((k >> b) & 1) for b in range(4)) for k in range(12, 16)}


def test_impossible_mock_raises():
    schema = _binary_schema(1)
    df = pd.DataFrame({"id": [1, 2, 3, 4], "f0": [0.0, 0, 1, 1], "y": [0.0, 1, 0, 1]})
    with pytest.raises(MockError, match="too few distinct rows"):
        make_mock(df, schema, seed=0)


def test_text_ids_and_constant_column(write_file):
    schema = Schema.from_dict({
        "columns": [
            {"name": "mrn", "role": "id", "type": "categorical", "categories": ["x"]},
            {"name": "age", "role": "feature", "type": "numeric", "min": 0, "max": 100},
            {"name": "y", "role": "label", "type": "binary", "missing": True},
        ]
    })
    df = pd.DataFrame({"mrn": ["A1", "A2", "A3"], "age": [50.0, 50.0, 50.0], "y": [np.nan, 1.0, 0.0]})
    mock = make_mock(df, schema, seed=0)
    assert not set(mock["mrn"]) & set(df["mrn"])
    assert mock["age"].between(0, 100).all()
    assert real_row_overlap(mock, df, schema) == 0


def test_small_schema_mock_all_kinds_validates(write_file, small_schema, small_csv, tmp_path):
    # Prepare: binary, multiclass and regression labels, a categorical feature
    df = load_records(write_file("r.csv", small_csv), small_schema)
    # Execute
    mock = make_mock(df, small_schema, n=300, seed=7)
    mock.to_csv(tmp_path / "mock.csv", index=False)
    back = load_records(tmp_path / "mock.csv", small_schema)
    # Assert
    assert real_row_overlap(mock, df, small_schema) == 0
    assert len(back) == 300
    assert set(back["stage"].dropna()) <= {"a", "b", "c"}
    assert back["los"].dropna().between(0, 365).all()
    assert back["bmi"].isna().any() and back["bmi"].notna().any()
