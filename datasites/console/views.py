"""What the review console shows, as plain data for its templates.

Nothing here decides or audits: the request, its policy check and its numbers come from
:func:`fedmtl.datasites.review.manual_review.show_request` (what ``fedmtl datasite review
--show`` prints), the ledger's verification, spend and requests from
:func:`fedmtl.datasites.ledger.audit.audit`. This module only puts them into words: the
job (tasks, model size, rounds, epsilon and what it buys), the roster against this
datasite's pins, and the ledger as a timeline.

Every value that comes from a request is the researcher's: it is turned into text here
and escaped by the templates (Jinja2 autoescape); none is marked safe.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from fedmtl.contract import protocol
from fedmtl.datasites.ledger.audit import AuditReport
from fedmtl.datasites.review.manual_review import RequestDetails
from fedmtl.datasites.rules.policy import Policy
from fedmtl.datasites.site import identity
from fedmtl.models import model_to_vector
from fedmtl.privacy.keys import VerifyKey

#: the longest text of one field the console shows (a spec may hold anything)
MAX_TEXT = 400


def text(x: Any, limit: int = MAX_TEXT) -> str:
    """``x`` as bounded plain text (the templates escape it).

    Args:
        x: any value from a request or the ledger.
        limit: the most characters kept.

    Returns:
        ``str(x)`` (``""`` for None), cut to ``limit`` characters with an ellipsis.
    """
    s = "" if x is None else (x if isinstance(x, str) else json.dumps(x, default=str) if isinstance(
        x, (dict, list, tuple)) else str(x))
    return s if len(s) <= limit else s[: limit - 1] + "…"


def num(x: Any) -> str:
    """A number as a reviewer reads it (4 significant digits); other values as text."""
    if isinstance(x, bool) or x is None:
        return text(x)
    if isinstance(x, (int, float)):
        return "n/a" if isinstance(x, float) and math.isnan(x) else f"{x:.4g}"
    return text(x)


@dataclass(frozen=True)
class RosterRow:
    """One site of a job's roster, against this datasite's pins."""

    site: str
    fingerprint: str
    status: str  # "this datasite" | "pinned" | "pinned with another key" | "NOT pinned" | "not a key"
    ok: bool


@dataclass
class JobView:
    """A request's job in plain words (see :func:`job_view`)."""

    name: str
    tasks: list[str]
    model: str
    parameters: str
    rounds: str
    local_training: str
    privacy: str
    epsilon: str
    epsilon_meaning: str
    secagg: str
    roster: list[RosterRow] = field(default_factory=list)
    other: list[tuple[str, str]] = field(default_factory=list)


