"""The demo's job recipe: one :class:`~fedmtl.contract.jobspec.JobSpec` per privacy mode.

The recipe is the JobSpec defaults of each privacy mode (:data:`fedmtl.contract.jobspec.RECIPES`,
chosen by experiment, docs/models.md "Recipe"): DP-SGD wants a large learning rate (its
clipped, noised steps are short); training without DP wants momentum. Every row of the
demo's comparison with DP uses :data:`RECIPE_DP`, every row without DP :data:`RECIPE_NODP`:
the same for federated, centralised and local-only training (``fedmtl demo``,
``python -m fedmtl.researcher.baselines``, benchmarks/recipe_sweep.py). Spelt out here so
the reports record it.
"""

from __future__ import annotations

from typing import Any

from fedmtl.contract.jobspec import RECIPES, JobSpec

#: federated rounds of the demo's jobs
ROUNDS = 5
RECIPE_DP: dict[str, Any] = {**RECIPES["dp"], "sample_rate": 0.05}
RECIPE_NODP: dict[str, Any] = {**RECIPES["no_dp"], "sample_rate": 0.05}


def recipe_spec(name: str, tasks: list[str], *, rounds: int = ROUNDS, epsilon: float | None, seed: int = 0,
                n_sites: int = 3, **overrides: Any) -> JobSpec:
    """The demo's job spec.

    Args:
        name: the job's name.
        tasks: the label columns, one task each.
        rounds: federated rounds.
        epsilon: the target epsilon per site (training, the scaling statistics and the final
            evaluation release together) with :data:`RECIPE_DP`; ``None`` for
            :data:`RECIPE_NODP` without DP.
        seed: the job's seed.
        n_sites: the hospitals; the secure-aggregation threshold is a majority of them.
        **overrides: JobSpec fields that replace the recipe's.

    Returns:
        The job spec (not validated against any schema yet).
    """
    privacy = {"target_epsilon": float(epsilon)} if epsilon else {"dp": False}
    recipe = RECIPE_DP if epsilon else RECIPE_NODP
    return JobSpec(
        name=name,
        tasks=[{"label": t} for t in tasks],
        rounds=rounds,
        secagg={"threshold": n_sites // 2 + 1, "clip": 1.0},
        seed=seed,
        **{**recipe, **privacy, **overrides},
    )
