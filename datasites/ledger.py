"""The datasite's privacy ledger: append-only, hash-chained, signed, crash-safe.

Files in the datasite home::

    ledger.jsonl        one JSON entry per line (the ledger)
    ledger.head.json    signed {seq, hash} of the last acknowledged entry (detects truncation)
    ledger.lock         lock file: every append and every budget check holds flock(LOCK_EX)
    ledger.jsonl.torn   bytes of torn appends removed on recovery (kept for forensics)

Each entry is ``{seq, ts, kind, body, prev_hash, hash, sig}``: ``hash`` is the sha256 of
the canonical JSON of ``{seq, ts, kind, body, prev_hash}``, ``prev_hash`` the previous
entry's hash (64 zeros for the first), and ``sig`` the Ed25519 signature (hex) of
``b"fedmtl-ledger-entry\\n" + hash`` with the datasite's ledger key. Entry 0 is
``ledger_created`` and names the key's fingerprint.

Kinds: ``ledger_created``, ``policy_changed``, ``request_received``, ``decision``,
``round_executed``, ``job_finished``, ``job_aborted``.

Guarantees

* **Budget charged before a round runs.** :meth:`Ledger.charge_round` composes the
  round's records with everything the dataset and the researcher already spent and
  refuses (:class:`~fedmtl.errors.PrivacyBudgetError`) if a budget of the current policy
  would be exceeded; check and append happen under one exclusive ``flock``, so any number
  of threads or processes can never together overspend. It also refuses rounds of
  requests that are not approved, replays and rounds beyond the approved count.
* **Crash-safe.** An append writes its line(s) with one ``write`` on an ``O_APPEND``
  descriptor, then ``fsync``s; only then is it *acknowledged* (the call returns) and the
  signed head is replaced atomically (temp file, fsync, rename). A crash mid-append can
  only leave a torn last line; :meth:`Ledger.open` moves it to ``ledger.jsonl.torn`` and
  truncates, and :func:`verify` reports it as a warning, not a problem. Nothing
  acknowledged is lost.
* **A request never runs without its decision.** :meth:`Ledger.review_and_record` writes
  the request and its decision in one append; a request without a decision (the reviewer
  crashed in between, or a manual review is waiting) reads as ``pending`` and
  :meth:`charge_round` refuses it.
* **Tamper-evident.** :func:`verify` detects an edited, deleted, reordered or re-signed
  entry and a truncated tail (against the signed head, or an ``expected_count`` the
  auditor kept). Rolling back *both* the ledger and the head to an earlier signed state
  cannot be detected from the home alone: keep the last audit's head (``report.json``)
  and pass its count as ``expected_count``.

This module imports neither syft nor torch (epsilon comes from
:mod:`fedmtl.privacy.accounting`, which imports Opacus's analysis lazily).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from fedmtl.datasites.policy import Policy, canonical_json
from fedmtl.datasites.review import Decision, RequestFacts, SpendSummary, decide
from fedmtl.errors import DatasiteError, PrivacyBudgetError
from fedmtl.privacy.accounting import PrivacyRecord, epsilon_of
from fedmtl.privacy.keys import (
    SignatureError,
    SigningKey,
    VerifyKey,
    load_private_key,
    save_private_key,
)

LEDGER_FILE = "ledger.jsonl"
HEAD_FILE = "ledger.head.json"
LOCK_FILE = "ledger.lock"
TORN_SUFFIX = ".torn"
KEY_FILE = "ledger_ed25519"  # in HOME/secrets/, raw 32 bytes, mode 0600
PUBLIC_KEY_FILE = "ledger_ed25519.pub"  # in HOME, hex; pin its fingerprint out of band
GENESIS_HASH = "0" * 64
ENTRY_DOMAIN = b"fedmtl-ledger-entry\n"
HEAD_DOMAIN = b"fedmtl-ledger-head\n"
KINDS: tuple[str, ...] = (
    "ledger_created",
    "policy_changed",
    "request_received",
    "decision",
    "round_executed",
    "job_finished",
    "job_aborted",
)
#: relative slack when comparing a composed epsilon with a budget (float noise only)
EPS_TOLERANCE = 1e-9


class LedgerError(DatasiteError):
    """The ledger cannot be used as asked."""


class LedgerCorruptError(LedgerError):
    """The ledger does not verify (edited, truncated, or signed by another key).
    Do not append to it; run ``fedmtl audit`` and restore from a backup."""


class RoundRefusedError(LedgerError):
    """A round may not run: the request is not approved, the round is a replay, or it is
    beyond the approved number of rounds."""


# ----------------------------------------------------------------------------- helpers


def _now_iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON of the entry's signed fields."""
    core = {k: entry[k] for k in ("seq", "ts", "kind", "body", "prev_hash")}
    return hashlib.sha256(canonical_json(core)).hexdigest()


