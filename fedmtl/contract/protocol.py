"""The round protocol both sides compute identically: the researcher's orchestrator and the
datasite runtime. Pure (no syft).

A job of ``R`` rounds runs ``R + 1`` *passes* through secure aggregation, ``R + 2`` with
``scaling = "standard"`` (:meth:`fedmtl.contract.jobspec.JobSpec.n_passes`). Pass ``p`` (1-based)
carries, as one masked vector per site:

- ``stats`` (pass 1 of a standard-scaling job, the *statistics pass*, which trains and
  evaluates nothing): count, sum and sum of squares of every numeric feature of the
  site's training split, noised (:mod:`fedmtl.privacy.stats_release`). The researcher
  derives the global mean/std from the sum (:func:`derive_scaling`), keeps them in the
  job state and sends them as ``scaling`` in the ``advertise`` message of every later
  pass; each site checks them (:func:`scaling_preprocessor`) and scales with them;
- ``update`` (training passes): the site's clipped model update, multiplied per group
  (trunk, each task head) by the site's labelled count for that group;
- ``counts`` (training passes): those counts, one per group, so the sum gives the
  weighted average per head;
- ``metrics`` (if the evaluation schedule says so): the sufficient statistics of every
  task's metrics for the *incoming* global model on the site's test split. The last pass
  evaluates the final model and trains nothing.

The site-specific job spec (the syft ``Constant`` the reviewer approves) is a dict::

    {"job": JobSpec.to_dict(), "job_id": str, "site": str,
     "roster": {site: ed25519 hex}, "schema": Schema.to_dict(), "max_count": int}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from fedmtl.errors import ConfigError
from fedmtl.schema import Schema

#: score-histogram bins of the released evaluation statistics: few, because each bin
#: carries Gaussian noise (see fedmtl.privacy.eval_release and docs/compliance.md)
N_BINS = 20


@dataclass(frozen=True)
class PassPlan:
    pass_no: int
    train: bool
    evaluate: bool
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    #: the statistics pass of standard scaling (releases ``stats`` only)
    stats: bool = False


def job_of(site_spec: Mapping[str, Any]):
    from fedmtl.contract.jobspec import JobSpec

    return JobSpec.from_dict(site_spec["job"])


def schema_of(site_spec: Mapping[str, Any]) -> Schema:
    return Schema.from_dict(site_spec["schema"], source="the job's schema")


def tasks_of(site_spec: Mapping[str, Any]):
    return job_of(site_spec).task_specs(schema_of(site_spec))


def build_model(site_spec: Mapping[str, Any]):
    """The job's model (identical initial weights at every party) and the range-scaling
    preprocessor of the schema (its width is the model's input width under either
    scaling; a standard-scaling job scales with :func:`scaling_preprocessor`)."""
    from fedmtl.models.preprocessing import Preprocessor

    job = job_of(site_spec)
    schema = schema_of(site_spec)
    pre = Preprocessor(schema)
    return job.build_model(schema, n_features=pre.n_features), pre


def groups_of(model) -> dict[str, list[slice]]:
    from fedmtl.models import task_slices

    return task_slices(model)


def task_metrics(tasks):
    """A fresh :class:`~fedmtl.models.metrics.TaskMetrics` for the job's tasks."""
    from fedmtl.privacy.eval_release import eval_metrics

    return eval_metrics(tasks, n_bins=N_BINS)


def update_metrics(tm, pred, Y, M, tasks) -> None:
    """Add one test split's predictions to ``tm`` (bounded per-record contributions, so the
    release in :mod:`fedmtl.privacy.eval_release` has the sensitivity it assumes)."""
    tm.update(pred, Y, M)


def metric_size(tasks) -> int:
    return int(sum(int(np.prod(s)) for s in task_metrics(tasks).state_shapes().values()))


def metric_vector(tm) -> np.ndarray:
    from fedmtl.models.metrics import flatten_state

    return flatten_state(tm.state()).astype(np.float64)


def compute_metrics(vec: np.ndarray, tasks) -> dict[str, dict[str, float]]:
    """Metric values per task from a (summed, de-quantised) flat metric vector."""
    from fedmtl.models.metrics import unflatten_state

    tm = task_metrics(tasks)
    state = unflatten_state(np.asarray(vec, dtype=np.float64), tm.state_shapes())
    # counts are rounded; every entry is a sum of non-negative terms, so DP noise that
    # pushed one below 0 is clamped there (post-processing: no privacy cost; exact
    # vectors are unchanged). A total at 0 gives NaN for that metric, never a crash.
    state = {k: np.maximum(np.rint(v), 0) if _is_count(k) else np.maximum(v, 0) for k, v in state.items()}
    out = {}
    for task, vals in tm.compute(state).items():
        out[task] = {k: float(v) for k, v in vals.items()}
    return out


def _is_count(key: str) -> bool:
    # histogram bins and totals are integer counts; sums (brier, errors) are not
    return any(w in key.rsplit("/", 1)[-1] for w in ("pos", "neg", "total", "correct", "count"))


def evaluates(job, pass_no: int) -> bool:
    """Whether pass ``pass_no`` releases (noised, charged) evaluation statistics."""
    return job.evaluates(pass_no)


def eval_pass_count(job) -> int:
    return len(job.eval_passes())


def last_pass(job) -> int:
    """The job's last pass (its final evaluation): :meth:`JobSpec.n_passes`."""
    return job.n_passes()


