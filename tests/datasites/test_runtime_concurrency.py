"""The round runtime shares one datasite process between jobs: a job's own calls run one
at a time (its state file is read, changed and written by one call at a time), while no
lock spans jobs and queries never wait for a training (datasites/runtime.py ``handle``).

The runtime runs here in process on the demo cohort, in dry-run homes (no ledger), as
``Job.dry_run`` runs it. Every check is about ordering and state, never about time.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from fedmtl.contract.jobspec import JobSpec
from fedmtl.datasites import runtime as rt
from fedmtl.models import model_to_vector
from fedmtl.researcher.job import Job
from fedmtl.researcher.session import Session
from fedmtl.researcher.simulate import LocalSite


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from fedmtl.datasites.data.cohort import prepare
    from fedmtl.datasites.data.records import load_records
    from fedmtl.schema import Schema

    files = prepare(tmp_path_factory.mktemp("cohort"), sites=3, seed=0)
    schema = Schema.load(files[0].schema)
    return schema, {f.name: load_records(f.records, schema) for f in files}


@pytest.fixture
def jobs(cohort, tmp_path):
    """Three dry-run homes (registered with the runtime) and a factory of jobs over them:
    ``make(name) -> (site specs, initial weights)``."""
    schema, data = cohort
    sites = {n: LocalSite(n, df, schema, tmp_path / "homes" / n) for n, df in data.items()}
    session = Session(sites)

    def make(name: str, **overrides):
        kw = dict(name=name, tasks=[{"label": "diabetes_5y"}, {"label": "htn_5y"}], rounds=1, local_steps=40,
                  sample_rate=0.2, noise_multiplier=1.0, secagg={"threshold": 2, "clip": 1.0}, scaling="range")
        kw.update(overrides)
        job = Job.create(session, JobSpec(**kw), out=tmp_path / "jobs" / name)
        return job.site_specs, model_to_vector(job.model).astype(np.float32)

    try:
        yield sites, data, make
    finally:
        for n in sites:
            rt.unregister_home(n)


def _advertise(weights: np.ndarray, attempt: int = 0) -> dict:
    return {"stage": "advertise", "pass": 1, "attempt": attempt, "weights": weights}


def _in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run():
        box["reply"] = fn(*args, **kwargs)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def _wait_until(cond, what: str) -> None:
    """Poll ``cond`` (a generous bound, only so a broken runtime fails instead of hanging)."""
    ev = threading.Event()
    for _ in range(6000):
        if cond():
            return
        ev.wait(0.01)
    raise AssertionError(f"never happened: {what}")


def test_a_replayed_advertise_sent_concurrently_succeeds_once(jobs, monkeypatch):
    # Prepare: one job; two identical advertise calls released at the same moment, with
    # room for both in the heavy pool (only the job's own lock may keep them apart)
    sites, data, make = jobs
    monkeypatch.setattr(rt, "_HEAVY_POOL", threading.BoundedSemaphore(2))
    specs, w = make("replay")
    site = "st-mary"
    start = threading.Barrier(2)

    def call():
        start.wait()
        return rt.handle(data=data[site], spec=specs[site], message=_advertise(w))

    # Execute
    threads = [_in_thread(call) for _ in range(2)]
    for t, _ in threads:
        t.join()
    replies = [box["reply"] for _, box in threads]

    # Assert: one trained and advertised; the other saw the first one's state and was refused
    ok = [r for r in replies if r.get("ok")]
    refused = [r for r in replies if not r.get("ok")]
    assert len(ok) == 1 and len(refused) == 1, replies
    assert "already started" in refused[0]["error"], refused[0]
    state = (Path(sites[site].home) / "jobs" / specs[site]["job_id"] / "state.json").read_text()
    assert '"attempt": 0' in state and '"pass": 1' in state


def test_a_job_waits_for_its_own_lock_and_for_nobody_elses(jobs):
    # Prepare: job A's lock is held (as by a long training of A)
    sites, data, make = jobs
    specs_a, w_a = make("held")
    specs_b, w_b = make("free")
    site = "general"
    home = sites[site].home
    job_a = specs_a[site]["job_id"]
    key = (str(home), job_a)

    with rt.job_lock(home, job_a):
        # Execute: A's next stage queues behind the holder
        t_a, box_a = _in_thread(rt.handle, data=data[site], spec=specs_a[site], message=_advertise(w_a))
        _wait_until(lambda: key in rt._JOB_LOCKS and rt._JOB_LOCKS[key].users == 2, "A's call waiting on A's lock")
        # another job trains and advertises while A's lock is held
        reply_b = rt.handle(data=data[site], spec=specs_b[site], message=_advertise(w_b))
        # and a query of A itself is answered (queries are read-only: no job lock)
        spend_a = rt.handle(data=None, spec=specs_a[site], message={"stage": "spend"})

        # Assert (while A's lock is still held)
        assert reply_b.get("ok") is True, reply_b
        assert spend_a.get("ok") is True, spend_a
        assert t_a.is_alive() and "reply" not in box_a

    t_a.join()
    assert box_a["reply"].get("ok") is True, box_a["reply"]
    assert key not in rt._JOB_LOCKS  # the registry forgets a lock nobody holds


def test_light_stages_and_queries_never_wait_for_a_heavy_slot(jobs):
    # Prepare: every heavy slot is taken (as by trainings of other jobs)
    sites, data, make = jobs
    specs, w = make("light")
    site = "riverside"
    pool = rt._heavy_pool()
    slots = rt.heavy_slots()
    for _ in range(slots):
        assert pool.acquire(blocking=False)
    try:
        # Execute: a query, and a light stage (refused: it comes before its advertise)
        spend = rt.handle(data=None, spec=specs[site], message={"stage": "spend"})
        early = rt.handle(data=None, spec=specs[site], message={"stage": "unmask", "pass": 1, "request": {}})
        # a heavy stage queues for a slot
        t, box = _in_thread(rt.handle, data=data[site], spec=specs[site], message=_advertise(w))

        # Assert
        assert spend.get("ok") is True, spend
        assert early.get("ok") is False and "before its 'advertise' stage" in early["error"], early
        assert t.is_alive() and "reply" not in box
    finally:
        for _ in range(slots):
            pool.release()
    t.join()
    assert box["reply"].get("ok") is True, box["reply"]


def test_heavy_slots_follow_the_environment(monkeypatch):
    monkeypatch.setenv(rt.HEAVY_SLOTS_ENV, "3")
    assert rt.heavy_slots() == 3
    monkeypatch.setenv(rt.HEAVY_SLOTS_ENV, "zero")
    assert rt.heavy_slots() >= 1
