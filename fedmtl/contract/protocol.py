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
  task's metrics for the *incoming* global model on the site's test split (a binary
  task: its logit histograms, and those of the training split for the researcher's Platt
  recalibration, :func:`fit_calibration`). The last pass evaluates the final model and
  trains nothing; the researcher folds the recalibration into the final model's heads.

Every function that needs the job, its schema or its roster takes the
:class:`~fedmtl.contract.site_spec.SiteSpec` (the syft ``Constant`` the reviewer approves,
parsed once at the edge with :meth:`SiteSpec.parse <fedmtl.contract.site_spec.SiteSpec.parse>`);
the bound mapping itself is still accepted and parsed (:meth:`SiteSpec.coerce`) until every
caller parses at its edge. Which pass trains, evaluates or releases statistics is the job's
:class:`~fedmtl.contract.schedule.PassSchedule`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from fedmtl.contract.jobspec import JobSpec
from fedmtl.contract.site_spec import SiteSpec
from fedmtl.errors import ConfigError
from fedmtl.schema import Schema

#: a parsed site spec, or (until every caller parses at its edge) the bound mapping
SiteSpecLike = SiteSpec | Mapping[str, Any]

#: score-histogram bins of a multiclass task's released evaluation statistics: few,
#: because each bin carries Gaussian noise (see fedmtl.privacy.eval_release and
#: docs/compliance.md); a binary task's are fedmtl.models.binned.RELEASE_BINS logit bins
N_BINS = 20


@dataclass(frozen=True)
class PassPlan:
    """What one pass asks of a site and returns (:func:`plan`).

    Attributes:
        pass_no: the pass (1-based).
        train: whether it runs a training round.
        evaluate: whether it releases evaluation statistics.
        names: the arrays of its masked vector, in order (``stats``; ``update``,
            ``counts``; ``metrics``).
        shapes: their shapes.
        stats: whether it is the statistics pass of standard scaling.
    """

    pass_no: int
    train: bool
    evaluate: bool
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    #: the statistics pass of standard scaling (releases ``stats`` only)
    stats: bool = False


def job_of(site_spec: SiteSpecLike) -> JobSpec:
    """The job spec of a site spec.

    Args:
        site_spec: the site spec.

    Returns:
        Its :class:`~fedmtl.contract.jobspec.JobSpec`.

    Raises:
        ConfigError: a mapping that does not parse.
    """
    return SiteSpec.coerce(site_spec).job


def schema_of(site_spec: SiteSpecLike) -> Schema:
    """The schema a site spec carries.

    Args:
        site_spec: the site spec.

    Returns:
        Its :class:`~fedmtl.schema.Schema`.

    Raises:
        ConfigError: a mapping that does not parse.
    """
    return SiteSpec.coerce(site_spec).schema


def tasks_of(site_spec: SiteSpecLike):
    """The job's tasks resolved against the spec's schema.

    Args:
        site_spec: the site spec.

    Returns:
        The :class:`~fedmtl.models.tasks.TaskSpec` list of the job.

    Raises:
        ConfigError: a mapping that does not parse, or tasks the schema does not hold.
    """
    spec = SiteSpec.coerce(site_spec)
    return spec.job.task_specs(spec.schema)


def build_model(site_spec: SiteSpecLike):
    """The job's model (identical initial weights at every party) and the range-scaling
    preprocessor of the schema (its width is the model's input width under either
    scaling; a standard-scaling job scales with :func:`scaling_preprocessor`).

    Args:
        site_spec: the site spec.

    Returns:
        ``(model, preprocessor)``.

    Raises:
        ConfigError: a mapping that does not parse.
    """
    from fedmtl.models.preprocessing import Preprocessor

    spec = SiteSpec.coerce(site_spec)
    job, schema = spec.job, spec.schema
    pre = Preprocessor(schema)
    return job.build_model(schema, n_features=pre.n_features), pre


def groups_of(model) -> dict[str, list[slice]]:
    from fedmtl.models import task_slices

    return task_slices(model)


def calibrates(site_spec: SiteSpecLike) -> bool:
    """Whether the job's evaluation statistics hold each binary task's calibration
    histograms of the training split: exactly when the schema has a split column (the
    calibration split must not share a record with the test split)."""
    spec = SiteSpec.coerce(site_spec)
    return spec.schema.split_column is not None


