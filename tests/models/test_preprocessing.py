"""Schema-defined preprocessing and labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fedmtl.errors import SchemaError
from fedmtl.models import Preprocessor, labels_of, local_stats, sum_stats, tasks_from_schema
from fedmtl.schema import Schema


def test_range_scaling_one_hot_and_missing_indicators(schema, records):
    # Prepare
    pre = Preprocessor(schema)
    # Execute
    X = pre.transform(records)
    # Assert
    assert pre.feature_names == ["age", "bmi", "bmi__missing", "sex=F", "sex=M", "smoker", "smoker__missing"]
    assert X.shape == (len(records), 7) and X.dtype == torch.float32
    f = {n: X[:, i].numpy() for i, n in enumerate(pre.feature_names)}
    np.testing.assert_allclose(f["age"], (records["age"] - 18) / 72, rtol=1e-5)
    miss = records["bmi"].isna().to_numpy()
    assert (f["bmi__missing"] == miss).all() and (f["bmi"][miss] == 0).all()
    np.testing.assert_allclose(f["sex=F"] + f["sex=M"], 1.0)
    assert (f["sex=M"] == (records["sex"] == "M")).all()


def test_stats_summed_across_sites_equal_the_pooled_mean_and_std(schema, make_site_records):
    # Prepare: three sites; pooled only to compute the reference
    sites = [make_site_records(n, seed=s, shift=5 * s) for s, n in enumerate((50, 80, 120))]
    pooled = pd.concat(sites)
    base = Preprocessor(schema)
    # Execute
    summed = sum_stats([base.local_stats(df) for df in sites])
    pre = Preprocessor.from_stats(schema, summed)
    # Assert
    assert pre.scaling == "standard"
    # values outside the declared range (the shifted sites' ages above 90) count clipped
    assert pre.mean["age"] == pytest.approx(pooled["age"].clip(18, 90).mean())
    assert pre.std["bmi"] == pytest.approx(pooled["bmi"].std(ddof=0))
    Xs = [pre.transform(df) for df in sites]
    allX = torch.cat(Xs).numpy()
    age = allX[:, pre.feature_names.index("age")]
    assert abs(age.mean()) < 1e-4 and age.std() == pytest.approx(1.0, rel=1e-3)


def test_same_schema_and_stats_give_identical_transform_everywhere(schema, records):
    # Prepare
    pre_a = Preprocessor.from_stats(schema, Preprocessor(schema).local_stats(records))
    pre_b = Preprocessor.from_dict(pre_a.to_dict())
    # Execute / Assert
    assert pre_b.feature_names == pre_a.feature_names
    assert torch.equal(pre_a.transform(records.iloc[:20]), pre_b.transform(records.iloc[:20]))
    # a site that only ever sees 'M' still gets the sex=F column
    only_m = records[records["sex"] == "M"].head(5)
    assert pre_a.transform(only_m).shape[1] == pre_a.n_features


def test_labels_give_values_and_masks(schema, records):
    # Prepare
    tasks = tasks_from_schema(schema)
    # Execute
    Y, mask = labels_of(records, tasks)
    # Assert
    assert Y.shape == mask.shape == (len(records), 3) and mask.dtype == torch.bool
    assert (mask[:, 0].numpy() == records["diabetes"].notna().to_numpy()).all()
    assert (mask[:, 1].numpy() == records["stage"].notna().to_numpy()).all()
    assert set(Y[mask[:, 0], 0].tolist()) <= {0.0, 1.0}
    stage = records["stage"].dropna().map({"F0": 0, "F1": 1, "F2": 2}).to_numpy()
    assert (Y[mask[:, 1], 1].numpy() == stage).all()
    np.testing.assert_allclose(Y[mask[:, 2], 2].numpy(), records["alt"].dropna().to_numpy(), rtol=1e-6)
    assert torch.isfinite(Y).all()


def test_preprocessor_needs_range_or_stats(schema):
    # Prepare
    d = schema.to_dict()
    for c in d["columns"]:
        if c["name"] == "age":
            c.pop("min")
            c.pop("max")
    from fedmtl.schema import Schema

    no_range = Schema.from_dict(d)
    # Execute / Assert
    with pytest.raises(ValueError, match=r"'age' declares no min/max.*from_stats"):
        Preprocessor(no_range)
    with pytest.raises(ValueError, match="no mean/std"):
        Preprocessor(schema, scaling="standard")
    with pytest.raises(ValueError, match="unknown scaling"):
        Preprocessor(schema, scaling="minmax")


def test_from_stats_rejects_wrong_shapes_and_empty_columns(schema):
    with pytest.raises(ValueError, match="lack"):
        Preprocessor.from_stats(schema, {"count": np.ones(2)})
    with pytest.raises(ValueError, match="2 entries"):
        Preprocessor.from_stats(schema, {"count": np.ones(3), "sum": np.ones(3), "sumsq": np.ones(3)})
    with pytest.raises(ValueError, match="no observed values"):
        Preprocessor.from_stats(schema, {"count": np.array([0.0, 2.0]), "sum": np.ones(2), "sumsq": np.ones(2)})


def test_transform_reports_every_problem(schema, records):
    # Prepare
    bad = records.head(5).copy()
    bad["sex"] = bad["sex"].astype(object)
    bad.loc[bad.index[0], "sex"] = "X"
    bad.loc[bad.index[1], "age"] = np.nan  # age may not be missing
    # Execute / Assert
    with pytest.raises(ValueError) as e:
        Preprocessor(schema).transform(bad)
    assert "'sex'" in str(e.value) and "'X'" in str(e.value) and "'age'" in str(e.value)
    with pytest.raises(ValueError, match="lack column"):
        Preprocessor(schema).transform(bad.drop(columns=["bmi"]))


def test_labels_reject_unknown_class_and_non_binary(schema, records):
    tasks = tasks_from_schema(schema)
    bad = records.head(4).copy()
    bad["stage"] = ["F0", "F9", None, "F1"]
    bad["diabetes"] = [0.0, 2.0, 1.0, np.nan]
    with pytest.raises(ValueError) as e:
        labels_of(bad, tasks)
    assert "F9" in str(e.value) and "0 or 1" in str(e.value)


def test_stats_need_no_declared_ranges(schema, records):
    # Prepare: a schema whose numeric features declare no min/max
    from fedmtl.models import local_stats
    from fedmtl.schema import Schema

    d = schema.to_dict()
    for c in d["columns"]:
        if c["role"] == "feature":
            c.pop("min", None)
            c.pop("max", None)
    bare = Schema.from_dict(d)
    # Execute
    pre = Preprocessor.from_stats(bare, local_stats(bare, records))
    X = pre.transform(records)
    # Assert
    age = X[:, pre.feature_names.index("age")].numpy()
    assert abs(age.mean()) < 1e-4
    assert local_stats(bare, records)["count"].tolist() == [len(records), records["bmi"].notna().sum()]


# -- per-column transforms -------------------------------------------------------------------
def _lab_schema(**col):
    d = {
        "columns": [
            {"name": "id", "role": "id", "type": "numeric"},
            {"name": "lab", "role": "feature", "type": "numeric", "min": 0, "max": 6000, "missing": True, **col},
            {"name": "y", "role": "label", "type": "binary"},
        ]
    }
    return Schema.from_dict(d)


def test_log1p_transform_is_applied_before_scaling_to_values_and_bounds():
    # Prepare: a skewed lab value with a wide "safe" range
    sch = _lab_schema(transform="log1p")
    df = pd.DataFrame({"id": [1, 2, 3, 4], "lab": [0.0, 50.0, 6000.0, None], "y": [0, 1, 0, 1]})
    # Execute
    rng = Preprocessor(sch).transform(df)[:, 0].numpy()
    pre = Preprocessor.from_stats(sch, local_stats(sch, df))
    std = pre.transform(df)[:, 0].numpy()
    # Assert: range scaling maps the transformed bounds to 0..1
    np.testing.assert_allclose(rng[:3], np.log1p([0.0, 50.0, 6000.0]) / np.log1p(6000.0), rtol=1e-6)
    assert rng[3] == 0.0  # missing: imputed
    # standard scaling standardises log1p(x), not x
    t = np.log1p([0.0, 50.0, 6000.0])
    assert pre.mean["lab"] == pytest.approx(t.mean()) and pre.std["lab"] == pytest.approx(t.std())
    np.testing.assert_allclose(std[:3], (t - t.mean()) / t.std(), rtol=1e-5)


def test_values_are_clipped_to_the_declared_range_before_scaling():
    sch = _lab_schema()
    df = pd.DataFrame({"id": [1, 2], "lab": [-5.0, 9000.0], "y": [0, 1]})
    X = Preprocessor(sch).transform(df)[:, 0].numpy()
    np.testing.assert_allclose(X, [0.0, 1.0])
    assert local_stats(sch, df)["sum"][0] == pytest.approx(6000.0)


@pytest.mark.parametrize(
    "col, message",
    [
        ({"transform": "log1p", "min": -1}, "needs min > -1"),
        ({"transform": "log1p", "min": -3.5}, "got min -3.5"),
        ({"transform": "sqrt"}, "transform 'sqrt' is not one of ['log1p']"),
    ],
)
def test_bad_transforms_are_refused_with_what_to_fix(col, message):
    with pytest.raises(SchemaError) as e:
        _lab_schema(**col)
    assert message in str(e.value)


def test_transform_applies_to_numeric_features_only():
    d = {"columns": [
        {"name": "id", "role": "id", "type": "numeric"},
        {"name": "sex", "role": "feature", "type": "categorical", "categories": ["F", "M"], "transform": "log1p"},
        {"name": "y", "role": "label", "type": "numeric", "min": 0, "max": 9, "transform": "log1p"},
    ]}
    with pytest.raises(SchemaError) as e:
        Schema.from_dict(d)
    assert "'sex': transform 'log1p' applies to numeric features only" in str(e.value)
    assert "'y': transform 'log1p' applies to numeric features only" in str(e.value)
    # a transform survives the schema's round trip (and stays out of schemas without one)
    sch = _lab_schema(transform="log1p")
    assert Schema.from_dict(sch.to_dict()) == sch and "transform" not in _lab_schema().to_dict()["columns"][1]
