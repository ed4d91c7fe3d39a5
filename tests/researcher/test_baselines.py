"""Baselines: the federated job's recipe trained centrally and per site, on small synthetic
sites (and the demo cohort, slow), measured by the one evaluator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fedmtl.contract.jobspec import JobSpec
from fedmtl.models.preprocessing import Preprocessor
from fedmtl.researcher.baselines import (
    METHODS,
    Evaluator,
    SiteData,
    format_table,
    main,
    run_baselines,
    summarise,
    train_like_job,
    without_dp,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sites(make_site_records):
    sites = []
    for k, n in enumerate((400, 250)):
        df = make_site_records(n, seed=10 + k, shift=3 * k)
        sites.append(SiteData(f"site{k}", df[df["split"] == "train"], df[df["split"] == "test"]))
    return sites


def _spec(**kw) -> JobSpec:
    base = dict(name="recipe", tasks=[{"label": "diabetes"}, {"label": "stage"}, {"label": "alt"}], rounds=3,
                local_epochs=1.0, sample_rate=0.1, lr=0.5, momentum=0.5, target_epsilon=5.0,
                model={"widths": [16]}, secagg={"threshold": 2})
    base.update(kw)
    return JobSpec(**base)


def test_every_method_reports_seeds_per_site_pooled_and_calibration(schema, make_site_records):
    # Prepare
    sites = _sites(make_site_records)
    # Execute
    rep = run_baselines(schema, sites, _spec(), seeds=(3, 4))
    # Assert
    assert rep["seeds"] == [3, 4] and set(rep["results"]) == set(METHODS)
    assert [t["name"] for t in rep["tasks"]] == ["diabetes", "stage", "alt"]
    n_test = sum(len(s.test) - s.test["diabetes"].isna().sum() for s in sites)
    for method, r in rep["results"].items():
        assert "error" not in r, (method, r)
        assert [run["seed"] for run in r["runs"]] == [3, 4]
        for run in r["runs"]:
            assert set(run["per_site"]) == {"site0", "site1"}
            d = run["pooled"]["diabetes"]
            assert 0.0 <= d["auroc"] <= 1.0 and d["n"] == n_test
            assert 0.0 <= d["brier"] <= 1.0 and 0.0 <= d["ece"] <= 1.0
            assert d["observed_rate"] == pytest.approx(
                np.nanmean(np.concatenate([s.test["diabetes"].to_numpy() for s in sites])))
            assert sum(run["reliability"]["diabetes"]["count"]) == n_test
            assert run["sklearn_gap"] <= 0.002
        sm = r["summary"]["pooled"]["diabetes"]
        vals = [run["pooled"]["diabetes"]["auroc"] for run in r["runs"]]
        assert sm["mean"] == pytest.approx(np.mean(vals)) and sm["sd"] == pytest.approx(np.std(vals, ddof=1))
    # diabetes depends strongly on age and bmi: a trained pooled model beats chance clearly
    assert rep["results"]["pooled_mtl"]["summary"]["pooled"]["diabetes"]["mean"] > 0.7
    assert rep["results"]["pooled_logreg"]["summary"]["pooled"]["diabetes"]["mean"] > 0.7
    assert "mae" in rep["results"]["pooled_mtl"]["runs"][0]["pooled"]["alt"]
    assert "stage" in format_table(rep)
    json.dumps(rep, allow_nan=False)


def test_baselines_train_the_jobs_recipe_and_spend_its_epsilon(schema, make_site_records):
    # Prepare
    sites = _sites(make_site_records)
    spec = _spec()
    # Execute
    rep = run_baselines(schema, sites, spec, seeds=(0,), methods=("pooled_mtl", "pooled_mtl_dp", "local_mtl_dp"))
    # Assert: one site of the job running all its rounds: same steps, same noise, same epsilon
    n_pooled = sum(len(s.train) for s in sites)
    pooled = rep["results"]["pooled_mtl"]["runs"][0]["training"]
    assert pooled["steps"] == spec.rounds * spec.steps_per_round(n_pooled)
    assert pooled["noise_multiplier"] == 0.0 and pooled["epsilon"] is None
    dp = rep["results"]["pooled_mtl_dp"]["runs"][0]["training"]
    assert dp["noise_multiplier"] == pytest.approx(spec.noise_for_site(n_pooled))
    assert dp["epsilon"] == pytest.approx(spec.epsilon_for_site(n_pooled)) and dp["epsilon"] <= 5.0 + 0.01
    for s in sites:
        local = rep["results"]["local_mtl_dp"]["runs"][0]["training"][s.name]
        assert local["n_train"] == len(s.train) and local["epsilon"] <= 5.0 + 0.01
    assert rep["recipe"]["lr"] == 0.5 and rep["preprocessor"]["scaling"] == spec.scaling


def test_same_seed_gives_the_same_report(schema, make_site_records):
    # Prepare
    sites = _sites(make_site_records)
    spec = _spec(rounds=1)
    # Execute
    a = run_baselines(schema, sites, spec, seeds=(1,), methods=("pooled_mtl", "local_mtl"))
    b = run_baselines(schema, sites, spec, seeds=(1,), methods=("pooled_mtl", "local_mtl"))
    # Assert
    assert a["results"]["pooled_mtl"]["runs"][0]["pooled"] == b["results"]["pooled_mtl"]["runs"][0]["pooled"]
    assert a["results"]["local_mtl"]["runs"][0]["per_site"] == b["results"]["local_mtl"]["runs"][0]["per_site"]


def test_evaluator_pooled_auroc_is_sklearns_on_all_test_records(schema, make_site_records):
    # Prepare
    sites = _sites(make_site_records)
    spec = without_dp(_spec(rounds=1))
    pre = Preprocessor(schema)
    X = torch.cat([pre.transform(s.train) for s in sites])
    from fedmtl.models.preprocessing import labels_of

    Y, M = (torch.cat(p) for p in zip(*[labels_of(s.train, spec.task_specs(schema)) for s in sites]))
    model, _ = train_like_job(spec, schema, X, Y, M, seed=0)
    # Execute
    ev = Evaluator(sites, spec.task_specs(schema)).model(model, pre)
    # Assert
    model.eval()
    with torch.no_grad():
        scores = np.concatenate([model.predict(pre.transform(s.test))["diabetes"] for s in sites])
    y = np.concatenate([s.test["diabetes"].to_numpy() for s in sites])
    keep = ~np.isnan(y)
    assert ev["pooled"]["diabetes"]["auroc"] == pytest.approx(roc_auc_score(y[keep], scores[keep]), abs=0.002)
    assert ev["sklearn_gap"] <= 0.002


def test_summarise_gives_mean_and_sd_per_task_site_and_task_mean():
    # Prepare
    evals = [{"pooled": {"a": {"auroc": a}, "b": {"auroc": b}}, "per_site": {"s": {"a": {"auroc": a}, "b": {}}},
              "sklearn_gap": g} for a, b, g in ((0.6, 0.8, 0.001), (0.7, 0.9, 0.0005))]
    # Execute
    sm = summarise(evals)
    # Assert
    assert sm["pooled"]["a"] == {"mean": pytest.approx(0.65), "sd": pytest.approx(np.std([0.6, 0.7], ddof=1)),
                                 "n_seeds": 2}
    assert sm["task_mean"]["mean"] == pytest.approx(0.75)
    assert sm["site_task_mean"]["s"]["mean"] == pytest.approx(0.65)  # only the tasks the site has
    assert sm["per_site"]["s"]["b"]["n_seeds"] == 0
    assert sm["sklearn_gap"] == 0.001
    with pytest.raises(ValueError, match="no evaluations"):
        summarise([])


def test_bad_requests_are_refused(schema, make_site_records):
    sites = _sites(make_site_records)
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['fedavg'\]"):
        run_baselines(schema, sites, _spec(), methods=("pooled_mtl", "fedavg"))
    with pytest.raises(ValueError, match="DP baselines need a job spec with dp on"):
        run_baselines(schema, sites, without_dp(_spec()), methods=("pooled_mtl_dp",))
    with pytest.raises(ValueError, match="at least one seed"):
        run_baselines(schema, sites, _spec(), seeds=())


@pytest.mark.slow
def test_cli_on_the_demo_cohort_writes_json_with_seeds_and_command(tmp_path):
    # Execute
    rc = main(["--out", str(tmp_path), "--quick", "--methods", "pooled_mtl,local_mtl"])
    # Assert
    rep = json.loads((tmp_path / "baselines.json").read_text())
    assert rc == 0 and rep["seeds"] == [0]
    assert rep["command"].startswith("python -m fedmtl.researcher.baselines --out")
    assert rep["results"]["pooled_mtl"]["runs"][0]["pooled"]["death_5y"]["auroc"] > 0.7
    # the hospital that does not record dyslipidemia has no metric for it
    last = list(rep["sites"])[-1]
    assert rep["results"]["local_mtl"]["runs"][0]["per_site"][last].get("dyslipidemia_5y", {}).get("auroc") is None
