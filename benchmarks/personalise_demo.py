"""Personalisation on the demo cohort: what ``fedmtl datasite personalise`` tells each hospital.

One federated DP job with the demo's recipe at ``--epsilon`` (simulated in process with the
real round code, ``fedmtl.researcher.simulate``; ``recipe_sweep``'s spec), then
``fedmtl.researcher.personalise.compare_at_site`` at each of the 3 hospitals: the federated
model, that model fine-tuned there (early stopping on a validation split carved from the
training split), the better local-only model (logistic regression or the job's recipe, chosen
on that validation split), and every difference with a paired-bootstrap 95% interval on the
hospital's own test split.

Run: ``python benchmarks/personalise_demo.py [--seed 0] [--epsilon 3]``; prints the tables and
writes ``benchmarks/results/personalise_demo.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from benchkit import machine_info
from recipe_sweep import _spec

from fedmtl.researcher.baselines import prepare_demo
from fedmtl.researcher.personalise import compare_at_site, comparison_table
from fedmtl.researcher.simulate import simulate

RESULTS = Path(__file__).parent / "results" / "personalise_demo.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="the job's, the comparison's and the bootstrap's seed")
    ap.add_argument("--epsilon", type=float, default=3.0, help="the job's epsilon per site")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fedmtl-personalise-") as tmp:
        schema, sites = prepare_demo(Path(tmp) / "cohort", sites=3, seed=0)
    tasks = [c.name for c in schema.labels]
    data = {s.name: pd.concat([s.train, s.test], ignore_index=True) for s in sites}
    t0 = time.perf_counter()
    result = simulate(_spec(tasks, {}, epsilon=a.epsilon, seed=a.seed), data, schema)
    runs = {"federated_job_seconds": round(time.perf_counter() - t0, 1), "sites": {}}
    for s in sites:
        t = time.perf_counter()
        cmp, _ = compare_at_site(result, s, seed=a.seed)
        cmp["seconds"] = round(time.perf_counter() - t, 1)
        runs["sites"][s.name] = cmp
        print(f"== {s.name}: fine-tuning kept epoch {cmp['finetune']['best_epoch']}; local-only: "
              f"{cmp['local_only']['chosen']} {cmp['local_only']['validation']}")
        print(comparison_table(cmp), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"command": "python benchmarks/personalise_demo.py " + shlex.join(sys.argv[1:]),
                                 "machine": machine_info(load_before), "seed": a.seed, "epsilon": a.epsilon,
                                 **runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