def _head_payload(seq: int, h: str, fingerprint: str) -> bytes:
    return HEAD_DOMAIN + canonical_json({"seq": seq, "hash": h, "fingerprint": fingerprint})


def _resolve(home_or_path: str | Path) -> Path:
    p = Path(home_or_path)
    return p / LEDGER_FILE if p.is_dir() or p.suffix != ".jsonl" else p


def _eps(records: Sequence[PrivacyRecord], policy: Policy) -> float:
    return epsilon_of(list(records), delta=policy.delta, accountant=policy.accountant)


def _over(value: float, limit: float) -> bool:
    return value > limit * (1 + EPS_TOLERANCE) + EPS_TOLERANCE


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    """Write ``data`` fully (one ``write`` in the normal case). Tests patch this to
    inject a crash mid-append."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def split_lines(raw: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines of a ledger file and its torn tail (bytes after the last newline,
    or trailing NUL/blank garbage a crash can leave)."""
    cut = raw.rfind(b"\n") + 1
    body, tail = raw[:cut], raw[cut:]
    lines = body.split(b"\n")[:-1] if body else []
    # trailing lines that are only NULs/whitespace are crash garbage, not entries
    while lines and not lines[-1].strip(b"\x00 \t\r"):
        tail = lines.pop() + b"\n" + tail
    return lines, tail


def load_or_create_key(home: str | Path) -> SigningKey:
    """The datasite's ledger signing key from ``HOME/secrets/ledger_ed25519`` (created,
    mode 0600, on first use); also writes ``HOME/ledger_ed25519.pub`` (hex)."""
    home = Path(home)
    secrets = home / "secrets"
    secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = secrets / KEY_FILE
    if path.exists():
        key = SigningKey.from_bytes(load_private_key(path))
    else:
        key = SigningKey.generate()
        save_private_key(path, key.to_bytes())
    pub = home / PUBLIC_KEY_FILE
    hex_pub = key.verify_key.to_bytes().hex()
    if not pub.exists() or pub.read_text().strip() != hex_pub:
        pub.write_text(hex_pub + "\n")
    return key


def read_public_key(home: str | Path) -> VerifyKey:
    """The verify key published in ``HOME/ledger_ed25519.pub``. An auditor should compare
    its fingerprint with one obtained out of band (or pass their own pinned key)."""
    return VerifyKey.from_bytes(bytes.fromhex((Path(home) / PUBLIC_KEY_FILE).read_text().strip()))


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RoundCharge:
    """What :meth:`Ledger.charge_round` charged (and acknowledged)."""

    request_id: str
    round: int
    seq: int
    epsilon_round: float
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
        }


@dataclass
class VerifyReport:
    """Result of :func:`verify`. ``ok`` is True when ``problems`` is empty."""

    path: str
    entries: int
    problems: list[str]
    warnings: list[str]
    head: dict[str, Any] | None
    fingerprint: str

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "entries": self.entries,
            "problems": list(self.problems),
            "warnings": list(self.warnings),
            "head": self.head,
            "fingerprint": self.fingerprint,
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
        elif kind == "round_executed":
            st = self.requests.get(b["request_id"])
            recs = [PrivacyRecord.from_dict(r) for r in b["records"]]
            if st is not None:
                st.rounds.append(int(b["round"]))
                st.records.extend(recs)
                st.epsilon_charged = float(b["epsilon_job"])
            self.round_records.append((b["dataset"], b["researcher"], recs))
        elif kind in ("job_finished", "job_aborted"):
            st = self.requests.get(b["request_id"])
            if st is not None:
                st.status = "finished" if kind == "job_finished" else "aborted"

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
            if st.status != "approved":
                continue
            if dataset is not None and st.facts.dataset != dataset:
                continue
            if researcher is not None and st.facts.researcher != researcher:
                continue
            planned = st.facts.privacy_records()
            out.extend(planned[len(st.records):])
        return out


# ----------------------------------------------------------------------------- ledger


