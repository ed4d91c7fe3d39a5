"""JobSpec's secure-aggregation threshold: the default is a majority of the job's sites
(floor(n/2) + 1), t <= n/2 is a construction/validation problem, and the round protocol
never builds parameters with t <= n/2."""

from __future__ import annotations

import pytest

from fedmtl.contract import protocol
from fedmtl.contract.jobspec import JobSpec, JobSpecError
from fedmtl.errors import ConfigError
from fedmtl.privacy.keys import SigningKey


def _spec(**kw) -> JobSpec:
    base = dict(name="t", tasks=[{"label": "diabetes"}], noise_multiplier=1.1)
    base.update(kw)
    return JobSpec(**base)


@pytest.mark.parametrize(("n", "t"), [(2, 2), (3, 2), (4, 3), (5, 3), (6, 4), (9, 5)])
def test_default_threshold_is_a_majority_of_the_named_sites(n, t):
    spec = _spec(sites=[f"s{i}" for i in range(n)])
    assert spec.secagg.threshold == t
    assert JobSpec.from_dict(spec.to_dict()) == spec  # the resolved value is written out


def test_spec_without_sites_resolves_for_the_sites_it_is_made_for():
    # Prepare: no sites named, no threshold given
    spec = _spec()
    assert spec.secagg.threshold is None
    # Execute / Assert
    assert spec.for_sites(["a", "b", "c"]).secagg.threshold == 2
    assert spec.for_sites(["a", "b", "c", "d", "e"]).secagg.threshold == 3
    partial = _spec(allow_partial=True)
    assert partial.threshold_for(5) == 3 and partial.can_run(approved=3, participating=5)
    assert not partial.can_run(approved=2, participating=5)
    explicit = _spec(secagg={"threshold": 4})
    assert explicit.for_sites(["a", "b", "c", "d", "e"]) is explicit
    with pytest.raises(JobSpecError, match="at least 2 sites"):
        spec.for_sites(["a"])


@pytest.mark.parametrize(("n", "t"), [(4, 2), (5, 2), (6, 3)])
def test_threshold_at_most_half_of_the_sites_is_refused(n, t):
    sites = [f"s{i}" for i in range(n)]
    with pytest.raises(JobSpecError, match=rf"threshold {t} is not more than half of the {n} site\(s\) named"):
        _spec(sites=sites, secagg={"threshold": t})
    with pytest.raises(JobSpecError, match=f"use at least {n // 2 + 1}"):
        _spec(secagg={"threshold": t}).for_sites(sites)


def _site_spec(n: int, threshold: int | None) -> dict:
    job = _spec(scaling="range", secagg={} if threshold is None else {"threshold": threshold})
    roster = {f"s{i}": SigningKey.generate().verify_key.to_bytes().hex() for i in range(n)}
    schema = {
        "dataset": {"name": "toy"},
        "columns": [
            {"name": "id", "role": "id", "type": "numeric"},
            {"name": "age", "role": "feature", "type": "numeric", "min": 0, "max": 100},
            {"name": "diabetes", "role": "label", "type": "binary", "missing": True},
        ],
    }
    return {"job": job.to_dict(), "job_id": "t-0123abcd", "site": "s0", "roster": roster, "schema": schema,
            "max_count": 100}


def test_protocol_reads_a_missing_threshold_as_the_roster_majority():
    spec = _site_spec(5, None)
    params = protocol.secagg_params(spec, 1, 0, protocol.plan(spec, 1))
    assert protocol.threshold_of(spec) == 3 and params.threshold == 3


def test_protocol_refuses_parameters_with_at_most_half_the_roster():
    spec = _site_spec(5, 2)
    with pytest.raises(ConfigError, match="threshold 2 is not more than half of the 5 sites"):
        protocol.secagg_params(spec, 1, 0, protocol.plan(spec, 1))