def task_metrics(tasks, *, calibration: bool = False):
    """A fresh :class:`~fedmtl.privacy.eval_release.ReleaseStatistics` for the job's tasks
    (``calibration``: :func:`calibrates`)."""
    from fedmtl.privacy.eval_release import ReleaseStatistics

    return ReleaseStatistics(tasks, n_bins=N_BINS, calibration=calibration)


def update_metrics(tm, pred, Y, M, tasks) -> None:
    """Add one test split's predictions to ``tm`` (bounded per-record contributions, so the
    release in :mod:`fedmtl.privacy.eval_release` has the sensitivity it assumes)."""
    tm.update(pred, Y, M)


def metric_size(tasks, *, calibration: bool = False) -> int:
    return int(sum(int(np.prod(s)) for s in task_metrics(tasks, calibration=calibration).state_shapes().values()))


def metric_vector(tm) -> np.ndarray:
    return tm.vector()


def eval_noise_sd(job: JobSpec, tasks, *, n_sites: int) -> float:
    """The standard deviation of the noise on each count of a sum of ``n_sites`` sites'
    evaluation releases (public: the job's ``eval_noise_multiplier`` times the release's
    sensitivity, each site adding its own noise)."""
    from fedmtl.privacy.eval_release import sensitivity

    return float(job.eval_noise_multiplier) * sensitivity(tasks) * float(np.sqrt(max(int(n_sites), 1)))


def fit_calibration(vec: np.ndarray, tasks, *, calibration: bool, noise_sd: float = 0.0) -> dict[str, tuple[float, float]]:
    """Each binary task's Platt recalibration ``(a, b)`` (:func:`fedmtl.models.binned.fit_platt`)
    from the calibration histograms of a (summed) metric vector; ``{}`` without them. Bins
    whose count is below twice the noise (``noise_sd`` per count, :func:`eval_noise_sd`) are
    left out: noise alone would pull the fit. Post-processing of the noised release: it
    costs nothing more."""
    from fedmtl.models.binned import fit_platt
    from fedmtl.models.metrics import unflatten_state

    if not calibration:
        return {}
    tm = task_metrics(tasks, calibration=True)
    st = unflatten_state(np.asarray(vec, dtype=np.float64), tm.state_shapes())
    return {t.name: fit_platt(st[f"{t.name}/fit/pos"], st[f"{t.name}/fit/neg"], min_count=2.0 * float(noise_sd))
            for t in tm.binary}


def compute_metrics(vec: np.ndarray, tasks, *, calibration: bool = False, noise_sd: float = 0.0,
                    platt: Mapping[str, tuple[float, float]] | None = None) -> dict[str, dict[str, float]]:
    """Metric values per task from a (summed, de-quantised) flat metric vector.

    A binary task's metrics (:func:`fedmtl.models.binned.binary_metrics`: ``auroc``,
    ``auprc``, ``accuracy``, ``brier``, ``mean_predicted``, ``observed_rate``, ``ece``,
    ``n``) are read under its Platt recalibration in ``platt`` (if any), each with its 95%
    interval ``<metric>_lo`` / ``<metric>_hi`` for noise of standard deviation ``noise_sd``
    per count (:func:`eval_noise_sd`), and ``wide`` = 1.0 where the AUROC interval is wider
    than +-0.05 (0.0 otherwise).

    Args:
        vec: the metric vector.
        tasks: the job's tasks.
        calibration: whether the vector holds calibration histograms (:func:`calibrates`).
        noise_sd: the noise on each count (0: exact statistics).
        platt: ``{task: (a, b)}`` (:func:`fit_calibration`).

    Returns:
        ``{task: {metric: value}}``.
    """
    from fedmtl.models.binned import binary_intervals, binary_metrics, support, warn_wide
    from fedmtl.models.metrics import unflatten_state

    tm = task_metrics(tasks, calibration=calibration)
    state = unflatten_state(np.asarray(vec, dtype=np.float64), tm.state_shapes())
    out: dict[str, dict[str, float]] = {}
    platt = dict(platt or {})
    for t in tm.binary:
        pos, neg = state[f"{t.name}/test/pos"], state[f"{t.name}/test/neg"]
        ab = tuple(platt.get(t.name, (1.0, 0.0)))
        # the ranking metrics count only the bins where the calibration split has records
        sup = (support(pos, neg, state[f"{t.name}/fit/pos"], state[f"{t.name}/fit/neg"], noise_sd=float(noise_sd))
               if calibration else None)
        vals = binary_metrics(pos, neg, platt=ab, support=sup)
        iv = binary_intervals(pos, neg, noise_sd=float(noise_sd), platt=ab, support=sup)
        for k, (lo, hi) in iv.items():
            vals[f"{k}_lo"], vals[f"{k}_hi"] = lo, hi
        vals["wide"] = float(warn_wide(iv))
        out[t.name] = {k: float(v) for k, v in vals.items()}
    if tm.others is not None:
        keys = tm.others.state_shapes()
        other = {k: v for k, v in state.items() if k in keys}
        # counts are rounded; every entry is a sum of non-negative terms, so DP noise that
        # pushed one below 0 is clamped there (post-processing: no privacy cost; exact
        # vectors are unchanged). A total at 0 gives NaN for that metric, never a crash.
        other = {k: np.maximum(np.rint(v), 0) if _is_count(k) else np.maximum(v, 0) for k, v in other.items()}
        for task, vals in tm.others.compute(other).items():
            out[task] = {k: float(v) for k, v in vals.items()}
    return {t.name: out[t.name] for t in tm.tasks}


