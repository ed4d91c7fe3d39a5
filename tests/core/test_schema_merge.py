"""One schema for the federation: :func:`fedmtl.schema.schema_differences`,
:func:`fedmtl.schema.merge_schemas` and their commands (`fedmtl datasite schema diff|merge`)."""

from __future__ import annotations

import copy

import pytest

from fedmtl.cli import main as cli_main
from fedmtl.contract.jobspec import JobSpec
from fedmtl.errors import SchemaError
from fedmtl.schema import DEFAULT_NAME, Schema, describe_differences, merge_schemas, schema_differences

BASE = {
    "dataset": {"name": "north", "description": "North Hospital"},
    "columns": [
        {"name": "pid", "role": "id", "type": "numeric"},
        {"name": "age", "role": "feature", "type": "numeric", "min": 20, "max": 85},
        {"name": "crp", "role": "feature", "type": "numeric", "min": 0, "max": 50, "transform": "log1p"},
        {"name": "sex", "role": "feature", "type": "categorical", "categories": ["F", "M"]},
        {"name": "stage", "role": "label", "type": "categorical", "categories": ["a", "b"], "missing": True},
        {"name": "death_5y", "role": "label", "type": "binary", "missing": True},
    ],
}


def _schema(name: str = "north", **changes: dict | None) -> Schema:
    """BASE with the [dataset] name and some columns' keys changed (None: the column left out)."""
    d = copy.deepcopy(BASE)
    d["dataset"]["name"] = name
    cols = []
    for c in d["columns"]:
        if c["name"] in changes and changes[c["name"]] is None:
            continue
        cols.append({**c, **(changes.get(c["name"]) or {})})
    d["columns"] = cols
    return Schema.from_dict(d)


def _write(tmp_path, fname: str, schema: Schema):
    p = tmp_path / fname
    schema.save(p)
    return p


def test_differences_name_each_column_and_key_with_each_schemas_value():
    # Prepare
    north = _schema()
    south = _schema("south", age={"min": 25, "max": 90}, sex={"categories": ["F", "M", "X"]},
                    crp={"missing": True})
    # Execute
    diffs = schema_differences([south, north])
    # Assert: one per key, in column order, each schema's value in the order given
    assert [(d.column, d.key, d.values) for d in diffs] == [
        (None, "name", ("south", "north")),
        ("age", "min", (25.0, 20.0)),
        ("age", "max", (90.0, 85.0)),
        ("crp", "missing", (True, False)),
        ("sex", "categories", (("F", "M", "X"), ("F", "M"))),
    ]
    assert diffs[2].describe() == "column 'age' key 'max' (90 vs 85)"
    assert diffs[3].describe(["south.toml", "north.toml"]) == (
        "column 'crp' key 'missing': south.toml says true, north.toml says false")
    # columns_only leaves the [dataset] table out; identical columns have no differences
    assert [d.column for d in schema_differences([south, north], columns_only=True)] == ["age", "age", "crp", "sex"]
    assert schema_differences([north, _schema("elsewhere")], columns_only=True) == []
    assert schema_differences([north, _schema()]) == []


def test_differences_report_a_missing_column_and_another_order():
    # Prepare
    north = _schema()
    short = _schema(sex=None)
    d = north.to_dict()
    d["columns"] = d["columns"][::-1]
    reordered = Schema.from_dict(d)
    # Execute
    missing = schema_differences([north, short])
    order = schema_differences([north, reordered])
    # Assert
    assert [(x.column, x.key) for x in missing] == [("sex", "present")]
    assert missing[0].describe(["a.toml", "b.toml"]) == "column 'sex': in a.toml, not in b.toml"
    assert [(x.column, x.key) for x in order] == [(None, "order")]
    assert describe_differences(missing) == "column 'sex' (declared vs absent)"
    three = schema_differences([north, short, reordered])
    assert len(three) == 2 and describe_differences(three, limit=1).endswith(
        "; and 1 more (`fedmtl datasite schema diff` lists them all)")


def test_merge_takes_the_union_of_ranges_categories_and_missing():
    # Prepare: three drafts of differently distributed exports
    a = _schema("a", age={"min": 20, "max": 85})
    b = _schema("b", age={"min": 25, "max": 90}, crp={"max": 80, "missing": True}, sex={"categories": ["M", "X"]})
    c = _schema("c", age={"min": 30, "max": 70, "description": "age at entry"})
    # Execute
    merged = merge_schemas([a, b, c], ["a.toml", "b.toml", "c.toml"])
    # Assert
    assert (merged.column("age").min, merged.column("age").max) == (20.0, 90.0)
    assert (merged.column("crp").min, merged.column("crp").max) == (0.0, 80.0)
    assert merged.column("crp").missing is True and merged.column("crp").transform == "log1p"
    assert merged.column("sex").categories == ("F", "M", "X")  # the first draft's order, then new ones
    assert merged.column("age").description == "age at entry"
    assert merged.names == a.names
    # every draft's columns fit inside the merged ones: merging again changes nothing
    assert schema_differences([merge_schemas([merged, a, b, c]), merged]) == []
    # the drafts name different datasets: the merged schema names none (each site publishes SITE-records)
    assert merged.name == DEFAULT_NAME
    assert merge_schemas([a, b], name="liver-cohort").name == "liver-cohort"
    assert merge_schemas([_schema("same"), _schema("same")]).name == "same"


