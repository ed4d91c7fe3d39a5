"""Baselines the federated results are judged against, like for like, without any server.

Every baseline trains **the federated job's own recipe** (a :class:`~fedmtl.contract.jobspec.JobSpec`):
the same model (``spec.build_model``, same trunk and widths), the same features (the
job's preprocessor), the same optimiser, learning rate, momentum, sampling rate, clipping
norm and number of passes over the data (``rounds x local_epochs``), and with DP the same
accounting (``spec.noise_for_site``: the noise that keeps all rounds and the job's
evaluation releases within ``target_epsilon`` on that many records). A baseline is "one
site of the job that trains all rounds in one go":

* ``pooled_mtl``      -- centralised: all hospitals' training records pooled, non-private.
  (Pooling raw records is exactly what federation avoids; it is the upper reference.)
* ``pooled_mtl_dp``   -- the same with DP-SGD at the job's epsilon (the pooled table is one
  party, so that is the same epsilon per record as the job's epsilon per site).
* ``local_mtl``       -- each hospital alone, non-private, on its own training records,
  evaluated on its own test split.
* ``local_mtl_dp``    -- the same with DP at the job's epsilon.
* ``pooled_logreg``   -- scikit-learn logistic regression per task on the pooled features:
  a sanity reference for the networks.

Every network is trained with :func:`fedmtl.privacy.dp.train_local` (``dp=False`` for the
non-private ones): the loop a datasite runs.

Evaluation: :class:`Evaluator` is the one evaluator of every row (the demo measures its
federated models with it too): :func:`fedmtl.models.metrics.evaluation_metrics` on each
hospital's test split, and "pooled" over all test splits (the sum of the sites' states).
Per task it reports AUROC, AUPRC, Brier score, mean predicted vs observed rate, ECE and
``n``; per evaluation the largest gap between its AUROC and scikit-learn's on the raw
scores (``sklearn_gap``). :func:`summarise` turns several seeds' evaluations into mean and
standard deviation.

Run: ``python -m fedmtl.researcher.baselines --out DIR [--sites 3] [--seeds 0,1,2] [--quick]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from fedmtl.datasites.data.cohort import prepare
from fedmtl.datasites.data.records import load_records
from fedmtl.models.metrics import evaluation_metrics, sum_states
from fedmtl.models.preprocessing import Preprocessor, labels_of, local_stats, sum_stats
from fedmtl.models.tasks import TaskSpec
from fedmtl.privacy.dp import train_local
from fedmtl.researcher.recipe import recipe_spec
from fedmtl.schema import MERGE_HINT, Schema, describe_differences, schema_differences

METHODS = ("pooled_mtl", "pooled_mtl_dp", "local_mtl", "local_mtl_dp", "pooled_logreg")
#: per-task figures kept in an evaluation
KEEP = ("auroc", "auprc", "brier", "mean_predicted", "observed_rate", "ece", "mae", "rmse", "n")


@dataclass
class SiteData:
    """One hospital's records, split into train and test."""

    name: str
    train: pd.DataFrame
    test: pd.DataFrame


def split_sites(data: Mapping[str, pd.DataFrame], schema: Schema) -> list[SiteData]:
    """``site -> records`` (with the schema's split column) as :class:`SiteData`."""
    split = schema.split_column
    if split is None:
        raise ValueError("the schema has no split column; baselines need each site's train/test split")
    return [SiteData(n, df[df[split] == "train"].reset_index(drop=True), df[df[split] == "test"].reset_index(drop=True))
            for n, df in data.items()]


def load_sites(paths: Sequence[tuple[str, Path, Path]]) -> tuple[Schema, list[SiteData]]:
    """Load ``(name, records, schema)`` triples and split by the schema's split column."""
    schema: Schema | None = None
    frames = {}
    for name, rec, sch in paths:
        s = Schema.load(sch)
        differ = schema_differences([s, schema], columns_only=True) if schema is not None else []
        if differ:
            raise ValueError(f"site {name!r}'s schema differs from the first site's: {describe_differences(differ)}; "
                             f"baselines need one schema: {MERGE_HINT}")
        schema = schema or s
        if s.split_column is None:
            raise ValueError(f"site {name!r}: the schema has no split column; baselines need train/test splits")
        frames[name] = load_records(rec, s)
    if schema is None:
        raise ValueError("no sites given")
    return schema, split_sites(frames, schema)


def prepare_demo(out_dir: Path, *, sites: int = 3, seed: int = 0) -> tuple[Schema, list[SiteData]]:
    """Write the demo cohort under ``out_dir`` and load it."""
    files = prepare(out_dir, sites=sites, seed=seed)
    return load_sites([(f.name, f.records, f.schema) for f in files])


