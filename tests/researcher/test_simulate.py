"""Whole jobs in process through the real round code: the strategy's two halves meet.

Each site runs the datasite runtime (LocalTransport), the researcher its pass loop and
secure aggregation; no syft server, so these run in the fast suite."""

from __future__ import annotations

import numpy as np
import pytest

from fedmtl.contract.jobspec import JobSpec
from fedmtl.contract.strategies import make_strategy
from fedmtl.datasites import runtime as rt
from fedmtl.datasites.data.cohort import prepare
from fedmtl.datasites.data.records import load_records
from fedmtl.models import model_to_vector, task_slices
from fedmtl.researcher.job import Job
from fedmtl.researcher.local_site import LocalSite
from fedmtl.researcher.session import Session
from fedmtl.schema import Schema


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    files = prepare(tmp_path_factory.mktemp("cohort"), sites=2, seed=0)
    schema = Schema.load(files[0].schema)
    return schema, {f.name: load_records(f.records, schema) for f in files}


def _run(strategy, cohort, tmp_path):
    """Run a two-task job; returns (job, result, the initial global vector, the homes)."""
    schema, data = cohort
    spec = JobSpec(name=f"strat-{strategy}", tasks=[{"label": "diabetes_5y"}, {"label": "cvd_5y"}], rounds=2,
                   local_steps=2, sample_rate=0.05, noise_multiplier=1.0, strategy=strategy,
                   secagg={"threshold": 2, "clip": 1.0}, seed=0)
    homes = {n: tmp_path / "homes" / n for n in data}
    sites = {n: LocalSite(n, df, schema, homes[n]) for n, df in data.items()}
    try:
        job = Job.create(Session(sites), spec, out=tmp_path / "job")
        start = model_to_vector(job.model).astype(np.float64)
        result = job.run(progress=False, transport=rt.LocalTransport({n: s.data for n, s in sites.items()},
                                                                     job.site_specs))
    finally:
        for n in sites:
            rt.unregister_home(n)
    return job, result, start, homes


def test_fedper_keeps_the_heads_at_the_sites_and_shares_the_trunk(cohort, tmp_path):
    # Execute
    job, result, start, homes = _run("fedper", cohort, tmp_path)
    # Assert: the global heads never moved; the trunk did
    personal = result.personal_mask()
    np.testing.assert_array_equal(personal, make_strategy("fedper").personal_mask(task_slices(job.model)))
    assert personal.any() and (~personal).any()
    assert result.rounds_done == 2
    np.testing.assert_array_equal(result.global_vector[personal], start[personal].astype(np.float32))
    assert not np.allclose(result.global_vector[~personal], start[~personal])
    # and each site trained its own heads, kept in its home, never sent
    for site, home in homes.items():
        heads = np.load(home / "jobs" / job.job_id / "heads.npy")
        assert heads.shape == start.shape
        assert not np.allclose(heads[personal], start[personal]), site


def test_fedavg_keeps_nothing_at_the_sites(cohort, tmp_path):
    # Execute
    job, result, start, homes = _run("fedavg", cohort, tmp_path)
    # Assert: every entry is shared, so the heads move too and no site keeps any
    assert not result.personal_mask().any()
    assert not np.allclose(result.global_vector, start)
    for home in homes.values():
        assert (home / "jobs" / job.job_id).is_dir()
        assert not (home / "jobs" / job.job_id / "heads.npy").exists()
