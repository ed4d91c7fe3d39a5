"""Models built and trained from several threads at once (the in-process transport runs
each site in its own thread; a datasite may run two jobs at once): every seeded model gets
exactly its seed's initial weights, and nothing deadlocks on torch's global generator."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from fedmtl.models import build_model
from fedmtl.models.tasks import TaskSpec
from fedmtl.privacy.dp import train_local

TASKS = [TaskSpec("y", "binary", "y")]


def _weights(seed: int) -> torch.Tensor:
    net = build_model(n_features=6, tasks=TASKS, trunk="mlp", seed=seed, widths=[16], dropout=0.1)
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def _train(seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 6, generator=g)
    Y = (X[:, :1] > 0).float()
    net = build_model(n_features=6, tasks=TASKS, trunk="mlp", seed=seed, widths=[16], dropout=0.1)
    res = train_local(model=net, X=X, Y=Y, mask=torch.ones_like(Y, dtype=torch.bool), tasks=TASKS, steps=3,
                      seed=seed, lr=0.1, sample_rate=0.5, dp=False)
    return float(res.steps)


def test_seeded_models_are_the_same_built_from_many_threads() -> None:
    expected = {s: _weights(s) for s in range(4)}
    jobs = [s % 4 for s in range(64)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        built = list(pool.map(_weights, jobs))
    for s, w in zip(jobs, built):
        assert torch.equal(w, expected[s]), f"a model of seed {s} built beside other builds got other weights"


def test_building_and_training_at_once_never_deadlocks() -> None:
    # before RNG_LOCK, torch's manual_seed (waiting for the generator, holding the GIL)
    # against get_rng_state (holding the generator, waiting for the GIL) hung a simulation
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(_train, s) for s in range(24)] + [pool.submit(_weights, s) for s in range(48)]
        for f in futures:
            f.result(timeout=120)
