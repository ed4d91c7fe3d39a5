"""The privacy ledger: charge before a round, no double spend under concurrency,
tamper evidence, crash safety."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import compliance_helpers as H  # registered by tests/datasites/conftest.py
import pytest

from fedmtl.datasites.ledger import ledger as L
from fedmtl.datasites.ledger.ledger import (
    Ledger,
    LedgerCorruptError,
    LedgerError,
    RoundRefusedError,
    load_or_create_key,
    read_public_key,
    verify,
)
from fedmtl.datasites.rules.review import SpendSummary, decide
from fedmtl.errors import PrivacyBudgetError
from fedmtl.privacy.accounting import PrivacyRecord, epsilon_of
from fedmtl.privacy.keys import SigningKey

R = H.ROUND
PARTS = ["st-mary", "general", "riverside"]


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def home(tmp_path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


def _open(home, key, **policy) -> Ledger:
    led = Ledger.open(home, key, clock=H.FakeClock())
    led.record_policy(H.make_policy(**policy), who=H.OWNER)
    return led


def _approve_without_committed(led: Ledger, facts) -> None:
    """Record an approval the way a reviewer that ignored other approved jobs would."""
    d = decide(policy=led.current_policy(), request=facts, spent=SpendSummary())
    assert d.status == "approved", d.explain()
    led.record_review(facts, d)


# -- the normal story ----------------------------------------------------------------------


def test_review_charge_finish_and_queries(home, key):
    # Prepare
    led = _open(home, key)
    f = H.make_facts()
    # Execute
    decision = led.review_and_record(f)
    charges = [led.charge_pass(request_id=f.request_id, pass_no=r, records=[R], participants=PARTS) for r in (1, 2, 3)]
    led.finish_job(f.request_id)
    # Assert
    assert decision.status == "approved"
    assert [c.pass_no for c in charges] == [1, 2, 3]
    assert charges[-1].epsilon_job == pytest.approx(decision.epsilon_job)
    assert charges[-1].epsilon_dataset == pytest.approx(epsilon_of([R] * 3, delta=1e-5))
    assert led.executed_rounds(f.request_id) == [1, 2, 3]
    assert led.request_status(f.request_id) == "finished"
    assert led.spent_records(dataset="nafld") == [R] * 3
    assert led.spent_records(dataset="nafld", researcher=H.BOB) == []
    kinds = [e["kind"] for e in led.entries()]
    assert kinds == ["ledger_created", "policy_changed", "request_received", "decision",
                     "round_executed", "round_executed", "round_executed", "job_finished"]
    body = led.entries()[4]["body"]
    assert body["participants"] == PARTS and body["records"] == [R.to_dict()]
    rep = verify(home, key.verify_key)
    assert rep.ok and rep.entries == 8 and rep.warnings == [], rep.problems


def test_policy_changes_are_recorded_with_both_hashes(home, key):
    led = _open(home, key)
    old = led.current_policy()
    new = H.make_policy(max_rounds=4)
    assert led.record_policy(old, who=H.OWNER) is None  # unchanged: no entry
    e = led.record_policy(new, who=H.OWNER)
    assert e["kind"] == "policy_changed"
    assert e["body"]["old_hash"] == old.hash() and e["body"]["new_hash"] == new.hash()
    assert led.current_policy() == new
    # a second process sees it too
    assert Ledger.open(home, key).current_policy() == new


def test_rounds_refused_for_replay_beyond_count_and_undecided_requests(home, key):
    led = _open(home, key)
    f = H.make_facts(rounds=2)
    led.review_and_record(f)
    led.charge_pass(request_id=f.request_id, pass_no=1, records=[R], participants=PARTS)
    with pytest.raises(RoundRefusedError, match="replay"):
        led.charge_pass(request_id=f.request_id, pass_no=1, records=[R], participants=PARTS)
    with pytest.raises(RoundRefusedError, match=r"outside the approved rounds 1..2"):
        led.charge_pass(request_id=f.request_id, pass_no=3, records=[R], participants=PARTS)
    with pytest.raises(RoundRefusedError, match="below the policy minimum"):
        led.charge_pass(request_id=f.request_id, pass_no=2, records=[PrivacyRecord(0.5, 0.05, 20)], participants=PARTS)
    with pytest.raises(PrivacyBudgetError, match="above what was approved"):
        led.charge_pass(request_id=f.request_id, pass_no=2, records=[PrivacyRecord(1.5, 0.05, 200)], participants=PARTS)
    led.finish_job(f.request_id)
    with pytest.raises(RoundRefusedError, match="is finished"):
        led.charge_pass(request_id=f.request_id, pass_no=2, records=[R], participants=PARTS)
    # a request without its decision is pending and cannot run
    g = H.make_facts()
    led.record_request(g)
    assert led.request_status(g.request_id) == "pending"
    with pytest.raises(RoundRefusedError, match="is pending, not approved"):
        led.charge_pass(request_id=g.request_id, pass_no=1, records=[R], participants=PARTS)
    # a denied request cannot run
    h = H.make_facts(n_sites=1)
    assert led.review_and_record(h).status == "denied"
    with pytest.raises(RoundRefusedError, match="is denied"):
        led.charge_pass(request_id=h.request_id, pass_no=1, records=[R], participants=PARTS)
    with pytest.raises(RoundRefusedError, match="never reviewed"):
        led.charge_pass(request_id="nope", pass_no=1, records=[R], participants=PARTS)
    with pytest.raises(LedgerError, match="already in the ledger"):
        led.record_request(g)
    with pytest.raises(LedgerError, match="decisions are final"):
        led.record_decision(h.request_id, decide(policy=led.current_policy(), request=h, spent=SpendSummary()))


def test_approval_with_unshown_warning_is_refused(home, key):
    led = _open(home, key, templates_only=False)
    f = H.make_facts(code_name="mine", code_hash="c" * 64)
    d = led.review_and_record(f)
    assert d.status == "pending_manual"
    from dataclasses import replace

    with pytest.raises(LedgerError, match="must record that they were shown"):
        led.record_decision(f.request_id, replace(d, status="approved", automatic=False))


# -- budgets -------------------------------------------------------------------------------


def test_budget_exhaustion_across_two_jobs(home, key):
    # Prepare: researcher budget 2.0; one 3-round job costs 1.507, two cost 2.042 composed
    led = _open(home, key, researcher_epsilon_budget=2.0, max_epsilon_per_job=2.0)
    job1, job2 = H.make_facts(), H.make_facts()
    _approve_without_committed(led, job1)
    _approve_without_committed(led, job2)  # both approved before either ran
    # Execute
    for r in (1, 2, 3):
        led.charge_pass(request_id=job1.request_id, pass_no=r, records=[R], participants=PARTS)
    led.finish_job(job1.request_id)
    led.charge_pass(request_id=job2.request_id, pass_no=1, records=[R], participants=PARTS)  # 1.702
    led.charge_pass(request_id=job2.request_id, pass_no=2, records=[R], participants=PARTS)  # 1.879
    with pytest.raises(PrivacyBudgetError) as info:
        led.charge_pass(request_id=job2.request_id, pass_no=3, records=[R], participants=PARTS)  # 2.042
    # Assert: refused before running, with the numbers, nothing charged
    msg = str(info.value)
    assert "researcher alice@uni.example" in msg and "2.042" in msg and "now 1.879" in msg and "budget 2" in msg
    assert led.executed_rounds(job2.request_id) == [1, 2]
    assert led.spent_epsilon(researcher=H.ALICE) == pytest.approx(epsilon_of([R] * 5, delta=1e-5))
    # and a third job is denied at review, naming the rule
    d = led.review_and_record(H.make_facts(rounds=1))
    assert d.status == "denied" and d.reasons[0].startswith("privacy.researcher_epsilon_budget")


def test_review_counts_budget_committed_to_approved_jobs(home, key):
    led = _open(home, key, researcher_epsilon_budget=2.0, max_epsilon_per_job=2.0)
    assert led.review_and_record(H.make_facts()).status == "approved"  # not run yet
    d = led.review_and_record(H.make_facts())
    assert d.status == "denied" and "privacy.researcher_epsilon_budget" in d.reasons[0]
    s = led.spend_summary(dataset="nafld", researcher=H.ALICE, include_committed=False)
    assert s.dataset_records == ()


# -- concurrency ---------------------------------------------------------------------------

X = PrivacyRecord(noise_multiplier=2.0, sample_rate=0.1, steps=50)  # 10 fit in 6.1, 11 do not
CONC = dict(max_rounds=10, max_epsilon_per_job=6.1, researcher_epsilon_budget=6.1, dataset_epsilon_budget=6.1)


def _charge_all(home: Path, key_bytes: bytes, request_id: str, out) -> None:
    led = Ledger.open(home, SigningKey.from_bytes(key_bytes))
    ok = 0
    for r in range(1, 11):
        try:
            led.charge_pass(request_id=request_id, pass_no=r, records=[X], participants=PARTS)
            ok += 1
        except PrivacyBudgetError:
            pass
    out.put(ok)


def _concurrent_setup(home, key):
    led = _open(home, key, **CONC)
    jobs = [H.make_facts(researcher=who, rounds=10, records=(X,) * 10) for who in (H.ALICE, H.BOB)]
    for j in jobs:
        _approve_without_committed(led, j)  # together they would spend 20 rounds; 10 fit
    return led, jobs


def _check_no_double_spend(home, key, successes):
    led = Ledger.open(home, key)
    charged = led.spent_records(dataset="nafld")
    assert sum(successes) == len(charged) == 10, successes
    assert epsilon_of(charged, delta=1e-5) <= 6.1
    assert verify(home, key.verify_key).ok


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_two_processes_never_double_spend(home, key):
    # Prepare
    _, jobs = _concurrent_setup(home, key)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_charge_all, args=(home, key.to_bytes(), j.request_id, q)) for j in jobs]
    # Execute
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    # Assert
    assert [p.exitcode for p in procs] == [0, 0]
    _check_no_double_spend(home, key, [q.get(timeout=5) for _ in procs])


def test_threads_sharing_and_not_sharing_an_instance_never_double_spend(home, key):
    led, jobs = _concurrent_setup(home, key)
    other = Ledger.open(home, key)
    results: list[int] = []

    def run(ledger, job):
        ok = 0
        for r in range(1, 11):
            try:
                ledger.charge_pass(request_id=job.request_id, pass_no=r, records=[X], participants=PARTS)
                ok += 1
            except PrivacyBudgetError:
                pass
        results.append(ok)

    threads = [threading.Thread(target=run, args=(led, jobs[0])), threading.Thread(target=run, args=(other, jobs[1]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _check_no_double_spend(home, key, results)


# -- tampering -----------------------------------------------------------------------------


@pytest.fixture
def sealed(tmp_path, key):
    home = tmp_path / "home"
    home.mkdir()
    H.populate(home, key)
    return home


def _lines(home) -> list[bytes]:
    return (home / L.LEDGER_FILE).read_bytes().splitlines(keepends=True)


def _write(home, lines) -> None:
    (home / L.LEDGER_FILE).write_bytes(b"".join(lines))


def _edit_body(line: bytes, rehash: bool) -> bytes:
    e = json.loads(line)
    e["body"]["epsilon_round"] = 0.001
    if rehash:
        e["hash"] = L.entry_hash(e)
    return json.dumps(e).encode() + b"\n"


def _round_line(lines) -> int:
    return next(i for i, ln in enumerate(lines) if b'"round_executed"' in ln)


def tamper_edit(home, key):
    lines = _lines(home)
    i = _round_line(lines)
    lines[i] = _edit_body(lines[i], rehash=False)
    _write(home, lines)
    return "does not match its hash: it was edited"


def tamper_edit_rehashed(home, key):
    lines = _lines(home)
    i = _round_line(lines)
    lines[i] = _edit_body(lines[i], rehash=True)
    _write(home, lines)
    return "no valid signature"


def tamper_delete(home, key):
    lines = _lines(home)
    del lines[_round_line(lines)]
    _write(home, lines)
    return "an entry was deleted"


def tamper_reorder(home, key):
    lines = _lines(home)
    i = _round_line(lines)
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    _write(home, lines)
    return "reordered"


def tamper_truncate(home, key):
    _write(home, _lines(home)[:-2])
    return "the ledger was truncated"


def tamper_truncate_and_delete_head(home, key):
    _write(home, _lines(home)[:-2])
    (home / L.HEAD_FILE).unlink()
    return "ledger.head.json is missing"


def tamper_resign(home, key):
    """Replay every entry into a new ledger signed by another key, and swap it in."""
    evil = SigningKey.generate()
    fake = home.parent / "fake"
    fake.mkdir()
    entries = [json.loads(ln) for ln in _lines(home)]
    led = Ledger.open(fake, evil)
    with led._locked():
        for e in entries[1:]:
            if e["kind"] == "round_executed":
                e["body"]["epsilon_round"] = 0.001
            led._append([(e["kind"], e["body"])])
    for name in (L.LEDGER_FILE, L.HEAD_FILE):
        shutil.copy(fake / name, home / name)
    assert verify(home, evil.verify_key).ok  # self-consistent under the attacker's key
    return "re-signed with another key"


TAMPER = [tamper_edit, tamper_edit_rehashed, tamper_delete, tamper_reorder, tamper_truncate,
          tamper_truncate_and_delete_head, tamper_resign]


@pytest.mark.parametrize("tamper", TAMPER, ids=lambda f: f.__name__)
def test_each_tampering_is_detected(sealed, key, tamper):
    # Prepare
    assert verify(sealed, key.verify_key).ok
    # Execute
    expected = tamper(sealed, key)
    report = verify(sealed, key.verify_key)
    # Assert
    assert not report.ok
    assert any(expected in p for p in report.problems), report.problems
    with pytest.raises(LedgerCorruptError):
        Ledger.open(sealed, key)


def test_rollback_of_ledger_and_head_is_caught_by_expected_count(sealed, key, tmp_path):
    backup = tmp_path / "backup"
    shutil.copytree(sealed, backup)
    n = verify(sealed, key.verify_key).entries
    led = Ledger.open(sealed, key)
    led.record_policy(H.make_policy(max_rounds=3), who=H.OWNER)
    for name in (L.LEDGER_FILE, L.HEAD_FILE):  # roll both back to the older signed state
        shutil.copy(backup / name, sealed / name)
    assert verify(sealed, key.verify_key).ok  # undetectable from the home alone
    rep = verify(sealed, key.verify_key, expected_count=n + 1)
    assert not rep.ok and "fewer than the" in rep.problems[0]


def test_wrong_pinned_key_is_reported(sealed):
    rep = verify(sealed, SigningKey.generate().verify_key)
    assert not rep.ok and any("created for key" in p for p in rep.problems)


# -- crash safety --------------------------------------------------------------------------


def test_torn_last_line_verifies_and_is_recovered(sealed, key):
    # Prepare: a crash left half a line
    before = _lines(sealed)
    with open(sealed / L.LEDGER_FILE, "ab") as f:
        f.write(before[-1][: len(before[-1]) // 2])
    # Execute / Assert: verifies with a warning, nothing acknowledged lost
    rep = verify(sealed, key.verify_key)
    assert rep.ok and "torn append" in rep.warnings[0]
    led = Ledger.open(sealed, key)
    assert _lines(sealed) == before
    assert (sealed / (L.LEDGER_FILE + L.TORN_SUFFIX)).exists()
    assert verify(sealed, key.verify_key).ok and verify(sealed, key.verify_key).warnings == []
    led.record_policy(H.make_policy(max_rounds=4), who=H.OWNER)  # appends continue
    assert verify(sealed, key.verify_key).entries == len(before) + 1


def _crash_during_append(home: Path, key_bytes: bytes, request_id: str, kill_at_write: int, out) -> None:
    """Charge rounds, report each acknowledged seq, and die (SIGKILL) halfway through the
    ledger write number ``kill_at_write``."""
    writes = {"n": 0}
    real_line, real_head = L._write_all, L.atomic_write_bytes

    def die_at(n: int, torn) -> None:
        if n == kill_at_write:
            torn()
            os.kill(os.getpid(), signal.SIGKILL)

    def torn_line(fd, data):  # the ledger line: half of it reaches the file
        writes["n"] += 1
        die_at(writes["n"], lambda: os.write(fd, data[: len(data) // 2]))
        real_line(fd, data)

    def torn_head(path, data, **kw):  # the head: half of its temp file, never renamed
        writes["n"] += 1
        die_at(writes["n"], lambda: Path(path).with_name(f".{Path(path).name}.torn.tmp").write_bytes(data[:9]))
        real_head(path, data, **kw)

    L._write_all, L.atomic_write_bytes = torn_line, torn_head
    led = Ledger.open(home, SigningKey.from_bytes(key_bytes))
    for r in range(1, 6):
        c = led.charge_pass(request_id=request_id, pass_no=r, records=[R], participants=PARTS)
        out.send((c.pass_no, c.seq))  # a Pipe send is synchronous: nothing queued dies with us


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
@pytest.mark.parametrize("kill_at_write", [5, 6], ids=["mid-ledger-line", "mid-head-update"])
def test_process_killed_mid_append_loses_nothing_acknowledged(home, key, kill_at_write):
    # Prepare: a 5-round job; each charge writes the ledger line then the head (2 writes)
    led = _open(home, key, max_rounds=5, max_epsilon_per_job=4.0)
    f = H.make_facts(rounds=5)
    assert led.review_and_record(f).status == "approved"
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    # Execute: write 5 is round 3's ledger line; write 6 is round 3's head update
    p = ctx.Process(target=_crash_during_append, args=(home, key.to_bytes(), f.request_id, kill_at_write, send))
    p.start()
    send.close()
    acked = []
    while recv.poll(60):  # True on data and on EOF (the child died)
        try:
            acked.append(recv.recv())
        except EOFError:
            break
    p.join(60)
    # Assert
    assert p.exitcode == -signal.SIGKILL
    assert [a[0] for a in acked] == [1, 2]
    rep = verify(home, key.verify_key)
    assert rep.ok, rep.problems
    assert rep.warnings  # torn tail, or entries ahead of the head
    again = Ledger.open(home, key)
    assert verify(home, key.verify_key).ok and verify(home, key.verify_key).warnings == []
    by_seq = {e["seq"]: e for e in again.entries()}
    for rnd, seq in acked:
        assert by_seq[seq]["kind"] == "round_executed" and by_seq[seq]["body"]["round"] == rnd
    expected_rounds = [1, 2] if kill_at_write == 5 else [1, 2, 3]  # round 3 was durable before the head
    assert again.executed_rounds(f.request_id) == expected_rounds
    nxt = expected_rounds[-1] + 1
    assert again.charge_pass(request_id=f.request_id, pass_no=nxt, records=[R], participants=PARTS).pass_no == nxt


def test_key_files(home):
    k = load_or_create_key(home)
    assert oct((home / "secrets" / L.KEY_FILE).stat().st_mode & 0o777) == "0o600"
    assert load_or_create_key(home).to_bytes() == k.to_bytes()
    assert read_public_key(home) == k.verify_key


def test_a_denial_without_epsilon_can_be_recorded(home, key):
    """Malformed requests are denied before any epsilon is computed (NaN epsilons)."""
    from fedmtl.datasites.rules.review import Decision

    led = _open(home, key)
    nan = float("nan")
    d = Decision(status="denied", reasons=("the request carries no job spec",), epsilon_job=nan,
                 epsilon_after_dataset=nan, epsilon_after_researcher=nan, budget_left={})
    f = H.make_facts(rounds=0, tasks=())
    led.record_review(f, d)
    st = Ledger.open(home, key).request(f.request_id)
    assert st.status == "denied" and st.decision.reasons == d.reasons
    assert verify(home, key.verify_key).ok


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_mid_entry_records_nothing_and_says_so(home, key, monkeypatch):
    # Prepare: an approved job; the disk fills up halfway through the next ledger line
    led = _open(home, key, max_rounds=3)
    f = H.make_facts(rounds=3)
    assert led.review_and_record(f).status == "approved"
    before = _lines(home)
    real = L._write_all

    def half_then_full(fd, data):
        real(fd, data[: len(data) // 2])
        _enospc()

    monkeypatch.setattr(L, "_write_all", half_then_full)
    # Execute / Assert: the charge fails with the cause named, and nothing was recorded
    with pytest.raises(LedgerError, match="disk is full.*nothing was recorded"):
        led.charge_pass(request_id=f.request_id, pass_no=1, records=[R], participants=PARTS)
    assert _lines(home) == before
    assert led.executed_rounds(f.request_id) == []
    monkeypatch.setattr(L, "_write_all", real)
    # space again: the same pass is charged once, and the ledger verifies
    led.charge_pass(request_id=f.request_id, pass_no=1, records=[R], participants=PARTS)
    assert led.executed_rounds(f.request_id) == [1]
    assert verify(home, key.verify_key).ok


def test_an_entry_whose_head_could_not_be_updated_is_reported_written(home, key, monkeypatch):
    # Prepare: an approved job; the head file cannot be replaced (a full disk)
    led = _open(home, key, max_rounds=3)
    f = H.make_facts(rounds=3)
    assert led.review_and_record(f).status == "approved"
    monkeypatch.setattr(L, "atomic_write_bytes", _enospc)
    # Execute: the charge's entry is durable, its head is not
    charge = led.charge_pass(request_id=f.request_id, pass_no=1, records=[R], participants=PARTS)
    monkeypatch.undo()
    # Assert: reported as written (the entry is the truth); the head is rebuilt from it at
    # the next open, and the ledger verifies
    assert charge.pass_no == 1 and led.executed_rounds(f.request_id) == [1]
    led.close()
    again = Ledger.open(home, key)
    assert again.executed_rounds(f.request_id) == [1]
    head = json.loads((home / L.HEAD_FILE).read_text())
    assert head["seq"] == charge.seq
    assert verify(home, key.verify_key).ok