class Ledger:
    """An open ledger for appending (the datasite side). Use :meth:`open`.

    Every public method first catches up with entries other processes appended, under
    the lock, so one instance per process (or several) all see one ledger.
    """

    def __init__(self, path: Path, signing_key: SigningKey, *, clock: Callable[[], float] | None = None):
        if not isinstance(signing_key, SigningKey):
            raise TypeError(f"signing_key must be a fedmtl.privacy.keys.SigningKey, got {type(signing_key).__name__}")
        self.path = Path(path)
        self.head_path = self.path.with_name(HEAD_FILE)
        self.lock_path = self.path.with_name(LOCK_FILE)
        self._key = signing_key
        self._vk = signing_key.verify_key
        self._fp = self._vk.fingerprint()
        self._clock = clock or time.time
        self._mutex = threading.RLock()
        self._lock_fd: int | None = None
        self._lock_pid = -1
        self._lock_depth = 0
        self._state = _State()
        self._offset = 0

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        home_or_path: str | Path,
        signing_key: SigningKey,
        *,
        clock: Callable[[], float] | None = None,
    ) -> "Ledger":
        """Open (or create) the ledger in a datasite home (or at a ``.jsonl`` path).

        Recovers a torn last line left by a crash, verifies every entry and the head,
        and brings the head up to date. Raises :class:`LedgerCorruptError` if the ledger
        was altered or belongs to another key.
        """
        path = _resolve(home_or_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        led = cls(path, signing_key, clock=clock)
        with led._locked():
            led._recover()
            led._catch_up()
            if not led._state.entries:
                led._append([("ledger_created", {"fingerprint": led._fp, "verify_key": led._vk.to_bytes().hex()})])
            led._check_head()
        return led

    def close(self) -> None:
        with self._mutex:
            if self._lock_fd is not None and self._lock_pid == os.getpid():
                os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def verify_key(self) -> VerifyKey:
        return self._vk

    # ------------------------------------------------------------------ locking
    @contextmanager
    def _locked(self, exclusive: bool = True) -> Iterator[None]:
        with self._mutex:
            if self._lock_fd is None or self._lock_pid != os.getpid():
                # after fork, the inherited descriptor shares the parent's lock: reopen
                self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
                self._lock_pid = os.getpid()
                self._lock_depth = 0
            if self._lock_depth == 0:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ reading
    def _recover(self) -> None:
        """Move a torn tail (crash mid-append) aside and truncate it. Holds the lock."""
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        _, tail = split_lines(raw)
        if not tail:
            return
        keep = len(raw) - len(tail)
        with open(self.path.with_name(self.path.name + TORN_SUFFIX), "ab") as f:
            f.write(b"--- torn tail recovered at " + _now_iso(time.time()).encode() + b"\n" + tail + b"\n")
            f.flush()
            os.fsync(f.fileno())
        with open(self.path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())

    def _catch_up(self) -> None:
        """Read entries appended since our last read (by anyone). Holds the lock."""
        if not self.path.exists():
            return
        size = self.path.stat().st_size
        if size < self._offset:
            raise LedgerCorruptError(
                f"{self.path} shrank from {self._offset} to {size} bytes while open: it was "
                "truncated outside fedmtl. Stop the datasite and run `fedmtl audit`."
            )
        if size == self._offset:
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            raw = f.read(size - self._offset)
        lines, tail = split_lines(raw)
        if tail:
            raise LedgerCorruptError(
                f"{self.path} has a torn line at byte {size - len(tail)} although no append is in "
                "progress; reopen the ledger to recover it"
            )
        for line in lines:
            try:
                e = json.loads(line)
            except json.JSONDecodeError as err:
                raise LedgerCorruptError(f"{self.path}: entry after seq {self._last_seq()} is not JSON ({err})") from None
            problem = _check_entry(e, self._state.entries[-1] if self._state.entries else None, self._vk)
            if problem:
                raise LedgerCorruptError(f"{self.path}: {problem}. Run `fedmtl audit` for the full report.")
            if e["seq"] == 0 and e["body"].get("fingerprint") != self._fp:
                raise LedgerCorruptError(
                    f"{self.path} was created for key {e['body'].get('fingerprint', '?')[:16]}..., "
                    f"not this datasite's key {self._fp[:16]}..."
                )
            self._state.apply(e)
        self._offset = size

    def _last_seq(self) -> int:
        return self._state.entries[-1]["seq"] if self._state.entries else -1

    def _check_head(self) -> None:
        """The head must point at an entry we have; catch it up if it lags. Holds the lock."""
        last = self._state.entries[-1]
        head = _read_head(self.head_path)
        if head is not None:
            try:
                self._vk.verify(bytes.fromhex(head["sig"]), _head_payload(head["seq"], head["hash"], self._fp))
            except (SignatureError, ValueError, KeyError, TypeError):
                raise LedgerCorruptError(f"{self.head_path} is not signed by this datasite's key") from None
            if head["seq"] > last["seq"]:
                raise LedgerCorruptError(
                    f"{self.path} ends at seq {last['seq']} but the signed head says seq {head['seq']}: "
                    f"{head['seq'] - last['seq']} acknowledged entr(y/ies) are missing (truncated). "
                    "Restore the ledger from a backup."
                )
            if self._state.entries[head["seq"]]["hash"] != head["hash"]:
                raise LedgerCorruptError(f"entry seq {head['seq']} does not match the signed head: rewritten")
            if head["seq"] == last["seq"]:
                return
        elif last["seq"] > 0:
            # only a crash right after the very first append can leave no head
            raise LedgerCorruptError(
                f"{self.head_path} is missing but {self.path} has {last['seq'] + 1} entries: the head "
                "was deleted, so truncation cannot be ruled out. Run `fedmtl audit`; restore both "
                "files from a backup"
            )
        self._write_head(last)

    def _write_head(self, last: Mapping[str, Any]) -> None:
        sig = self._key.sign(_head_payload(last["seq"], last["hash"], self._fp)).hex()
        data = canonical_json(
            {"seq": last["seq"], "hash": last["hash"], "ts": last["ts"], "fingerprint": self._fp, "sig": sig}
        )
        tmp = self.head_path.with_name(self.head_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.head_path)
        _fsync_dir(self.head_path.parent)

    # ------------------------------------------------------------------ appending
    def _append(self, items: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Append entries in ONE write + fsync. Holds the lock; caller has caught up."""
        entries: list[dict[str, Any]] = []
        prev = self._state.entries[-1]["hash"] if self._state.entries else GENESIS_HASH
        seq = self._last_seq() + 1
        ts = _now_iso(self._clock())
        for kind, body in items:
            if kind not in KINDS:
                raise ValueError(f"unknown ledger entry kind {kind!r}; one of {list(KINDS)}")
            e: dict[str, Any] = {"seq": seq, "ts": ts, "kind": kind, "body": body, "prev_hash": prev}
            e["hash"] = entry_hash(e)
            e["sig"] = self._key.sign(ENTRY_DOMAIN + e["hash"].encode()).hex()
            entries.append(e)
            prev, seq = e["hash"], seq + 1
        data = b"".join(canonical_json(e) + b"\n" for e in entries)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)  # acknowledged from here on
        finally:
            os.close(fd)
        if seq == len(entries):  # first entry: make the file's creation durable
            _fsync_dir(self.path.parent)
        for e in entries:
            self._state.apply(e)
        self._offset += len(data)
        self._write_head(entries[-1])
        return entries

    # ------------------------------------------------------------------ policy
    def record_policy(self, policy: Policy, *, who: str) -> dict[str, Any] | None:
        """Record ``policy`` as the datasite's policy (a ``policy_changed`` entry with the
        old and new hash). Returns None when it equals the current one."""
        with self._locked():
            self._catch_up()
            old = self._state.policy_hash
            new = policy.hash()
            if old == new:
                return None
            body = {"who": who, "old_hash": old, "new_hash": new, "policy": policy.to_dict()}
            return self._append([("policy_changed", body)])[0]

    def current_policy(self) -> Policy | None:
        with self._locked(exclusive=False):
            self._catch_up()
            return self._state.policy

    def _policy(self) -> Policy:
        if self._state.policy is None:
            raise LedgerError("the ledger has no policy yet; record one with Ledger.record_policy(policy, who=...)")
        return self._state.policy

    # ------------------------------------------------------------------ requests
    @staticmethod
    def _request_body(facts: RequestFacts) -> dict[str, Any]:
        return {
            "request_id": facts.request_id,
            "researcher": facts.researcher,
            "dataset": facts.dataset,
            "code_name": facts.code_name,
            "code_hash": facts.code_hash,
            "spec_hash": facts.spec_hash,
            "facts": facts.to_dict(),
        }

    @staticmethod
    def _decision_body(request_id: str, decision: Decision) -> dict[str, Any]:
        return {
            "request_id": request_id,
            "who": decision.reviewer,
            "mode": "automatic" if decision.automatic else "manual",
            "status": decision.status,
            "reasons": list(decision.reasons),
            "epsilon": decision.to_dict()["epsilon_job"],
            "warning_shown": decision.warning_shown,
            "decision": decision.to_dict(),
        }

    def record_request(self, facts: RequestFacts) -> dict[str, Any]:
        """Record that a request arrived (it reads as ``pending`` until a decision)."""
        with self._locked():
            self._catch_up()
            self._new_request_id(facts.request_id)
            return self._append([("request_received", self._request_body(facts))])[0]

    def _new_request_id(self, request_id: str) -> None:
        if not request_id:
            raise LedgerError("a request needs a non-empty request_id")
        if request_id in self._state.requests:
            raise LedgerError(f"request {request_id!r} is already in the ledger (seq "
                              f"{self._state.requests[request_id].received_seq}); request ids are unique")

    def record_decision(self, request_id: str, decision: Decision) -> dict[str, Any]:
        """Record a decision on a recorded request. A final decision (approved or denied)
        cannot be replaced; a ``pending_manual`` one can be followed by a person's."""
        with self._locked():
            self._catch_up()
            st = self._state.requests.get(request_id)
            if st is None:
                raise LedgerError(f"no request {request_id!r} in the ledger; record the request first")
            if st.status not in ("pending", "pending_manual"):
                raise LedgerError(f"request {request_id!r} was already decided ({st.status}); decisions are final")
            if decision.status == "approved" and decision.warnings and not decision.warning_shown:
                raise LedgerError(
                    f"request {request_id!r}: an approval with warnings must record that they were "
                    "shown (use review.manual_decision(..., warnings_acknowledged=True))"
                )
            return self._append([("decision", self._decision_body(request_id, decision))])[0]

    def record_review(self, facts: RequestFacts, decision: Decision) -> tuple[dict[str, Any], dict[str, Any]]:
        """Record a request and its decision in one atomic append."""
        with self._locked():
            self._catch_up()
            self._new_request_id(facts.request_id)
            a, b = self._append(
                [("request_received", self._request_body(facts)), ("decision", self._decision_body(facts.request_id, decision))]
            )
            return a, b

    def review_and_record(self, facts: RequestFacts) -> Decision:
        """Auto-review: decide ``facts`` against the ledger's current policy and what was
        spent *and committed* (approved jobs' remaining rounds), and record request and
        decision in one append, all under the lock (two concurrent reviews cannot both
        take the last of the budget)."""
        with self._locked():
            self._catch_up()
            self._new_request_id(facts.request_id)
            policy = self._policy()
            spent = self._summary(facts.dataset, facts.researcher, include_committed=True)
            decision = decide(policy=policy, request=facts, spent=spent)
            self.record_review(facts, decision)
            return decision

    # ------------------------------------------------------------------ rounds
    def charge_round(
        self,
        *,
        request_id: str,
        round: int,  # noqa: A002 - the natural name
        records: Sequence[PrivacyRecord],
        participants: Sequence[str],
    ) -> RoundCharge:
        """Charge a round's privacy ``records`` BEFORE it runs; raise if it may not run.

        Refuses (:class:`RoundRefusedError`) a request that is not approved (or finished,
        aborted), a round number not above every executed one (replay), a round beyond
        the approved count, and records noisier-than-approved in cost (the job's composed
        epsilon may not exceed what was approved, nor the policy's per-job maximum).
        Refuses (:class:`PrivacyBudgetError`) when the dataset or the researcher budget of
        the current policy would be exceeded. Check and append are atomic across threads
        and processes.
        """
        records = list(records)
        if not records or not all(isinstance(r, PrivacyRecord) for r in records):
            raise TypeError("records must be a non-empty list of PrivacyRecord")
        if isinstance(round, bool) or not isinstance(round, int):
            raise TypeError(f"round must be an int, got {round!r}")
        with self._locked():
            self._catch_up()
            policy = self._policy()
            st = self._state.requests.get(request_id)
            if st is None:
                raise RoundRefusedError(f"no request {request_id!r} in the ledger; it was never reviewed")
            if st.status != "approved":
                raise RoundRefusedError(
                    f"request {request_id!r} is {st.status}, not approved; no round may run"
                )
            approved_rounds = st.facts.passes or st.facts.rounds
            if round < 1 or round > approved_rounds:
                raise RoundRefusedError(
                    f"round {round} of request {request_id!r} is outside the approved rounds 1..{approved_rounds}"
                )
            if st.rounds and round <= max(st.rounds):
                raise RoundRefusedError(
                    f"round {round} of request {request_id!r} is a replay: rounds {sorted(st.rounds)} already ran"
                )
            low = min(r.noise_multiplier for r in records)
            if low < policy.min_noise_multiplier:
                raise RoundRefusedError(
                    f"round {round}: noise_multiplier {low:g} is below the policy minimum {policy.min_noise_multiplier:g}"
                )
            ds, rs = st.facts.dataset, st.facts.researcher
            eps_round = _eps(records, policy)
            eps_job = _eps([*st.records, *records], policy)
            approved_eps = st.decision.epsilon_job if st.decision else 0.0
            cap = min(approved_eps, policy.max_epsilon_per_job)
            if _over(eps_job, cap):
                raise PrivacyBudgetError(
                    f"round {round} of request {request_id!r} would bring the job to epsilon {eps_job:.4g} "
                    f"at delta={policy.delta:g}, above what was approved ({approved_eps:.4g}) or the per-job "
                    f"maximum ({policy.max_epsilon_per_job:g}); the round was not run"
                )
            ds_before = self._state.spent(dataset=ds)
            rs_before = self._state.spent(dataset=ds, researcher=rs)
            eps_ds = _eps([*ds_before, *records], policy)
            eps_rs = _eps([*rs_before, *records], policy)
            if _over(eps_ds, policy.dataset_epsilon_budget):
                raise PrivacyBudgetError(
                    f"round {round} of request {request_id!r} would bring dataset {ds!r} to epsilon "
                    f"{eps_ds:.4g} (now {_eps(ds_before, policy):.4g}, this round alone {eps_round:.4g}) at "
                    f"delta={policy.delta:g}, above its budget {policy.dataset_epsilon_budget:g}; the round was not run"
                )
            if _over(eps_rs, policy.researcher_epsilon_budget):
                raise PrivacyBudgetError(
                    f"round {round} of request {request_id!r} would bring researcher {rs} to epsilon "
                    f"{eps_rs:.4g} on {ds!r} (now {_eps(rs_before, policy):.4g}, this round alone "
                    f"{eps_round:.4g}) at delta={policy.delta:g}, above the budget "
                    f"{policy.researcher_epsilon_budget:g}; the round was not run"
                )
            body = {
                "request_id": request_id,
                "round": round,
                "dataset": ds,
                "researcher": rs,
                "records": [r.to_dict() for r in records],
                "epsilon_round": eps_round,
                "epsilon_job": eps_job,
                "epsilon_dataset": eps_ds,
                "epsilon_researcher": eps_rs,
                "delta": policy.delta,
                "accountant": policy.accountant,
                "participants": list(participants),
            }
            e = self._append([("round_executed", body)])[0]
            return RoundCharge(
                request_id=request_id,
                round=round,
                seq=e["seq"],
                epsilon_round=eps_round,
                epsilon_job=eps_job,
                epsilon_dataset=eps_ds,
                epsilon_researcher=eps_rs,
                budget_left={
                    "dataset": policy.dataset_epsilon_budget - eps_ds,
                    "researcher": policy.researcher_epsilon_budget - eps_rs,
                },
            )

    def finish_job(self, request_id: str, *, aborted: bool = False, reason: str = "") -> dict[str, Any]:
        """Record ``job_finished`` (or ``job_aborted``); no round may run afterwards and
        the job's unspent rounds stop counting as committed budget."""
        with self._locked():
            self._catch_up()
            st = self._state.requests.get(request_id)
            if st is None:
                raise LedgerError(f"no request {request_id!r} in the ledger")
            if st.status in ("finished", "aborted"):
                raise LedgerError(f"request {request_id!r} is already {st.status}")
            kind = "job_aborted" if aborted else "job_finished"
            body = {"request_id": request_id, "rounds": list(st.rounds), "reason": reason,
                    "epsilon_job": st.epsilon_charged}
            return self._append([(kind, body)])[0]

    # ------------------------------------------------------------------ queries
    def _summary(self, dataset: str, researcher: str, *, include_committed: bool) -> SpendSummary:
        ds = self._state.spent(dataset=dataset)
        rs = self._state.spent(dataset=dataset, researcher=researcher)
        if include_committed:
            ds += self._state.committed(dataset=dataset)
            rs += self._state.committed(dataset=dataset, researcher=researcher)
        return SpendSummary(dataset_records=tuple(ds), researcher_records=tuple(rs))

    def spend_summary(self, *, dataset: str, researcher: str, include_committed: bool = True) -> SpendSummary:
        """Records spent on ``dataset`` overall and by ``researcher`` on it, plus (by
        default) the remaining planned records of approved, unfinished jobs."""
        with self._locked(exclusive=False):
            self._catch_up()
            return self._summary(dataset, researcher, include_committed=include_committed)

    def spent_records(self, *, dataset: str | None = None, researcher: str | None = None) -> list[PrivacyRecord]:
        """Records charged so far, filtered by dataset and/or researcher."""
        with self._locked(exclusive=False):
            self._catch_up()
            return self._state.spent(dataset=dataset, researcher=researcher)

    def spent_epsilon(self, *, dataset: str | None = None, researcher: str | None = None) -> float:
        """Composed epsilon of :meth:`spent_records` under the current policy."""
        with self._locked(exclusive=False):
            self._catch_up()
            return _eps(self._state.spent(dataset=dataset, researcher=researcher), self._policy())

    def request(self, request_id: str) -> RequestState | None:
        with self._locked(exclusive=False):
            self._catch_up()
            return self._state.requests.get(request_id)

    def request_status(self, request_id: str) -> str:
        """pending | pending_manual | approved | denied | finished | aborted | unknown."""
        st = self.request(request_id)
        return st.status if st else "unknown"

    def requests(self, *, status: str | None = None) -> list[RequestState]:
        with self._locked(exclusive=False):
            self._catch_up()
            return [s for s in self._state.requests.values() if status is None or s.status == status]

    def executed_rounds(self, request_id: str) -> list[int]:
        st = self.request(request_id)
        return list(st.rounds) if st else []

    def entries(self) -> list[dict[str, Any]]:
        with self._locked(exclusive=False):
            self._catch_up()
            return [dict(e) for e in self._state.entries]


# ----------------------------------------------------------------------------- verify


def _read_head(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LedgerCorruptError(f"{path} is not valid JSON ({e})") from None


def _check_entry(e: Any, prev: Mapping[str, Any] | None, vk: VerifyKey) -> str | None:
    """The first problem with entry ``e`` following ``prev``, or None."""
    if not isinstance(e, dict) or not {"seq", "ts", "kind", "body", "prev_hash", "hash", "sig"} <= set(e):
        return "an entry lacks the fields seq, ts, kind, body, prev_hash, hash, sig"
    want_seq = prev["seq"] + 1 if prev else 0
    if e["seq"] != want_seq:
        return f"entry seq {e['seq']} found where seq {want_seq} was expected: an entry was deleted, inserted or reordered"
    want_prev = prev["hash"] if prev else GENESIS_HASH
    if e["prev_hash"] != want_prev:
        return f"entry seq {e['seq']} does not chain to the previous entry: an entry was deleted, inserted or reordered"
    if entry_hash(e) != e["hash"]:
        return f"entry seq {e['seq']} ({e['kind']}) does not match its hash: it was edited"
    try:
        vk.verify(bytes.fromhex(e["sig"]), ENTRY_DOMAIN + e["hash"].encode())
    except (SignatureError, ValueError, TypeError):
        return f"entry seq {e['seq']} has no valid signature by key {vk.fingerprint()[:16]}...: re-signed with another key or forged"
    return None


def read_entries(home_or_path: str | Path) -> tuple[list[dict[str, Any]], bytes]:
    """Parsed entries (unverified; unparsable lines as ``{"_raw": ...}``) and the torn tail."""
    path = _resolve(home_or_path)
    raw = path.read_bytes() if path.exists() else b""
    lines, tail = split_lines(raw)
    out: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        try:
            e = json.loads(line)
            out.append(e if isinstance(e, dict) else {"_raw": line.decode("utf-8", "replace"), "_line": i + 1})
        except (json.JSONDecodeError, UnicodeDecodeError):
            out.append({"_raw": line.decode("utf-8", "replace"), "_line": i + 1})
    return out, tail


def verify(home_or_path: str | Path, verify_key: VerifyKey, *, expected_count: int | None = None) -> VerifyReport:
    """Check a ledger against the datasite's pinned ``verify_key``. Read-only.

    Reports (as problems) edited, deleted, inserted, reordered, unsigned or re-signed
    entries, a ledger created for another key, a head that is missing, forged or ahead of
    the ledger (truncation), and fewer entries than ``expected_count``. A torn last line
    (crash mid-append, never acknowledged) is a warning.
    """
    if not isinstance(verify_key, VerifyKey):
        raise TypeError(f"verify_key must be a fedmtl.privacy.keys.VerifyKey, got {type(verify_key).__name__}")
    path = _resolve(home_or_path)
    fp = verify_key.fingerprint()
    problems: list[str] = []
    warnings: list[str] = []
    if not path.exists():
        return VerifyReport(str(path), 0, [f"no ledger at {path}"], [], None, fp)
    lock_fd = None
    lock_path = path.with_name(LOCK_FILE)
    if lock_path.exists():  # a consistent snapshot while a datasite appends
        try:
            lock_fd = os.open(lock_path, os.O_RDONLY)
            fcntl.flock(lock_fd, fcntl.LOCK_SH)
        except OSError:
            lock_fd = None
    try:
        entries, tail = read_entries(path)
        head_path = path.with_name(HEAD_FILE)
        head_error = False
        try:
            head = _read_head(head_path)
        except LedgerCorruptError as e:
            head, head_error = None, True
            problems.append(str(e))
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    if tail:
        warnings.append(
            f"the last {len(tail)} byte(s) are a torn append (a crash mid-write, never acknowledged); "
            "they are moved aside the next time the datasite opens the ledger"
        )
    bad_sigs = 0
    prev: dict[str, Any] | None = None
    for i, e in enumerate(entries):
        if "_raw" in e:
            problems.append(f"line {e['_line']} is not a JSON entry: it was edited")
            prev = None
            continue
        if prev is None and i > 0:
            # resynchronise after a broken line
            prev = {"seq": e.get("seq", i) - 1, "hash": e.get("prev_hash")}
        p = _check_entry(e, prev, verify_key)
        if p:
            if "signature" in p:
                bad_sigs += 1
            else:
                problems.append(p)
        if i == 0 and isinstance(e.get("body"), dict) and e.get("kind") == "ledger_created":
            if e["body"].get("fingerprint") != fp:
                problems.append(
                    f"the ledger was created for key {str(e['body'].get('fingerprint'))[:16]}..., not the pinned key {fp[:16]}..."
                )
        elif i == 0:
            problems.append("the first entry is not ledger_created: the start of the ledger was deleted")
        prev = e if isinstance(e.get("seq"), int) else None
    if bad_sigs:
        if bad_sigs == len(entries):
            problems.append(
                f"none of the {bad_sigs} entries is signed by the pinned key {fp[:16]}...: the ledger was "
                "re-signed with another key (or you pinned the wrong key)"
            )
        else:
            problems.append(f"{bad_sigs} of {len(entries)} entries have no valid signature by the pinned key {fp[:16]}...")
    last_seq = entries[-1].get("seq", -1) if entries and "_raw" not in entries[-1] else len(entries) - 1
    if head is None:
        if not head_error:
            problems.append(f"{HEAD_FILE} is missing: the tail of the ledger cannot be checked for truncation")
    else:
        try:
            verify_key.verify(bytes.fromhex(head["sig"]), _head_payload(head["seq"], head["hash"], fp))
        except (SignatureError, ValueError, KeyError, TypeError):
            problems.append(f"{HEAD_FILE} is not signed by the pinned key {fp[:16]}...")
        else:
            hs = head["seq"]
            if hs > last_seq:
                problems.append(
                    f"the ledger was truncated: it ends at seq {last_seq} but the signed head says "
                    f"seq {hs} ({hs - last_seq} acknowledged entr(y/ies) missing)"
                )
            elif hs >= 0 and (hs >= len(entries) or entries[hs].get("hash") != head["hash"]):
                problems.append(f"entry seq {hs} does not match the signed head: the ledger was rewritten")
            elif hs < last_seq:
                warnings.append(
                    f"{last_seq - hs} entr(y/ies) after the signed head (seq {hs}): a crash between an "
                    "append and the head update; they verify and the head catches up on the next open"
                )
    if expected_count is not None and len(entries) < expected_count:
        problems.append(
            f"the ledger has {len(entries)} entries, fewer than the {expected_count} expected: it was truncated or rolled back"
        )
    return VerifyReport(str(path), len(entries), problems, warnings, head, fp)


__all__ = [
    "HEAD_FILE",
    "KINDS",
    "LEDGER_FILE",
    "Ledger",
    "LedgerCorruptError",
    "LedgerError",
    "RequestState",
    "RoundCharge",
    "RoundRefusedError",
    "VerifyReport",
    "entry_hash",
    "load_or_create_key",
    "read_entries",
    "read_public_key",
    "split_lines",
    "verify",
]