def read_release(vec: np.ndarray, site_spec: SiteSpecLike, *, n_sites: int,
                 recalibrate: bool = True) -> tuple[dict[str, dict[str, float]], dict[str, tuple[float, float]]]:
    """What a (summed) evaluation release says: each binary task's Platt recalibration
    (:func:`fit_calibration`, with ``recalibrate`` and a calibration split) and the metrics
    read under it with their intervals (:func:`compute_metrics`), for the noise of
    ``n_sites`` sites (:func:`eval_noise_sd`).

    Args:
        vec: the metric vector (one site's, or the de-quantised sum).
        site_spec: any site's spec of the job.
        n_sites: how many sites' releases it sums.
        recalibrate: fit the recalibration (``False``: the model as it is).

    Returns:
        ``(metrics, platt)``; ``platt`` is ``{}`` when nothing was fitted.
    """
    spec = SiteSpec.coerce(site_spec)
    tasks = spec.job.task_specs(spec.schema)
    cal = calibrates(spec)
    sd = eval_noise_sd(spec.job, tasks, n_sites=n_sites)
    platt = fit_calibration(vec, tasks, calibration=cal, noise_sd=sd) if recalibrate else {}
    return compute_metrics(vec, tasks, calibration=cal, noise_sd=sd, platt=platt), platt


def _is_count(key: str) -> bool:
    # histogram bins and totals are integer counts; sums (brier, errors) are not
    return any(w in key.rsplit("/", 1)[-1] for w in ("pos", "neg", "total", "correct", "count"))


def evaluates(job: JobSpec, pass_no: int) -> bool:
    """Whether pass ``pass_no`` releases (noised, charged) evaluation statistics
    (:meth:`PassSchedule.evaluates <fedmtl.contract.schedule.PassSchedule.evaluates>`)."""
    return job.schedule.evaluates(pass_no)


def eval_pass_count(job: JobSpec) -> int:
    """How many passes of ``job`` release evaluation statistics
    (:attr:`PassSchedule.n_eval_passes <fedmtl.contract.schedule.PassSchedule.n_eval_passes>`)."""
    return job.schedule.n_eval_passes


def last_pass(job: JobSpec) -> int:
    """The job's last pass (its final evaluation):
    :attr:`PassSchedule.last_pass <fedmtl.contract.schedule.PassSchedule.last_pass>`."""
    return job.schedule.last_pass


def derive_scaling(site_spec: SiteSpecLike, summed_stats: np.ndarray, *, n_sites: int) -> dict[str, dict[str, float]]:
    """The researcher's global mean/std per numeric feature from the statistics pass's
    aggregate (``n_sites`` sites contributed): post-processing of the noised sums.

    Args:
        site_spec: the site spec (any site's: they share job and schema).
        summed_stats: the statistics pass's de-quantised aggregate.
        n_sites: how many sites contributed to it.

    Returns:
        ``{"mean": {feature: float}, "std": {feature: float}}``.
    """
    from fedmtl.privacy.stats_release import derive_scaling as derive

    spec = SiteSpec.coerce(site_spec)
    return derive(summed_stats, spec.schema, noise_multiplier=float(spec.job.stats_noise_multiplier),
                  n_sites=int(n_sites))


