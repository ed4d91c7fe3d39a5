"""A datasite that goes down comes back into a running job, and a job goes on (or refuses,
naming it) without a site that is down.

Three datasites on loopback (one module-scoped federation), short jobs (3 rounds, 2 local
steps). Each test has a researcher of its own. The site-down test stops a site and
relaunches it at its end.
"""

from __future__ import annotations

import threading

import pytest

from fedmtl.contract.jobspec import JobSpec
from fedmtl.datasites.ledger import site_ledger
from fedmtl.datasites.ledger.ledger import verify
from fedmtl.datasites.server import admin
from fedmtl.datasites.server.launch import free_port, launch
from fedmtl.datasites.site import identity
from fedmtl.errors import DatasiteError, JobError
from fedmtl.researcher.checkpoint import CheckpointStore
from fedmtl.researcher.job import Job
from fedmtl.researcher.session import Session

pytestmark = pytest.mark.integration

PW = "researcher-password-1"


@pytest.fixture(scope="module")
def sites(federation):
    """The shared federation (tests/researcher/conftest.py)."""
    return federation


def _entries(handles, email: str) -> list[dict]:
    for h in handles:
        admin.add_researcher(home=h.home, email=email, password=PW)
    return [{"url": h.url, "email": email, "password": PW, "name": h.name} for h in handles]


def _spec(threshold: int, rounds: int = 3) -> JobSpec:
    return JobSpec(name="rejoin", tasks=[{"label": "diabetes_5y"}], rounds=rounds, local_steps=2, sample_rate=0.02,
                   lr=0.5, noise_multiplier=1.0, secagg={"threshold": threshold, "clip": 1.0}, scaling="range")


def _approved_job(session: Session, spec: JobSpec, out) -> Job:
    job = session.submit(spec, out=out)
    status = job.wait_for_review(timeout=60)
    assert {v["status"] for v in status.values()} == {"approved"}, status
    return job


def _ledger_state(h, job_id: str):
    return site_ledger.open_ledger(h.home).request(job_id)


def _assert_verified(handles) -> None:
    for h in handles:
        report = verify(h.home, identity.load_public(h.home).verify_key)
        assert report.ok, (h.name, report.problems)


def _assert_result_is_the_ledgers(job: Job, result, handles) -> None:
    """Each site's charged epsilon, read back from its ledger, is what the result reports;
    the passes its ledger charged are the passes the result says it took part in."""
    for h in handles:
        state = _ledger_state(h, job.job_id)
        assert result.epsilon_source[h.name] == "ledger", result.epsilon_source
        assert result.epsilon[h.name] == state.epsilon_charged, (h.name, result.epsilon, state.epsilon_charged)
        assert sorted(state.rounds) == result.site_passes[h.name], (h.name, state.rounds, result.site_passes)


def test_a_site_killed_mid_job_and_relaunched_rejoins_and_is_not_charged_for_what_it_missed(sites, tmp_path):
    # Prepare: an approved 3-round job (4 passes) that ran 2 passes at every site
    session = Session.connect(_entries(sites, "rejoiner@uni.example"))
    job = _approved_job(session, _spec(threshold=2), tmp_path / "job")
    last = job.spec.schedule.last_pass
    assert last >= 4
    job.run(progress=False, passes=2)
    victim = sites[1]
    index = sites.index(victim)
    # Execute: SIGKILL the victim; relaunch it with its home only once the job waits for it
    # (so it is down for pass 3, and the job, not the test, does the waiting)
    victim._process.kill()
    victim._process.wait()
    lines: list[str] = []
    relaunched = threading.Event()
    started: list[str] = []

    def relaunch() -> None:
        sites[index] = launch(home=victim.home, port=victim.port)
        relaunched.set()

    def log(line: str) -> None:
        lines.append(line)
        if "waiting up to" in line and victim.name in line and not started:
            started.append(line)
            threading.Thread(target=relaunch, daemon=True).start()

    result = job.run(progress=False, rejoin_wait=120.0, log=log)
    # Assert: it missed pass 3 (down before it) and took part again from pass 4 on
    assert relaunched.is_set(), lines
    assert result.site_passes[victim.name] == [1, 2] + list(range(4, last + 1)), (result.site_passes, lines)
    for h in sites:
        if h.name != victim.name:
            assert result.site_passes[h.name] == list(range(1, last + 1))
    assert any(f"{victim.name} answers again and rejoins at pass 4" in line for line in lines), lines
    history = CheckpointStore(job.out / "checkpoints").latest(spec_hash=job.state["spec_hash"]).metrics
    (pass3,) = [r for r in history if r["pass"] == 3]
    assert victim.name in pass3["dropped"] and victim.name not in pass3["survivors"], pass3
    assert "missed 3" in str(result), str(result)
    # its ledger charged only the passes it ran, and the result says what each ledger charged
    assert 3 not in _ledger_state(sites[index], job.job_id).rounds
    _assert_result_is_the_ledgers(job, result, sites)
    others = [result.epsilon[h.name] for h in sites if h.name != victim.name]
    assert result.epsilon[victim.name] < min(others)
    charged = job.charged()
    assert {s: row["epsilon"] for s, row in charged.items()} == result.epsilon
    _assert_verified(sites)


