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

* **Budget charged before a pass runs.** :meth:`Ledger.charge_pass` composes the
  pass's records with everything the dataset and the researcher already spent and
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
  :meth:`charge_pass` refuses it.
* **Tamper-evident.** :func:`verify` detects an edited, deleted, reordered or re-signed
  entry and a truncated tail (against the signed head, or an ``expected_count`` the
  auditor kept). Rolling back *both* the ledger and the head to an earlier signed state
  cannot be detected from the home alone: keep the last audit's head (``report.json``)
  and pass its count as ``expected_count``.

This module imports neither syft nor torch (epsilon comes from
:mod:`fedmtl.privacy.accounting`, which imports Opacus's analysis lazily).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from fedmtl.datasites.ledger.ledger_format import (  # noqa: F401 - re-exported
    ENTRY_DOMAIN,
    GENESIS_HASH,
    HEAD_FILE,
    KEY_FILE,
    KINDS,
    LEDGER_FILE,
    LOCK_FILE,
    PUBLIC_KEY_FILE,
    TORN_SUFFIX,
    _eps,
    _head_payload,
    _now_iso,
    _resolve,
    _write_all,
    entry_hash,
    load_or_create_key,
    read_public_key,
    split_lines,
)
from fedmtl.datasites.ledger.ledger_state import PassCharge, RequestState, _State  # noqa: F401
from fedmtl.datasites.ledger.ledger_verify import VerifyReport, _check_entry, _read_head, read_entries, verify  # noqa: F401
from fedmtl.datasites.rules.budget import BudgetCheck, check_budget
from fedmtl.datasites.rules.policy import Policy
from fedmtl.datasites.rules.review import Decision, RequestFacts, SpendSummary, decide
from fedmtl.errors import LedgerCorruptError, LedgerError, PrivacyBudgetError, RoundRefusedError
from fedmtl.fsutil import atomic_write_bytes, canonical_json, fsync_dir
from fedmtl.privacy.accounting import PrivacyRecord
from fedmtl.privacy.keys import (
    SignatureError,
    SigningKey,
    VerifyKey,
)

# ----------------------------------------------------------------------------- ledger


log = logging.getLogger("fedmtl.ledger")


