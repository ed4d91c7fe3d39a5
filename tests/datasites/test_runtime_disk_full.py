"""A pass whose payload the site's disk cannot hold is refused before the charge: nothing
charged, the cause named; with space again the same pass runs and is charged once (issue 21).
In process, through the real runtime and secure aggregation, on the demo cohort."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from fedmtl.contract.jobspec import JobSpec
from fedmtl.datasites import runtime as rt
from fedmtl.errors import FedMTLError


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from fedmtl.datasites.data.cohort import prepare
    from fedmtl.datasites.data.records import load_records
    from fedmtl.schema import Schema

    files = prepare(tmp_path_factory.mktemp("cohort"), sites=3, seed=0)
    schema = Schema.load(files[0].schema)
    return schema, {f.name: load_records(f.records, schema).head(300) for f in files}


def _charged(home: Path, job_id: str) -> list[int]:
    path = home / "jobs" / job_id / "state.json"
    return list(json.loads(path.read_text()).get("charged", [])) if path.exists() else []


def test_a_full_disk_refuses_the_pass_before_the_charge(cohort, tmp_path, monkeypatch):
    from fedmtl.researcher.job import Job
    from fedmtl.researcher.local_site import LocalSite
    from fedmtl.researcher.session import Session

    # Prepare: three in-memory sites and a one-round job; st-mary's disk is full
    schema, data = cohort
    sites = {n: LocalSite(n, df, schema, tmp_path / "homes" / n) for n, df in data.items()}
    try:
        def spec(name: str) -> JobSpec:
            return JobSpec(name=name, tasks=[{"label": "diabetes_5y"}], rounds=1, local_steps=2, sample_rate=0.1,
                           noise_multiplier=1.0, secagg={"threshold": 2, "clip": 1.0}, scaling="standard",
                           seed=0, eval_every=0)

        job = Job.create(Session(sites), spec("disk-full"), out=tmp_path / "job")
        transport = rt.LocalTransport({n: s.data for n, s in sites.items()}, job.site_specs)
        full = sites["st-mary"].home.resolve()
        real = os.posix_fallocate

        def fallocate(fd, offset, length):
            if Path(os.readlink(f"/proc/self/fd/{fd}")).is_relative_to(full):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, offset, length)

        monkeypatch.setattr(os, "posix_fallocate", fallocate)
        replies = []
        inner = transport.call

        def call(site, message):
            reply = inner(site, message)
            replies.append((site, message.get("stage"), reply))
            return reply

        transport.call = call
        # Execute: the first pass (the statistics pass) with st-mary's disk full
        try:
            job.run(progress=False, transport=transport)
        except FedMTLError:
            pass  # two sites of three still make the threshold; either outcome is fine here
        # Assert: st-mary refused its pass, naming the cause, and charged nothing
        refusals = [r for s, st, r in replies if s == "st-mary" and st == "advertise"]
        assert refusals and not refusals[0]["ok"]
        assert "disk is full" in refusals[0]["error"] and "nothing was charged" in refusals[0]["error"]
        assert _charged(sites["st-mary"].home, job.job_id) == []
        assert _charged(sites["general"].home, job.job_id)  # the others ran
        # with space again, st-mary takes part in a job, each pass charged once
        monkeypatch.setattr(os, "posix_fallocate", real)
        again = Job.create(Session(sites), spec("disk-freed"), out=tmp_path / "job2")
        again.run(progress=False, transport=rt.LocalTransport({n: s.data for n, s in sites.items()},
                                                                again.site_specs))
        charged = _charged(sites["st-mary"].home, again.job_id)
        assert charged and sorted(charged) == sorted(set(charged)) == _charged(sites["general"].home, again.job_id)
    finally:
        for n in sites:
            rt.unregister_home(n)