def job_preprocessor(spec, schema: Schema, sites: Sequence[SiteData]) -> Preprocessor:
    """The features of ``spec``'s job: range scaling by the schema's declared bounds, or
    standard scaling from the (exact) sum of the sites' training-split statistics."""
    if spec.scaling == "range":
        return Preprocessor(schema)
    return Preprocessor.from_stats(schema, sum_stats([local_stats(schema, s.train) for s in sites]))


def without_dp(spec):
    """``spec`` with DP off (everything else the same)."""
    return dataclasses.replace(spec, dp=False, noise_multiplier=None, target_epsilon=None)


# -- evaluation ----------------------------------------------------------------------------
class Evaluator:
    """Every row's evaluator: :func:`evaluation_metrics` on each site's test split and on
    all of them pooled (sum of states), plus the gap to scikit-learn's AUROC."""

    def __init__(self, sites: Sequence[SiteData], tasks: Sequence[TaskSpec]) -> None:
        self.sites = list(sites)
        self.tasks = list(tasks)
        self.names = [s.name for s in self.sites]
        self._labels = {s.name: labels_of(s.test, self.tasks) for s in self.sites}
        self._features: dict[tuple[str, str], torch.Tensor] = {}

    def features(self, pre: Preprocessor, site: str) -> torch.Tensor:
        key = (json.dumps(pre.to_dict(), sort_keys=True, default=str), site)
        if key not in self._features:
            self._features[key] = pre.transform(next(s.test for s in self.sites if s.name == site))
        return self._features[key]

    def model(self, model, pre: Preprocessor) -> dict[str, Any]:
        """Evaluate one model (a :class:`~fedmtl.models.MultiTaskNet`) on every site."""
        return self.models({n: model for n in self.names}, pre)

    def models(self, models: Mapping[str, Any], pre: Preprocessor) -> dict[str, Any]:
        """Evaluate ``models[site]`` on ``site``'s test split, for every site."""
        preds = {}
        for n in self.names:
            m = models[n]
            m.eval()
            with torch.no_grad():
                preds[n] = {k: np.asarray(v, dtype=float) for k, v in m.predict(self.features(pre, n)).items()}
        return self.predictions(preds)

    def predictions(self, preds: Mapping[str, Mapping[str, np.ndarray]],
                    tasks: Sequence[TaskSpec] | None = None) -> dict[str, Any]:
        """Evaluate ``preds[site][task]`` (scores for ``site``'s test records)."""
        # scikit-learn is in the test extra only (pyproject), not a dependency: imported where
        # it is used, so that importing this module (the demo, personalise) never needs it
        from sklearn.metrics import roc_auc_score

        tasks = list(tasks) if tasks is not None else self.tasks
        idx = [[t.name for t in self.tasks].index(t.name) for t in tasks]
        states, per_site = [], {}
        for n in self.names:
            Y, M = self._labels[n]
            tm = evaluation_metrics(tasks).update(preds[n], Y[:, idx], M[:, idx])
            st = tm.state()
            states.append(st)
            per_site[n] = _slim(tm.compute(st))
        pooled_tm = evaluation_metrics(tasks)
        summed = sum_states(states)
        pooled = _slim(pooled_tm.compute(summed))
        gap = 0.0
        for j, t in zip(idx, tasks):
            if t.kind != "binary" or pooled.get(t.name, {}).get("auroc") is None:
                continue
            y = np.concatenate([self._labels[n][0][:, j].numpy()[self._labels[n][1][:, j].numpy()] for n in self.names])
            s = np.concatenate([np.asarray(preds[n][t.name])[self._labels[n][1][:, j].numpy()] for n in self.names])
            gap = max(gap, abs(float(roc_auc_score(y, s)) - float(pooled_tm.compute(summed)[t.name]["auroc"])))
        return {"per_site": per_site, "pooled": pooled, "reliability": pooled_tm.reliability(summed),
                "sklearn_gap": gap}


def _slim(res: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float | None]]:
    return {
        t: {k: (None if not np.isfinite(v) else float(v)) for k, v in m.items() if k in KEEP}
        for t, m in res.items()
    }


