"""Baselines the federated results are judged against, without any server.

On the demo cohort (or any list of sites with the same schema), train and evaluate:

* ``pooled_mtl``      -- centralised: all hospitals' training records pooled, one
  multi-task model, non-private. (Pooling raw records is exactly what federation
  avoids; it is here only as the upper reference.)
* ``pooled_mtl_dp``   -- the same with DP-SGD at a target (epsilon, delta).
* ``pooled_single``   -- centralised, one single-task model per task, non-private.
* ``local_mtl``       -- each hospital alone: one multi-task model on its own training
  records, evaluated on its own test split.
* ``pooled_logreg``   -- scikit-learn logistic regression per task on the pooled
  features: a sanity reference for the networks.

Every model is trained with :func:`fedmtl.privacy.dp.train_local` (``dp=False`` for the
non-private ones), so the training loop is the one datasites will run. Preprocessing is
standard scaling from the *sum* of the sites' :meth:`Preprocessor.local_stats` over
their training splits (what secure aggregation would give), never from pooled records.

Per task, metrics (AUROC, AUPRC, n) are reported on each hospital's test split and on
all test splits together ("pooled": the sum of the sites' metric states). The JSON
records the seed, the command and the configuration.

Run: ``python -m fedmtl.researcher.baselines --out DIR [--sites 3] [--seed 0] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from fedmtl.models.metrics import TaskMetrics, sum_states
from fedmtl.models.nets import MultiTaskNet, build_model
from fedmtl.models.preprocessing import Preprocessor, labels_of, local_stats, sum_stats
from fedmtl.models.tasks import TaskSpec, tasks_from_schema
from fedmtl.schema import Schema

METHODS = ("pooled_mtl", "pooled_mtl_dp", "pooled_single", "local_mtl", "pooled_logreg")


@dataclass
class SiteData:
    """One hospital's records, split into train and test."""

    name: str
    train: pd.DataFrame
    test: pd.DataFrame


@dataclass
class BaselineConfig:
    """Training settings shared by every network baseline."""

    widths: tuple[int, ...] = (64, 32)
    dropout: float = 0.1
    epochs: float = 8.0
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    dp_epochs: float = 8.0
    dp_batch_size: int = 512
    dp_lr: float = 1.0
    dp_target_epsilon: float = 3.0
    dp_delta: float = 1e-5
    dp_max_grad_norm: float = 1.0
    n_bins: int = 1000
    methods: tuple[str, ...] = METHODS

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")


@dataclass
class _Prepared:
    tasks: list[TaskSpec]
    pre: Preprocessor
    train: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    test: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    timings: dict[str, float] = field(default_factory=dict)


def load_sites(paths: Sequence[tuple[str, Path, Path]]) -> tuple[Schema, list[SiteData]]:
    """Load ``(name, records, schema)`` triples and split by the schema's split column."""
    from fedmtl.datasites.records import load_records

    schema: Schema | None = None
    sites = []
    for name, rec, sch in paths:
        s = Schema.load(sch)
        if schema is not None and [c for c in s.columns] != [c for c in schema.columns]:
            raise ValueError(f"site {name!r} has a different schema from the first site; baselines need one schema")
        schema = schema or s
        df = load_records(rec, s)
        split = s.split_column
        if split is None:
            raise ValueError(f"site {name!r}: the schema has no split column; baselines need train/test splits")
        sites.append(SiteData(name, df[df[split] == "train"].reset_index(drop=True), df[df[split] == "test"].reset_index(drop=True)))
    if schema is None:
        raise ValueError("no sites given")
    return schema, sites


def prepare_demo(out_dir: Path, *, sites: int = 3, seed: int = 0) -> tuple[Schema, list[SiteData]]:
    """Write the demo cohort under ``out_dir`` and load it."""
    from fedmtl.datasites.cohort import prepare

    files = prepare(out_dir, sites=sites, seed=seed)
    return load_sites([(f.name, f.records, f.schema) for f in files])


def _prepare(schema: Schema, sites: Sequence[SiteData], tasks: Sequence[TaskSpec] | None) -> _Prepared:
    tasks = list(tasks) if tasks is not None else tasks_from_schema(schema)
    pre = Preprocessor.from_stats(schema, sum_stats([local_stats(schema, s.train) for s in sites]))

    def tensors(df: pd.DataFrame):
        X = pre.transform(df)
        Y, M = labels_of(df, tasks)
        return X, Y, M

    return _Prepared(
        tasks=tasks,
        pre=pre,
        train={s.name: tensors(s.train) for s in sites},
        test={s.name: tensors(s.test) for s in sites},
    )


