"""JobResult: save/load, rebuilding the model, prediction, metrics table."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from fedmtl.errors import ConfigError
from fedmtl.jobspec import JobSpec
from fedmtl.models import Preprocessor, model_to_vector
from fedmtl.researcher.result import JobResult, head_mask
from fedmtl.schema import Schema

SCHEMA = Schema.from_dict(
    {
        "dataset": {"name": "toy"},
        "columns": [
            {"name": "id", "role": "id", "type": "numeric"},
            {"name": "age", "role": "feature", "type": "numeric", "min": 18, "max": 90},
            {"name": "sex", "role": "feature", "type": "categorical", "categories": ["F", "M"]},
            {"name": "diabetes", "role": "label", "type": "binary", "missing": True},
            {"name": "stage", "role": "label", "type": "categorical", "categories": ["F0", "F1", "F2"], "missing": True},
            {"name": "alt", "role": "label", "type": "numeric", "min": 0, "max": 200, "missing": True},
        ],
    }
)
SPEC = JobSpec(
    name="toy",
    tasks=[{"label": "diabetes"}, {"label": "stage"}, {"label": "alt"}],
    model={"widths": [8]},
    noise_multiplier=1.0,
    strategy="fedper",
)
DF = pd.DataFrame({"id": [1, 2, 3, 4], "age": [20.0, 40.0, 60.0, 80.0], "sex": ["F", "M", "M", "F"],
                   "diabetes": [0, 1, None, 1], "stage": ["F0", None, "F2", "F1"], "alt": [10.0, 20.0, None, 40.0]})


def _result(**kw) -> JobResult:
    net = SPEC.build_model(SCHEMA)
    vec = model_to_vector(net)
    k = int(head_mask(net).sum())
    base = dict(
        spec=SPEC,
        model_config=net.config,
        preprocessor=Preprocessor(SCHEMA).to_dict(),
        global_vector=vec,
        site_heads={"st-mary": np.full(k, 0.25, dtype=np.float32)},
        epsilon={"st-mary": 1.5, "general": math.inf},
        rounds_done=2,
    )
    base.update(kw)
    r = JobResult(**base)
    r.add_metrics(1, {"diabetes": {"auroc": 0.6, "n": 10.0}, "alt": {"mae": 3.0}})
    r.add_metrics(2, {"diabetes": {"auroc": 0.7, "n": 10.0}, "alt": {"mae": 2.0}},
                  sites={"st-mary": {"diabetes": {"auroc": 0.65}}})
    return r


def test_predict_shapes_and_probabilities():
    # Execute
    pred = _result().predict(DF)
    # Assert
    assert set(pred) == {"diabetes", "stage", "alt"}
    assert pred["diabetes"].shape == (4,) and np.all((pred["diabetes"] > 0) & (pred["diabetes"] < 1))
    assert pred["stage"].shape == (4, 3)
    np.testing.assert_allclose(pred["stage"].sum(axis=1), 1.0, rtol=1e-5)
    assert pred["alt"].shape == (4,)


def test_predict_equals_the_model_on_preprocessed_features():
    r = _result()
    direct = SPEC.build_model(SCHEMA).predict(Preprocessor(SCHEMA).transform(DF))
    for task, v in r.predict(DF).items():
        np.testing.assert_allclose(v, direct[task], rtol=1e-6)


def test_save_load_round_trip(tmp_path):
    # Prepare
    r = _result()
    # Execute
    r.save(tmp_path / "out")
    back = JobResult.load(tmp_path / "out")
    # Assert
    assert back.spec == SPEC
    np.testing.assert_array_equal(back.global_vector, r.global_vector)
    np.testing.assert_array_equal(back.site_heads["st-mary"], r.site_heads["st-mary"])
    assert back.metrics == r.metrics
    assert back.epsilon["st-mary"] == 1.5 and math.isinf(back.epsilon["general"])
    assert back.rounds_done == 2
    assert JobSpec.load(tmp_path / "out" / "job.toml") == SPEC
    for task, v in back.predict(DF, site="st-mary").items():
        np.testing.assert_allclose(v, r.predict(DF, site="st-mary")[task])


def test_site_heads_replace_only_head_entries():
    r = _result()
    g, s = r.vector(), r.vector("st-mary")
    mask = head_mask(r.model())
    np.testing.assert_array_equal(g[~mask], s[~mask])
    np.testing.assert_array_equal(s[mask], 0.25)
    assert not np.allclose(r.predict(DF)["diabetes"], r.predict(DF, site="st-mary")["diabetes"])
    with pytest.raises(KeyError, match="no personalised heads for site 'general'"):
        r.model("general")


def test_metrics_table():
    t = _result().metrics_table()
    assert list(t.columns) == ["round", "site", "task", "metric", "value"]
    assert len(t) == 7
    row = t[(t["round"] == 2) & (t["site"] == "st-mary")]
    assert row[["task", "metric", "value"]].values.tolist() == [["diabetes", "auroc", 0.65]]
    pooled = t[(t["site"] == "pooled") & (t["metric"] == "auroc")]["value"].tolist()
    assert pooled == [0.6, 0.7]
    assert _result().final_metrics()["alt"] == {"mae": 2.0}


def test_inconsistent_parts_are_refused():
    with pytest.raises(ValueError, match="parameters"):
        _result(global_vector=np.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError, match="head entries"):
        _result(site_heads={"x": np.zeros(3)})
    other = Schema.from_dict({**SCHEMA.to_dict(), "columns": [c.to_dict() for c in SCHEMA.columns if c.name != "sex"]})
    with pytest.raises(ValueError, match="preprocessor makes 1 features"):
        _result(preprocessor=Preprocessor(other).to_dict())


def test_load_refuses_missing_or_tampered_results(tmp_path):
    with pytest.raises(ConfigError, match="holds no saved job result"):
        JobResult.load(tmp_path)
    _result().save(tmp_path)
    meta = json.loads((tmp_path / "result.json").read_text())
    meta["spec"]["rounds"] = 99
    (tmp_path / "result.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="does not match its recorded hash"):
        JobResult.load(tmp_path)
