"""Drafting a schema from an unseen export, integer-coded categories, the launch-time
test split and the range warnings. Pure: no syft server."""

from __future__ import annotations

import io
import socket
import tomllib

import numpy as np
import pandas as pd
import pytest

from fedmtl.cli import main as cli_main
from fedmtl.datasites.data.records import add_test_split, load_records, range_warnings, validate_frame
from fedmtl.datasites.data.schema_infer import infer_file, infer_schema
from fedmtl.datasites.server.launch import NO_SPLIT_WARNING, free_port, launch
from fedmtl.errors import DatasiteError, RecordsValidationError, SchemaError
from fedmtl.schema import Schema, category_key


def _export(n: int = 300, seed: int = 3) -> pd.DataFrame:
    """A hospital export that is not the demo cohort: integer-coded stage, skewed lab."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "patient_id": np.arange(5001, 5001 + n),
            "age": rng.normal(62, 11, n).round(1),
            "stage": rng.integers(1, 4, n).astype(float),  # 1, 2, 3
            "crp": np.exp(rng.normal(1.0, 1.3, n)).round(2),
            "sex": rng.choice(["F", "M"], n),
            "smoker": rng.integers(0, 2, n),
            "hx_death_in_family": rng.integers(0, 2, n),
            "relapse_2y": rng.integers(0, 2, n).astype(float),
            "death_event": rng.integers(0, 2, n).astype(float),
        }
    )
    df.loc[rng.random(n) < 0.1, "stage"] = np.nan  # pandas now writes 1.0, 2.0, 3.0
    df.loc[rng.random(n) < 0.15, "relapse_2y"] = np.nan
    df.loc[rng.random(n) < 0.25, "death_event"] = np.nan
    return df


def _as_csv_cells(df: pd.DataFrame) -> pd.DataFrame:
    """The frame as ``read_export`` sees a CSV: every cell text, missing as ''."""
    return pd.read_csv(io.StringIO(df.to_csv(index=False)), dtype=str, keep_default_na=False)


# -- infer -------------------------------------------------------------------------------


def test_infer_types_ranges_categories_id_and_labels():
    # Prepare
    df = _export()
    # Execute
    draft = infer_schema(_as_csv_cells(df), name="North Hospital")
    c = {col.name: col for col in draft.columns}
    # Assert: the id, by name and uniqueness
    assert draft.id_column == "patient_id" and c["patient_id"].type == "numeric"
    # numeric with the observed range rounded outward
    assert c["age"].type == "numeric" and c["age"].role == "feature"
    assert c["age"].min <= df["age"].min() and c["age"].max >= df["age"].max()
    assert c["age"].max - c["age"].min <= 1.5 * (df["age"].max() - df["age"].min())
    assert not c["age"].missing
    # the integer-coded stage: categories as integers, not "1.0"
    assert c["stage"].type == "categorical" and c["stage"].categories == [1, 2, 3]
    assert c["stage"].missing
    # binary, categorical text
    assert c["smoker"].type == "binary" and c["smoker"].role == "feature"
    assert c["sex"].type == "categorical" and c["sex"].categories == ["F", "M"]
    # a skewed lab value is flagged
    assert c["crp"].type == "numeric" and any("skewed" in n for n in c["crp"].notes)
    # outcome-like binary columns are suggested labels; a history column is not
    assert draft.labels == ["relapse_2y", "death_event"]
    assert c["hx_death_in_family"].role == "feature"
    assert c["relapse_2y"].missing and c["death_event"].missing
    assert draft.split_column is None and draft.problems == []
    assert draft.name == "north-hospital"


def test_draft_is_a_loadable_commented_schema_that_the_export_passes(tmp_path):
    # Prepare: a CSV export written the way pandas writes it
    df = _export()
    records = tmp_path / "export.csv"
    df.to_csv(records, index=False)
    # Execute
    text = infer_file(records).toml()
    out = tmp_path / "schema.toml"
    out.write_text(text)
    schema = Schema.load(out)
    typed = load_records(records, schema)
    # Assert: comments tell the owner what to check; the draft is valid and fits the data
    assert text.startswith("# DRAFT records schema")
    assert "CHECK" in text and "--test-fraction" in text and "docs/schema.md" in text
    assert tomllib.loads(text)["columns"][2]["categories"] == [1, 2, 3]
    assert schema.column("stage").categories == ("1", "2", "3")
    assert [c.name for c in schema.labels] == ["relapse_2y", "death_event"]
    assert list(typed["stage"].cat.categories) == ["1", "2", "3"]
    assert typed["stage"].isna().sum() == df["stage"].isna().sum()
    assert (typed["stage"].astype(object).dropna() == df["stage"].dropna().astype(int).astype(str).values).all()


def test_infer_split_column_text_id_and_problems():
    # Prepare: text ids, a split column, free text, no outcome-like column
    n = 60
    raw = pd.DataFrame(
        {
            "mrn": [f"H{i:05d}" for i in range(n)],
            "weight": [str(50 + i % 40) + ".5" for i in range(n)],
            "notes": [f"free text {i}" for i in range(n - 1)] + [""],
            "split": ["test" if i % 5 == 0 else "train" for i in range(n)],
            "flag": [str(i % 2) for i in range(n)],
        }
    )
    # Execute
    draft = infer_schema(raw)
    c = {col.name: col for col in draft.columns}
    # Assert
    assert draft.id_column == "mrn"
    assert c["mrn"].type == "categorical" and c["mrn"].categories is None  # no id list published
    assert draft.split_column == "split" and c["split"].categories == ["train", "test"]
    assert not c["notes"].usable and any("notes" in p for p in draft.problems)
    assert any("no label column" in p for p in draft.problems)
    assert "#  - no label column" in draft.toml()
    with pytest.raises(SchemaError, match="no column has role 'label'"):
        draft.schema()
    # once the owner marks a label, the draft is a schema and the rows fit it
    c["flag"].role = "label"
    schema = draft.schema()
    typed = validate_frame(raw.drop(columns=["notes"]), schema)
    assert typed["mrn"].iloc[3] == "H00003"


def test_infer_parquet_typed_columns(tmp_path):
    df = _export(n=120)
    path = tmp_path / "export.parquet"
    df.to_parquet(path, index=False)
    draft = infer_file(path, name="parq")
    schema = draft.schema()
    typed = load_records(path, schema)
    assert schema.column("stage").categories == ("1", "2", "3")
    assert typed["stage"].notna().sum() == df["stage"].notna().sum()


def test_cli_schema_infer_writes_once(tmp_path, capsys):
    records = tmp_path / "north.csv"
    _export(n=80).to_csv(records, index=False)
    out = tmp_path / "schema.toml"
    assert cli_main(["datasite", "schema", "infer", "--records", str(records), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "labels (suggested): relapse_2y, death_event" in err and "--test-fraction 0.2" in err
    Schema.load(out)
    # an existing file is not replaced without --force
    assert cli_main(["datasite", "schema", "infer", "--records", str(records), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    # without --out the draft goes to stdout
    assert cli_main(["datasite", "schema", "infer", "--records", str(records), "--name", "x"]) == 0
    assert 'name = "x"' in capsys.readouterr().out


# -- integer categories ---------------------------------------------------------------------


def test_category_key_rule():
    assert [category_key(v) for v in (1, 1.0, "1", " 1.0 ", "+1", np.int64(1), np.float64(1.0))] == ["1"] * 7
    assert category_key("01") == "01" and category_key(1.5) == "1.5" and category_key(" a ") == "a"
    with pytest.raises(SchemaError, match="binary"):
        category_key(True)


def _stage_schema(categories) -> Schema:
    return Schema.from_dict(
        {
            "columns": [
                {"name": "id", "role": "id", "type": "numeric"},
                {"name": "stage", "role": "feature", "type": "categorical", "categories": categories,
                 "missing": True},
                {"name": "y", "role": "label", "type": "binary"},
            ]
        }
    )


def test_integer_categories_validate_and_round_trip(tmp_path):
    # Prepare: integer categories in the schema, cells written 2, 2.0 and typed in Parquet
    schema = _stage_schema([1, 2, 3])
    csv = tmp_path / "r.csv"
    csv.write_text("id,stage,y\n1,2,0\n2,2.0,1\n3,,0\n4,3,1\n")
    pq = tmp_path / "r.parquet"
    pd.DataFrame({"id": [1, 2, 3], "stage": [1.0, np.nan, 3.0], "y": [0, 1, 0]}).to_parquet(pq)
    # Execute
    from_csv = load_records(csv, schema)
    from_pq = load_records(pq, schema)
    saved = tmp_path / "schema.toml"
    schema.save(saved)
    # Assert
    assert schema.column("stage").categories == ("1", "2", "3")
    assert from_csv["stage"].astype(object).tolist()[:2] == ["2", "2"] and pd.isna(from_csv["stage"][2])
    assert from_pq["stage"].astype(object).tolist()[0] == "1"
    assert Schema.load(saved) == schema
    assert _stage_schema(["1", "2.0", 3]) == schema  # however they are written
    # a code outside the list is still an error; "01" is not "1"
    csv.write_text("id,stage,y\n1,4,0\n2,01,1\n")
    with pytest.raises(RecordsValidationError, match=r"2 value\(s\) not in categories \['1', '2', '3'\]"):
        load_records(csv, schema)
    with pytest.raises(SchemaError, match="duplicates"):
        _stage_schema([1, "1.0"])
    with pytest.raises(SchemaError, match="boolean"):
        _stage_schema([True, False])


# -- the launch-time split and the range warnings ---------------------------------------


def _typed_export(tmp_path, n=400):
    df = _export(n=n)
    records = tmp_path / "export.csv"
    df.to_csv(records, index=False)
    schema = infer_file(records).schema()
    return records, schema, load_records(records, schema)


def test_add_test_split_is_stratified_seeded_and_recorded(tmp_path):
    _, schema, df = _typed_export(tmp_path)
    out, s2, info = add_test_split(df, schema, 0.2, seed=7)
    again, _, _ = add_test_split(df, schema, 0.2, seed=7)
    other, _, _ = add_test_split(df, schema, 0.2, seed=8)
    assert s2.split_column == "split" and s2.names[-1] == "split"
    assert info == {"column": "split", "source": "launch", "test_fraction": 0.2, "seed": 7,
                    "stratified_by": "relapse_2y"}
    assert "seed 7" in s2.column("split").description
    assert (out["split"] == "test").sum() == 80
    assert out["split"].equals(again["split"]) and not out["split"].equals(other["split"])
    # each stratum of the first label (0, 1, missing) is split 20/80 up to rounding
    label = df["relapse_2y"].fillna(-1)
    for v in (0.0, 1.0, -1.0):
        members = label == v
        assert abs((out.loc[members, "split"] == "test").sum() - 0.2 * members.sum()) <= 1
    validate_frame(out.astype(object).where(out.notna(), ""), s2)  # fits the new schema
    with pytest.raises(DatasiteError, match="already declares the split column"):
        add_test_split(out, s2, 0.2)
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(DatasiteError, match="between 0 and 1"):
            add_test_split(df, schema, bad)


def test_range_warnings_name_the_column(tmp_path):
    _, schema, df = _typed_export(tmp_path)
    assert range_warnings(df, schema) == []
    d = schema.to_dict()
    for c in d["columns"]:
        if c["name"] == "age":
            c["min"], c["max"] = 0, 5000
    wide = Schema.from_dict(d)
    (msg,) = range_warnings(df, wide)
    assert "'age'" in msg and "[0, 5000]" in msg and "observed" in msg
    assert "poorly conditioned" in msg and "docs/schema.md" in msg


def test_launch_warns_before_anything_is_written(tmp_path):
    # Prepare: no split column, a far too wide range; the port is taken so the launch
    # stops after validation, before anything is written
    records, schema, _ = _typed_export(tmp_path)
    d = schema.to_dict()
    d["columns"][3]["max"] = 100000  # crp
    path = tmp_path / "schema.toml"
    Schema.from_dict(d).save(path)
    seen: list[str] = []
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(DatasiteError, match="in use"):
            launch(home=tmp_path / "h", name="north", records=records, schema=path, port=port, warn=seen.append)
    assert seen[-1] == NO_SPLIT_WARNING and "'crp'" in seen[0]
    assert "--test-fraction" in NO_SPLIT_WARNING and "evaluation runs on the training records" in NO_SPLIT_WARNING
    assert not (tmp_path / "h").exists()
    # a test fraction with a split column already there, or out of range: refused, nothing written
    with pytest.raises(DatasiteError, match="between 0 and 1"):
        launch(home=tmp_path / "h", name="north", records=records, schema=path, port=free_port(),
               test_fraction=1.0, warn=seen.append)
    assert not (tmp_path / "h").exists()