def test_merge_refuses_conflicts_naming_column_key_and_file():
    # Prepare: every kind of conflict, one column each
    north = _schema()
    south = _schema(
        "south",
        age={"type": "categorical", "categories": [1, 2], "min": None, "max": None},  # type
        crp={"transform": None},                                                      # transform
        sex={"role": "label"},                                                        # role
        stage={"categories": ["a", "b", "c"]},                                        # a label's classes
        death_5y=None,                                                                # absent
    )
    # Execute
    with pytest.raises(SchemaError) as e:
        merge_schemas([north, south], ["north.toml", "south.toml"])
    # Assert: each conflict named once, with both files' values and what to fix
    text = str(e.value)
    assert "cannot be merged" in text
    assert "column 'age' key 'type': north.toml says \"numeric\", south.toml says \"categorical\": the type must be the same" in text
    assert "column 'age' key 'min'" not in text  # follows from the type conflict: not named again
    assert "column 'crp' key 'transform': north.toml says \"log1p\", south.toml says nothing" in text
    assert "column 'sex' key 'role': north.toml says \"feature\", south.toml says \"label\"" in text
    assert "column 'stage' key 'categories': north.toml says [a, b], south.toml says [a, b, c]: a label's categories" in text
    assert "column 'death_5y': in north.toml, not in south.toml: every site's export needs the same columns" in text
    # a bound one draft declares and another does not
    d = north.to_dict()
    d["columns"][0] = {"name": "pid", "role": "id", "type": "numeric", "max": 9999}
    with pytest.raises(SchemaError, match=r"column 'pid' key 'max': #1 says 9999, #2 says nothing: declared in "
                       r"some drafts only: declare max in every draft"):
        merge_schemas([Schema.from_dict(d), north])
    with pytest.raises(SchemaError, match="two or more"):
        merge_schemas([north])


def test_job_spec_names_the_feature_column_and_key_that_differ():
    # Prepare
    spec = JobSpec(name="j", tasks=[{"label": "death_5y"}], rounds=1, noise_multiplier=1.0)
    schemas = {"north": _schema(), "south": _schema("south", sex={"categories": ["F", "M", "X"]})}
    # Execute
    text = "\n".join(spec.problems(schemas))
    # Assert
    assert "the sites' feature columns differ: south's from north's: column 'sex' key 'categories' ([F, M, X] vs [F, M])" in text
    assert "fedmtl datasite schema merge" in text


# -- the commands -------------------------------------------------------------------------


def test_merge_command_writes_the_shared_schema_and_diff_exits_like_diff(tmp_path, capsys):
    # Prepare
    a = _write(tmp_path, "a.toml", _schema("a", age={"min": 20, "max": 85}))
    b = _write(tmp_path, "b.toml", _schema("b", age={"min": 25, "max": 90}))
    out = tmp_path / "shared.toml"
    # Execute
    rc_diff = cli_main(["datasite", "schema", "diff", str(a), str(b), "--columns-only"])
    diff_out = capsys.readouterr().out
    rc = cli_main(["datasite", "schema", "merge", str(a), str(b), "--out", str(out), "--name", "liver"])
    merge_err = capsys.readouterr().err
    # Assert: diff listed both range keys with each file's value and exited 1
    assert rc_diff == 1
    assert diff_out.splitlines() == [f"column 'age' key 'min': {a} says 20, {b} says 25",
                                     f"column 'age' key 'max': {a} says 85, {b} says 90"]
    # the merged file loads and equals the library's merge; the command said what it unioned
    assert rc == 0 and f"merged 2 schemas into {out}" in merge_err and "column 'age' key 'max'" in merge_err
    shared = Schema.load(out)
    assert schema_differences([shared, merge_schemas([Schema.load(a), Schema.load(b)], name="liver")]) == []
    assert out.read_text().startswith("# The federation's shared records schema")
    # the shared schema against itself: identical, exit 0
    assert cli_main(["datasite", "schema", "diff", str(out), str(out)]) == 0
    assert "declare the same columns and [dataset] table" in capsys.readouterr().out
    # a second merge does not replace --out without --force
    assert cli_main(["datasite", "schema", "merge", str(a), str(b), "--out", str(out)]) == 2
    assert "add --force" in capsys.readouterr().err
    assert Schema.load(out).name == "liver"


def test_merge_command_with_a_conflict_writes_nothing_and_diff_fails_on_bad_files(tmp_path, capsys):
    # Prepare
    a = _write(tmp_path, "a.toml", _schema())
    b = _write(tmp_path, "b.toml", _schema(crp={"transform": None}))
    out = tmp_path / "shared.toml"
    # Execute
    rc = cli_main(["datasite", "schema", "merge", str(a), str(b), "--out", str(out)])
    err = capsys.readouterr().err
    # Assert: the user error's exit status, the conflict named, nothing written
    assert rc == 2 and "column 'crp' key 'transform'" in err and not out.exists()
    assert cli_main(["datasite", "schema", "diff", str(a), str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["datasite", "schema", "diff", str(a)]) == 2
