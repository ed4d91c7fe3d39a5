"""Released metrics: do their stated 95% intervals cover the exact values?

Issue 23 ("Honest releases"): each released metric of a binary task comes with an interval
(:func:`fedmtl.models.binned.binary_intervals`, through
:func:`fedmtl.contract.protocol.compute_metrics`), and the stated 95% intervals must cover the
value the exact scores give on the same test rows in at least 90% of runs. This benchmark
checks that by simulation, with the release code the job runs:

* scenarios: ``demo`` (the NAFLD cohort as ``fedmtl demo`` prepares it: 3 hospitals, 5
  binary tasks) and ``800`` (each demo hospital subsampled to 800 patients, split column
  kept);
* scores: ONE L2 logistic regression per task (scikit-learn, C=1) fitted on the pooled
  training splits (the job's standard scaling from the exact training statistics), as
  ``fitted``; and ``dp_like``, the same logits shrunk towards a too-low risk
  (``0.5 * logit - 1``), as DP models produce;
* per run: each site builds its release vector (test split + calibration histograms of its
  training split, :class:`fedmtl.privacy.eval_release.ReleaseStatistics`), noises it with
  a fresh generator (:func:`~fedmtl.privacy.eval_release.noise_statistics`, noise
  multiplier ``sigma``), the 3 vectors are summed (what secure aggregation gives the
  researcher), the Platt recalibration is fitted from the summed calibration histograms and
  the metrics and intervals are read under it, as ``Job`` does;
* exact values: on the unbinned scores of the pooled test rows, under the same run's Platt
  recalibration for the risk-based metrics: scikit-learn ``roc_auc_score`` and
  ``average_precision_score``, accuracy at risk 0.5, Brier, mean predicted risk, observed
  rate, and ECE over the release bins with each record at its own risk.

Run: ``python benchmarks/release_coverage.py [--runs 300] [--quick]``; prints a coverage and
half-width table per scenario, model and sigma, writes
``benchmarks/results/release_coverage.json`` and ``release_coverage.png`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from benchkit import machine_info
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score

from fedmtl.contract import protocol
from fedmtl.models.binned import METRICS, RELEASE_BINS, logit_bins
from fedmtl.models.preprocessing import Preprocessor, labels_of, local_stats, sum_stats
from fedmtl.models.tasks import tasks_from_schema
from fedmtl.privacy.eval_release import ReleaseStatistics, noise_statistics, sensitivity
from fedmtl.researcher.baselines import SiteData, prepare_demo

RESULTS = Path(__file__).parent / "results" / "release_coverage.json"
#: the job's default evaluation noise multiplier (JobSpec) and a smaller one
SIGMAS = (5.0, 2.0)
SITE_SIZE = 800
TARGET = 0.90


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40.0, 40.0)))


def subsample(sites: Sequence[SiteData], n: int, seed: int) -> list[SiteData]:
    """Each site cut to ``n`` patients drawn at random from its records (train and test
    together, so each patient keeps the split it had)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in sites:
        tr, te = s.train.assign(_split="train"), s.test.assign(_split="test")
        df = pd.concat([tr, te], ignore_index=True)
        keep = np.sort(rng.choice(len(df), size=min(n, len(df)), replace=False))
        df = df.iloc[keep]
        out.append(SiteData(s.name, df[df._split == "train"].drop(columns="_split").reset_index(drop=True),
                            df[df._split == "test"].drop(columns="_split").reset_index(drop=True)))
    return out


def fit_logits(schema, sites: Sequence[SiteData], tasks, seed: int) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """``{site: {"train"|"test": {task: logit}}}`` of one L2 logistic regression per task
    fitted on the pooled training splits (NaN where the record has no label)."""
    pre = Preprocessor.from_stats(schema, sum_stats([local_stats(schema, s.train) for s in sites]))
    X = np.concatenate([pre.transform(s.train).numpy() for s in sites])
    Y, M = (np.concatenate([a.numpy() for a in t]) for t in zip(*(labels_of(s.train, tasks) for s in sites)))
    models = {t.name: LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(X[M[:, j]], Y[M[:, j], j])
              for j, t in enumerate(tasks)}
    out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for s in sites:
        out[s.name] = {part: {t.name: models[t.name].decision_function(pre.transform(df).numpy()) for t in tasks}
                       for part, df in (("train", s.train), ("test", s.test))}
    return out