def summarise(evals: Sequence[Mapping[str, Any]], metric: str = "auroc") -> dict[str, Any]:
    """Mean and sample standard deviation over seeds of ``metric`` per task, pooled and
    per site, and of the mean over tasks: ``{"pooled": {task: {"mean", "sd", "n_seeds"}},
    "per_site": {site: {...}}, "task_mean": {"mean", "sd"}, "site_task_mean": {site: {...}}}``."""
    if not evals:
        raise ValueError("no evaluations to summarise")

    def stats(vals: list[float | None]) -> dict[str, float | int | None]:
        v = [x for x in vals if x is not None]
        if not v:
            return {"mean": None, "sd": None, "n_seeds": 0}
        return {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n_seeds": len(v)}

    def task_mean(block: Mapping[str, Mapping[str, float | None]]) -> float | None:
        v = [m.get(metric) for m in block.values() if m.get(metric) is not None]
        return float(np.mean(v)) if v else None

    tasks = list(evals[0]["pooled"])
    sites = list(evals[0]["per_site"])
    return {
        "pooled": {t: stats([e["pooled"].get(t, {}).get(metric) for e in evals]) for t in tasks},
        "per_site": {s: {t: stats([e["per_site"][s].get(t, {}).get(metric) for e in evals]) for t in tasks}
                     for s in sites},
        "task_mean": stats([task_mean(e["pooled"]) for e in evals]),
        "site_task_mean": {s: stats([task_mean(e["per_site"][s]) for e in evals]) for s in sites},
        "sklearn_gap": max(float(e.get("sklearn_gap", 0.0)) for e in evals),
    }


# -- training: one party running the whole job ---------------------------------------------
def train_like_job(spec, schema: Schema, X: torch.Tensor, Y: torch.Tensor, M: torch.Tensor, *,
                   seed: int) -> tuple[Any, dict[str, Any]]:
    """Train ``spec``'s model on ``(X, Y, M)`` as one site of the job would over all its
    rounds: ``rounds * steps_per_round(n)`` steps of :func:`train_local` with the job's
    optimiser settings, and with DP the job's noise for ``n`` records. ``seed`` sets the
    initial weights (as the job's ``seed`` does) and the sampling/noise."""
    spec = dataclasses.replace(spec, seed=int(seed))
    n = int(X.shape[0])
    model = spec.build_model(schema, n_features=int(X.shape[1]))
    kw = dict(spec.client_config())
    kw.pop("fedprox_mu", None)
    steps = int(spec.rounds) * spec.steps_per_round(n)
    if spec.dp:
        kw["noise_multiplier"] = spec.noise_for_site(n)
    res = train_local(model=model, X=X, Y=Y, mask=M, tasks=spec.task_specs(schema), steps=steps, seed=int(seed), **kw)
    info = {"n_train": n, "steps": res.steps, "sample_rate": res.sample_rate,
            "noise_multiplier": res.noise_multiplier,
            "epsilon": spec.epsilon_for_site(n) if spec.dp else None, "delta": spec.delta if spec.dp else None}
    return model, info


def run_baselines(
    schema: Schema,
    sites: Sequence[SiteData],
    spec,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    methods: Sequence[str] = METHODS,
    pre: Preprocessor | None = None,
    evaluator: Evaluator | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Train and evaluate every method in ``methods`` with ``spec``'s recipe (DP methods
    at its privacy settings; ``spec`` must have DP on if a ``_dp`` method is asked for),
    once per seed. ``pre``: the features (default :func:`job_preprocessor`). Returns the
    JSON-able report: per method the per-seed evaluations (``runs``) and ``summary``
    (:func:`summarise`)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if any(m.endswith("_dp") for m in methods) and not spec.dp:
        raise ValueError("DP baselines need a job spec with dp on (target_epsilon or noise_multiplier)")
    if not seeds:
        raise ValueError("give at least one seed")
    t0 = time.perf_counter()
    tasks = spec.task_specs(schema)
    pre = pre or job_preprocessor(spec, schema, sites)
    ev = evaluator or Evaluator(sites, tasks)
    names = [s.name for s in sites]
    train = {s.name: (pre.transform(s.train), *labels_of(s.train, tasks)) for s in sites}
    pooled = tuple(torch.cat([train[n][i] for n in names]) for i in range(3))
    nodp = without_dp(spec)
    results: dict[str, Any] = {}
    for method in methods:
        t = time.perf_counter()
        runs = []
        try:
            for seed in seeds:
                if method == "pooled_logreg":
                    runs.append({"seed": int(seed), **_logreg(pooled, tasks, pre, ev, seed)})
                    continue
                job = spec if method.endswith("_dp") else nodp
                if method.startswith("pooled"):
                    model, info = train_like_job(job, schema, *pooled, seed=seed)
                    runs.append({"seed": int(seed), "training": info, **ev.model(model, pre)})
                else:
                    models, infos = {}, {}
                    for n in names:
                        models[n], infos[n] = train_like_job(job, schema, *train[n], seed=seed)
                    runs.append({"seed": int(seed), "training": infos, **ev.models(models, pre)})
            entry: dict[str, Any] = {"runs": runs, "summary": summarise(runs)}
        except (ValueError, RuntimeError) as e:  # e.g. a diverged model's NaN scores
            entry = {"error": f"{type(e).__name__}: {e}"}
        entry["seconds"] = round(time.perf_counter() - t, 2)
        results[method] = entry
        log(f"{method}: " + (f"FAILED ({entry['error']})" if "error" in entry else f"done in {entry['seconds']:.1f}s"))
    return {
        "seeds": [int(s) for s in seeds],
        "recipe": spec.to_dict(),
        "preprocessor": {"scaling": pre.scaling, "features": pre.feature_names},
        "tasks": [t.to_dict() for t in tasks],
        "sites": {s.name: {"n_train": len(s.train), "n_test": len(s.test)} for s in sites},
        "results": results,
        "seconds": round(time.perf_counter() - t0, 2),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _logreg(pooled, tasks: Sequence[TaskSpec], pre: Preprocessor, ev: Evaluator, seed: int) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    X, Y, M = (a.numpy() for a in pooled)
    models = {}
    for j, t in enumerate(tasks):
        if t.kind != "binary" or M[:, j].sum() < 2 or len(set(Y[M[:, j], j])) < 2:
            continue
        models[t.name] = LogisticRegression(max_iter=1000, random_state=seed).fit(X[M[:, j]], Y[M[:, j], j])
    used = [t for t in tasks if t.name in models]
    preds = {n: {t.name: models[t.name].predict_proba(ev.features(pre, n).numpy())[:, 1] for t in used}
             for n in ev.names}
    return {"training": {"model": "sklearn LogisticRegression(max_iter=1000)"}, **ev.predictions(preds, used)}


def format_table(report: Mapping[str, Any], metric: str = "auroc") -> str:
    """Per-task mean (sd) over seeds of ``metric`` of each method, pooled test and per site."""
    tasks = [t["name"] for t in report["tasks"]]
    sites = list(report["sites"])
    cols = ["pooled"] + sites
    lines = [f"{metric.upper()} on test splits, mean (sd) over seeds {report['seeds']} "
             "(pooled = all hospitals' test records)"]
    for method, r in report["results"].items():
        if "error" in r:
            lines.append(f"\n{method}: {r['error']}")
            continue
        sm = summarise(r["runs"], metric)
        lines.append(f"\n{method}")
        lines.append("  " + "task".ljust(18) + "".join(c[:15].rjust(16) for c in cols))
        for t in tasks:
            cells = [sm["pooled"].get(t)] + [sm["per_site"][s].get(t) for s in sites]
            lines.append("  " + t.ljust(18) + "".join(_ms(c).rjust(16) for c in cells))
    return "\n".join(lines)


def _ms(c: Mapping[str, Any] | None) -> str:
    if not c or c.get("mean") is None:
        return "-"
    return f"{c['mean']:.3f} ({c['sd']:.3f})"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m fedmtl.researcher.baselines", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for baselines.json (and the cohort, unless --data)")
    ap.add_argument("--sites", type=int, default=3, help="hospitals of the demo cohort (default 3)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    ap.add_argument("--data", type=Path, help="existing cohort folder (<site>/records.csv + schema.toml)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--epsilon", type=float, default=3.0, help="epsilon of the DP baselines (default 3)")
    ap.add_argument("--rounds", type=int, help="rounds of the recipe (default: the demo's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest for these small models)")
    ap.add_argument("--quick", action="store_true", help="2 rounds and one seed: a smoke run")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds must be whole numbers separated by commas, got {args.seeds!r}")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if args.quick:
        seeds = seeds[:1]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.data:
        dirs = sorted(p for p in args.data.iterdir() if (p / "records.csv").is_file())
        schema, sites = load_sites([(p.name, p / "records.csv", p / "schema.toml") for p in dirs])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            schema, sites = prepare_demo(Path(tmp), sites=args.sites, seed=0)
    kw = {"rounds": 2 if args.quick else args.rounds} if (args.quick or args.rounds) else {}
    spec = recipe_spec("baselines", [c.name for c in schema.labels], epsilon=args.epsilon, n_sites=len(sites), **kw)
    report = run_baselines(schema, sites, spec, seeds=seeds, methods=methods, log=lambda s: print(s, file=sys.stderr))
    report["command"] = " ".join(shlex.quote(a) for a in ["python", "-m", "fedmtl.researcher.baselines", *argv])
    report["data"] = str(args.data) if args.data else f"fedmtl.datasites.data.cohort.prepare(sites={args.sites}, seed=0)"
    path = args.out / "baselines.json"
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(report, indent=2, allow_nan=False), encoding="utf-8")
    tmp_path.replace(path)
    print(format_table(report))
    print(f"\nwrote {path} in {report['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