def test_resume_with_a_site_down_goes_on_when_the_threshold_allows_and_refuses_naming_it_when_not(
        sites, tmp_path):
    # Prepare: an approved 2-round job (threshold 2 of the 3 sites) that ran one pass, and a
    # job with threshold 3 written to its folder. Then one site stops.
    entries = _entries(sites, "resumer@uni.example")
    session = Session.connect(entries)
    lenient = _approved_job(session, _spec(threshold=2, rounds=2), tmp_path / "lenient")
    session.job(_spec(threshold=3, rounds=2), out=tmp_path / "strict").claim()
    lenient.run(progress=False, passes=1)
    down = sites[2]
    down.stop()
    # Execute: connect again (a new researcher process) and resume both
    lines: list[str] = []
    session = Session.connect(entries, log=lines.append)
    assert sorted(session.sites) == sorted(h.name for h in sites if h is not down)
    assert list(session.down) == [down.name] and any(down.name in line for line in lines), lines
    resumed = Job.resume(session, tmp_path / "lenient", log=lines.append)
    assert any(f"down: {down.name}" in line and "threshold 2" in line for line in lines), lines
    result = resumed.run(progress=False, rejoin_wait=0, log=lines.append)
    with pytest.raises(JobError, match=rf"{down.name}.*threshold 3"):
        Job.resume(session, tmp_path / "strict")
    # Assert: the lenient job ran its remaining passes with the two others
    last = lenient.spec.schedule.last_pass
    assert result.site_passes[down.name] == [1]
    for h in sites:
        if h is not down:
            assert result.site_passes[h.name] == list(range(1, last + 1))
    assert resumed.status()[down.name]["status"] == "down"
    assert any(f"without {down.name}" in line and "rejoin_wait=0" in line for line in lines), lines
    # the down site's ledger charged pass 1 only (its figure as read back after that pass),
    # the others' charges are read back at the end
    assert sorted(_ledger_state(down, lenient.job_id).rounds) == [1]
    _assert_result_is_the_ledgers(resumed, result, sites)
    up = [h for h in sites if h is not down]
    # a new job needs every site to review it; a down site stays down until it answers
    with pytest.raises(JobError, match=rf"every site of its roster.*{down.name} is down"):
        session.job(_spec(threshold=2), out=tmp_path / "new")
    with pytest.raises(DatasiteError, match="cannot reach"):
        session.reconnect(down.name)
    assert down.name in session.down
    # nobody answers: connect refuses, naming the sites
    nowhere = [{"url": f"http://127.0.0.1:{free_port()}", "email": "x@y.z", "password": PW, "name": "ghost"}]
    with pytest.raises(DatasiteError, match="no datasite answered: ghost"):
        Session.connect(nowhere)
    _assert_verified(up)
    # the down site comes back: the job's last pass ran without it, so it never closed the job;
    # running the job again (no pass left) finishes it there and nothing stays reserved for it
    back = launch(home=down.home, port=down.port)
    sites[sites.index(down)] = back
    session.reconnect(down.name)
    lines.clear()
    again = resumed.run(progress=False, rejoin_wait=0, log=lines.append)
    assert _ledger_state(back, lenient.job_id).status == "finished"
    assert any(f"{down.name} missed the last pass; closed there (finished)" in line for line in lines), lines
    (reserved,) = resumed.spend()[down.name]["epsilon_reserved"].values()
    assert reserved == 0.0
    assert again.site_passes[down.name] == [1]
    _assert_result_is_the_ledgers(resumed, again, sites)
    _assert_verified(sites)
