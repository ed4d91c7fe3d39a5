"""fedmtl.contract.protocol: what each pass asks of a site, read from the parsed site spec."""

from __future__ import annotations

import pytest

from fedmtl.contract import protocol
from fedmtl.contract.jobspec import JobSpec
from fedmtl.contract.site_spec import SiteSpec
from fedmtl.errors import ConfigError
from fedmtl.models import vector_size
from fedmtl.privacy import stats_release
from fedmtl.privacy.keys import SigningKey
from fedmtl.schema import Schema

SCHEMA = Schema.from_dict({
    "dataset": {"name": "toy"},
    "columns": [
        {"name": "id", "role": "id", "type": "numeric"},
        {"name": "age", "role": "feature", "type": "numeric", "min": 0, "max": 100},
        {"name": "diabetes", "role": "label", "type": "binary", "missing": True},
    ],
})
ROSTER = {f"s{i}": SigningKey.generate().verify_key.to_bytes().hex() for i in range(3)}


def _spec(roster=ROSTER, **job) -> SiteSpec:
    kw = dict(name="toy", tasks=[{"label": "diabetes"}], rounds=2, local_steps=2, sample_rate=0.1,
              noise_multiplier=1.0, eval_every=1)
    return SiteSpec.build(job=JobSpec(**{**kw, **job}), job_id="toy-0123abcd", site="s0", roster=roster,
                          schema=SCHEMA, max_count=100)


def test_the_plan_follows_the_schedule():
    # Prepare
    spec = _spec(scaling="standard")
    model, _ = protocol.build_model(spec)
    # Execute
    plans = [protocol.plan(spec, p, model=model) for p in spec.schedule.passes()]
    # Assert: statistics pass, two training rounds that evaluate, the final evaluation
    assert [(p.stats, p.train, p.evaluate) for p in plans] == \
        [(True, False, False), (False, True, True), (False, True, True), (False, False, True)]
    assert plans[0].names == ("stats",) and plans[0].shapes == ((stats_release.size(SCHEMA),),)
    assert plans[1].names == ("update", "counts", "metrics")
    assert plans[1].shapes[0] == (vector_size(model),)
    assert plans[3].names == ("metrics",) and plans[3].shapes == ((protocol.metric_size(protocol.tasks_of(spec)),),)


@pytest.mark.parametrize("p", [0, 5])
def test_a_pass_outside_the_job_has_no_plan(p):
    with pytest.raises(ConfigError, match=f"pass {p} is outside this job's 1..4"):
        protocol.plan(_spec(scaling="standard"), p)


def test_the_secagg_parameters_bind_the_job_attempt_and_roster():
    spec = _spec(scaling="range")
    plan = protocol.plan(spec, 1)
    a, b = protocol.secagg_params(spec, 1, 0, plan), protocol.secagg_params(spec, 1, 1, plan)
    assert a.job_id == "toy-0123abcd/attempt-0" and a.round == 1 and a.threshold == 2
    assert sorted(a.roster) == sorted(ROSTER) and a.shapes == plan.shapes
    assert a.digest() != b.digest()


def test_an_empty_roster_has_no_threshold():
    with pytest.raises(ConfigError, match="roster must be a non-empty table"):
        protocol.threshold_of(_spec(roster={}))


def test_the_scaling_a_pass_may_carry_depends_on_the_job():
    rng, std = _spec(scaling="range"), _spec(scaling="standard")
    assert protocol.scaling_preprocessor(rng, None) is not None
    with pytest.raises(ConfigError, match="may not carry 'scaling'"):
        protocol.scaling_preprocessor(rng, {"mean": {}, "std": {}})
    with pytest.raises(ConfigError, match="must carry 'scaling'"):
        protocol.scaling_preprocessor(std, None)


def test_the_counts_come_from_the_schedule():
    job = _spec(scaling="standard").job
    assert protocol.last_pass(job) == job.schedule.last_pass == 4
    assert protocol.eval_pass_count(job) == job.schedule.n_eval_passes == 3
    assert [protocol.evaluates(job, p) for p in range(1, 5)] == [False, True, True, True]
