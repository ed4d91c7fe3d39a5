"""Standard scaling in a federated job, in process: the real round runtime and secure
aggregation over LocalTransport (researcher/local_site.py's LocalSite homes), no syft."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fedmtl.contract import protocol
from fedmtl.contract.jobspec import JobSpec
from fedmtl.datasites import runtime as rt
from fedmtl.datasites.ledger import site_ledger
from fedmtl.models import model_to_vector
from fedmtl.models.preprocessing import Preprocessor, local_stats, sum_stats
from fedmtl.privacy import stats_release
from fedmtl.researcher.job import Job, LocalTransport, run_pass
from fedmtl.researcher.local_site import LocalSite
from fedmtl.researcher.session import Session
from fedmtl.schema import Schema

SCHEMA = Schema.from_dict({
    "columns": [
        {"name": "id", "role": "id", "type": "numeric"},
        {"name": "age", "role": "feature", "type": "numeric", "min": 18, "max": 90},
        {"name": "crp", "role": "feature", "type": "numeric", "min": 0, "max": 6000, "transform": "log1p"},
        {"name": "sex", "role": "feature", "type": "categorical", "categories": ["F", "M"]},
        {"name": "y", "role": "label", "type": "binary", "missing": True},
        {"name": "split", "role": "split", "type": "categorical", "categories": ["train", "test"]},
    ]
})


def _records(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    age = rng.uniform(18, 90, n)
    crp = np.exp(rng.normal(1.5 + 0.3 * seed, 1.0, n)).clip(0, 6000)
    logit = 0.05 * (age - 55) + 0.8 * (np.log1p(crp) - 2)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(float)
    return pd.DataFrame({"id": np.arange(n), "age": age, "crp": crp, "sex": rng.choice(["F", "M"], n), "y": y,
                         "split": np.where(rng.random(n) < 0.75, "train", "test")})


@pytest.fixture
def sites(tmp_path):
    data = {f"site{i}": _records(400, seed=i) for i in range(3)}
    made = {n: LocalSite(n, df, SCHEMA, tmp_path / "homes" / n) for n, df in data.items()}
    yield made
    for n in made:
        rt.unregister_home(n)


def _spec(**kw) -> JobSpec:
    base = dict(name="std", tasks=[{"label": "y"}], rounds=2, local_steps=5, sample_rate=0.1, lr=0.5,
                noise_multiplier=1.0, secagg={"threshold": 2})
    base.update(kw)
    return JobSpec(**base)


def _site_state(site: LocalSite, job: Job) -> dict:
    return json.loads((site.home / "jobs" / job.job_id / "state.json").read_text())


def test_sites_scale_with_the_aggregated_statistics(sites, tmp_path):
    # Prepare
    session = Session(sites)
    job = Job.create(session, _spec(), out=tmp_path / "job")
    transport = LocalTransport({n: s.data for n, s in sites.items()}, job.site_specs)
    # Execute
    result = job.run(progress=False, transport=transport)
    # Assert: pass 1 was the statistics pass, then 2 training rounds, then the final evaluation
    assert job.spec.n_passes() == 4 and result.rounds_done == 2
    assert [r["round"] for r in result.metrics] == [2]
    assert sorted(p.name for p in (tmp_path / "job" / "aggregates").iterdir()) == ["pass-2.npz", "pass-3.npz"]
    # the job state keeps the derived mean/std; every site scaled its passes with exactly them
    scaling = json.loads((tmp_path / "job" / "job.json").read_text())["scaling"]
    for name, site in sites.items():
        st = _site_state(site, job)
        assert st["completed"] == [1, 2, 3, 4] and st["scaling"] == scaling, name
    # they are the pooled training statistics up to the release's noise (log1p(crp), not crp)
    train = [s.data[s.data["split"] == "train"] for s in sites.values()]
    exact = Preprocessor.from_stats(SCHEMA, sum_stats([local_stats(SCHEMA, df) for df in train]))
    c, h = stats_release.unit_frame(SCHEMA)
    n = sum(len(df) for df in train)
    # noise on each summed entry over the pooled count, in unit form: the mean moves by about
    # that, the variance by about three times that (sum of squares, and the mean's square)
    noise = np.sqrt(3) * stats_release.noise_std(SCHEMA, 5.0) / n
    for i, f in enumerate(("age", "crp")):
        assert abs(scaling["mean"][f] - exact.mean[f]) < 5 * noise * h[i], f
        assert abs(scaling["std"][f] ** 2 - exact.std[f] ** 2) < 15 * noise * h[i] ** 2, f
    assert scaling["mean"]["crp"] < np.log1p(6000) / 2  # transformed units
    # the result predicts with the sites' scaling
    assert result.preprocessor["scaling"] == "standard" and result.preprocessor["mean"] == scaling["mean"]
    # epsilon charged: the statistics release composed with training and evaluation
    n_train = len(train[0])
    assert result.epsilon["site0"] == pytest.approx(job.spec.epsilon_for_site(n_train))
    assert job.spec.epsilon_for_site(n_train) > _spec(scaling="range").epsilon_for_site(n_train)


def test_range_scaling_still_runs_without_a_statistics_pass(sites, tmp_path):
    session = Session(sites)
    job = Job.create(session, _spec(scaling="range", rounds=1), out=tmp_path / "job")
    transport = LocalTransport({n: s.data for n, s in sites.items()}, job.site_specs)
    result = job.run(progress=False, transport=transport)
    assert job.spec.n_passes() == 2 and result.rounds_done == 1 and "scaling" not in job.state
    assert result.preprocessor["scaling"] == "range"
    assert _site_state(sites["site0"], job)["completed"] == [1, 2]


def _started(sites, tmp_path):
    """A standard-scaling job whose statistics pass ran; (job, transport, weights, scaling)."""
    session = Session(sites)
    job = Job.create(session, _spec(), out=tmp_path / "job")
    transport = LocalTransport({n: s.data for n, s in sites.items()}, job.site_specs)
    weights = model_to_vector(job.model).astype(np.float64)
    out = run_pass(transport=transport, site_specs=job.site_specs, sites=job.sites, pass_no=1, attempt=0,
                   weights=weights, model=job.model)
    scaling = protocol.derive_scaling(next(iter(job.site_specs.values())), out.arrays["stats"],
                                      n_sites=len(out.survivors))
    return job, transport, weights, scaling


def test_sites_refuse_a_training_pass_without_or_with_bad_statistics(sites, tmp_path):
    # Prepare
    job, transport, weights, scaling = _started(sites, tmp_path)
    msg = {"stage": "advertise", "pass": 2, "attempt": 0, "weights": weights.astype(np.float32)}
    # Execute / Assert: no scaling, malformed, out of range; nothing runs or is charged
    none = transport.call("site0", msg)
    assert not none["ok"] and "must carry 'scaling'" in none["error"]
    bad = {"mean": dict(scaling["mean"], age=1e6), "std": scaling["std"]}
    refused = transport.call("site0", {**msg, "scaling": bad})
    assert not refused["ok"] and "scaling.mean['age']" in refused["error"] and "declared range" in refused["error"]
    assert 2 not in _site_state(sites["site0"], job)["charged"]
    # the right scaling runs; a different one on a later pass is refused (one mean/std per job)
    assert transport.call("site0", {**msg, "scaling": scaling})["ok"]
    other = {"mean": dict(scaling["mean"], age=40.0), "std": scaling["std"]}
    changed = transport.call("site0", {**msg, "attempt": 1, "scaling": other})
    assert not changed["ok"] and "differs from the one earlier passes" in changed["error"]
    # the researcher's side refuses to start a training pass without the statistics
    from fedmtl.errors import JobError

    with pytest.raises(JobError, match="needs scaling="):
        run_pass(transport=transport, site_specs=job.site_specs, sites=job.sites, pass_no=2, attempt=5,
                 weights=weights, model=job.model)


def test_statistics_are_charged_before_they_are_computed(sites, tmp_path, monkeypatch):
    # Prepare: record the order of charge and computation; then a ledger that refuses
    events: list[str] = []
    real_stats = stats_release.site_statistics
    monkeypatch.setattr(site_ledger, "charge_pass",
                        lambda home, spec, p, records: events.append(f"charge {p} {[r.to_dict() for r in records]}"))
    monkeypatch.setattr(stats_release, "site_statistics",
                        lambda schema, df: events.append("compute") or real_stats(schema, df))
    session = Session(sites)
    job = Job.create(session, _spec(stats_noise_multiplier=3.0), out=tmp_path / "job")
    transport = LocalTransport({n: s.data for n, s in sites.items()}, job.site_specs)
    w = model_to_vector(job.model).astype(np.float32)
    msg = {"stage": "advertise", "pass": 1, "attempt": 0, "weights": w}
    # Execute
    assert transport.call("site0", msg)["ok"]
    # Assert: the statistics release (sigma 3, one step at rate 1) was charged, then computed
    assert events == ["charge 1 [{'noise_multiplier': 3.0, 'sample_rate': 1.0, 'steps': 1}]", "compute"]

    # a ledger that refuses: nothing is computed
    events.clear()

    def refuse(home, spec, p, records):
        events.append("charge")
        raise rt.RoundError("budget exhausted")

    monkeypatch.setattr(site_ledger, "charge_pass", refuse)
    out = transport.call("site1", msg)
    assert not out["ok"] and "budget exhausted" in out["error"] and events == ["charge"]


def test_a_dry_run_beyond_the_statistics_pass_uses_the_derived_scaling(sites, tmp_path):
    # the dry run of `fedmtl train` runs two passes: the statistics pass, then a training
    # pass that needs the scaling derived from it
    session = Session(sites)
    job = Job.create(session, _spec(), out=tmp_path / "job")
    out = job.dry_run(passes=2)
    assert out["ok"] is True
