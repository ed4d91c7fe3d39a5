"""Schema-defined preprocessing and labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fedmtl.models import Preprocessor, labels_of, sum_stats, tasks_from_schema


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
    assert pre.mean["age"] == pytest.approx(pooled["age"].mean())
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
