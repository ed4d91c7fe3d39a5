"""A job's lifecycle at real datasites: the researcher finishes or aborts it, a site closes
an idle one itself, and the result reports what each site's ledger charged.

Three datasites on loopback (one module-scoped federation), short jobs (2 rounds, a few
local steps). Each test has a researcher of its own, so the reservations it looks at are
its job's alone.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from fedmtl.contract.jobspec import JobSpec
from fedmtl.datasites.ledger import site_ledger
from fedmtl.datasites.ledger.ledger import verify
from fedmtl.datasites.server import admin
from fedmtl.datasites.site import identity
from fedmtl.errors import JobError
from fedmtl.models import model_to_vector
from fedmtl.researcher.job import SyftTransport
from fedmtl.researcher.session import Session

pytestmark = pytest.mark.integration

PW = "researcher-password-1"


@pytest.fixture(scope="module")
def sites(federation):
    """The shared federation (tests/researcher/conftest.py)."""
    return federation


def _session(handles, email: str) -> Session:
    for h in handles:
        admin.add_researcher(home=h.home, email=email, password=PW)
    return Session.connect([{"url": h.url, "email": email, "password": PW} for h in handles])


def _approved_job(handles, tmp_path, email: str):
    spec = JobSpec(name="life", tasks=[{"label": "diabetes_5y"}, {"label": "dyslipidemia_5y"}], rounds=2,
                   local_steps=2, sample_rate=0.02, lr=0.5, noise_multiplier=1.0,
                   secagg={"threshold": 2, "clip": 1.0}, scaling="range")
    job = _session(handles, email).submit(spec, out=tmp_path / "job")
    status = job.wait_for_review(timeout=60)
    assert {v["status"] for v in status.values()} == {"approved"}, status
    return job


def _state(h, job_id: str):
    return site_ledger.open_ledger(h.home).request(job_id)


def _entries(h, job_id: str, *kinds: str) -> list[dict]:
    return [e for e in site_ledger.open_ledger(h.home).entries()
            if e["kind"] in kinds and e["body"].get("request_id") == job_id]


def _assert_verified(handles) -> None:
    for h in handles:
        report = verify(h.home, identity.load_public(h.home).verify_key)
        assert report.ok, (h.name, report.problems)


def _reserved(job) -> dict[str, float]:
    """Each site's reserved epsilon for the job's researcher, from their spend view."""
    out = {}
    for site, view in job.spend().items():
        (value,) = view["epsilon_reserved"].values()
        out[site] = value
    return out


def test_finish_after_pass_one_closes_the_job_releases_its_reservation_and_refuses_later_passes(sites, tmp_path):
    # Prepare: an approved 2-round job (3 passes) holds its unspent passes in reserve
    job = _approved_job(sites, tmp_path, "finisher@uni.example")
    assert all(v > 0 for v in _reserved(job).values())
    # Execute: one pass, then finish
    job.run(progress=False, passes=1)
    charged_before = {h.name: len(_state(h, job.job_id).records) for h in sites}
    closed = job.finish(reason="enough for today")
    # Assert: each site recorded job_finished once (by the researcher, with the reason)
    for h in sites:
        assert closed[h.name]["status"] == "finished" and closed[h.name]["closed_now"] is True, closed
        assert closed[h.name]["passes_charged"] == [1] and closed[h.name]["passes_reserved"] == 0
        (entry,) = _entries(h, job.job_id, "job_finished", "job_aborted")
        assert entry["kind"] == "job_finished"
        assert entry["body"]["by"] == "researcher" and entry["body"]["reason"] == "enough for today"
    # nothing reserved any more, in the spend view and in the ledger's own state
    assert _reserved(job) == {h.name: 0.0 for h in sites}
    assert all(_state(h, job.job_id).reserved_records() == [] for h in sites)
    # a later pass is refused at every site, over the data plane and over syft, without a charge
    w = np.zeros(model_to_vector(job.model).size, dtype=np.float32)
    advertise = {"stage": "advertise", "pass": 2, "attempt": 0, "weights": w}
    for h in sites:
        reply = job.transport().call(h.name, advertise)
        assert reply["ok"] is False, (h.name, reply)
    reply = SyftTransport(job.session, job.state["func_name"]).call(sites[0].name, advertise)
    assert reply["ok"] is False and "finished" in reply["error"], reply
    assert {h.name: len(_state(h, job.job_id).records) for h in sites} == charged_before
    # closing again returns the job's state: no second entry, no error
    again = job.finish()
    for h in sites:
        assert again[h.name]["status"] == "finished" and again[h.name]["closed_now"] is False
        assert len(_entries(h, job.job_id, "job_finished", "job_aborted")) == 1
    # the result reports what each site's ledger charged, and that every site took part in pass 1
    result = job.result()
    for h in sites:
        assert result.epsilon[h.name] == _state(h, job.job_id).epsilon_charged
        assert result.epsilon_source[h.name] == "ledger"
        assert result.site_passes[h.name] == [1]
    assert "read back from each site's ledger" in str(result)
    _assert_verified(sites)


def test_abort_over_both_transports_is_recorded_and_nothing_runs_or_stays_reserved(sites, tmp_path):
    # Prepare: an approved job, never run
    job = _approved_job(sites, tmp_path, "aborter@uni.example")
    first = sites[0].name
    # Execute: one site is asked over syft, then the job aborts everywhere (the default transport)
    syft = SyftTransport(job.session, job.state["func_name"])
    reply = syft.call(first, {"stage": "close", "action": "abort", "reason": "wrong cohort"})
    closed = job.abort(reason="wrong cohort")
    # Assert
    assert reply["ok"] is True and reply["view"]["status"] == "aborted" and reply["view"]["closed_now"] is True
    assert closed[first]["closed_now"] is False  # syft closed it already: its state comes back
    for h in sites:
        assert closed[h.name]["status"] == "aborted" and closed[h.name]["passes_charged"] == []
        (entry,) = _entries(h, job.job_id, "job_finished", "job_aborted")
        assert entry["kind"] == "job_aborted" and entry["body"]["reason"] == "wrong cohort"
    assert _reserved(job) == {h.name: 0.0 for h in sites}
    # pass 1 is refused now, and nothing was charged
    w = np.zeros(model_to_vector(job.model).size, dtype=np.float32)
    for h in sites:
        reply = job.transport().call(h.name, {"stage": "advertise", "pass": 1, "attempt": 0, "weights": w})
        assert reply["ok"] is False
        assert _state(h, job.job_id).records == [] and _entries(h, job.job_id, "round_executed") == []
    # a malformed close is refused before anything is sent
    with pytest.raises(JobError, match="at most 500"):
        job.abort(reason="x" * 501)
    _assert_verified(sites)


def test_a_site_closes_an_idle_job_itself_and_releases_its_reservation(sites, tmp_path):
    # Prepare: an approved job with no pass; every site's policy closes jobs idle for 1 s
    # (recorded in the ledger as an owner's policy change). Runs last: every approved job
    # of this module is idle by then.
    job = _approved_job(sites, tmp_path, "idler@uni.example")
    before = {h.name: site_ledger.current_policy(h.home) for h in sites}
    try:
        for h in sites:
            site_ledger.install_policy(h.home, dataclasses.replace(before[h.name], job_idle_close_s=1),
                                       who="owner (test)")
        # Execute: wait for the sites' background thread (it checks at every poll, 1-3 s)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(_state(h, job.job_id).status == "approved" for h in sites):
            time.sleep(0.5)
    finally:
        for h in sites:
            site_ledger.install_policy(h.home, before[h.name], who="owner (test)")
    # Assert: each site aborted it, saying why, and nothing stays reserved
    for h in sites:
        assert _state(h, job.job_id).status == "aborted", h.name
        (entry,) = _entries(h, job.job_id, "job_finished", "job_aborted")
        assert entry["kind"] == "job_aborted" and entry["body"]["by"] == "datasite"
        assert entry["body"]["reason"].startswith("idle") and "limits.job_idle_close_s" in entry["body"]["reason"]
    assert _reserved(job) == {h.name: 0.0 for h in sites}
    # the researcher closing it afterwards gets its state, not an error
    closed = job.finish()
    assert {r["status"] for r in closed.values()} == {"aborted"}
    _assert_verified(sites)
