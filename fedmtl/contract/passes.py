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
from fedmtl.errors import JobError, PassLostError

#: advertise, share_keys, masked_input, consistency, unmask
CALLS_PER_PASS = 5


@dataclass
class PassOutcome:
    pass_no: int
    arrays: dict[str, np.ndarray]
    survivors: list[str]
    dropped: dict[str, str]
    reports: dict[str, dict[str, Any]]
    seconds: dict[str, float]


def run_pass(
    *,
    transport,
    site_specs: Mapping[str, dict],
    sites: list[str],
    pass_no: int,
    attempt: int,
    weights: np.ndarray,
    model,
    on_stage: Callable[[str], None] | None = None,
    scaling: Mapping[str, Any] | None = None,
) -> PassOutcome:
    """One pass through the five secure-aggregation stages over ``sites``. ``scaling``:
    the job's mean/std (standard scaling, every pass after the statistics pass)."""
    from fedmtl.privacy.secagg import ServerSession, TooFewSitesError

    any_spec = next(iter(site_specs.values()))
    plan = protocol.plan(any_spec, pass_no, model=model)
    job = protocol.job_of(any_spec)
    if job.scaling == "standard" and not plan.stats and scaling is None:
        raise JobError(
            f"pass {pass_no} of a standard-scaling job needs scaling= (the mean/std derived from the "
            "statistics pass with fedmtl.contract.protocol.derive_scaling); nothing was sent"
        )
    adv_extra: dict[str, Any] = {"scaling": _plain(scaling)} if (scaling is not None and not plan.stats) else {}
    params = protocol.secagg_params(any_spec, pass_no, attempt, plan)
    server = ServerSession(params)
    dropped: dict[str, str] = {}
    reports: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    kinds: dict[str, str] = {}

    def stage(name: str, active: list[str], make_msg: Callable[[str], dict]) -> dict[str, Any]:
        if on_stage:
            on_stage(name)
        t0 = time.perf_counter()
        base = {"stage": name, "pass": pass_no, "attempt": attempt}
        with ThreadPoolExecutor(max_workers=max(1, len(active))) as ex:
            futs = {s: ex.submit(transport.call, s, {**base, **make_msg(s)}) for s in active}
            results = {s: f.result() for s, f in futs.items()}
        seconds[name] = time.perf_counter() - t0
        out = {}
        for s, r in results.items():
            if r.get("ok"):
                out[s] = r
            else:
                dropped[s] = f"{name}: {r.get('error')}"
                kinds[s] = str(r.get("kind", ""))
        return out

    try:
        adv = stage("advertise", sites, lambda s: {"weights": weights.astype(np.float32), **adv_extra})
        for s, r in adv.items():
            reports[s] = r.get("report", {})
        keys = server.collect_advertisements([r["message"] for r in adv.values()])
        shares = stage("share_keys", list(adv), lambda s: {"keys": keys})
        deliveries = server.collect_shares([r["message"] for r in shares.values()])
        masked = stage("masked_input", list(deliveries), lambda s: {"delivery": deliveries[s]})
        check = server.collect_masked_inputs([r["message"] for r in masked.values()])
        signed = stage("consistency", list(masked), lambda s: {"request": check})
        request = server.collect_consistency([r["message"] for r in signed.values()])
        reveals = stage("unmask", list(signed), lambda s: {"request": request})
        t1 = time.perf_counter()
        result = server.unmask([r["message"] for r in reveals.values()])
        seconds["unmask_server"] = time.perf_counter() - t1
    except TooFewSitesError as e:
        if dropped and set(kinds.values()) == {"PassAlreadyExecutedError"}:
            raise PassLostError(
                f"pass {pass_no} was already completed at {sorted(dropped)} but its aggregate was never "
                "saved here; it cannot run twice"
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
