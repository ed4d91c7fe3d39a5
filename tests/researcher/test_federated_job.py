"""A federated multi-task DP job across three real datasites on loopback."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmtl.contract import protocol
from fedmtl.contract.jobspec import JobSpec
from fedmtl.datasites.runtime import TEST_HOOK_ENV
from fedmtl.datasites.server import admin
from fedmtl.datasites.server.launch import free_port, launch
from fedmtl.datasites.server.peers import pin_federation
from fedmtl.researcher.job import JobError, SyftTransport
from fedmtl.researcher.session import Session

PW = "researcher-password-1"
EMAIL = "ada@uni.example"


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory):
    import os

    from fedmtl.datasites.data.cohort import prepare

    os.environ[TEST_HOOK_ENV] = "1"  # test-only: sites keep their unmasked payloads on disk
    out = tmp_path_factory.mktemp("cohort")
    files = prepare(out, sites=3, seed=0)
    homes = tmp_path_factory.mktemp("homes")
    handles = []
    try:
        for f in files:
            h = launch(home=homes / f.name, name=f.name, records=f.records, schema=f.schema, port=free_port())
            handles.append(h)
            admin.add_researcher(home=h.home, email=EMAIL, password=PW)
        pin_federation([h.home for h in handles])  # the owners pin each other
        yield handles
    finally:
        for h in handles:
            h.stop()
        os.environ.pop(TEST_HOOK_ENV, None)


def _session(handles):
    return Session.connect([{"url": h.url, "email": EMAIL, "password": PW} for h in handles])


def _spec(**kw):
    base = dict(
        name="mtl",
        tasks=[{"label": "diabetes_5y"}, {"label": "dyslipidemia_5y"}],
        rounds=3,
        local_steps=5,
        sample_rate=0.02,
        lr=0.5,
        noise_multiplier=1.0,
        secagg={"threshold": 2, "clip": 1.0},
        scaling="range",  # passes 1..3 train; standard scaling (a statistics pass first) has its own test
    )
    base.update(kw)
    return JobSpec(**base)


@pytest.mark.integration
def test_standard_scaling_job_releases_statistics_first_and_sites_scale_with_them(three_sites, tmp_path):
    # Prepare: a researcher of its own, so that the spend views of this module's jobs stay apart
    email = "std@uni.example"
    for h in three_sites:
        admin.add_researcher(home=h.home, email=email, password=PW)
    session = Session.connect([{"url": h.url, "email": email, "password": PW} for h in three_sites])
    spec = _spec(name="std", rounds=1, scaling="standard")
    job = session.submit(spec, out=tmp_path / "job")
    # Execute
    result = job.run(progress=False)
    # Assert: every site approved the 3 passes (statistics, 1 round, final evaluation) and ran them
    assert {v["status"] for v in job.status().values()} == {"approved"}
    assert spec.n_passes() == 3 and result.rounds_done == 1 and [r["round"] for r in result.metrics] == [1]
    scaling = job.state["scaling"]
    assert set(scaling["mean"]) == {c.name for c in session.schemas["st-mary"].features if c.type == "numeric"}
    for h in three_sites:
        payload = np.load(h.home / "jobs" / job.job_id / "test-hook" / "pass-1.npz")
        assert list(payload) == ["stats"]  # the statistics pass released nothing else
        import json

        state = json.loads((h.home / "jobs" / job.job_id / "state.json").read_text())
        assert state["completed"] == [1, 2, 3] and state["scaling"] == scaling, h.name
    # the ledger charged the statistics release with the rest: what the job promised
    spend = job.spend()
    for site, view in spend.items():
        (dataset, eps), = view["epsilon_spent"].items()
        assert eps == pytest.approx(result.epsilon[site], rel=0.05)
    assert result.preprocessor["scaling"] == "standard"
    pred = result.predict(session.mock("st-mary"))
    assert np.all((pred["diabetes_5y"] >= 0) & (pred["diabetes_5y"] <= 1))


@pytest.mark.integration
def test_three_sites_three_rounds_secure_aggregate_equals_plain_fedavg(three_sites, tmp_path):
    # Prepare
    session = _session(three_sites)
    assert sorted(session.sites) == ["general", "riverside", "st-mary"]
    job = session.submit(_spec(), out=tmp_path / "job")
    # Execute
    result = job.run(progress=False)
    # Assert: the rounds travelled over the datasites' data plane (the default when offered)
    assert job.last_transport == "dataplane"
    # every site approved automatically, all passes ran
    assert {v["status"] for v in job.status().values()} == {"approved"}
    assert result.rounds_done == 3
    # only the final model is evaluated (the default policy allows one noised, charged release)
    assert [r["round"] for r in result.metrics] == [3]
    # a released AUROC is undefined (NaN) when the noised positives sum to <= 0 (small test
    # splits); either way it comes with an interval inside [0, 1] that holds it
    for r in result.metrics:
        m = r["pooled"]["diabetes_5y"]
        assert math.isnan(m["auroc"]) or m["auroc_lo"] <= m["auroc"] <= m["auroc_hi"]
        assert 0.0 <= m["auroc_lo"] <= m["auroc_hi"] <= 1.0
    assert set(result.epsilon) == set(session.sites) and all(e > 0 for e in result.epsilon.values())
    # the aggregate equals the plain weighted FedAvg of the sites' unmasked updates
    model = job.model
    groups = protocol.groups_of(model)
    for p in (1, 2, 3):
        agg = np.load(tmp_path / "job" / "aggregates" / f"pass-{p}.npz")
        sums = np.zeros_like(agg["average_update"])
        counts = None
        for h in three_sites:
            payload = np.load(h.home / "jobs" / job.job_id / "test-hook" / f"pass-{p}.npz")
            sums = sums + payload["update"]
            counts = payload["counts"] if counts is None else counts + payload["counts"]
        from fedmtl.privacy.quantization import average_by_group

        plain, _ = average_by_group(sums, counts, groups=groups)
        np.testing.assert_allclose(agg["average_update"], plain, atol=1e-3)
        assert np.array_equal(np.rint(agg["counts"]), counts)
    # riverside has no dyslipidemia labels: it contributed zero weight to that head
    riverside = next(h for h in three_sites if h.name == "riverside")
    names = sorted(groups)
    payload = np.load(riverside.home / "jobs" / job.job_id / "test-hook" / "pass-1.npz")
    assert payload["counts"][names.index("dyslipidemia_5y")] == 0

    # Round 4 of a 3-round approval, and a replayed round, are refused by the runtime
    transport = SyftTransport(session, job.state["func_name"])
    w = np.zeros(result.global_vector.size, dtype=np.float32)
    beyond = transport.call("st-mary", {"stage": "advertise", "pass": 5, "attempt": 0, "weights": w})
    assert not beyond["ok"] and "beyond the approved 3 round" in beyond["error"]
    replay = transport.call("st-mary", {"stage": "advertise", "pass": 2, "attempt": 9, "weights": w})
    assert not replay["ok"] and "replay is refused" in replay["error"]
    bad = transport.call("general", {"stage": "advertise", "pass": 5, "attempt": 0, "weights": w[:3]})
    assert not bad["ok"]

    # the researcher sees their own spend and budget left at each site, nothing else
    spend = job.spend()
    for site, view in spend.items():
        assert view["email"] == EMAIL, site
        assert view["requests"] and all(r["researcher"] == EMAIL for r in view["requests"])
        (dataset, eps), = view["epsilon_spent"].items()
        assert eps == pytest.approx(result.epsilon[site], rel=0.05)
        assert view["budget_left"][dataset] == pytest.approx(5.0 - eps, rel=1e-6)

    # the result predicts
    mock = session.mock("st-mary")
    pred = result.predict(mock)
    assert set(pred) == {"diabetes_5y", "dyslipidemia_5y"}
    assert np.all((pred["diabetes_5y"] >= 0) & (pred["diabetes_5y"] <= 1))


@pytest.mark.integration
def test_denied_site_is_named_with_its_reason(three_sites, tmp_path):
    # Prepare: noise below the default policy's minimum (0.8)
    session = _session(three_sites)
    job = session.submit(_spec(name="too-noisy", noise_multiplier=0.3, rounds=1), out=tmp_path / "job")
    # Execute
    status = job.wait_for_review(timeout=60)
    # Assert
    assert {v["status"] for v in status.values()} == {"denied"}
    assert all("noise" in v["reason"] for v in status.values())
    with pytest.raises(JobError, match="not every site approved"):
        job.run(progress=False, review_timeout=5)


@pytest.mark.integration
def test_site_killed_mid_round_recovers_or_aborts(three_sites, tmp_path):
    # Prepare: one pass driven by hand; a site vanishes after sharing its keys
    session = _session(three_sites)
    job = session.submit(_spec(name="dropout", rounds=1), out=tmp_path / "job")
    assert {v["status"] for v in job.wait_for_review(60).values()} == {"approved"}

    class Flaky(SyftTransport):
        def __init__(self, *a, gone=(), **k):
            super().__init__(*a, **k)
            self.gone = set(gone)

        def call(self, site, message):
            if site in self.gone and message["stage"] in ("masked_input", "unmask"):
                return {"ok": False, "error": "connection refused", "kind": "Unreachable"}
            return super().call(site, message)

    from fedmtl.researcher.job import run_pass

    w = job.model and np.asarray(__import__("fedmtl.models", fromlist=["x"]).model_to_vector(job.model))
    outcome = run_pass(transport=Flaky(session, job.state["func_name"], gone={"general"}),
                       site_specs=job.site_specs, sites=job.sites, pass_no=1, attempt=0,
                       weights=w, model=job.model)
    # Assert: the round completed with the two survivors
    assert sorted(outcome.survivors) == ["riverside", "st-mary"]
    assert "general" in outcome.dropped
    # with two sites gone, fewer than t=2 remain: a clean abort, nothing revealed
    with pytest.raises(JobError, match="aborted"):
        run_pass(transport=Flaky(session, job.state["func_name"], gone={"general", "riverside"}),
                 site_specs=job.site_specs, sites=job.sites, pass_no=2, attempt=0,
                 weights=w, model=job.model)


@pytest.mark.integration
def test_researcher_killed_then_resumed_charges_no_round_twice(three_sites, tmp_path):
    import subprocess
    import sys
    import time

    from fedmtl.datasites.ledger import site_ledger

    # Prepare: a sites file and a job file for the CLI
    sites = tmp_path / "sites.toml"
    sites.write_text("".join(
        f'[[sites]]\nurl = "{h.url}"\nemail = "{EMAIL}"\npassword_env = "FEDMTL_TEST_PW"\n\n' for h in three_sites
    ))
    # the demo-sized trunk (the small-site default trains in a blink) and 5 rounds: the kill
    # below must land while passes are left, or the sites finish the job before it
    spec = _spec(name="resume", rounds=5, model={"widths": [64, 32]})
    spec.save(tmp_path / "job.toml")
    out = tmp_path / "job"
    env = {**__import__("os").environ, "FEDMTL_TEST_PW": PW}
    # Execute: start `fedmtl train`, kill it once pass 2 is checkpointed
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedmtl.cli", "train", "--sites", str(sites), "--job", str(tmp_path / "job.toml"),
         "--out", str(out), "--quiet", "--no-dry-run"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and not list((out / "checkpoints").glob("*2*")):
        assert proc.poll() is None, "fedmtl train exited before it was killed"
        time.sleep(0.5)
    time.sleep(0.5)  # let it get into pass 3
    proc.kill()
    proc.wait()
    # resume from the CLI, in a fresh process
    done = subprocess.run(
        [sys.executable, "-m", "fedmtl.cli", "train", "--sites", str(sites), "--out", str(out), "--quiet"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    # Assert: the job completed, and every site charged each pass exactly once
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming job" in done.stdout
    job_id = __import__("json").loads((out / "job.json").read_text())["job_id"]
    for h in three_sites:
        led = site_ledger.open_ledger(h.home)
        # rounds 1..5 and the final evaluation release (pass 6), each charged once
        assert led.executed_rounds(job_id) == [1, 2, 3, 4, 5, 6], h.name
        charges = [e for e in led.entries() if e["kind"] == "round_executed" and e["body"].get("request_id") == job_id]
        assert len(charges) == 6  # 5 training rounds + the final evaluation release
        assert led.request_status(job_id) == "finished"
    # Prepare: as if the researcher died after the sites ran the last pass and before it was
    # saved here (the last pass's checkpoint is gone; the sites have closed the job)
    max((out / "checkpoints").glob("round-*.npz")).unlink()
    result = out / "result"
    __import__("shutil").rmtree(result)
    # Execute: resume once more
    again = subprocess.run(
        [sys.executable, "-m", "fedmtl.cli", "train", "--sites", str(sites), "--out", str(out), "--quiet"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    # Assert: it says the last pass is lost and why, saves the trained model without final
    # metrics, and no site ran or charged anything again
    said = again.stdout + again.stderr
    assert again.returncode == 0, said[-2000:]
    assert "its last pass (the final evaluation release and the risks' recalibration) is lost" in said
    assert "closed at" in said and "no final metrics" in said
    from fedmtl.researcher.result import JobResult

    kept = JobResult.load(result)
    assert kept.lost_passes == [6] and "no final evaluation" in str(kept)
    for h in three_sites:
        led = site_ledger.open_ledger(h.home)
        assert led.executed_rounds(job_id) == [1, 2, 3, 4, 5, 6], h.name
        charges = [e for e in led.entries() if e["kind"] == "round_executed" and e["body"].get("request_id") == job_id]
        assert len(charges) == 6


@pytest.mark.integration
def test_modified_template_is_denied_naming_the_advisory(three_sites, tmp_path):

    from fedmtl.datasites.site import syftio

    sy = syftio.import_syft()
    from syft.service.policy.policy import OutputPolicyExecuteCount

    session = _session(three_sites)
    job = session.job(_spec(name="evil", rounds=1), out=tmp_path / "job")
    conn = session.sites["st-mary"]
    name = job.state["func_name"]
    src = (
        f"def {name}(data, spec, message):\n"
        "    return {'rows': data.head(5).to_dict()}\n"
    )
    import linecache

    linecache.cache["<evil>"] = (len(src), None, src.splitlines(True), "<evil>")
    ns: dict = {}
    exec(compile(src, "<evil>", "exec"), ns)
    with syftio.quiet():
        policy = sy.MixedInputPolicy(data=conn.asset, spec=sy.Constant(val=job.site_specs["st-mary"]),
                                     message=dict, client=conn.client)
        conn.client.code.request_code_execution(
            sy.syft_function(input_policy=policy, output_policy=OutputPolicyExecuteCount(limit=1))(ns[name])
        )
    st = job.wait_for_review(60)["st-mary"]
    assert st["status"] == "denied"
    assert "PYSEC-2026-546" in st["reason"]
