"""The round runtime preprocesses a site's records once per job, not once per call."""

from __future__ import annotations

import pytest

from fedmtl.contract.jobspec import JobSpec
from fedmtl.datasites import runtime as rt
from fedmtl.models.preprocessing import Preprocessor


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from fedmtl.datasites.data.cohort import prepare
    from fedmtl.datasites.data.records import load_records
    from fedmtl.schema import Schema

    files = prepare(tmp_path_factory.mktemp("cohort"), sites=2, seed=0)
    schema = Schema.load(files[0].schema)
    return schema, {f.name: load_records(f.records, schema) for f in files}


@pytest.mark.parametrize("scaling", ["range", "standard"])
def test_records_are_preprocessed_once_per_job_and_forgotten_at_its_end(cohort, monkeypatch, scaling):
    from fedmtl.researcher.simulate import simulate

    schema, data = cohort
    calls = []
    original = Preprocessor.transform

    def counting(self, df):
        calls.append(len(df))
        return original(self, df)

    monkeypatch.setattr(Preprocessor, "transform", counting)
    spec = JobSpec(name="cache", tasks=[{"label": "diabetes_5y"}], rounds=3, local_steps=2, sample_rate=0.02,
                   noise_multiplier=1.0, secagg={"threshold": 2, "clip": 1.0}, scaling=scaling, seed=0)
    result = simulate(spec, data, schema)
    assert result.rounds_done == 3
    split = schema.split_column
    train_sizes = sorted(int((df[split] == "train").sum()) for df in data.values())
    # each site's training split was transformed once for the three training rounds
    assert sorted(n for n in calls if n in train_sizes) == train_sizes, calls
    # and nothing of the finished job stays in memory
    assert not any(k[1].startswith("cache") for k in rt._TENSORS), list(rt._TENSORS)
