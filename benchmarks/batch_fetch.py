"""A site's local training with its batches fetched a record at a time (before) or a batch
at a time (now: ``fedmtl.privacy.dp._Rows``), side by side.

Torch's loader used to call ``TensorDataset.__getitem__`` for every record of a Poisson
batch and stack the records; ``_Rows.__getitems__`` indexes each tensor once per batch.
The batches, their order and the trained weights are the same (checked here: the two
ways must give identical weights from the same seed). Each configuration trains the
demo's model (MLP 64-32, five binary heads, 24 features) with
:func:`fedmtl.privacy.dp.train_local`, with DP (ghost clipping) and without, on 4,000
records at sample rate 0.05, alternating before/after ``--pairs`` times; the ratio is the
median wall time before over after.

Run: ``python benchmarks/batch_fetch.py [--pairs 5] [--steps 200]``; writes
``benchmarks/results/batch_fetch.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from benchkit import machine_info
from torch.utils.data import TensorDataset, default_collate

RESULTS = Path(__file__).parent / "results" / "batch_fetch.json"


def _train(dp_mod, X, Y, M, tasks, *, dp: bool, steps: int) -> tuple[float, torch.Tensor]:
    from fedmtl.models import build_model, model_to_vector

    net = build_model(n_features=X.shape[1], tasks=tasks, trunk="mlp", seed=1, widths=[64, 32])
    kw = {"noise_multiplier": 1.0, "max_grad_norm": 1.0} if dp else {}
    t = time.perf_counter()
    dp_mod.train_local(model=net, X=X, Y=Y, mask=M, tasks=tasks, steps=steps, seed=3, lr=0.5, sample_rate=0.05,
                       dp=dp, **kw)
    return time.perf_counter() - t, torch.from_numpy(model_to_vector(net))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)

    from fedmtl.models.tasks import TaskSpec
    from fedmtl.privacy import dp as dp_mod

    torch.set_num_threads(1)
    load_before = os.getloadavg()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4000, 24, generator=g)
    Y = (X[:, :5] + torch.randn(4000, 5, generator=g) > 0).float()
    M = torch.rand(4000, 5, generator=g) > 0.3
    tasks = [TaskSpec(f"t{k}", "binary", f"t{k}") for k in range(5)]
    now = (dp_mod._Rows, dp_mod._stacked)
    before = (TensorDataset, default_collate)
    rows = {}
    for dp in (False, True):
        times: dict[str, list[float]] = {"before": [], "after": []}
        weights = {}
        for _ in range(a.pairs):
            for name, (ds, collate) in (("before", before), ("after", now)):
                dp_mod._Rows, dp_mod._stacked = ds, collate
                try:
                    sec, w = _train(dp_mod, X, Y, M, tasks, dp=dp, steps=a.steps)
                finally:
                    dp_mod._Rows, dp_mod._stacked = now
                times[name].append(sec)
                weights[name] = w
        same = bool(torch.equal(weights["before"], weights["after"]))
        b, n = statistics.median(times["before"]), statistics.median(times["after"])
        rows["dp" if dp else "nonprivate"] = {"before_s": round(b, 3), "after_s": round(n, 3),
                                              "speedup": round(b / n, 2), "same_weights": same}
        print(f"{'DP' if dp else 'non-private'}: {a.steps} steps {b:.2f}s before, {n:.2f}s after: "
              f"{b / n:.2f}x; same weights: {same}", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"command": f"python benchmarks/batch_fetch.py --pairs {a.pairs} --steps {a.steps}",
                                 "machine": machine_info(load_before), "results": rows}, indent=1) + "\n")
    return 0 if all(r["same_weights"] for r in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
