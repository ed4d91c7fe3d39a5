"""One pass of a job through the five secure-aggregation stages, over any transport.

The researcher acts as the secure-aggregation server: :func:`run_pass` sends each stage's
message to every active site through a *transport* (``call(site, message) -> reply``:
syft code calls in :class:`fedmtl.researcher.job.SyftTransport`, the in-process runtime
in :class:`fedmtl.datasites.runtime.LocalTransport` for dry runs), collects the replies
into a :class:`fedmtl.privacy.secagg.ServerSession`, and returns only the aggregate:
masks cancel in the sum and dropped sites' masks are recovered from survivors' shares.
Before unmasking, every survivor signs the survivor set it is told (the ``consistency``
stage); each site reveals shares only against t matching signatures.
Both sides use it: the researcher to run jobs, a data owner to dry-run a request.

A standard-scaling job's statistics pass (pass 1) returns ``arrays["stats"]``; turn it into
the job's mean/std with :func:`fedmtl.contract.protocol.derive_scaling` (``n_sites`` =
``len(outcome.survivors)``) and give that as ``scaling=`` to every later pass (the
``advertise`` message carries it; sites refuse a later pass without it).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from fedmtl.contract import protocol
from fedmtl.contract.messages import Advertise, Consistency, MaskedInput, Reply, ShareKeys, StageMessage, Unmask
from fedmtl.contract.site_spec import SiteSpec
from fedmtl.contract.transport import Transport
from fedmtl.errors import JobError, PassLostError

#: advertise, share_keys, masked_input, consistency, unmask
CALLS_PER_PASS = 5


@dataclass
class PassOutcome:
    """What one pass returned to the researcher.

    Attributes:
        pass_no: the pass.
        arrays: the aggregate, by the pass plan's names (``stats``; ``update``,
            ``counts``; ``metrics``).
        survivors: the sites whose vectors are in the sum.
        dropped: site -> why it dropped out (``"<stage>: <error>"``).
        reports: site -> its ``advertise`` report.
        seconds: stage -> wall seconds.
    """

    pass_no: int
    arrays: dict[str, np.ndarray]
    survivors: list[str]
    dropped: dict[str, str]
    reports: dict[str, dict[str, Any]]
    seconds: dict[str, float]


def run_pass(
    *,
    transport: Transport,
    site_specs: Mapping[str, SiteSpec | Mapping[str, Any]],
    sites: list[str],
    pass_no: int,
    attempt: int,
    weights: np.ndarray,
    model,
    on_stage: Callable[[str], None] | None = None,
    scaling: Mapping[str, Any] | None = None,
) -> PassOutcome:
    """One pass through the five secure-aggregation stages over ``sites``.

    Args:
        transport: how the messages reach the sites (:class:`~fedmtl.contract.transport.Transport`).
        site_specs: site -> its site spec (parsed, or the bound mapping); the pass reads
            the job, schema and roster from any one of them.
        sites: the sites to run the pass on.
        pass_no: the pass.
        attempt: the researcher's attempt at this pass.
        weights: the global model as a flat vector.
        model: the job's model (its shapes fix the pass plan).
        on_stage: called with each stage's name before it runs.
        scaling: the job's mean/std (standard scaling, every pass after the statistics
            pass).

    Returns:
        The :class:`PassOutcome` (the aggregate only).

    Raises:
        JobError: ``scaling`` is missing where needed, or too few sites survived (nothing
            was revealed).
        PassLostError: the pass already completed at the sites but its aggregate is lost.
    """
    from fedmtl.privacy.secagg import ServerSession, TooFewSitesError

    any_spec = SiteSpec.coerce(next(iter(site_specs.values())))
    plan = protocol.plan(any_spec, pass_no, model=model)
    job = any_spec.job
    if job.scaling == "standard" and not plan.stats and scaling is None:
        raise JobError(
            f"pass {pass_no} of a standard-scaling job needs scaling= (the mean/std derived from the "
            "statistics pass with fedmtl.contract.protocol.derive_scaling); nothing was sent"
        )
    adv_scaling = _plain(scaling) if (scaling is not None and not plan.stats) else None
    params = protocol.secagg_params(any_spec, pass_no, attempt, plan)
    server = ServerSession(params)
    dropped: dict[str, str] = {}
    reports: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    kinds: dict[str, str] = {}

    def stage(name: str, active: list[str], make_msg: Callable[[str], StageMessage]) -> dict[str, Reply]:
        if on_stage:
            on_stage(name)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, len(active))) as ex:
            futs = {s: ex.submit(transport.call, s, make_msg(s).to_dict()) for s in active}
            results = {s: Reply.from_dict(f.result()) for s, f in futs.items()}
        seconds[name] = time.perf_counter() - t0
        out = {}
        for s, r in results.items():
            if r.ok:
                out[s] = r
            else:
                dropped[s] = f"{name}: {r.error}"
                kinds[s] = str(r.kind or "")
        return out

    try:
        adv = stage("advertise", sites, lambda s: Advertise(pass_no, attempt, weights.astype(np.float32),
                                                            scaling=adv_scaling))
        for s, r in adv.items():
            reports[s] = dict(r.report) if r.report is not None else {}
        keys = server.collect_advertisements([r.message for r in adv.values()])
        shares = stage("share_keys", list(adv), lambda s: ShareKeys(pass_no, attempt, keys))
        deliveries = server.collect_shares([r.message for r in shares.values()])
        masked = stage("masked_input", list(deliveries), lambda s: MaskedInput(pass_no, attempt, deliveries[s]))
        check = server.collect_masked_inputs([r.message for r in masked.values()])
        signed = stage("consistency", list(masked), lambda s: Consistency(pass_no, attempt, check))
        request = server.collect_consistency([r.message for r in signed.values()])
        reveals = stage("unmask", list(signed), lambda s: Unmask(pass_no, attempt, request))
        t1 = time.perf_counter()
        result = server.unmask([r.message for r in reveals.values()])
        seconds["unmask_server"] = time.perf_counter() - t1
    except TooFewSitesError as e:
        seen = set(kinds.values())
        if dropped and seen == {"PassAlreadyExecutedError"}:
            raise PassLostError(
                f"pass {pass_no} was already completed at {sorted(dropped)} but its aggregate was never "
                "saved here; it cannot run twice"
            ) from None
        closed = sorted(s for s, k in kinds.items() if k == "JobClosedRefused")
        if closed and seen <= {"PassAlreadyExecutedError", "JobClosedRefused"}:
            if pass_no == any_spec.schedule.last_pass:
                # a site closes a job when it runs its last pass (or when the job idles past
                # its limit there): either way that pass will not run, and no aggregate of it is here
                raise PassLostError(
                    f"the job is closed at {closed} (a site closes a job when it runs its last pass, or when "
                    f"the job idles past the site's limit), so pass {pass_no}, its last, cannot run; no "
                    "aggregate of it was saved here"
                ) from None
            raise JobError(
                f"pass {pass_no} cannot run: the job is closed (finished or aborted) at {closed}, and no pass of "
                "it runs there any more. Nothing was sent; job.result() holds the model of the last saved pass"
            ) from None
        detail = "; ".join(f"{s}: {why}" for s, why in sorted(dropped.items())) or "none"
        raise JobError(
            f"pass {pass_no} aborted: {e}. Nothing was revealed. Sites that failed: {detail}"
        ) from None
    arrays = dict(zip(plan.names, result.arrays))
    return PassOutcome(pass_no, arrays, list(result.survivors), dropped, reports, seconds)


def _plain(scaling: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """The scaling as plain dicts of floats (what travels in a syft message)."""
    return {str(k): {str(n): float(v) for n, v in dict(t).items()} for k, t in dict(scaling).items()}
