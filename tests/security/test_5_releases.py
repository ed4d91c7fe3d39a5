"""Attack class 5 — releases outside DP: "nothing per-site leaves outside secure
aggregation; nothing leaves outside the accounted budget".

A legit job runs through the library (every pass, every stage) with a transport that
records every reply. The ``advertise`` replies must carry no per-site loss, counts,
split sizes or per-site metrics; and each datasite's ledger must hold the charge of an
evaluation release (a privacy record at sample rate 1.0: the Gaussian mechanism on the
test statistics) BEFORE the site hands out the masked statistics of that pass.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import security_kit as K

from fedmtl.researcher.job import SyftTransport

pytestmark = pytest.mark.integration


def _eval_charges(home, job_id: str) -> int:
    """Evaluation releases charged to ``job_id`` in the site's ledger (records at sample
    rate 1.0, counted by steps)."""
    st = K.site_ledger().open_ledger(home).request(job_id)
    if st is None:
        return 0
    return int(sum(r.steps for r in st.records if float(r.sample_rate) == 1.0))


class Recorder(SyftTransport):
    """SyftTransport that keeps every reply, and checks each site's ledger at the moment
    the site hands out a pass's masked statistics."""

    def __init__(self, session, func_name: str, *, homes: dict, job_id: str, eval_passes: set[int]):
        super().__init__(session, func_name)
        self.homes, self.job_id, self.eval_passes = homes, job_id, eval_passes
        self.stats_passes: set[int] = set()
        self.replies: list[tuple[str, str, int | None, dict]] = []
        self.uncharged: list[str] = []
        self._lock = threading.Lock()

    def call(self, site, message):
        reply = super().call(site, message)
        stage, p = message.get("stage"), message.get("pass")
        with self._lock:
            self.replies.append((site, stage, p, reply))
            if stage == "masked_input" and reply.get("ok") and p in self.eval_passes:
                # every full-sample release up to this pass: the statistics pass of
                # standard scaling (if any) and each evaluation release
                need = sum(1 for q in self.eval_passes if q <= p) + sum(1 for q in self.stats_passes if q <= p)
                have = _eval_charges(self.homes[site], self.job_id)
                if have < need:
                    self.uncharged.append(
                        f"{site} pass {p}: released masked evaluation statistics with {have} evaluation "
                        f"charge(s) in its ledger, {need} needed"
                    )
        return reply


@pytest.fixture(scope="module")
def finished_job(federation):
    email = federation.researcher("release")
    session = federation.session(email)
    job = federation.job(K.legit_spec(name="release"), email=email)
    job.submit()
    status = job.wait_for_review(timeout=K.DECISION_TIMEOUT)
    assert {v["status"] for v in status.values()} == {"approved"}, f"the legit job was not approved: {status}"
    spec = next(iter(job.site_specs.values()))
    passes = range(1, K.protocol().last_pass(job.spec) + 1)
    plans = {p: K.protocol().plan(spec, p, model=job.model) for p in passes}
    eval_passes = {p for p in passes if plans[p].evaluate}
    recorder = Recorder(session, job.state["func_name"], homes={n: h.home for n, h in federation.handles.items()},
                        job_id=job.job_id, eval_passes=eval_passes)
    recorder.stats_passes = {p for p in passes if getattr(plans[p], "stats", False)}
    result = job.run(progress=False, transport=recorder)
    return job, recorder, result, eval_passes


def test_the_legit_job_ran_every_pass(finished_job):
    job, recorder, result, _ = finished_job
    failed = [(s, st, p, r.get("error")) for s, st, p, r in recorder.replies if not r.get("ok")]
    assert not failed, f"some calls of the legit job failed: {failed}"
    assert result.rounds_done == int(job.spec.rounds)
    assert result.metrics, "the job released no (securely aggregated) evaluation"
    assert np.all(np.isfinite(result.global_vector))


def test_advertise_replies_carry_no_per_site_figures(finished_job):
    _, recorder, _, _ = finished_job
    adverts = [(s, p, r) for s, st, p, r in recorder.replies if st == "advertise"]
    assert adverts, "no advertise reply was recorded"
    leaks = [f"{s} pass {p}: {k}" for s, p, r in adverts for k in K.forbidden_keys(r)]
    assert not leaks, f"per-site figures outside secure aggregation: {leaks}"


def test_no_reply_of_any_stage_carries_per_site_figures(finished_job):
    _, recorder, _, _ = finished_job
    leaks = [f"{s} {st} pass {p}: {k}" for s, st, p, r in recorder.replies for k in K.forbidden_keys(r)]
    assert not leaks, f"per-site figures outside secure aggregation: {leaks}"


def test_evaluation_release_is_charged_before_it_is_released(finished_job):
    _, recorder, _, eval_passes = finished_job
    assert eval_passes, "the legit job evaluates no pass (the final evaluation is always released)"
    assert not recorder.uncharged, "evaluation statistics released before being charged: " + "; ".join(
        recorder.uncharged
    )


def test_every_ledger_charges_the_final_evaluation(finished_job, federation):
    job, _, _, eval_passes = finished_job
    for name, h in federation.handles.items():
        led = K.site_ledger().open_ledger(h.home)
        st = led.request(job.job_id)
        assert st is not None, f"{name}'s ledger does not know job {job.job_id}"
        evals = [r for r in st.records if float(r.sample_rate) == 1.0]
        assert evals, (
            f"{name}'s ledger charged job {job.job_id} no evaluation release (no record at sample_rate "
            f"1.0); charged records: {[r.to_dict() for r in st.records]}"
        )
        stats = 1 if job.spec.stats_pass else 0
        assert sum(r.steps for r in evals) >= len(eval_passes) + stats, (name, [r.to_dict() for r in evals])
        assert led.request_status(job.job_id) == "finished", name
