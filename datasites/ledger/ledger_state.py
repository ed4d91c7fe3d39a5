"""What a ledger's entries say, folded in order: requests and their decisions, charged
rounds, spend and committed budget per dataset and researcher, the current policy.
Pure: no file access (see :mod:`fedmtl.datasites.ledger.ledger`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from fedmtl.datasites.rules.policy import Policy
from fedmtl.datasites.rules.review import Decision, RequestFacts
from fedmtl.privacy.accounting import PrivacyRecord

# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class PassCharge:
    """What :meth:`Ledger.charge_pass` charged (and acknowledged).

    ``epsilon_pass`` is the pass alone; ``epsilon_job``, ``epsilon_dataset`` and
    ``epsilon_researcher`` are the totals with it; ``budget_left`` is the dataset and
    researcher budget left *before* it (the meaning of
    :attr:`fedmtl.datasites.rules.budget.BudgetCheck.left`, as in a review's decision)."""

    request_id: str
    pass_no: int
    seq: int
    epsilon_pass: float
    epsilon_job: float
    epsilon_dataset: float
    epsilon_researcher: float
    budget_left: Mapping[str, float]


@dataclass
class RequestState:
    """A request as the ledger knows it. ``status``: pending (no decision yet),
    pending_manual, approved, denied, finished, aborted."""

    request_id: str
    facts: RequestFacts
    received_seq: int
    received_ts: str
    status: str = "pending"
    decision: Decision | None = None
    decisions: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    records: list[PrivacyRecord] = field(default_factory=list)
    epsilon_charged: float = 0.0
    #: the time of the request's last decision or charged pass (what idle time counts from)
    last_activity_ts: str = ""
    #: the ``job_finished`` / ``job_aborted`` entry's body, once the job is closed
    closed: dict[str, Any] | None = None

    def reserved_records(self) -> list[PrivacyRecord]:
        """The privacy records this request still holds against the budgets: the planned
        records of the passes it has not been charged for while it is approved; none once
        it is denied, finished or aborted."""
        if self.status != "approved":
            return []
        return list(self.facts.privacy_records()[len(self.records):])

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "researcher": self.facts.researcher,
            "dataset": self.facts.dataset,
            "code_name": self.facts.code_name,
            "code_hash": self.facts.code_hash,
            "spec_hash": self.facts.spec_hash,
            "received": self.received_ts,
            "status": self.status,
            "decision": self.decision.to_dict() if self.decision else None,
            "decisions": list(self.decisions),
            "rounds_approved": self.facts.rounds,
            "rounds_executed": list(self.rounds),
            "epsilon_charged": self.epsilon_charged,
            "passes_reserved": max(0, int(self.facts.passes or self.facts.rounds) - len(self.rounds))
            if self.status == "approved" else 0,
            "closed": dict(self.closed) if self.closed else None,
        }


# ----------------------------------------------------------------------------- state


class _State:
    """What the entries say, folded in order (requests, spend, policy)."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.requests: dict[str, RequestState] = {}
        self.policy: Policy | None = None
        self.policy_hash: str | None = None
        self.round_records: list[tuple[str, str, list[PrivacyRecord]]] = []  # dataset, researcher, recs

    def apply(self, e: dict[str, Any]) -> None:
        self.entries.append(e)
        kind, b = e["kind"], e["body"]
        if kind == "policy_changed":
            self.policy = Policy.from_dict(b["policy"])
            self.policy_hash = b["new_hash"]
        elif kind == "request_received":
            facts = RequestFacts.from_dict(b["facts"])
            self.requests[facts.request_id] = RequestState(
                request_id=facts.request_id, facts=facts, received_seq=e["seq"], received_ts=e["ts"]
            )
        elif kind == "decision":
            st = self.requests.get(b["request_id"])
            if st is not None:
                st.decision = Decision.from_dict(b["decision"])
                st.decisions.append({"seq": e["seq"], "ts": e["ts"], **b["decision"]})
                st.status = st.decision.status
                st.last_activity_ts = e["ts"]
        elif kind == "round_executed":
            st = self.requests.get(b["request_id"])
            recs = [PrivacyRecord.from_dict(r) for r in b["records"]]
            if st is not None:
                st.rounds.append(int(b["round"]))
                st.records.extend(recs)
                st.epsilon_charged = float(b["epsilon_job"])
                st.last_activity_ts = e["ts"]
            self.round_records.append((b["dataset"], b["researcher"], recs))
        elif kind in ("job_finished", "job_aborted"):
            st = self.requests.get(b["request_id"])
            if st is not None:
                st.status = "finished" if kind == "job_finished" else "aborted"
                st.closed = {"seq": e["seq"], "ts": e["ts"], "kind": kind, "reason": b.get("reason", ""),
                             "by": b.get("by", "")}

    def spent(self, *, dataset: str | None = None, researcher: str | None = None) -> list[PrivacyRecord]:
        out: list[PrivacyRecord] = []
        for ds, rs, recs in self.round_records:
            if (dataset is None or ds == dataset) and (researcher is None or rs == researcher):
                out.extend(recs)
        return out

    def committed(self, *, dataset: str | None = None, researcher: str | None = None) -> list[PrivacyRecord]:
        """Records approved jobs have not spent yet (their remaining planned rounds)."""
        out: list[PrivacyRecord] = []
        for st in self.requests.values():
            if dataset is not None and st.facts.dataset != dataset:
                continue
            if researcher is not None and st.facts.researcher != researcher:
                continue
            out.extend(st.reserved_records())
        return out


