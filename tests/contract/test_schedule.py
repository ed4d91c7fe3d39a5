"""fedmtl.contract.schedule: one pass schedule for the job spec, the reviewer and the runtime.

The reviewer's limit on evaluation passes (``limits.max_eval_passes``) must bound exactly
the releases the runtime charges, so both are checked here against the same schedule over
a grid of specs: the count the reviewer's limits compute, the ``eval_passes`` the review
facts carry, the passes the runtime's pass plan evaluates and the evaluation records the
runtime charges pass by pass.
"""

from __future__ import annotations

import itertools

import pytest

from fedmtl.contract import protocol
from fedmtl.contract.jobspec import JobSpec
from fedmtl.contract.schedule import PassSchedule
from fedmtl.contract.site_spec import SiteSpec
from fedmtl.datasites.review.autoreview import job_facts
from fedmtl.datasites.rules import limits
from fedmtl.datasites.rules.policy import Policy
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
N_TRAIN = 500
#: distinct noise, so an evaluation record is told apart from the statistics record
EVAL_NOISE, STATS_NOISE = 7.0, 5.0


def _job(rounds: int, eval_every: int, scaling: str) -> JobSpec:
    return JobSpec(name="grid", tasks=[{"label": "diabetes"}], rounds=rounds, local_steps=2, sample_rate=0.1,
                   noise_multiplier=1.0, eval_every=eval_every, scaling=scaling,
                   eval_noise_multiplier=EVAL_NOISE, stats_noise_multiplier=STATS_NOISE)


def _site_spec(job: JobSpec) -> SiteSpec:
    return SiteSpec.build(job=job, job_id="grid-0123abcd", site="s0", roster=ROSTER, schema=SCHEMA, max_count=N_TRAIN)


GRID = list(itertools.product(range(1, 6), range(0, 5), ("standard", "range")))


def test_standard_and_range_schedules_name_the_same_rounds():
    # Prepare
    std = PassSchedule(rounds=3, eval_every=2, stats_pass=True)
    rng = PassSchedule(rounds=3, eval_every=2, stats_pass=False)
    # Execute / Assert
    assert (std.n_passes, rng.n_passes) == (5, 4) and (std.last_pass, rng.last_pass) == (5, 4)
    assert list(std.passes()) == [1, 2, 3, 4, 5]
    assert [std.is_stats_pass(p) for p in std.passes()] == [True, False, False, False, False]
    assert not any(rng.is_stats_pass(p) for p in rng.passes())
    assert [std.training_round(p) for p in std.passes()] == [None, 1, 2, 3, None]
    assert [rng.training_round(p) for p in rng.passes()] == [1, 2, 3, None]
    assert [std.rounds_before(p) for p in std.passes()] == [0, 0, 1, 2, 3]
    assert [rng.rounds_before(p) for p in rng.passes()] == [0, 1, 2, 3]
    assert std.eval_passes() == (2, 4, 5) and rng.eval_passes() == (1, 3, 4)
    assert std.n_eval_passes == rng.n_eval_passes == 3


def test_the_final_pass_alone_evaluates_without_eval_every():
    s = PassSchedule(rounds=4, stats_pass=True)
    assert s.eval_passes() == (6,) and s.n_eval_passes == 1
    assert not s.evaluates(1)  # the statistics pass never evaluates


@pytest.mark.parametrize("rounds,every,scaling", GRID)
def test_the_eval_count_is_the_number_of_evaluating_passes(rounds, every, scaling):
    s = PassSchedule(rounds=rounds, eval_every=every, stats_pass=scaling == "standard")
    assert s.n_eval_passes == len(s.eval_passes()) == sum(s.evaluates(p) for p in s.passes())


def test_the_eval_count_of_a_huge_schedule_is_computed_not_enumerated():
    # the reviewer asks this of bounded-magnitude numbers before the rounds cap applies
    s = PassSchedule(rounds=10**9, eval_every=3, stats_pass=True)
    assert s.n_eval_passes == 333_333_334 + 1
    assert PassSchedule(rounds=10**9).n_eval_passes == 1


@pytest.mark.parametrize("kw,err", [
    ({"rounds": 2.0}, TypeError), ({"rounds": True}, TypeError), ({"rounds": -1}, ValueError),
    ({"rounds": 2, "eval_every": -1}, ValueError), ({"rounds": 2, "stats_pass": 1}, TypeError),
])
def test_a_malformed_schedule_is_refused(kw, err):
    with pytest.raises(err):
        PassSchedule(**kw)


def test_the_job_spec_answers_from_its_schedule():
    job = _job(3, 2, "standard")
    assert job.schedule == PassSchedule(rounds=3, eval_every=2, stats_pass=True)
    assert job.n_passes() == job.schedule.n_passes and job.stats_pass is True
    assert [job.evaluates(p) for p in range(1, 6)] == [job.schedule.evaluates(p) for p in range(1, 6)]
    assert job.eval_passes() == list(job.schedule.eval_passes())
    assert [job.rounds_before(p) for p in range(1, 6)] == [job.schedule.rounds_before(p) for p in range(1, 6)]


@pytest.mark.parametrize("rounds,every,scaling", GRID)
def test_the_reviewer_bounds_exactly_what_the_runtime_charges(rounds, every, scaling):
    # Prepare
    job = _job(rounds, every, scaling)
    spec = _site_spec(job)
    # Execute: the runtime's side -- the passes its plan evaluates, the evaluation
    # releases it charges pass by pass (JobRuntime._charge: job.pass_records)
    plans = [protocol.plan(spec, p) for p in spec.schedule.passes()]
    evaluating = [pl.pass_no for pl in plans if pl.evaluate]
    charged = [r for p in spec.schedule.passes() for r in job.pass_records(N_TRAIN, p)
               if r.noise_multiplier == EVAL_NOISE and r.sample_rate == 1.0 and r.steps == 1]
    # the reviewer's side -- the review facts' count and the limits' verdict at that count
    facts = job_facts(spec, n_train=N_TRAIN, request_id="grid-0123abcd", roster=tuple(sorted(ROSTER.items())),
                      site="s0", researcher="r@x", dataset="toy", code_name="f", code_hash="h")
    n = len(evaluating)

    def eval_denials(cap: int) -> list[str]:
        policy = Policy(allowed_tasks=("diabetes",), max_eval_passes=cap, min_eval_noise_multiplier=1.0)
        return [m for m in limits.job_problems(job.to_dict(), policy=policy, schema=SCHEMA, n_train=N_TRAIN)
                if "limits.max_eval_passes" in m]

    # Assert
    assert facts.eval_passes == n == len(charged), (facts.eval_passes, evaluating, len(charged))
    assert facts.passes == len(plans) == spec.schedule.last_pass
    assert eval_denials(n) == []
    assert eval_denials(n - 1) and f"in {n} passes" in eval_denials(n - 1)[0]
