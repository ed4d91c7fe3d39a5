"""Attack class 12 — closing someone else's job: "only the researcher whose job a site
approved can finish or abort it there, and a closed job is never run or charged again".

A ``close`` request (``{"stage": "close", "action": "finish" | "abort", "reason"}``) writes
``job_finished`` / ``job_aborted`` to the site's ledger. An attacker who closes a victim's
job wastes the victim's approval (and its secure-aggregation round for everyone). The
attacker holds: their own researcher account and approved job (and its data-plane key),
the victim's site spec and job id (suppose it leaked), raw HTTP and the raw syft client.
Each attack fails if the victim's job is no longer ``approved`` in any site's ledger.
Once the victim has closed it, a stranger's request for it is refused on its signature like
one for an open job: only the job's own key holder is told it is closed
(``JobClosedRefused``), which is how a researcher who died after the last pass learns it.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import security_kit as K

pytestmark = pytest.mark.integration

CLOSE = {"stage": "close", "action": "abort", "reason": "closed by someone else"}


def _post(url: str, spec: dict, message: dict, key) -> dict:
    from fedmtl.contract import wire
    from fedmtl.datasites.server.dataplane import ROUND_PATH

    env = wire.Envelope(job_id=str(spec["job_id"]), site=str(spec["site"]), seq=time.time_ns(), spec=spec,
                        message=message)
    req = wire.sign_request(env, key)
    r = httpx.post(url.rstrip("/") + ROUND_PATH, content=req.body, timeout=120,
                   headers={"content-type": "application/x-fedmtl", **req.headers()})
    return wire.decode(r.content)


def _closings(home, job_id: str) -> list[dict]:
    return [e for e in K.site_ledger().open_ledger(home).entries()
            if e["kind"] in ("job_finished", "job_aborted") and e["body"].get("request_id") == job_id]


def _assert_still_open(federation, job) -> None:
    for name, h in federation.handles.items():
        st = K.site_ledger().open_ledger(h.home).request(job.job_id)
        assert st.status == "approved", f"ATTACK SUCCEEDED: the victim's job is {st.status} at {name}"
        assert _closings(h.home, job.job_id) == [], f"ATTACK SUCCEEDED: {name}'s ledger closed the victim's job"


@pytest.fixture(scope="module")
def jobs(federation):
    """The victim's approved job and the attacker's own approved job (with its key)."""
    from fedmtl.researcher.dataplane_client import load_or_create_key

    out = {}
    for who in ("victim", "closer"):
        job = federation.job(K.legit_spec(name=f"close-{who}"), email=federation.researcher(f"close {who}"))
        job.submit()
        out[who] = job
    for who, job in out.items():
        status = job.wait_for_review(timeout=K.DECISION_TIMEOUT)
        assert {v["status"] for v in status.values()} == {"approved"}, (who, status)
    return out["victim"], out["closer"], load_or_create_key(out["closer"].out / "secrets")


def test_a_close_signed_with_another_jobs_key_is_refused(federation, jobs):
    # Prepare: the victim's spec (leaked), the attacker's own approved job's key
    victim, _, attacker_key = jobs
    # Execute: the victim's spec and job id, signed with the attacker's key, at every site
    replies = {name: _post(h.url, victim.site_specs[name], CLOSE, attacker_key)
               for name, h in federation.handles.items()}
    # Assert
    for name, reply in replies.items():
        assert reply.get("ok") is not True, f"ATTACK SUCCEEDED at {name}: {reply}"
        assert "signature" in str(reply.get("error", "")).lower(), reply
    _assert_still_open(federation, victim)


def test_the_attackers_own_job_cannot_close_the_victims(federation, jobs):
    # Prepare
    victim, closer, attacker_key = jobs
    site, h = next(iter(federation.handles.items()))
    spec = dict(closer.site_specs[site])
    # Execute: the attacker's own approved spec, its job id swapped for the victim's
    spec["job_id"] = victim.job_id
    reply = _post(h.url, spec, CLOSE, attacker_key)
    # ... and the attacker's own approved syft code, asked to close (it can only name its own job)
    from fedmtl.researcher.job import SyftTransport

    own = SyftTransport(closer.session, closer.state["func_name"]).call(site, {**CLOSE, "job_id": victim.job_id})
    # Assert
    assert reply.get("ok") is not True, f"ATTACK SUCCEEDED: {reply}"
    _assert_still_open(federation, victim)
    assert own.get("ok") is True and own["view"]["job_id"] == closer.job_id  # the attacker's own job only
    assert _closings(h.home, closer.job_id)


def test_the_victims_code_is_not_callable_and_a_copy_of_its_request_is_denied(federation, jobs):
    # Prepare
    victim, closer, _ = jobs
    site = next(iter(federation.handles))
    attacker = federation.researcher("close closer")  # the email of the closer's own account
    # Execute: call the victim's approved function by its name from the attacker's client ...
    from fedmtl.researcher.job import SyftTransport

    direct = SyftTransport(closer.session, victim.state["func_name"]).call(site, CLOSE)
    # ... and submit the template with the victim's exact spec (its job id) as the attacker's own
    sub = federation.forge("copy of the victim's request", site, dict(victim.site_specs[site]),
                           victim.state["func_name"] + "_copy", email=attacker)
    decision = federation.wait(sub)
    # Assert
    assert direct.get("ok") is not True, f"ATTACK SUCCEEDED: the victim's code ran for the attacker: {direct}"
    assert decision.status != "APPROVED", "ATTACK SUCCEEDED: a copy of the victim's request was approved"
    if sub.submitted:
        out = K._resolve(federation.try_execute(sub, message=CLOSE))
        assert not (isinstance(out, dict) and out.get("ok") is True), f"ATTACK SUCCEEDED: {out}"
    _assert_still_open(federation, victim)


def test_a_closed_job_is_never_run_charged_or_reopened(federation, jobs):
    # Prepare: the victim finishes their own job (after the attacks above failed)
    victim, _, _ = jobs
    closed = victim.finish(reason="done")
    assert {r["status"] for r in closed.values()} == {"finished"}, closed
    w = np.zeros(federation.model_size(next(iter(victim.site_specs.values()))), dtype=np.float32)
    # Execute: pass 1 over the data plane, and a second close
    replies = {name: victim.transport().call(name, {"stage": "advertise", "pass": 1, "attempt": 0, "weights": w})
               for name in federation.handles}
    again = victim.abort(reason="reopen?")
    # Assert: refused, uncharged; the second close changes nothing (still finished, one entry)
    for name, h in federation.handles.items():
        assert replies[name].get("ok") is not True, f"ATTACK SUCCEEDED: a closed job ran at {name}"
        st = K.site_ledger().open_ledger(h.home).request(victim.job_id)
        assert st.records == [], f"ATTACK SUCCEEDED: a closed job was charged at {name}"
        assert st.status == "finished" and again[name]["status"] == "finished"
        assert len(_closings(h.home, victim.job_id)) == 1


def test_only_the_jobs_own_key_learns_that_it_is_closed(federation, jobs):
    # Prepare: the victim's job, finished (by the test above, or here); the attacker holds
    # the victim's spec and job id and its own approved job's key
    victim, _, attacker_key = jobs
    if K.site_ledger().open_ledger(next(iter(federation.handles.values())).home).request(
            victim.job_id).status == "approved":
        victim.finish(reason="done")
    w = np.zeros(federation.model_size(next(iter(victim.site_specs.values()))), dtype=np.float32)
    from fedmtl.researcher.dataplane_client import load_or_create_key

    own_key = load_or_create_key(victim.out / "secrets")
    last = victim.spec.schedule.last_pass
    for name, h in federation.handles.items():
        spec = victim.site_specs[name]
        before = K.site_ledger().open_ledger(h.home).request(victim.job_id).records
        for p in (1, last):
            msg = {"stage": "advertise", "pass": p, "attempt": 0, "weights": w}
            # Execute: the same pass message, signed by a stranger's key and by the job's own
            stranger = _post(h.url, spec, msg, attacker_key)
            owner = _post(h.url, spec, msg, own_key)
            # Assert: the stranger is refused on the signature, as for an open job, and learns
            # nothing of the job's state; its owner is told the job is closed; nothing ran or was charged
            assert stranger.get("ok") is not True and owner.get("ok") is not True, f"ATTACK SUCCEEDED at {name}"
            assert "signature" in str(stranger.get("error", "")).lower(), stranger
            assert stranger.get("kind") == "DataPlaneRefused" and "finished" not in str(stranger), \
                f"ATTACK SUCCEEDED: a stranger learnt that the job is closed at {name}: {stranger}"
            assert owner.get("kind") == "JobClosedRefused" and "finished" in str(owner.get("error")), owner
        after = K.site_ledger().open_ledger(h.home).request(victim.job_id)
        assert after.status == "finished" and after.records == before, \
            f"ATTACK SUCCEEDED: the closed job was run or charged at {name}"
