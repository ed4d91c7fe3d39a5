"""The one budget check (fedmtl.datasites.rules.budget): its verdict and its meaning of
"left", and that the reviewer and the ledger's charge, which both use it, agree on every
history."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import compliance_helpers as H  # registered by tests/datasites/conftest.py
import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from fedmtl.datasites.ledger.ledger import Ledger
from fedmtl.datasites.rules.budget import EPS_TOLERANCE, check_budget, exceeds
from fedmtl.datasites.rules.review import SpendSummary, decide
from fedmtl.errors import PrivacyBudgetError
from fedmtl.privacy.accounting import PrivacyRecord, epsilon_of
from fedmtl.privacy.keys import SigningKey

R = H.ROUND
BUDGET_RULES = ("privacy.max_epsilon_per_job", "privacy.dataset_epsilon_budget", "privacy.researcher_epsilon_budget")
PARTS = ["st-mary", "general", "riverside"]


def test_exceeds_allows_float_noise_only():
    # Prepare / Execute / Assert
    assert not exceeds(2.0, 2.0)
    assert not exceeds(2.0 * (1 + EPS_TOLERANCE / 2), 2.0)
    assert exceeds(2.0 * (1 + 10 * EPS_TOLERANCE), 2.0)
    assert exceeds(1e-6, 0.0) and not exceeds(0.0, 0.0)


def test_left_is_the_budget_before_the_new_records():
    # Prepare
    before, new = [R, R], [R]
    # Execute
    c = check_budget(before=before, new=new, limit=4.0, delta=1e-5, accountant="rdp")
    # Assert: left is limit minus what was spent before; after composes (never adds)
    assert c.before == pytest.approx(epsilon_of([R, R], delta=1e-5))
    assert c.after == pytest.approx(epsilon_of([R, R, R], delta=1e-5))
    assert c.left == pytest.approx(4.0 - c.before)
    assert c.after < c.before + epsilon_of([R], delta=1e-5)
    assert not c.over
    assert check_budget(before=before, new=new, limit=c.after * 0.99, delta=1e-5, accountant="rdp").over


# -- the reviewer and the ledger agree -------------------------------------------------------

records = st.builds(
    PrivacyRecord,
    noise_multiplier=st.sampled_from([1.0, 1.5, 2.0, 3.0]),
    sample_rate=st.sampled_from([0.01, 0.05, 0.1]),
    steps=st.sampled_from([10, 20, 50]),
)
jobs = st.lists(records, min_size=1, max_size=4)
history = st.lists(st.tuples(st.sampled_from([H.ALICE, H.BOB]), jobs), max_size=3)
# a budget at random (the dataset's; the researcher's and the per-job maximum as a share of
# the one above, as a valid policy has them), or exactly what the job brings the total to
limit = st.one_of(st.floats(min_value=0.2, max_value=8.0), st.just("exact"))
share = st.one_of(st.floats(min_value=0.1, max_value=1.0), st.just("exact"))


def _facts(job: list[PrivacyRecord], researcher: str):
    return H.make_facts(researcher=researcher, rounds=len(job), records=tuple(job),
                        noise_multiplier=job[0].noise_multiplier, sample_rate=job[0].sample_rate,
                        steps_per_round=job[0].steps)


def _approve(led: Ledger, facts) -> None:
    """Record ``facts`` as approved whatever the policy says, with its own epsilon."""
    d = decide(policy=led.current_policy(), request=facts, spent=SpendSummary())
    led.record_review(facts, replace(d, status="approved", reasons=()))


@settings(max_examples=40, deadline=None)
@given(past=history, job=jobs, ds_limit=limit, rs_limit=share, job_limit=share)
def test_review_and_charge_give_the_same_verdict_on_any_history(past, job, ds_limit, rs_limit, job_limit):
    with tempfile.TemporaryDirectory() as tmp:
        # Prepare: a ledger whose history was charged under a permissive policy
        led = Ledger.open(Path(tmp), SigningKey.generate(), clock=H.FakeClock())
        big = dict(max_epsilon_per_job=1e6, researcher_epsilon_budget=1e6, dataset_epsilon_budget=1e6)
        led.record_policy(H.make_policy(**big), who=H.OWNER)
        for who, recs in past:
            f = _facts(recs, who)
            _approve(led, f)
            for p, rec in enumerate(recs, start=1):
                led.charge_pass(request_id=f.request_id, pass_no=p, records=[rec], participants=PARTS)
            led.finish_job(f.request_id)
        spent_ds = led.spent_records(dataset="nafld")
        spent_rs = led.spent_records(dataset="nafld", researcher=H.ALICE)

        def at(x, before, of=1.0):
            return epsilon_of([*before, *job], delta=1e-5) if x == "exact" else x * of

        ds_budget = at(ds_limit, spent_ds)
        rs_budget = at(rs_limit, spent_rs, ds_budget)
        job_max = at(job_limit, [], rs_budget)
        assume(job_max <= rs_budget <= ds_budget)
        policy = H.make_policy(max_epsilon_per_job=job_max, dataset_epsilon_budget=ds_budget,
                               researcher_epsilon_budget=rs_budget)
        led.record_policy(policy, who=H.OWNER)
        facts = _facts(job, H.ALICE)
        # Execute: the reviewer's verdict; then the ledger charges the job pass by pass
        d = decide(policy=policy, request=facts, spent=led.spend_summary(dataset="nafld", researcher=H.ALICE))
        review_refuses = any(r.startswith(BUDGET_RULES) for r in d.reasons)
        led.record_review(facts, replace(d, status="approved", reasons=()))
        charges, ledger_refuses = [], False
        try:
            for p, rec in enumerate(job, start=1):
                charges.append(led.charge_pass(request_id=facts.request_id, pass_no=p, records=[rec],
                                               participants=PARTS))
        except PrivacyBudgetError:
            ledger_refuses = True
        # Assert: one verdict, and "left" means the same (before the job) in both
        event("refused" if review_refuses else "charged")
        assert review_refuses == ledger_refuses, (d.explain(), [c.epsilon_dataset for c in charges])
        if charges:
            assert dict(charges[0].budget_left) == dict(d.budget_left)
        if not ledger_refuses:
            assert charges[-1].epsilon_dataset == d.epsilon_after_dataset
            assert charges[-1].epsilon_researcher == d.epsilon_after_researcher
