"""Three hospitals whose exports are distributed differently agree on one schema: each drafts
its own (`fedmtl datasite schema infer`), the drafts differ and a job across them is refused
naming the column and the key; `fedmtl datasite schema merge` makes them one, every export
validates against it, and a job runs across three real datasites launched with it."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from fedmtl.cli import main as cli_main
from fedmtl.contract.jobspec import JobSpec
from fedmtl.datasites import runtime as rt
from fedmtl.datasites.data.cohort import prepare
from fedmtl.datasites.data.records import load_records
from fedmtl.datasites.server import admin
from fedmtl.datasites.server.launch import free_port, launch
from fedmtl.datasites.server.peers import pin_federation
from fedmtl.errors import JobError
from fedmtl.researcher.job import Job
from fedmtl.researcher.local_site import LocalSite
from fedmtl.researcher.session import Session
from fedmtl.schema import Schema, schema_differences

PW = "researcher-password-1"
EMAIL = "ada@uni.example"
#: each hospital's patients: one age band of the demo cohort, 300 of them
BANDS = {"north": (0, 50), "south": (50, 65), "east": (65, 200)}
SHARED_NAME = "nafld-shared"


def _spec(**kw) -> JobSpec:
    base = dict(name="shared", tasks=[{"label": "diabetes_5y"}], model={"widths": [16]}, rounds=1, local_steps=2,
                sample_rate=0.05, lr=0.5, noise_multiplier=1.0, secagg={"threshold": 2, "clip": 1.0},
                scaling="range")
    return JobSpec(**{**base, **kw})


@pytest.fixture(scope="module")
def drafts(tmp_path_factory):
    """``{site: (export, draft schema file)}``: three exports cut from the demo cohort by age
    band (so their ranges differ), each drafted by `schema infer` on its own."""
    out = tmp_path_factory.mktemp("bands")
    (cohort,) = prepare(out / "cohort", sites=1, seed=0)
    raw = pd.read_csv(cohort.records, dtype=str, keep_default_na=False)  # the cells as exported
    age = pd.to_numeric(raw["age"])
    made = {}
    for i, (site, (lo, hi)) in enumerate(BANDS.items()):
        export, draft = out / f"{site}.csv", out / f"{site}.toml"
        raw[(age >= lo) & (age < hi)].sample(300, random_state=i).to_csv(export, index=False)
        assert cli_main(["datasite", "schema", "infer", "--records", str(export), "--out", str(draft)]) == 0
        made[site] = (export, draft)
    return made


def test_drafts_of_differently_distributed_exports_differ_and_a_job_across_them_names_the_key(drafts, tmp_path):
    # Prepare: the three drafts as three in-process sites (the researcher's real Session and Job)
    schemas = {site: Schema.load(draft) for site, (_, draft) in drafts.items()}
    sites = {site: LocalSite(site, load_records(export, schemas[site]), schemas[site], tmp_path / site)
             for site, (export, _) in drafts.items()}
    try:
        # Execute
        with pytest.raises(JobError) as e:
            Job.create(Session(sites), _spec(), out=tmp_path / "job")
    finally:
        for site in sites:
            rt.unregister_home(site)
    # Assert: the drafts differ in the age range at least; the refusal names column, key and values
    diffs = schema_differences(list(schemas.values()), columns_only=True)
    assert {("age", "min"), ("age", "max")} <= {(d.column, d.key) for d in diffs}
    assert all(d.key in ("min", "max", "categories", "missing", "description") for d in diffs)
    east, north = schemas["east"].column("age"), schemas["north"].column("age")
    # (the sites in name order: east is the first, north the first to differ from it)
    assert f"north's schema differs from east's: column 'age' key 'min' ({north.min:g} vs {east.min:g})" in str(e.value)
    assert "fedmtl datasite schema merge" in str(e.value)
    assert not (tmp_path / "job").exists()


@pytest.mark.integration
def test_merged_schema_validates_every_export_and_a_job_runs_across_the_three_sites(drafts, tmp_path):
    # Prepare: merge the three drafts into the shared schema
    shared = tmp_path / "shared.toml"
    files = [str(draft) for _, draft in drafts.values()]
    assert cli_main(["datasite", "schema", "merge", *files, "--out", str(shared), "--name", SHARED_NAME]) == 0
    schema = Schema.load(shared)
    assert cli_main(["datasite", "schema", "diff", str(shared), *files]) == 1
    # every export validates against it; its age range is the union of the drafts'
    for export, _ in drafts.values():
        assert len(load_records(export, schema)) == 300
    ages = [Schema.load(draft).column("age") for _, draft in drafts.values()]
    assert schema.column("age").min == min(c.min for c in ages) and schema.column("age").max == max(c.max for c in ages)

    # Execute: three datasites launched with the shared schema, pinned to each other; one job
    handles = []
    try:
        for site, (export, _) in drafts.items():
            h = launch(home=tmp_path / "homes" / site, name=site, records=export, schema=shared, port=free_port())
            handles.append(h)
            admin.add_researcher(home=h.home, email=EMAIL, password=PW)
        pin_federation([h.home for h in handles])
        session = Session.connect([{"url": h.url, "email": EMAIL, "password": PW} for h in handles])
        job = session.submit(_spec(), out=tmp_path / "job")
        result = job.run(progress=False)
        statuses = {v["status"] for v in job.status().values()}
    finally:
        for h in handles:
            h.stop()

    # Assert: each site published the dataset under the shared schema's name, and the job ran
    assert [h.dataset for h in handles] == [SHARED_NAME] * 3
    assert {site: s.name for site, s in session.schemas.items()} == {site: SHARED_NAME for site in BANDS}
    assert statuses == {"approved"}
    assert result.rounds_done == 1 and set(result.epsilon) == set(BANDS)
    # a released AUROC is undefined (NaN) when the noised positives sum to <= 0 (small test
    # splits); either way it comes with an interval inside [0, 1] that holds it
    for r in result.metrics:
        m = r["pooled"]["diabetes_5y"]
        assert math.isnan(m["auroc"]) or m["auroc_lo"] <= m["auroc"] <= m["auroc_hi"]
        assert 0.0 <= m["auroc_lo"] <= m["auroc_hi"] <= 1.0
