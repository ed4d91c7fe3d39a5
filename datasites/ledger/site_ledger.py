"""Where the datasite runtime and reviewer meet the policy and the signed ledger.

The ledger (:mod:`fedmtl.datasites.ledger.ledger`) is signed with the datasite's Ed25519
identity key. The policy lives in ``HOME/policy.toml``; every change of it is recorded in
the ledger. A home without a policy file gets
:func:`fedmtl.datasites.template.default_policy` on first launch.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

from fedmtl.datasites.ledger.audit import researcher_view
from fedmtl.datasites.ledger.ledger import Ledger
from fedmtl.datasites.rules.policy import Policy
from fedmtl.datasites.site import identity
from fedmtl.errors import RoundError
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
    if (Path(home) / DRY_RUN_MARKER).exists():
        return
    led = open_ledger(home)
    st = led.request(str(spec["job_id"]))
    if st is not None and st.status == "approved":
        led.finish_job(str(spec["job_id"]))


def researcher_view_of_job(home: Path, job_id: str) -> dict[str, Any]:
    """The spend and budget left of the researcher who submitted ``job_id`` — only their
    own entries (:func:`fedmtl.datasites.ledger.audit.researcher_view`)."""
    if (Path(home) / DRY_RUN_MARKER).exists():
        return {}
    led = open_ledger(home)
    st = led.request(job_id)
    if st is None:
        return {}
    return researcher_view(led, st.facts.researcher).to_dict()


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