def _exact(z: np.ndarray, y: np.ndarray, platt: tuple[float, float]) -> dict[str, float]:
    """Every metric of the unbinned logits ``z`` (labels ``y``) under ``logit -> a z + b``."""
    a, b = platt
    r = _sigmoid(a * z + b)
    bins = logit_bins(_sigmoid(z))  # the release bins are on the model's own logit
    n = len(y)
    ece = sum(abs(float(y[bins == k].sum() - r[bins == k].sum())) for k in range(RELEASE_BINS)) / n
    return {
        "auroc": float(roc_auc_score(y, z)),
        "auprc": float(average_precision_score(y, z)),
        "accuracy": float(np.mean((r >= 0.5) == (y == 1))),
        "brier": float(np.mean((r - y) ** 2)),
        "mean_predicted": float(r.mean()),
        "observed_rate": float(y.mean()),
        "ece": float(ece),
    }


def simulate(logits: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]], labels: Mapping[str, Any], tasks,
             *, sigma: float, runs: int, seed: int) -> dict[str, Any]:
    """Coverage and median half-width per task and metric over ``runs`` noised releases."""
    names = [t.name for t in tasks]
    vecs = {}
    for s, parts in logits.items():
        rs = ReleaseStatistics(tasks, n_bins=protocol.N_BINS, calibration=True)
        (Ytr, Mtr), (Yte, Mte) = labels[s]["train"], labels[s]["test"]
        rs.update({k: _sigmoid(v) for k, v in parts["test"].items()}, Yte, Mte)
        rs.update_calibration({k: _sigmoid(v) for k, v in parts["train"].items()}, Ytr, Mtr)
        vecs[s] = rs.vector()
    # the pooled test rows with a label, per task
    zt, yt = {}, {}
    for j, t in enumerate(names):
        zt[t] = np.concatenate([logits[s]["test"][t][labels[s]["test"][1][:, j]] for s in logits])
        yt[t] = np.concatenate([labels[s]["test"][0][labels[s]["test"][1][:, j], j] for s in logits])
    noise_sd = sigma * sensitivity(tasks) * math.sqrt(len(vecs))
    rng = np.random.default_rng(seed)
    hits = {t: {m: 0 for m in METRICS} for t in names}
    undefined = {t: {m: 0 for m in METRICS} for t in names}
    half: dict[str, dict[str, list[float]]] = {t: {m: [] for m in METRICS} for t in names}
    err: dict[str, dict[str, list[float]]] = {t: {m: [] for m in METRICS} for t in names}
    exact_raw = {t: _exact(zt[t], yt[t], (1.0, 0.0)) for t in names}
    for _ in range(runs):
        summed = sum(noise_statistics(v, tasks, n_bins=protocol.N_BINS, calibration=True,
                                      noise_multiplier=sigma, rng=rng) for v in vecs.values())
        platt = protocol.fit_calibration(summed, tasks, calibration=True)
        rel = protocol.compute_metrics(summed, tasks, calibration=True, noise_sd=noise_sd, platt=platt)
        for t in names:
            ex = _exact(zt[t], yt[t], platt[t])
            for m in METRICS:
                lo, hi, v = rel[t][f"{m}_lo"], rel[t][f"{m}_hi"], rel[t][m]
                if not (math.isfinite(lo) and math.isfinite(hi)):
                    undefined[t][m] += 1
                    continue
                hits[t][m] += int(lo - 1e-12 <= ex[m] <= hi + 1e-12)
                half[t][m].append((hi - lo) / 2)
                err[t][m].append(v - ex[m])
    return {
        "sigma": sigma, "noise_sd_per_count": noise_sd, "runs": runs,
        "n_test": {t: int(len(yt[t])) for t in names},
        "exact_without_platt": exact_raw,
        "coverage": {t: {m: hits[t][m] / runs for m in METRICS} for t in names},
        "undefined_intervals": undefined,
        "median_half_width": {t: {m: float(np.median(half[t][m])) if half[t][m] else None for m in METRICS} for t in names},
        "mean_error": {t: {m: float(np.mean(err[t][m])) if err[t][m] else None for m in METRICS} for t in names},
        "rmse": {t: {m: float(np.sqrt(np.mean(np.square(err[t][m])))) if err[t][m] else None for m in METRICS}
                 for t in names},
    }