def _cat(parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    return tuple(torch.cat([p[i] for p in parts]) for i in range(3))


def _fit(
    X: torch.Tensor,
    Y: torch.Tensor,
    M: torch.Tensor,
    tasks: Sequence[TaskSpec],
    cfg: BaselineConfig,
    *,
    seed: int,
    dp: bool,
) -> tuple[MultiTaskNet, dict[str, Any]]:
    from fedmtl.privacy.dp import train_local

    model = build_model(n_features=X.shape[1], tasks=tasks, widths=list(cfg.widths), dropout=cfg.dropout, seed=seed)
    n = X.shape[0]
    if dp:
        q = min(1.0, cfg.dp_batch_size / n)
        res = train_local(
            model=model, X=X, Y=Y, mask=M, tasks=tasks, epochs=cfg.dp_epochs, sample_rate=q, lr=cfg.dp_lr,
            target=(cfg.dp_target_epsilon, cfg.dp_delta), max_grad_norm=cfg.dp_max_grad_norm, seed=seed,
        )
    else:
        q = min(1.0, cfg.batch_size / n)
        res = train_local(
            model=model, X=X, Y=Y, mask=M, tasks=tasks, epochs=cfg.epochs, sample_rate=q, lr=cfg.lr,
            momentum=cfg.momentum, dp=False, seed=seed,
        )
    info = {
        "steps": res.steps,
        "sample_rate": res.sample_rate,
        "n_train": n,
        "noise_multiplier": res.noise_multiplier,
        "epsilon": res.epsilon if dp else None,
        "delta": res.delta if dp else None,
    }
    return model, info


def _evaluate(
    predict: Callable[[str], dict[str, np.ndarray]],
    prep: _Prepared,
    site_names: Sequence[str],
    n_bins: int,
    tasks: Sequence[TaskSpec] | None = None,
) -> dict[str, Any]:
    """Metrics per site test split, and pooled over all test splits (sum of states)."""
    tasks = list(tasks) if tasks is not None else prep.tasks
    idx = [prep.tasks.index(t) for t in tasks]
    states, per_site = [], {}
    for name in site_names:
        X, Y, M = prep.test[name]
        tm = TaskMetrics(tasks, n_bins=n_bins).update(predict(name), Y[:, idx], M[:, idx])
        st = tm.state()
        states.append(st)
        per_site[name] = _slim(tm.compute(st))
    pooled = _slim(TaskMetrics(tasks, n_bins=n_bins).compute(sum_states(states)))
    return {"per_site": per_site, "pooled": pooled}


def _slim(res: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    keep = ("auroc", "auprc", "mae", "rmse", "n")
    return {
        t: {k: (None if not np.isfinite(v) else round(float(v), 4)) for k, v in m.items() if k in keep}
        for t, m in res.items()
    }


def run_baselines(
    schema: Schema,
    sites: Sequence[SiteData],
    *,
    cfg: BaselineConfig | None = None,
    seed: int = 0,
    tasks: Sequence[TaskSpec] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Train and evaluate every method in ``cfg.methods``; returns the JSON-able report."""
    cfg = cfg or BaselineConfig()
    t0 = time.perf_counter()
    prep = _prepare(schema, sites, tasks)
    names = [s.name for s in sites]
    pooled_train = _cat([prep.train[n] for n in names])
    results: dict[str, Any] = {}
    for method in cfg.methods:
        t = time.perf_counter()
        try:
            entry = _run_method(method, prep, names, pooled_train, cfg, seed)
        except (ValueError, RuntimeError) as e:  # e.g. a diverged model's NaN scores
            entry = {"error": f"{type(e).__name__}: {e}"}
        entry["seconds"] = round(time.perf_counter() - t, 2)
        results[method] = entry
        log(f"{method}: " + (f"FAILED ({entry['error']})" if "error" in entry else f"done in {entry['seconds']:.1f}s"))
    return {
        "seed": seed,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "tasks": [t.to_dict() for t in prep.tasks],
        "features": prep.pre.feature_names,
        "sites": {s.name: {"n_train": len(s.train), "n_test": len(s.test)} for s in sites},
        "results": results,
        "seconds": round(time.perf_counter() - t0, 2),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _run_method(
    method: str, prep: _Prepared, names: Sequence[str], pooled_train, cfg: BaselineConfig, seed: int
) -> dict[str, Any]:
    def model_predictor(model: MultiTaskNet):
        return lambda name: model.predict(prep.test[name][0])

    if method in ("pooled_mtl", "pooled_mtl_dp"):
        model, info = _fit(*pooled_train, prep.tasks, cfg, seed=seed, dp=method.endswith("_dp"))
        return {"training": info, **_evaluate(model_predictor(model), prep, names, cfg.n_bins)}
    if method == "pooled_single":
        per_task, infos = {}, {}
        X, Y, M = pooled_train
        for j, t in enumerate(prep.tasks):
            if not bool(M[:, j].any()):
                continue
            model, infos[t.name] = _fit(X, Y[:, [j]], M[:, [j]], [t], cfg, seed=seed, dp=False)
            per_task[t.name] = _evaluate(model_predictor(model), prep, names, cfg.n_bins, tasks=[t])
        return {"training": infos, **_merge_tasks(per_task, names)}
    if method == "local_mtl":
        models, infos = {}, {}
        for n in names:
            models[n], infos[n] = _fit(*prep.train[n], prep.tasks, cfg, seed=seed, dp=False)
        return {
            "training": infos,
            **_evaluate(lambda name: models[name].predict(prep.test[name][0]), prep, names, cfg.n_bins),
        }
    return _logreg(prep, names, pooled_train, cfg, seed)


def _merge_tasks(per_task: dict[str, dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"per_site": {n: {} for n in names}, "pooled": {}}
    for t, ev in per_task.items():
        for n in names:
            out["per_site"][n].update(ev["per_site"][n])
        out["pooled"].update(ev["pooled"])
    return out


def _logreg(prep: _Prepared, names: Sequence[str], pooled_train, cfg: BaselineConfig, seed: int) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    X, Y, M = (a.numpy() for a in pooled_train)
    models = {}
    for j, t in enumerate(prep.tasks):
        if t.kind != "binary" or M[:, j].sum() < 2 or len(set(Y[M[:, j], j])) < 2:
            continue
        models[t.name] = LogisticRegression(max_iter=500, random_state=seed).fit(X[M[:, j]], Y[M[:, j], j])
    tasks = [t for t in prep.tasks if t.name in models]

    def predict(name: str) -> dict[str, np.ndarray]:
        Xt = prep.test[name][0].numpy()
        return {t.name: models[t.name].predict_proba(Xt)[:, 1] for t in tasks}

    return {"training": {"model": "sklearn LogisticRegression(max_iter=500)"}, **_evaluate(predict, prep, names, cfg.n_bins, tasks=tasks)}


def format_table(report: dict[str, Any], metric: str = "auroc") -> str:
    """Per-task ``metric`` of each method, pooled test and per site, as plain text."""
    tasks = [t["name"] for t in report["tasks"]]
    sites = list(report["sites"])
    cols = ["pooled"] + sites
    lines = [f"{metric.upper()} on test splits (pooled = all hospitals' test records)"]
    for method, r in report["results"].items():
        if "error" in r:
            lines.append(f"\n{method}: {r['error']}")
            continue
        lines.append(f"\n{method}" + (f"  (epsilon={r['training']['epsilon']:.2f})" if method.endswith("_dp") else ""))
        lines.append("  " + "task".ljust(18) + "".join(c[:11].rjust(12) for c in cols))
        for t in tasks:
            vals = [r["pooled"].get(t, {}).get(metric)] + [r["per_site"][s].get(t, {}).get(metric) for s in sites]
            lines.append("  " + t.ljust(18) + "".join(("-" if v is None else f"{v:.3f}").rjust(12) for v in vals))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m fedmtl.researcher.baselines", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for baselines.json (and the cohort, unless --data)")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, help="existing cohort folder (<site>/records.csv + schema.toml)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--epochs", type=float, help="override the non-private and DP epochs")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest for these small models)")
    ap.add_argument("--quick", action="store_true", help="2 epochs each: a smoke run")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = BaselineConfig(methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()))
    if args.quick:
        cfg.epochs = cfg.dp_epochs = 2.0
    if args.epochs:
        cfg.epochs = cfg.dp_epochs = args.epochs
    args.out.mkdir(parents=True, exist_ok=True)
    if args.data:
        dirs = sorted(p for p in args.data.iterdir() if (p / "records.csv").is_file())
        schema, sites = load_sites([(p.name, p / "records.csv", p / "schema.toml") for p in dirs])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            schema, sites = prepare_demo(Path(tmp), sites=args.sites, seed=args.seed)
    report = run_baselines(schema, sites, cfg=cfg, seed=args.seed, log=lambda s: print(s, file=sys.stderr))
    report["command"] = " ".join(shlex.quote(a) for a in ["python", "-m", "fedmtl.researcher.baselines", *argv])
    report["data"] = str(args.data) if args.data else f"fedmtl.datasites.cohort.prepare(sites={args.sites}, seed={args.seed})"
    path = args.out / "baselines.json"
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(report, indent=2, allow_nan=False), encoding="utf-8")
    tmp_path.replace(path)
    print(format_table(report))
    print(f"\nwrote {path} in {report['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
