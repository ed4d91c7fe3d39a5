"""Where the datasite runtime and reviewer meet the policy and the signed ledger.

The ledger (:mod:`fedmtl.datasites.ledger.ledger`) is signed with the datasite's Ed25519
identity key. The policy lives in ``HOME/policy.toml``; every change of it is recorded in
the ledger. A home without a policy file gets
:func:`fedmtl.datasites.template.default_policy` on first launch.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

from fedmtl.datasites.ledger.audit import researcher_view
from fedmtl.datasites.ledger.ledger import Ledger
from fedmtl.datasites.rules.policy import Policy
from fedmtl.datasites.site import identity
from fedmtl.errors import RoundError, RoundRefusedError
from fedmtl.fsutil import canonical_json
from fedmtl.privacy.accounting import PrivacyRecord

POLICY_FILE = "policy.toml"
#: a throw-away home of a researcher's dry run (no ledger); never in a datasite's home
DRY_RUN_MARKER = "DRY_RUN_HOME"
_LEDGERS: dict[Path, Any] = {}
_LOCK = threading.Lock()


def open_ledger(home: Path):
    home = Path(home).resolve()
    with _LOCK:
        led = _LEDGERS.get(home)
        if led is None:
            led = Ledger.open(home, identity.load(home).signing_key)
            _LEDGERS[home] = led
        return led


def install_policy(home: Path, policy: Policy, *, who: str) -> None:
    """Write ``HOME/policy.toml`` and record the change in the ledger (if it changed)."""
    led = open_ledger(home)
    policy.save(Path(home) / POLICY_FILE)
    led.record_policy(policy, who=who)


def current_policy(home: Path) -> Policy:
    pol = open_ledger(home).current_policy()
    if pol is None:
        raise RuntimeError(f"no policy recorded in the ledger of {home}")
    return pol


def charge_pass(home: Path, spec: Mapping[str, Any], pass_no: int, records: Sequence[PrivacyRecord]) -> None:
    """Charge pass ``pass_no`` of the job ``spec`` describes before it runs
    (:meth:`fedmtl.datasites.ledger.ledger.Ledger.charge_pass`); nothing in a dry run's
    throw-away home.

    Args:
        home: the datasite home.
        spec: the site spec (its ``job_id`` and ``roster``).
        pass_no: the pass about to run.
        records: its privacy records.

    Raises:
        RoundError: ``records`` is empty (non-private training never runs here).
        RoundRefusedError: the ledger refuses the pass (see the ledger).
        PrivacyBudgetError: a budget would be exceeded.
    """
    if (Path(home) / DRY_RUN_MARKER).exists():
        return
    if not records:
        raise RoundError("non-private training (dp = false) never runs on a datasite")
    open_ledger(home).charge_pass(
        request_id=str(spec["job_id"]),
        pass_no=int(pass_no),
        records=list(records),
        participants=sorted(spec.get("roster", {})),
    )


def finish_job(home: Path, spec: Mapping[str, Any]) -> None:
    """Record ``job_finished`` for the job of ``spec`` after its last pass (nothing when it
    is already closed, or in a dry run's throw-away home)."""
    if (Path(home) / DRY_RUN_MARKER).exists():
        return
    led = open_ledger(home)
    st = led.request(str(spec["job_id"]))
    if st is not None and st.status == "approved":
        led.close_job(str(spec["job_id"]), aborted=False, reason="its last pass completed", by="datasite")


def close_job(home: Path, spec: Mapping[str, Any], *, aborted: bool, reason: str) -> dict[str, Any]:
    """The researcher's ``close`` request: record ``job_finished`` (or ``job_aborted``) for
    the approved job ``spec`` describes, once; closing a closed job returns its state.

    The job is the one the ledger approved for exactly this spec (its ``spec_hash``), never
    just the id the spec names: a spec whose hash the ledger's request does not hold
    closes nothing.

    Args:
        home: the datasite home.
        spec: the approved site spec, as bound (syft) or carried (data plane).
        aborted: ``job_aborted`` rather than ``job_finished``.
        reason: the researcher's reason.

    Returns:
        ``{"job_id", "status", "closed_now", "closed", "passes_charged", "epsilon_charged",
        "passes_reserved"}`` (``{}`` in a dry run's home).

    Raises:
        RoundRefusedError: the ledger holds no approval of this spec.
    """
    if (Path(home) / DRY_RUN_MARKER).exists():
        return {}
    job_id = str(spec["job_id"])
    led = open_ledger(home)
    st = led.request(job_id)
    if st is None or st.facts.spec_hash != spec_hash(spec):
        raise RoundRefusedError(f"this datasite holds no approval of job {job_id!r} with this spec; nothing was closed")
    st, now = led.close_job(job_id, aborted=aborted, reason=reason, by="researcher")
    row = st.to_dict()
    return {"job_id": job_id, "status": st.status, "closed_now": now, "closed": row["closed"],
            "passes_charged": list(st.rounds), "epsilon_charged": st.epsilon_charged,
            "passes_reserved": row["passes_reserved"]}


def spec_hash(spec: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a site spec: what a review's ``spec_hash`` holds
    (:func:`fedmtl.datasites.review.autoreview.site_spec_hash`)."""
    return hashlib.sha256(canonical_json(dict(spec))).hexdigest()


def job_status(home: Path, job_id: str) -> str | None:
    """The ledger's status of ``job_id`` (``approved``, ``finished``, ``aborted``...), or
    ``None`` in a dry run's home or for a job the ledger does not hold."""
    if (Path(home) / DRY_RUN_MARKER).exists():
        return None
    st = open_ledger(home).request(job_id)
    return None if st is None else st.status


def close_idle_jobs(home: Path) -> list[dict[str, Any]]:
    """Abort the approved jobs idle for longer than the policy's ``limits.job_idle_close_s``
    (:meth:`fedmtl.datasites.ledger.ledger.Ledger.close_idle_jobs`); the entries appended."""
    if (Path(home) / DRY_RUN_MARKER).exists():
        return []
    return open_ledger(home).close_idle_jobs()


def researcher_view_of_job(home: Path, job_id: str) -> dict[str, Any]:
    """The spend and budget left of the researcher who submitted ``job_id`` — only their
    own entries (:func:`fedmtl.datasites.ledger.audit.researcher_view`), plus what lets the
    researcher run this site's review ahead of time (:mod:`fedmtl.datasites.review.preview`):
    ``policy`` (the current policy; limits are not secret) and ``records`` (their own privacy
    records spent and committed on this dataset, the ones the review composes a new job with)."""
    if (Path(home) / DRY_RUN_MARKER).exists():
        return {}
    led = open_ledger(home)
    st = led.request(job_id)
    if st is None:
        return {}
    view = researcher_view(led, st.facts.researcher).to_dict()
    policy = led.current_policy()
    view["policy"] = None if policy is None else policy.to_dict()
    mine = led.spend_summary(dataset=st.facts.dataset, researcher=st.facts.researcher).researcher_records
    view["records"] = [r.to_dict() for r in mine]
    return view


def concurrency_of_job(home: Path, job_id: str) -> tuple[str | None, int | None]:
    """Who submitted ``job_id`` here and how many of their jobs may train or evaluate at
    once (``limits.max_concurrent_jobs_per_researcher`` of the current policy).

    Args:
        home: the datasite home.
        job_id: the job (its request id in the ledger).

    Returns:
        ``(researcher, cap)``; ``(None, None)`` in a dry run's throw-away home (no ledger)
        and for a job the ledger does not hold (the charge refuses it anyway).
    """
    if (Path(home) / DRY_RUN_MARKER).exists():
        return None, None
    led = open_ledger(home)
    st = led.request(job_id)
    if st is None:
        return None, None
    policy = led.current_policy()
    cap = None if policy is None else int(policy.max_concurrent_jobs_per_researcher)
    return str(st.facts.researcher), cap


def site_metrics_allowed(home: Path) -> bool:
    if (Path(home) / DRY_RUN_MARKER).exists():
        return True
    return bool(current_policy(home).release_per_site_metrics)
