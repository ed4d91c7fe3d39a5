"""JobResult: save/load, rebuilding the model, prediction, metrics table."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from fedmtl.contract.jobspec import JobSpec
from fedmtl.contract.strategies import make_strategy
from fedmtl.errors import ConfigError
from fedmtl.models import Preprocessor, model_to_vector, task_slices
from fedmtl.researcher.result import JobResult
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
    rounds=3,
)
DF = pd.DataFrame({"id": [1, 2, 3, 4], "age": [20.0, 40.0, 60.0, 80.0], "sex": ["F", "M", "M", "F"],
                   "diabetes": [0, 1, None, 1], "stage": ["F0", None, "F2", "F1"], "alt": [10.0, 20.0, None, 40.0]})


def _result(**kw) -> JobResult:
    net = SPEC.build_model(SCHEMA)
    vec = model_to_vector(net)
    k = int(make_strategy(SPEC.strategy).personal_mask(task_slices(net)).sum())
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
    mask = r.personal_mask(r.model())
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


def test_site_final_metrics_are_the_last_released_per_site_values():
    # Execute
    r = _result()
    # Assert: round 2 released st-mary's diabetes AUROC; MAE is asked for by name
    assert r.site_final_metrics() == {"st-mary": {"diabetes": 0.65}}
    assert r.site_final_metrics("mae") == {"st-mary": {}}
    bare = _result()
    for entry in bare.metrics:
        entry.pop("sites", None)
    assert bare.site_final_metrics() == {}


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


# -- a readable summary ------------------------------------------------------------------------
def test_summary_shows_tasks_final_metrics_epsilon_and_rounds_only():
    # Prepare
    r = _result()
    r.add_metrics(3, {"diabetes": {"auroc": 0.7123, "brier": 0.1834, "n": 10.0},
                      "stage": {"auroc": 0.61, "brier": 0.52}, "alt": {"mae": 2.5, "rmse": 3.0}})
    # Execute
    text, rep = str(r), repr(r)
    # Assert: tasks, the final AUROC and Brier (calibration), MAE, epsilon per site, rounds
    assert text == rep
    assert text.splitlines()[0] == "JobResult 'toy': 2 of 3 round(s), 3 task(s), strategy fedper"
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:5]}
    assert rows["diabetes"] == ["binary", "0.712", "0.183", "-", "-", "-"]
    assert rows["stage"] == ["multiclass", "0.610", "0.520", "-", "-", "-"]
    assert rows["alt"] == ["regression", "-", "-", "-", "-", "2.5"]
    assert "after round 3" in text
    assert "epsilon per site: general=inf, st-mary=1.5 (delta=1e-05)" in text
    # never the spec, the schema or the weights
    assert len(text.splitlines()) <= 10
    for secret in ("noise_multiplier", "max_grad_norm", "categories", "'min'", "global_vector", "[", "array"):
        assert secret not in text, secret
    assert f"{float(r.global_vector[0]):.4g}" not in text


def test_summary_without_evaluations():
    r = _result()
    r.metrics.clear()
    rows = {line.split()[0]: line.split()[1:] for line in str(r).splitlines()[2:5]}
    assert "no evaluation yet" in str(r) and rows["diabetes"] == ["binary", "-", "-", "-", "-", "-"]


def test_a_lost_last_pass_is_said_and_survives_a_save(tmp_path):
    # Prepare: the sites ran the job's last pass while the researcher's process was gone
    last = SPEC.schedule.last_pass
    r = _result(lost_passes=[last])
    r.metrics.pop()  # its evaluation never reached the researcher
    # Execute
    back = JobResult.load(r.save(tmp_path / "res"))
    # Assert: no "final metrics from ..." line: the summary says the last pass is lost and what that means
    for res in (r, back):
        text = str(res)
        assert res.lost_passes == [last]
        assert "no final evaluation" in text and "final metrics from" not in text
        assert f"lost: pass(es) {last} ran at the sites" in text and "risks are not recalibrated" in text
    # a result without lost passes says nothing of the kind
    assert "lost" not in str(_result())


def test_summary_shows_intervals_calibration_and_warns_on_wide_intervals():
    # Prepare: a released AUROC with a wide interval, and one recalibrated task
    r = _result()
    r.add_metrics(3, {"diabetes": {"auroc": 0.7123, "auroc_lo": 0.61, "auroc_hi": 0.80, "brier": 0.1834,
                                   "mean_predicted": 0.081, "observed_rate": 0.079, "ece": 0.012, "wide": 1.0},
                      "stage": {"auroc": 0.61, "brier": 0.52}, "alt": {"mae": 2.5, "rmse": 3.0}})
    r.metrics[-1]["calibration"] = {"diabetes": [1.3, -0.4]}
    # Execute
    text = str(r)
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:5]}
    # Assert
    assert rows["diabetes"] == ["binary", "0.712", "(0.610", "to", "0.800)", "0.183", "0.081/0.079", "0.012", "-"]
    assert "warning: the AUROC interval of diabetes is wider than +-0.05" in text
    assert "diabetes a=1.30 b=-0.40" in text


# -- predict checks its input as launch checks an export ----------------------------------------
def _export(df: pd.DataFrame, path) -> None:
    df.to_csv(path, index=False)


def _problems(exc) -> list[str]:
    return list(exc.value.problems)


def test_predict_needs_only_the_features():
    r = _result()
    only = DF[["age", "sex"]]
    for task, v in r.predict(only).items():
        np.testing.assert_allclose(v, r.predict(DF)[task], rtol=1e-6)


def test_predict_reads_a_csv_export_like_launch(tmp_path):
    r = _result()
    _export(DF, tmp_path / "patients.csv")
    for task, v in r.predict(tmp_path / "patients.csv").items():
        np.testing.assert_allclose(v, r.predict(DF)[task], rtol=1e-5)


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda d: d.assign(age=[20.0, 40.0, 160.0, 80.0]), "column 'age': 1 value(s) above max 90"),
        (lambda d: d.assign(age=[20.0, "old", 60.0, 80.0]), "column 'age' (numeric): 1 value(s) are not numbers"),
        (lambda d: d.assign(sex=["F", "X", "M", "F"]), "column 'sex' (categorical): 1 value(s) not in categories"),
        (lambda d: d.drop(columns=["sex"]), "missing column(s) ['sex']"),
        (lambda d: d.assign(age=[20.0, None, 60.0, 80.0]), "column 'age': 1 missing (empty/NaN) value(s)"),
        (lambda d: d.assign(notes=["a", "b", "c", "d"]), "extra column(s) ['notes'] not in the schema"),
    ],
)
def test_predict_refuses_records_that_do_not_fit_the_schema_with_launchs_message(tmp_path, change, expected):
    from fedmtl.datasites.data.records import load_records
    from fedmtl.errors import RecordsValidationError

    # Prepare: the same bad records as a DataFrame and as an export launch would read
    bad = change(DF.copy())
    _export(bad, tmp_path / "bad.csv")
    # Execute
    with pytest.raises(RecordsValidationError) as from_frame:
        _result().predict(bad)
    with pytest.raises(RecordsValidationError) as from_file:
        _result().predict(tmp_path / "bad.csv")
    with pytest.raises(RecordsValidationError) as at_launch:
        load_records(tmp_path / "bad.csv", SCHEMA)
    # Assert: one clear problem, worded (and, for the file, numbered) as launch words it
    assert any(expected in p for p in _problems(from_frame)), _problems(from_frame)
    (theirs,) = [p for p in _problems(at_launch) if expected in p]
    assert theirs in _problems(from_file)
    assert "failed validation" in str(from_frame.value) and "Fix these" in str(from_frame.value)


def test_predict_lists_every_problem_at_once():
    from fedmtl.errors import RecordsValidationError

    bad = DF.assign(age=[20.0, 400.0, 60.0, -5.0], sex=["F", "Q", "M", "F"])
    with pytest.raises(RecordsValidationError) as e:
        _result().predict(bad)
    text = "\n".join(e.value.problems)
    assert "above max 90" in text and "below min 18" in text and "not in categories" in text


def test_predict_refuses_other_inputs():
    with pytest.raises(TypeError, match="DataFrame or a CSV/Parquet path"):
        _result().predict([[20.0, "F"]])


def test_predict_on_a_missing_file_says_so(tmp_path):
    from fedmtl.errors import RecordsValidationError

    with pytest.raises(RecordsValidationError, match="does not exist"):
        _result().predict(tmp_path / "nope.csv")
