"""Baselines: the reference methods, on small synthetic sites (and the demo cohort, slow)."""

from __future__ import annotations

import json

import pytest
import torch

from fedmtl.researcher.baselines import METHODS, BaselineConfig, SiteData, format_table, main, run_baselines


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _sites(make_site_records):
    sites = []
    for k, n in enumerate((400, 250)):
        df = make_site_records(n, seed=10 + k, shift=3 * k)
        sites.append(SiteData(f"site{k}", df[df["split"] == "train"], df[df["split"] == "test"]))
    return sites


def test_every_method_reports_per_site_and_pooled_metrics(schema, make_site_records):
    # Prepare
    sites = _sites(make_site_records)
    cfg = BaselineConfig(epochs=3, dp_epochs=1, batch_size=32, dp_batch_size=64, widths=(16,), dp_target_epsilon=5.0, n_bins=100)
    # Execute
    rep = run_baselines(schema, sites, cfg=cfg, seed=3)
    # Assert
    assert rep["seed"] == 3 and set(rep["results"]) == set(METHODS)
    assert [t["name"] for t in rep["tasks"]] == ["diabetes", "stage", "alt"]
    for method, r in rep["results"].items():
        assert set(r["per_site"]) == {"site0", "site1"}
        auc = r["pooled"]["diabetes"]["auroc"]
        assert 0.0 <= auc <= 1.0
        n_test = sum(len(s.test) - s.test["diabetes"].isna().sum() for s in sites)
        assert r["pooled"]["diabetes"]["n"] == n_test
    # diabetes depends strongly on age and bmi: a trained pooled model beats chance clearly
    assert rep["results"]["pooled_mtl"]["pooled"]["diabetes"]["auroc"] > 0.7
    assert rep["results"]["pooled_logreg"]["pooled"]["diabetes"]["auroc"] > 0.7
    assert "mae" in rep["results"]["pooled_mtl"]["pooled"]["alt"]
    dp = rep["results"]["pooled_mtl_dp"]["training"]
    assert dp["epsilon"] <= 5.0 and dp["noise_multiplier"] > 0
    assert "stage" in format_table(rep)
    json.dumps(rep, allow_nan=False)


def test_same_seed_gives_the_same_report(schema, make_site_records):
    # Prepare
    sites = _sites(make_site_records)
    cfg = BaselineConfig(epochs=1, widths=(8,), methods=("pooled_mtl", "local_mtl"), n_bins=50)
    # Execute
    a = run_baselines(schema, sites, cfg=cfg, seed=1)
    b = run_baselines(schema, sites, cfg=cfg, seed=1)
    # Assert
    assert a["results"]["pooled_mtl"]["pooled"] == b["results"]["pooled_mtl"]["pooled"]
    assert a["results"]["local_mtl"]["per_site"] == b["results"]["local_mtl"]["per_site"]


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['fedavg'\]"):
        BaselineConfig(methods=("pooled_mtl", "fedavg"))


@pytest.mark.slow
def test_cli_on_the_demo_cohort_writes_json_with_seed_and_command(tmp_path):
    # Execute
    rc = main(["--out", str(tmp_path), "--quick", "--methods", "pooled_mtl,local_mtl", "--seed", "0"])
    # Assert
    rep = json.loads((tmp_path / "baselines.json").read_text())
    assert rc == 0 and rep["seed"] == 0
    assert rep["command"].startswith("python -m fedmtl.researcher.baselines --out")
    assert rep["results"]["pooled_mtl"]["pooled"]["death_5y"]["auroc"] > 0.7
    # the hospital that does not record dyslipidemia has no metric for it
    last = list(rep["sites"])[-1]
    assert rep["results"]["local_mtl"]["per_site"][last].get("dyslipidemia_5y", {}).get("auroc") is None