def _write_failure(path: Path, error: OSError) -> str:
    """What went wrong writing ``path``, in words an owner can act on."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the datasite's disk is full (writing its {path.name}): its owner must free space there"
    return f"could not write the datasite's {path.name} ({type(error).__name__}: {error.strerror or error})"


def _ts_seconds(ts: str) -> float:
    """Seconds since the epoch of an entry's ``ts`` (ISO 8601, UTC, ``Z``)."""
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


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
        atomic_write_bytes(self.head_path, data + b"\n", mode=0o644)

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
            size = os.fstat(fd).st_size
            try:
                _write_all(fd, data)
                os.fsync(fd)  # acknowledged from here on
            except OSError as e:
                # not acknowledged: take back whatever part reached the file (a full disk
                # mid-write), so the ledger stays as it was; if even that fails, the torn
                # tail is moved aside at the next open (_recover)
                try:
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                except OSError:
                    pass
                raise LedgerError(f"{_write_failure(self.path, e)}; nothing was recorded") from e
        finally:
            os.close(fd)
        if seq == len(entries):  # first entry: make the file's creation durable
            fsync_dir(self.path.parent)
        for e in entries:
            self._state.apply(e)
        self._offset += len(data)
        try:
            self._write_head(entries[-1])
        except OSError as e:
            # the entries are durable and they are the truth: report them written. The head
            # lags; the next append or open (_check_head) writes it again from them.
            log.warning("ledger entries up to seq %d are written, but %s could not be updated (%s); "
                        "it is rewritten at the next append or open", entries[-1]["seq"], self.head_path,
                        _write_failure(self.head_path, e))
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

    # ------------------------------------------------------------------ passes
    def charge_pass(
        self,
        *,
        request_id: str,
        pass_no: int,
        records: Sequence[PrivacyRecord],
        participants: Sequence[str],
    ) -> PassCharge:
        """Charge a pass's privacy ``records`` BEFORE it runs; raise if it may not run.

        The budgets are checked with :func:`fedmtl.datasites.rules.budget.check_budget`,
        the check the reviewer applies to the whole job. The entry is a ``round_executed``
        entry whose ``round`` key holds ``pass_no`` (the on-disk name stays).

        Args:
            request_id: the approved request (the job id).
            pass_no: the pass, 1.. the approved number of passes; above every pass
                already charged.
            records: the pass's privacy records (non-empty).
            participants: the roster's sites, recorded with the charge.

        Returns:
            The :class:`PassCharge` acknowledged in the ledger.

        Raises:
            TypeError: ``records`` is empty or holds something else; ``pass_no`` is not
                an int.
            RoundRefusedError: the request is not approved (or finished, aborted), the
                pass is a replay or beyond the approved count, or its noise is below the
                policy's minimum.
            PrivacyBudgetError: the job's composed epsilon would exceed what was
                approved or the policy's per-job maximum, or the dataset or researcher
                budget of the current policy would be exceeded.

        Check and append are atomic across threads and processes.
        """
        records = list(records)
        if not records or not all(isinstance(r, PrivacyRecord) for r in records):
            raise TypeError("records must be a non-empty list of PrivacyRecord")
        if isinstance(pass_no, bool) or not isinstance(pass_no, int):
            raise TypeError(f"pass_no must be an int, got {pass_no!r}")
        p = pass_no
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
            if p < 1 or p > approved_rounds:
                raise RoundRefusedError(
                    f"round {p} of request {request_id!r} is outside the approved rounds 1..{approved_rounds}"
                )
            if st.rounds and p <= max(st.rounds):
                raise RoundRefusedError(
                    f"round {p} of request {request_id!r} is a replay: rounds {sorted(st.rounds)} already ran"
                )
            low = min(r.noise_multiplier for r in records)
            if low < policy.min_noise_multiplier:
                raise RoundRefusedError(
                    f"round {p}: noise_multiplier {low:g} is below the policy minimum {policy.min_noise_multiplier:g}"
                )
            ds, rs = st.facts.dataset, st.facts.researcher

            def check(before: Sequence[PrivacyRecord], limit: float) -> BudgetCheck:
                return check_budget(before=before, new=records, limit=limit, delta=policy.delta,
                                    accountant=policy.accountant)

            eps_round = _eps(records, policy)
            approved_eps = st.decision.epsilon_job if st.decision else 0.0
            job = check(st.records, min(approved_eps, policy.max_epsilon_per_job))
            eps_job = job.after
            if job.over:
                raise PrivacyBudgetError(
                    f"round {p} of request {request_id!r} would bring the job to epsilon {eps_job:.4g} "
                    f"at delta={policy.delta:g}, above what was approved ({approved_eps:.4g}) or the per-job "
                    f"maximum ({policy.max_epsilon_per_job:g}); the round was not run"
                )
            on_ds = check(self._state.spent(dataset=ds), policy.dataset_epsilon_budget)
            on_rs = check(self._state.spent(dataset=ds, researcher=rs), policy.researcher_epsilon_budget)
            eps_ds, eps_rs = on_ds.after, on_rs.after
            if on_ds.over:
                raise PrivacyBudgetError(
                    f"round {p} of request {request_id!r} would bring dataset {ds!r} to epsilon "
                    f"{eps_ds:.4g} (now {on_ds.before:.4g}, this round alone {eps_round:.4g}) at "
                    f"delta={policy.delta:g}, above its budget {policy.dataset_epsilon_budget:g}; the round was not run"
                )
            if on_rs.over:
                raise PrivacyBudgetError(
                    f"round {p} of request {request_id!r} would bring researcher {rs} to epsilon "
                    f"{eps_rs:.4g} on {ds!r} (now {on_rs.before:.4g}, this round alone "
                    f"{eps_round:.4g}) at delta={policy.delta:g}, above the budget "
                    f"{policy.researcher_epsilon_budget:g}; the round was not run"
                )
            body = {
                "request_id": request_id,
                "round": p,  # the on-disk name of the pass number
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
            return PassCharge(
                request_id=request_id,
                pass_no=p,
                seq=e["seq"],
                epsilon_pass=eps_round,
                epsilon_job=eps_job,
                epsilon_dataset=eps_ds,
                epsilon_researcher=eps_rs,
                budget_left={"dataset": on_ds.left, "researcher": on_rs.left},
            )

    def finish_job(self, request_id: str, *, aborted: bool = False, reason: str = "",
                   by: str = "datasite") -> dict[str, Any]:
        """Record ``job_finished`` (or ``job_aborted``); no round may run afterwards and
        the job's unspent rounds stop counting as committed budget.

        Args:
            request_id: the job.
            aborted: record ``job_aborted`` instead of ``job_finished``.
            reason: why (written to the entry).
            by: who closed it: ``"datasite"`` (its last pass, or its idle time) or
                ``"researcher"`` (a ``close`` request).

        Returns:
            The appended entry.

        Raises:
            LedgerError: no such request, or it is already finished or aborted.
        """
        with self._locked():
            self._catch_up()
            st = self._state.requests.get(request_id)
            if st is None:
                raise LedgerError(f"no request {request_id!r} in the ledger")
            if st.status in ("finished", "aborted"):
                raise LedgerError(f"request {request_id!r} is already {st.status}")
            kind = "job_aborted" if aborted else "job_finished"
            body = {"request_id": request_id, "rounds": list(st.rounds), "reason": reason,
                    "epsilon_job": st.epsilon_charged, "by": by}
            return self._append([(kind, body)])[0]

    def close_job(self, request_id: str, *, aborted: bool, reason: str, by: str) -> tuple[RequestState, bool]:
        """Close an approved job (:meth:`finish_job`) unless it is already closed; check and
        append under one lock, so two closings never both append.

        Args:
            request_id: the job.
            aborted: ``job_aborted`` rather than ``job_finished``.
            reason: why.
            by: ``"researcher"`` or ``"datasite"``.

        Returns:
            ``(the request's state after it, whether this call closed it)``; a job already
            finished or aborted is returned as it is (``False``).

        Raises:
            RoundRefusedError: no such request, or it was never approved (pending or
                denied: there is nothing to close).
        """
        with self._locked():
            self._catch_up()
            st = self._state.requests.get(request_id)
            if st is None:
                raise RoundRefusedError(f"no request {request_id!r} in the ledger; it was never reviewed")
            if st.status in ("finished", "aborted"):
                return st, False
            if st.status != "approved":
                raise RoundRefusedError(f"request {request_id!r} is {st.status}, not approved; there is no job to close")
            self.finish_job(request_id, aborted=aborted, reason=reason, by=by)
            return self._state.requests[request_id], True

    def close_idle_jobs(self, *, now: float | None = None) -> list[dict[str, Any]]:
        """Abort every approved job with no decision or charged pass for the current
        policy's ``limits.job_idle_close_s`` seconds (``job_aborted``, ``by`` the datasite,
        reason ``idle ...``): their unspent passes stop being reserved.

        Args:
            now: the time to measure from (default: the ledger's clock).

        Returns:
            The appended entries (none when no job was idle).
        """
        with self._locked():
            self._catch_up()
            policy = self._state.policy
            if policy is None:
                return []
            limit = float(policy.job_idle_close_s)
            t = self._clock() if now is None else float(now)
            out = []
            for st in list(self._state.requests.values()):
                if st.status != "approved" or not st.last_activity_ts:
                    continue
                idle = t - _ts_seconds(st.last_activity_ts)
                if idle >= limit:
                    reason = (f"idle for {idle:.0f} s without a pass (limits.job_idle_close_s = {limit:g}); "
                              "closed by the datasite, its unspent passes are no longer reserved")
                    out.append(self.finish_job(st.request_id, aborted=True, reason=reason, by="datasite"))
            return out

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


__all__ = [
    "HEAD_FILE",
    "KINDS",
    "LEDGER_FILE",
    "Ledger",
    "LedgerCorruptError",
    "LedgerError",
    "PassCharge",
    "RequestState",
    "RoundRefusedError",
    "VerifyReport",
    "entry_hash",
    "load_or_create_key",
    "read_entries",
    "read_public_key",
    "split_lines",
    "verify",
]