def _job_dict(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    job = (spec or {}).get("job") if isinstance(spec, Mapping) else None
    return dict(job) if isinstance(job, Mapping) else {}


def _task_text(t: Any) -> str:
    if not isinstance(t, Mapping):
        return text(t)
    label, name = t.get("label"), t.get("name")
    out = f"predict {text(label, 80)}"
    if name is not None and name != label:
        out += f" (head {text(name, 80)})"
    if t.get("kind") is not None:
        out += f", {text(t.get('kind'), 40)}"
    if t.get("weight") not in (None, 1, 1.0):
        out += f", weight {num(t.get('weight'))}"
    return out


def _parameters(spec: Mapping[str, Any] | None, details: RequestDetails) -> str:
    """The model's parameter count, built as the datasite would build it; only for a spec
    that passed the reviewer's bounds (a malformed one is not built)."""
    if details.problems or not isinstance(spec, Mapping):
        return "not computed: the job spec is invalid (see the policy check)"
    try:
        model, _ = protocol.build_model(spec)
        return f"{int(model_to_vector(model).size):,} trainable weights"
    except Exception as e:  # noqa: BLE001 - shown, never a crash of the page
        return f"not computed ({type(e).__name__}: {text(e, 200)})"


def roster_rows(spec: Mapping[str, Any] | None, *, own_site: str, own_fingerprint: str,
                policy: Policy | None) -> list[RosterRow]:
    """The job's secure-aggregation roster, each site checked against this datasite's pins.

    Args:
        spec: the request's site spec (its ``roster`` maps site name to Ed25519 key hex).
        own_site: this datasite's name.
        own_fingerprint: the fingerprint of this datasite's identity key.
        policy: the current policy (its pinned peers), or None.

    Returns:
        One row per roster entry, in the roster's order.
    """
    roster = spec.get("roster") if isinstance(spec, Mapping) else None
    if not isinstance(roster, Mapping):
        return []
    pins = {p.name: p.fingerprint for p in (policy.peers if policy else ())}
    rows = []
    for site, key in roster.items():
        try:
            fp = VerifyKey.from_bytes(bytes.fromhex(str(key))).fingerprint()
        except (ValueError, TypeError):
            rows.append(RosterRow(text(site, 80), text(key, 80), "not a key", False))
            continue
        if site == own_site:
            status, ok = ("this datasite", True) if fp == own_fingerprint else ("this site's name, another key", False)
        elif site in pins:
            status, ok = ("pinned", True) if pins[site] == fp else ("pinned with another key", False)
        else:
            status, ok = "NOT pinned", False
        rows.append(RosterRow(text(site, 80), fp, status, ok))
    return rows


def epsilon_meaning(epsilon: Any, delta: Any) -> str:
    """What an epsilon buys, in one sentence a reviewer can act on."""
    try:
        e = float(epsilon)
        d = float(delta)
    except (TypeError, ValueError):
        return "the job's epsilon could not be computed (see the policy check)"
    if not math.isfinite(e):
        return "no finite guarantee: the job would not be differentially private"
    factor = math.exp(e)
    return (f"whatever the researcher does with the results, including or leaving out any one patient "
            f"changes the probability of any outcome by at most a factor of e^{e:.3g} = {factor:.3g} "
            f"(except with probability delta = {d:.2g}); smaller is more private")


def job_view(details: RequestDetails, *, own_site: str, own_fingerprint: str, policy: Policy | None) -> JobView:
    """The job of ``details`` in plain words.

    Args:
        details: what :func:`~fedmtl.datasites.review.manual_review.show_request` returned.
        own_site: this datasite's name.
        own_fingerprint: its identity key's fingerprint.
        policy: the current policy (pinned peers, delta), or None.

    Returns:
        The :class:`JobView`; every field is text (the templates escape it).
    """
    spec = details.spec if isinstance(details.spec, Mapping) else None
    job = _job_dict(spec)
    d = details.decision
    tasks = job.get("tasks")
    model = job.get("model") if isinstance(job.get("model"), Mapping) else {}
    steps = (f"{num(job.get('local_steps'))} DP-SGD steps" if job.get("local_steps") is not None
             else f"{num(job.get('local_epochs'))} epochs" if job.get("local_epochs") is not None else "default")
    if job.get("dp") is False:
        privacy = "NO differential privacy (dp = false)"
    elif job.get("target_epsilon") is not None:
        privacy = f"DP-SGD calibrated to a target epsilon {num(job.get('target_epsilon'))} per site"
    else:
        privacy = f"DP-SGD with noise multiplier {num(job.get('noise_multiplier'))}"
    privacy += (f", gradients clipped to {num(job.get('max_grad_norm'))}, sampling rate "
                f"{num(job.get('sample_rate'))}, delta {num(job.get('delta'))}")
    sec = job.get("secagg") if isinstance(job.get("secagg"), Mapping) else {}
    delta = job.get("delta", policy.delta if policy else None)
    known = {"name", "tasks", "model", "rounds", "local_steps", "local_epochs", "dp", "target_epsilon",
             "noise_multiplier", "max_grad_norm", "sample_rate", "delta", "secagg"}
    other = [(text(k, 60), text(v)) for k, v in sorted(job.items(), key=lambda kv: str(kv[0])) if k not in known]
    return JobView(
        name=text(job.get("name")) or "(no name)",
        tasks=[_task_text(t) for t in tasks] if isinstance(tasks, list) else [text(tasks)],
        model=", ".join(f"{text(k, 40)} {text(v, 80)}" for k, v in model.items()) or "(default)",
        parameters=_parameters(spec, details),
        rounds=(f"{num(job.get('rounds'))} round(s), evaluation every {num(job.get('eval_every'))}"
                if job.get("eval_every") else f"{num(job.get('rounds'))} round(s)"),
        local_training=f"{steps} per round, learning rate {num(job.get('lr'))}, strategy "
        f"{text((job.get('strategy') or {}).get('name') if isinstance(job.get('strategy'), Mapping) else job.get('strategy'), 40)}",
        privacy=privacy,
        epsilon=num(d.epsilon_job),
        epsilon_meaning=epsilon_meaning(d.epsilon_job, delta),
        secagg=f"threshold {num(sec.get('threshold'))} of {len((spec or {}).get('roster') or {})} site(s)",
        roster=roster_rows(spec, own_site=own_site, own_fingerprint=own_fingerprint, policy=policy),
        other=other,
    )


def own_identity(home: Path) -> tuple[str, VerifyKey]:
    """(this datasite's name, its identity verify key: the ledger's key too)."""
    pub = identity.load_public(home)
    return pub.site, pub.verify_key


# ----------------------------------------------------------------------------- ledger


@dataclass(frozen=True)
class TimelineRow:
    """One ledger entry, for the timeline."""

    seq: str
    ts: str
    kind: str
    request_id: str
    who: str
    summary: str


def _summary(kind: str, b: Mapping[str, Any]) -> str:
    if kind == "policy_changed":
        return f"policy {text(b.get('new_hash'), 16)}"
    if kind == "request_received":
        f = b.get("facts") if isinstance(b.get("facts"), Mapping) else {}
        return (f"code {text(b.get('code_name'), 80)} on {text(b.get('dataset'), 60)}; tasks "
                f"{text(', '.join(map(str, f.get('tasks') or [])), 200)}")
    if kind == "decision":
        reasons = b.get("reasons") if isinstance(b.get("reasons"), list) else []
        return f"{text(b.get('status'), 20)} ({text(b.get('mode'), 20)}): " + text("; ".join(map(str, reasons)))
    if kind == "round_executed":
        return (f"pass {text(b.get('round'), 10)} charged on {text(b.get('dataset'), 60)}: epsilon "
                f"{num(b.get('epsilon_round'))} this pass, {num(b.get('epsilon_job'))} for the job so far")
    if kind in ("job_finished", "job_aborted"):
        return f"epsilon charged {num(b.get('epsilon_job'))}" + (f"; {text(b.get('reason'))}" if b.get("reason") else "")
    return ""


def timeline(entries: Sequence[Mapping[str, Any]], *, newest_first: bool = True, limit: int = 500) -> list[TimelineRow]:
    """The ledger's entries as timeline rows (newest first, at most ``limit``).

    Args:
        entries: the ledger's entries (:func:`fedmtl.datasites.ledger.ledger.read_entries`).
        newest_first: order.
        limit: the most rows.

    Returns:
        Rows of text; a malformed entry is shown as such, never skipped silently.
    """
    rows = []
    for e in entries:
        if not isinstance(e, Mapping) or "kind" not in e:
            rows.append(TimelineRow(text(e.get("_line", "?") if isinstance(e, Mapping) else "?"), "", "unreadable",
                                    "", "", text(e.get("_raw") if isinstance(e, Mapping) else e, 200)))
            continue
        b = e.get("body") if isinstance(e.get("body"), Mapping) else {}
        who = b.get("who", b.get("researcher", ""))
        rows.append(TimelineRow(text(e.get("seq"), 12), text(e.get("ts"), 19).replace("T", " "),
                                text(e.get("kind"), 40), text(b.get("request_id"), 80), text(who, 120),
                                _summary(str(e.get("kind")), b)))
    if newest_first:
        rows.reverse()
    return rows[:limit]


def spend_rows(spent: Mapping[str, float], budget: float | None) -> list[tuple[str, str, str, str]]:
    """(name, spent, budget, left) rows for a spend table beside a chart."""
    return [(text(k, 120), num(v), num(budget), num(budget - v) if budget is not None else "")
            for k, v in sorted(spent.items())]


def budgets(report: AuditReport) -> tuple[float | None, float | None]:
    """(researcher budget, dataset budget) of the policy the audit read."""
    p = (report.policy or {}).get("privacy", {}) if isinstance(report.policy, Mapping) else {}
    r, d = p.get("researcher_epsilon_budget"), p.get("dataset_epsilon_budget")
    return (float(r) if r is not None else None, float(d) if d is not None else None)


__all__ = ["JobView", "RosterRow", "TimelineRow", "budgets", "epsilon_meaning", "job_view", "num", "own_identity",
           "roster_rows", "spend_rows", "text", "timeline"]
