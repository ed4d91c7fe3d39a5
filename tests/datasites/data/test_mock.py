"""make_mock: synthetic rows with the real marginals, no real row, valid records."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedmtl.datasites.data.mock import MockError, make_mock, real_row_overlap
from fedmtl.datasites.data.records import load_records
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


# -- the vectorised real-row check against row tuples ------------------------------------


def _row_tuples(frame: pd.DataFrame) -> list[tuple]:
    """Reference keys: text as str, numbers as float, missing (None/NaN) as None."""
    import math

    cols = []
    for name in frame.columns:
        s = frame[name]
        if isinstance(s.dtype, pd.CategoricalDtype) or s.dtype == object:
            cols.append([None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                         for v in s.astype("object")])
        else:
            cols.append([None if math.isnan(v) else float(v) for v in s.to_numpy(dtype=float)])
    return list(zip(*cols)) if cols else [() for _ in range(len(frame))]


def _small_frame(rng: np.random.Generator, n: int, *, text_as: str = "category") -> pd.DataFrame:
    num = rng.choice([0.0, -0.0, 1.5, np.nan, 2.0], n)
    flag = rng.choice([0.0, 1.0, np.nan], n)
    text = rng.choice(np.array(["a", "b", None], dtype=object), n)
    out = pd.DataFrame({"num": num, "flag": flag, "text": text})
    if text_as == "category":
        out["text"] = pd.Categorical(out["text"], categories=["a", "b", "c"])
    return out


@pytest.mark.parametrize("seed", range(5))
def test_real_row_check_equals_row_tuples(seed):
    # Prepare: few distinct values so that many rows collide; -0.0 and 0.0, NaN and None
    from fedmtl.datasites.data.mock import _RowSet

    rng = np.random.default_rng(seed)
    real = _small_frame(rng, 60, text_as="category")
    other = _small_frame(rng, 200, text_as="object")
    other.loc[other.index[::7], "text"] = np.nan  # NaN in a text column is missing too
    other.loc[other.index[::11], "text"] = "z"  # a value no real row has
    # Execute
    got = _RowSet(real).contains(other)
    # Assert
    keys = set(_row_tuples(real))
    want = np.array([k in keys for k in _row_tuples(other)])
    assert got.tolist() == want.tolist()
    assert want.any() and not want.all()  # the case is not trivial


def test_real_row_check_text_never_equals_number_but_missing_equals_missing():
    from fedmtl.datasites.data.mock import _RowSet

    real = pd.DataFrame({"v": [1.0, np.nan]})
    other = pd.DataFrame({"v": pd.Series(["1.0", None, "1"], dtype=object)})
    assert _RowSet(real).contains(other).tolist() == [False, True, False]
    # no columns: every row is the empty row
    assert _RowSet(real[[]]).contains(other[[]]).tolist() == [True, True, True]