def derive_scaling(site_spec: Mapping[str, Any], summed_stats: np.ndarray, *, n_sites: int) -> dict[str, dict[str, float]]:
    """The researcher's global mean/std per numeric feature from the statistics pass's
    aggregate (``n_sites`` sites contributed): post-processing of the noised sums."""
    from fedmtl.privacy.stats_release import derive_scaling as derive

    job = job_of(site_spec)
    return derive(summed_stats, schema_of(site_spec), noise_multiplier=float(job.stats_noise_multiplier),
                  n_sites=int(n_sites))


def scaling_preprocessor(site_spec: Mapping[str, Any], scaling: Any):
    """The site's preprocessor for a pass: range scaling (``scaling`` must be ``None``),
    or standard scaling from the researcher's ``scaling`` after
    :func:`fedmtl.privacy.stats_release.check_scaling`. Raises :class:`ConfigError` with
    what is wrong."""
    from fedmtl.models.preprocessing import Preprocessor

    job = job_of(site_spec)
    schema = schema_of(site_spec)
    if job.scaling != "standard":
        if scaling is not None:
            raise ConfigError(f"this job scales by the declared ranges (scaling = {job.scaling!r}); "
                              "a pass message may not carry 'scaling'")
        return Preprocessor(schema)
    if scaling is None:
        raise ConfigError("this job uses standard scaling: every pass after the statistics pass must carry "
                          "'scaling' (the mean/std the researcher derived from pass 1)")
    from fedmtl.privacy.stats_release import preprocessor

    try:
        return preprocessor(schema, scaling)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def job_records(job, n_train: int):
    """Every privacy record the job costs a site with ``n_train`` training records, in the
    order the runtime charges them (pass by pass: training round, then evaluation)."""
    return job.job_records(n_train)


def plan(site_spec: Mapping[str, Any], pass_no: int, *, model=None) -> PassPlan:
    job = job_of(site_spec)
    last = last_pass(job)
    if not 1 <= pass_no <= last:
        raise ConfigError(f"pass {pass_no} is outside this job's 1..{last}")
    if job.is_stats_pass(pass_no):
        from fedmtl.privacy.stats_release import size

        return PassPlan(pass_no, False, False, ("stats",), ((size(schema_of(site_spec)),),), stats=True)
    if model is None:
        model, _ = build_model(site_spec)
    tasks = job.task_specs(schema_of(site_spec))
    names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    train = job.training_round(pass_no) is not None
    if train:
        from fedmtl.models import vector_size

        names += ["update", "counts"]
        shapes += [(vector_size(model),), (len(groups_of(model)),)]
    ev = evaluates(job, pass_no)
    if ev:
        names.append("metrics")
        shapes.append((metric_size(tasks),))
    return PassPlan(pass_no, train, ev, tuple(names), tuple(shapes))


def threshold_of(site_spec: Mapping[str, Any]) -> int:
    """The secure-aggregation threshold of a site spec: the job's ``secagg.threshold``, or
    (left out) ``floor(n/2) + 1`` of the ``n`` sites of its roster. Every party derives
    the same value, and the parameters' digest binds it.

    Args:
        site_spec: the site-specific job spec (see the module docs).

    Returns:
        the threshold t.

    Raises:
        ConfigError: the roster is empty or not a table.
    """
    roster = site_spec.get("roster")
    if not isinstance(roster, Mapping) or not roster:
        raise ConfigError("the job spec's roster must be a non-empty table of site -> identity key")
    return job_of(site_spec).threshold_for(len(roster))


def secagg_params(site_spec: Mapping[str, Any], pass_no: int, attempt: int, pass_plan: PassPlan):
    """The secure-aggregation parameters of one pass and attempt of the job.

    Args:
        site_spec: the site-specific job spec.
        pass_no: the pass (the round of the parameters).
        attempt: the researcher's attempt at this pass (part of the job id the digest binds).
        pass_plan: :func:`plan` of the pass (the shapes).

    Returns:
        :class:`~fedmtl.privacy.secagg.SecAggParams`.

    Raises:
        ConfigError: the threshold is not more than half of the roster (a server lying
            about dropouts could unmask one site; the datasites' review denies such a job,
            and no party runs one).
    """
    from fedmtl.privacy.keys import VerifyKey
    from fedmtl.privacy.quantization import QuantizationConfig, weighted_bound
    from fedmtl.privacy.secagg import SecAggParams

    job = job_of(site_spec)
    roster = {s: VerifyKey.from_bytes(bytes.fromhex(h)) for s, h in site_spec["roster"].items()}
    sa = job.secagg
    threshold = threshold_of(site_spec)
    if 2 * threshold <= len(roster):
        raise ConfigError(
            f"secure-aggregation threshold {threshold} is not more than half of the {len(roster)} sites of the "
            f"roster: a server that lies about dropouts could unmask one site's update; refused (use at least "
            f"{len(roster) // 2 + 1})"
        )
    max_count = int(site_spec["max_count"])
    bound = max(weighted_bound(clip=float(sa.clip), max_count=max_count), float(max_count))
    if pass_plan.stats:
        # unit-form statistics are at most max_count per entry, plus the noise (6 sd of
        # headroom; a value beyond is clipped, which is post-processing)
        from fedmtl.privacy.stats_release import noise_std

        bound = float(max_count) + 6.0 * noise_std(schema_of(site_spec), float(job.stats_noise_multiplier))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the t <= n/2 warning is reported at validation time
        return SecAggParams(
            job_id=f"{site_spec['job_id']}/attempt-{attempt}",
            round=pass_no,
            roster=roster,
            threshold=threshold,
            shapes=pass_plan.shapes,
            quantization=QuantizationConfig(
                bound=bound, num_sites=len(roster), frac_bits=int(sa.frac_bits)
            ),
        )