def scaling_preprocessor(site_spec: SiteSpecLike, scaling: Any):
    """The site's preprocessor for a pass: range scaling (``scaling`` must be ``None``),
    or standard scaling from the researcher's ``scaling`` after
    :func:`fedmtl.privacy.stats_release.check_scaling`.

    Args:
        site_spec: the site spec.
        scaling: the ``scaling`` of the pass's ``advertise`` message, or ``None``.

    Returns:
        The :class:`~fedmtl.models.preprocessing.Preprocessor` of the pass.

    Raises:
        ConfigError: what is wrong with ``scaling``.
    """
    from fedmtl.models.preprocessing import Preprocessor

    spec = SiteSpec.coerce(site_spec)
    job, schema = spec.job, spec.schema
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


def plan(site_spec: SiteSpecLike, pass_no: int, *, model=None) -> PassPlan:
    """What pass ``pass_no`` of the job asks of a site and returns.

    Args:
        site_spec: the site spec.
        pass_no: the pass, ``1..last_pass``.
        model: the job's model, if already built (its size fixes the update's shape).

    Returns:
        The :class:`PassPlan`.

    Raises:
        ConfigError: the pass is outside the job's passes.
    """
    spec = SiteSpec.coerce(site_spec)
    job, schedule = spec.job, spec.schedule
    last = schedule.last_pass
    if not 1 <= pass_no <= last:
        raise ConfigError(f"pass {pass_no} is outside this job's 1..{last}")
    if schedule.is_stats_pass(pass_no):
        from fedmtl.privacy.stats_release import size

        return PassPlan(pass_no, False, False, ("stats",), ((size(spec.schema),),), stats=True)
    if model is None:
        model, _ = build_model(spec)
    tasks = job.task_specs(spec.schema)
    names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    train = schedule.training_round(pass_no) is not None
    if train:
        from fedmtl.models import vector_size

        names += ["update", "counts"]
        shapes += [(vector_size(model),), (len(groups_of(model)),)]
    ev = schedule.evaluates(pass_no)
    if ev:
        names.append("metrics")
        shapes.append((metric_size(tasks, calibration=calibrates(spec)),))
    return PassPlan(pass_no, train, ev, tuple(names), tuple(shapes))


def threshold_of(site_spec: SiteSpecLike) -> int:
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
    spec = SiteSpec.coerce(site_spec)
    if not spec.roster:
        raise ConfigError("the job spec's roster must be a non-empty table of site -> identity key")
    return spec.job.threshold_for(len(spec.roster))


def secagg_params(site_spec: SiteSpecLike, pass_no: int, attempt: int, pass_plan: PassPlan):
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

    spec = SiteSpec.coerce(site_spec)
    job = spec.job
    roster = {s: VerifyKey.from_bytes(bytes.fromhex(h)) for s, h in spec.roster.items()}
    sa = job.secagg
    threshold = threshold_of(spec)
    if 2 * threshold <= len(roster):
        raise ConfigError(
            f"secure-aggregation threshold {threshold} is not more than half of the {len(roster)} sites of the "
            f"roster: a server that lies about dropouts could unmask one site's update; refused (use at least "
            f"{len(roster) // 2 + 1})"
        )
    max_count = int(spec.max_count)
    bound = max(weighted_bound(clip=float(sa.clip), max_count=max_count), float(max_count))
    if pass_plan.stats:
        # unit-form statistics are at most max_count per entry, plus the noise (6 sd of
        # headroom; a value beyond is clipped, which is post-processing)
        from fedmtl.privacy.stats_release import noise_std

        bound = float(max_count) + 6.0 * noise_std(spec.schema, float(job.stats_noise_multiplier))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the t <= n/2 warning is reported at validation time
        return SecAggParams(
            job_id=f"{spec.job_id}/attempt-{attempt}",
            round=pass_no,
            roster=roster,
            threshold=threshold,
            shapes=pass_plan.shapes,
            quantization=QuantizationConfig(
                bound=bound, num_sites=len(roster), frac_bits=int(sa.frac_bits)
            ),
        )
