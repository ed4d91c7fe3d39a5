"""Recipe experiments on the demo cohort: the evidence behind the JobSpec defaults.

Each configuration is a set of JobSpec overrides on top of the demo's spec
(``fedmtl.researcher.demo.recipe_spec`` at ``--epsilon``, 3 hospitals) and is run once
per seed, with every run measured by the demo's evaluator (mean AUROC over the five tasks
on all hospitals' test splits, and per hospital):

- ``fed``: the federated job, simulated in process with the real round code and secure
  aggregation (``fedmtl.researcher.simulate``);
- ``pooled``: one party holding every hospital's training records, the same recipe and
  the same DP accounting (``fedmtl.researcher.baselines``, ``pooled_mtl_dp``);
- ``local``: each hospital alone without DP, the demo's non-private recipe
  (``local_mtl``), the per-hospital bar of the comparison;
- ``finetune``: the federated job, then each hospital fine-tunes the federated model on its
  own training split without DP (``fedmtl.researcher.personalise``; a model that stays at
  the hospital: ``ft_epochs``, ``ft_lr``, ``ft_momentum``, ``ft_patience`` in the configuration,
  default ``personalise.FINETUNE`` and ``PATIENCE``), measured on its own test split. The
  fine-tuning configurations of one sweep over the same job configuration fine-tune the same
  federated models (one simulated job per seed), so their differences are paired.

A configuration may also set ``nm`` (a fixed noise multiplier instead of the epsilon
target: ``nm = 0.01`` keeps the clipping and removes the noise, the ceiling of a recipe).
DP noise is drawn fresh on every run, so one seed moves by about +-0.005: compare means
over several seeds.

Run: ``python benchmarks/recipe_sweep.py --grid '[{}, {"lr": 0.3, "momentum": 0.9}]'
[--mode fed pooled local finetune] [--seeds 0 1 2]``; appends each configuration's summary to
``benchmarks/results/recipe_sweep.json`` (``--out`` to change) as it finishes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchkit import grid_arg, save_runs

RESULTS = Path(__file__).parent / "results" / "recipe_sweep.json"


def _spec(tasks, cfg: dict, *, epsilon: float | None, seed: int):
    from fedmtl.researcher import demo

    cfg = {k: v for k, v in cfg.items() if not k.startswith("ft_")}
    nm = cfg.pop("nm", None)
    rounds = cfg.pop("rounds", demo.ROUNDS)
    spec = demo.recipe_spec("sweep", tasks, epsilon=epsilon, seed=seed, rounds=rounds, **cfg)
    if nm is not None:
        spec = dataclasses.replace(spec, noise_multiplier=float(nm), target_epsilon=None)
    return spec


def run(grid: list[dict], *, modes: list[str], seeds: list[int], epsilon: float, out: Path) -> list[dict]:
    import pandas as pd
    import torch

    from fedmtl.models.preprocessing import Preprocessor
    from fedmtl.researcher.baselines import Evaluator, prepare_demo, run_baselines, summarise
    from fedmtl.researcher.personalise import finetune_sites
    from fedmtl.researcher.simulate import simulate

    torch.set_num_threads(1)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fedmtl-sweep-") as tmp:
        schema, sites = prepare_demo(Path(tmp) / "cohort", sites=3, seed=0)
    tasks = [c.name for c in schema.labels]
    data = {s.name: pd.concat([s.train, s.test], ignore_index=True) for s in sites}
    ev = Evaluator(sites, _spec(tasks, {}, epsilon=epsilon, seed=0).task_specs(schema))
    done = json.loads(out.read_text()).get("runs", []) if out.exists() else []
    # one federated job per job spec (configuration and seed), shared by every fine-tuning
    # configuration over it: fine-tuning settings are compared on the same federated models
    jobs: dict[str, object] = {}
    for cfg in grid:
        for mode in modes:
            t0 = time.perf_counter()
            if mode in ("fed", "finetune"):
                evals = []
                for seed in seeds:
                    spec = _spec(tasks, cfg, epsilon=epsilon, seed=seed)
                    key = spec.spec_hash()  # the spec leaves the ft_ settings out
                    res = jobs.get(key) if mode == "finetune" else None
                    if res is None:
                        res = simulate(spec, data, schema)
                        if mode == "finetune":
                            jobs[key] = res
                    pre = Preprocessor.from_dict(res.preprocessor)
                    if mode == "fed":
                        evals.append(ev.model(res.model(), pre))
                        continue
                    ft = {k[3:]: float(v) for k, v in cfg.items() if k.startswith("ft_")}
                    evals.append(ev.models(finetune_sites(res, sites, seed=seed, **ft), pre))
                summary = summarise(evals)
            else:
                method = "pooled_mtl_dp" if mode == "pooled" else "local_mtl"
                spec = _spec(tasks, cfg, epsilon=epsilon if mode == "pooled" else None, seed=seeds[0])
                rep = run_baselines(schema, sites, spec, seeds=seeds, methods=[method], evaluator=ev)
                entry = rep["results"][method]
                if "error" in entry:
                    raise RuntimeError(f"{cfg}: {entry['error']}")
                summary = entry["summary"]
            row = {
                "config": cfg, "mode": mode, "epsilon": None if mode == "local" else epsilon, "seeds": seeds,
                "noise_multiplier": spec.noise_for_site(len(sites[0].train)) if spec.dp else 0.0,
                "mean_auroc": round(summary["task_mean"]["mean"], 4),
                "sd": round(summary["task_mean"]["sd"], 4),
                "per_hospital": {k: round(v["mean"], 4) for k, v in summary["site_task_mean"].items()},
                "seconds": round(time.perf_counter() - t0, 1),
            }
            done.append(row)
            print(json.dumps(row), flush=True)
            save_runs(out, "recipe_sweep.py", sys.argv[1:], load_before, done)
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", required=True, type=grid_arg,
                    help="JSON list of JobSpec overrides (plus 'nm', 'rounds')")
    ap.add_argument("--mode", nargs="+", choices=["fed", "pooled", "local", "finetune"], default=["fed"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    run(a.grid, modes=a.mode, seeds=a.seeds, epsilon=a.epsilon, out=a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