def table(res: Mapping[str, Any]) -> str:
    """Markdown: per task, coverage / median half-width of each metric."""
    tasks = list(res["coverage"])
    head = "| task (test n) | " + " | ".join(METRICS) + " |"
    rows = [head, "|" + "---|" * (len(METRICS) + 1)]
    for t in tasks:
        cells = []
        for m in METRICS:
            c, h = res["coverage"][t][m], res["median_half_width"][t][m]
            mark = "**" if c < TARGET else ""
            cells.append(f"{mark}{c:.2f}{mark} ±{h:.3f}" if h is not None else f"{c:.2f} -")
        rows.append(f"| {t} ({res['n_test'][t]}) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def summary_table(report: Mapping[str, Any]) -> str:
    """Markdown: per scenario, model and sigma, each metric's worst coverage over the tasks
    and its median half-width (median over tasks of the per-task medians)."""
    rows = ["| sites | model | sigma | " + " | ".join(METRICS) + " |", "|" + "---|" * (len(METRICS) + 3)]
    for sc, by_model in report["results"].items():
        for mo, by_sigma in by_model.items():
            for sg, r in by_sigma.items():
                cells = []
                for m in METRICS:
                    cov = min(r["coverage"][t][m] for t in r["coverage"])
                    hw = [r["median_half_width"][t][m] for t in r["coverage"] if r["median_half_width"][t][m] is not None]
                    mark = "**" if cov < TARGET else ""
                    cells.append(f"{mark}{cov:.2f}{mark} ±{float(np.median(hw)):.3f}" if hw else f"{cov:.2f}")
                rows.append(f"| {sc} | {mo} | {sg} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(report: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [(sc, mo, sg) for sc, by_model in report["results"].items() for mo, by_sigma in by_model.items()
             for sg in by_sigma]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
    x = np.arange(len(METRICS))
    w = 0.8 / max(len(cases), 1)
    lowest = 1.0
    for i, (sc, mo, sg) in enumerate(cases):
        r = report["results"][sc][mo][sg]
        tasks = list(r["coverage"])
        cov = [min(r["coverage"][t][m] for t in tasks) for m in METRICS]
        hw = [float(np.median([r["median_half_width"][t][m] for t in tasks
                               if r["median_half_width"][t][m] is not None])) for m in METRICS]
        lowest = min(lowest, *cov)
        lab = f"{sc} {mo} sigma {sg}"
        ax1.bar(x + i * w - 0.4 + w / 2, cov, w, label=lab)
        ax2.bar(x + i * w - 0.4 + w / 2, hw, w, label=lab)
    ax1.axhline(TARGET, color="k", ls="--", lw=1)
    ax1.axhline(0.95, color="grey", ls=":", lw=1)
    ax1.set_ylim(max(0.0, min(lowest, TARGET) - 0.1), 1.01)
    ax1.set_ylabel("coverage (worst task)")
    ax1.set_title("95% intervals of the released metrics: coverage of the exact value")
    ax2.set_ylabel("half-width (median over tasks)")
    ax2.set_xticks(x, METRICS)
    ax2.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=300, help="noised releases per scenario, model and sigma")
    ap.add_argument("--quick", action="store_true", help="40 runs")
    ap.add_argument("--seed", type=int, default=0, help="the noise's, the subsample's and the fit's seed")
    ap.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS), help="evaluation noise multipliers")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    runs = 40 if a.quick else a.runs
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedmtl-coverage-") as tmp:
        schema, demo_sites = prepare_demo(Path(tmp) / "cohort", sites=3, seed=0)
    tasks = tasks_from_schema(schema)
    if any(t.kind != "binary" for t in tasks):
        raise SystemExit(f"expected binary tasks only, got {[(t.name, t.kind) for t in tasks]}")
    scenarios = {"demo": demo_sites, str(SITE_SIZE): subsample(demo_sites, SITE_SIZE, a.seed)}
    report: dict[str, Any] = {
        "command": "python " + " ".join(shlex.quote(x) for x in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "runs": runs, "seed": a.seed, "n_bins": RELEASE_BINS, "target": TARGET,
        "tasks": [t.name for t in tasks], "sites": {}, "results": {},
    }
    for sc, sites in scenarios.items():
        report["sites"][sc] = {s.name: {"n_train": len(s.train), "n_test": len(s.test)} for s in sites}
        labels = {s.name: {part: tuple(x.numpy() for x in labels_of(df, tasks))
                           for part, df in (("train", s.train), ("test", s.test))} for s in sites}
        raw = fit_logits(schema, sites, tasks, a.seed)
        models = {"fitted": raw,
                  "dp_like": {s: {p: {t: 0.5 * z - 1.0 for t, z in d.items()} for p, d in parts.items()}
                              for s, parts in raw.items()}}
        report["results"][sc] = {}
        for mo, logits in models.items():
            report["results"][sc][mo] = {}
            for sg in a.sigmas:
                t = time.perf_counter()
                res = simulate(logits, labels, tasks, sigma=sg, runs=runs, seed=a.seed)
                res["seconds"] = round(time.perf_counter() - t, 1)
                report["results"][sc][mo][str(sg)] = res
                worst = min(c for by_m in res["coverage"].values() for c in by_m.values())
                print(f"== {sc} sites, {mo} model, sigma {sg} (noise sd {res['noise_sd_per_count']:.1f} per count "
                      f"of the sum; {runs} runs, {res['seconds']} s; worst coverage {worst:.2f})", flush=True)
                print(table(res), flush=True)
    print("== worst coverage over the tasks, median half-width", flush=True)
    print(summary_table(report), flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["machine"] = machine_info(load_before)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))
    png = a.out.with_suffix(".png")
    plot(report, png)
    print(f"wrote {a.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
