"""One pass of a job through the four secure-aggregation stages, over any transport.

The researcher acts as the secure-aggregation server: :func:`run_pass` sends each stage's
message to every active site through a *transport* (``call(site, message) -> reply``:
syft code calls in :class:`fedmtl.researcher.job.SyftTransport`, the in-process runtime
in :class:`fedmtl.datasites.runtime.LocalTransport` for dry runs), collects the replies
into a :class:`fedmtl.privacy.secagg.ServerSession`, and returns only the aggregate:
masks cancel in the sum and dropped sites' masks are recovered from survivors' shares.
Both sides use it: the researcher to run jobs, a data owner to dry-run a request.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from fedmtl import protocol
from fedmtl.errors import JobError, PassLostError

CALLS_PER_PASS = 4


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
) -> PassOutcome:
    """One pass through the four secure-aggregation stages over ``sites``."""
    from fedmtl.privacy.secagg import ServerSession, TooFewSitesError

    any_spec = next(iter(site_specs.values()))
    plan = protocol.plan(any_spec, pass_no, model=model)
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
        adv = stage("advertise", sites, lambda s: {"weights": weights.astype(np.float32)})
        for s, r in adv.items():
            reports[s] = r.get("report", {})
        keys = server.collect_advertisements([r["message"] for r in adv.values()])
        shares = stage("share_keys", list(adv), lambda s: {"keys": keys})
        deliveries = server.collect_shares([r["message"] for r in shares.values()])
        masked = stage("masked_input", list(deliveries), lambda s: {"delivery": deliveries[s]})
        request = server.collect_masked_inputs([r["message"] for r in masked.values()])
        reveals = stage("unmask", list(masked), lambda s: {"request": request})
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
