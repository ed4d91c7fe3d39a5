"""Automatic review of pending code requests, inside the datasite process.

For each pending syft request it builds the :class:`~fedmtl.datasites.review.RequestFacts`
(code hash, the job spec from the syft ``Constant``, the privacy records the job would
spend on this dataset), lets the ledger decide against the policy and record request and
decision in one signed append, then approves or denies the request in syft with the
reasons. A decision of ``pending_manual`` leaves the request for a person
(``fedmtl datasite review``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedmtl.datasites import home as home_mod

log = logging.getLogger("fedmtl.autoreview")


def spec_of(request) -> dict[str, Any] | None:
    """The job spec a request carries as its syft ``Constant`` named ``spec``."""
    kwargs = getattr(request.code, "input_policy_init_kwargs", None) or {}
    for rules in kwargs.values():
        if isinstance(rules, dict) and "spec" in rules:
            val = getattr(rules["spec"], "val", None)
            return val if isinstance(val, dict) else None
    return None


def facts_of(home: Path, request):
    """Build the review facts of a syft request (pure apart from reading the home)."""
    from fedmtl.datasites import identity, protocol
    from fedmtl.datasites.review import RequestFacts
    from fedmtl.datasites.template import code_sha256

    cfg = home_mod.read_config(home)
    meta = json.loads((Path(home) / "dataset_meta.json").read_text())
    code = request.code
    raw = code.raw_code or ""
    code_hash = code_sha256(raw)
    if getattr(code, "nested_codes", None):
        code_hash = "nested:" + code_hash  # calls other syft code: never a template
    spec = spec_of(request)
    researcher = str(getattr(request, "requesting_user_email", "") or "unknown")
    base = dict(
        researcher=researcher,
        dataset=cfg["dataset"],
        code_name=str(code.service_func_name),
        code_hash=code_hash,
    )
    problems: list[str] = []
    job = None
    if spec is None:
        problems.append("the request carries no job spec (a syft Constant named 'spec')")
    else:
        try:
            job = protocol.job_of(spec)
        except Exception as e:  # noqa: BLE001 - any malformed spec is a denial reason
            problems.append(f"the job spec is invalid: {e}")
        if spec.get("site") != cfg["name"]:
            problems.append(f"the job spec is for site {spec.get('site')!r}, not {cfg['name']!r}")
        own = identity.load_public(home).verify_key.to_bytes().hex()
        if (spec.get("roster") or {}).get(cfg["name"]) != own:
            problems.append("the job's roster does not hold this datasite's identity key")
    request_id = str(spec.get("job_id")) if spec and spec.get("job_id") else f"syft-{request.id}"
    if job is None:
        return RequestFacts(
            request_id=request_id, tasks=(), noise_multiplier=0.0, max_grad_norm=0.0, rounds=0,
            local_epochs=0, sample_rate=0.0, steps_per_round=0, delta=1e-5, n_sites=0,
            secagg_threshold=0, **base,
        ), problems
    n_train = int(meta["split_sizes"].get("train", meta["n_records"]))
    records = tuple(job.privacy_records(n_train)) if job.dp else ()
    noise = float(job.noise_for_site(n_train)) if job.dp else 0.0
    if job.local_epochs is not None:
        local_epochs = float(job.local_epochs)
    elif job.local_steps is not None:
        local_epochs = job.local_steps * job.sample_rate_for_site(n_train)
    else:
        local_epochs = 1.0
    return RequestFacts(
        request_id=request_id,
        tasks=tuple(t.label for t in job.tasks),
        noise_multiplier=noise,
        max_grad_norm=float(job.max_grad_norm),
        rounds=int(job.rounds),
        local_epochs=max(1, int(round(float(local_epochs)))) if local_epochs else 1,
        sample_rate=float(job.sample_rate),
        steps_per_round=int(job.steps_per_round(n_train)),
        delta=float(job.delta),
        n_sites=len(spec.get("roster") or {}),
        secagg_threshold=int(job.secagg.threshold),
        release_per_site_metrics=bool(job.per_site_metrics),
        spec_hash=job.spec_hash(),
        records=records,
        **base,
    ), problems


def resolve_request(home: Path, req, led):
    """(facts, problems, ledger state) of a syft request. A job id the ledger already holds
    for another request (other code, spec or researcher) is never inherited: the request
    is then known under ``syft-<uid>`` and carries the reason."""
    facts, problems = facts_of(home, req)
    known = led.request(facts.request_id)
    if known is not None and not same_request(known.facts, facts):
        problems = [*problems, reused_id_reason(facts.request_id, known.facts)]
        facts = replace(facts, request_id=f"syft-{req.id}")
        known = led.request(facts.request_id)
    return facts, problems, known


def review_pending(home: Path, client) -> None:
    from fedmtl.datasites import ledger_seam, syftio

    if not (Path(home) / "dataset_meta.json").exists():
        return  # first launch still uploading
    led = ledger_seam.open_ledger(home)
    with syftio.quiet():
        pending = [r for r in client.requests.get_all() if r.status.name == "PENDING"]
    for req in pending:
        facts, problems, known = resolve_request(home, req, led)
        if known is None:
            if problems:
                decision = _denied(problems)
                led.record_review(facts, decision)
            else:
                decision = led.review_and_record(facts)
            status, reasons = decision.status, list(decision.reasons)
        else:
            status = known.status
            reasons = list(known.decision.reasons) if known.decision else []
        with syftio.quiet():
            if status == "approved":
                req.approve()
            elif status == "denied":
                req.deny(reason="; ".join(reasons) or "denied by the datasite policy")
        log.info("request %s (%s): %s", req.id, facts.request_id, status)


def same_request(a, b) -> bool:
    """Whether two RequestFacts are the same request (same code, job spec, researcher)."""
    return (a.code_hash, a.spec_hash, a.researcher) == (b.code_hash, b.spec_hash, b.researcher)


def reused_id_reason(request_id: str, earlier) -> str:
    return (
        f"job id {request_id!r} is already used in the ledger by another request (code "
        f"{earlier.code_hash[:12]}..., from {earlier.researcher}); a reused id never inherits a "
        "decision: submit the job again (a new job gets a new id)"
    )


def _denied(problems: list[str]):
    from fedmtl.datasites.review import Decision

    return Decision(
        status="denied",
        reasons=tuple(problems),
        epsilon_job=float("nan"),
        epsilon_after_dataset=float("nan"),
        epsilon_after_researcher=float("nan"),
        budget_left={},
    )
