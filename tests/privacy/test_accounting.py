"""Accounting: records in, epsilon out, matching Opacus's own accountants."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedmtl.errors import PrivacyBudgetError
from fedmtl.privacy import accounting
from fedmtl.privacy.accounting import (
    ACCOUNTANT_TYPES,
    ACCOUNTANTS,
    PrivacyRecord,
    calibrate_noise,
    create_accountant,
    epsilon_of,
    merge_records,
)

DELTA = 1e-5


def _opacus_eps(accountant, records, delta=DELTA):
    # Prepare: drive Opacus's accountant one step at a time, as its optimizer hook would
    for r in records:
        for _ in range(r.steps):
            accountant.step(noise_multiplier=r.noise_multiplier, sample_rate=r.sample_rate)
    return accountant.get_epsilon(delta=delta)


@pytest.mark.parametrize(
    "records",
    [
        [PrivacyRecord(1.1, 0.01, 300)],
        [PrivacyRecord(0.8, 0.05, 40), PrivacyRecord(1.5, 0.02, 100), PrivacyRecord(1.0, 0.1, 25)],
    ],
    ids=["single", "heterogeneous"],
)
def test_rdp_matches_opacus_rdp_accountant(records):
    # Execute
    ours = epsilon_of(records, delta=DELTA, accountant="rdp")
    theirs = _opacus_eps(RDPAccountant(), records)
    # Assert
    assert ours == pytest.approx(theirs, rel=1e-9)
    assert ours > 0


@pytest.mark.parametrize(
    "records",
    [
        [PrivacyRecord(1.1, 0.01, 300)],
        [PrivacyRecord(0.8, 0.05, 40), PrivacyRecord(1.5, 0.02, 100)],
    ],
    ids=["single", "heterogeneous"],
)
def test_prv_matches_opacus_prv_accountant(records):
    # Execute
    ours = epsilon_of(records, delta=DELTA, accountant="prv")
    theirs = _opacus_eps(PRVAccountant(), records)
    # Assert
    assert ours == pytest.approx(theirs, rel=1e-9)


def test_prv_is_tighter_than_rdp():
    # Prepare
    records = [PrivacyRecord(1.0, 0.02, 500)]
    # Execute
    rdp = epsilon_of(records, delta=DELTA, accountant="rdp")
    prv = epsilon_of(records, delta=DELTA, accountant="prv")
    # Assert
    assert prv < rdp


def test_composition_of_rounds_equals_one_long_run_and_grows():
    # Prepare: 5 rounds of 20 steps each, plus a second job on the same data
    rounds = [PrivacyRecord(1.2, 0.05, 20) for _ in range(5)]
    other_job = [PrivacyRecord(2.0, 0.1, 30)]
    # Execute
    eps_rounds = epsilon_of(rounds, delta=DELTA)
    eps_long = epsilon_of([PrivacyRecord(1.2, 0.05, 100)], delta=DELTA)
    eps_both = epsilon_of(rounds + other_job, delta=DELTA)
    eps_swapped = epsilon_of(other_job + rounds, delta=DELTA)
    # Assert
    assert eps_rounds == pytest.approx(eps_long, rel=1e-12)
    assert eps_both > eps_rounds
    assert eps_both == pytest.approx(eps_swapped, rel=1e-12)
    assert epsilon_of(rounds[:2], delta=DELTA) < eps_rounds


def test_non_adjacent_records_compose_like_opacus_within_prv_error():
    # Prepare: A, B, A -- Opacus keeps three history entries, we merge to two
    a, b = PrivacyRecord(1.0, 0.05, 30), PrivacyRecord(1.6, 0.02, 50)
    # Execute
    ours = epsilon_of([a, b, a], delta=DELTA, accountant="prv")
    theirs = _opacus_eps(PRVAccountant(), [a, b, a])
    # Assert: same mechanism, different discretisation, within PRV's eps_error
    assert ours == pytest.approx(theirs, abs=0.02)


def test_empty_and_free_records_cost_nothing_and_no_noise_costs_infinity():
    # Execute / Assert
    assert epsilon_of([], delta=DELTA) == 0.0
    assert epsilon_of([PrivacyRecord(1.0, 0.1, 0), PrivacyRecord(0.0, 0.0, 10)], delta=DELTA) == 0.0
    assert math.isinf(epsilon_of([PrivacyRecord(0.0, 0.1, 1)], delta=DELTA))
    assert math.isinf(epsilon_of([PrivacyRecord(0.0, 0.1, 1)], delta=DELTA, accountant="prv"))


def test_merge_records_groups_identical_mechanisms():
    # Prepare
    a, b = PrivacyRecord(1.0, 0.05, 3), PrivacyRecord(2.0, 0.05, 4)
    # Execute
    merged = merge_records([a, b, a, PrivacyRecord(1.0, 0.05, 0)])
    # Assert
    assert merged == [PrivacyRecord(1.0, 0.05, 6), PrivacyRecord(2.0, 0.05, 4)]


def test_record_roundtrips_through_dict():
    # Prepare
    r = PrivacyRecord(noise_multiplier=1.25, sample_rate=0.01, steps=7)
    # Execute
    back = PrivacyRecord.from_dict(r.to_dict())
    # Assert
    assert back == r
    assert r.to_dict() == {"noise_multiplier": 1.25, "sample_rate": 0.01, "steps": 7}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"noise_multiplier": -1.0, "sample_rate": 0.1, "steps": 1}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "sample_rate": 1.5, "steps": 1}, "sample_rate"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": -2}, "steps"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1.5}, "steps"),
        ({"noise_multiplier": float("nan"), "sample_rate": 0.1, "steps": 1}, "noise_multiplier"),
    ],
)
def test_invalid_records_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrivacyRecord(**kwargs)


def test_from_dict_names_missing_keys():
    with pytest.raises(ValueError, match="steps"):
        PrivacyRecord.from_dict({"noise_multiplier": 1.0, "sample_rate": 0.1})


def test_unknown_accountant_and_bad_delta_raise():
    recs = [PrivacyRecord(1.0, 0.1, 10)]
    with pytest.raises(ValueError, match=r"'gdp'.*\['rdp', 'prv'\]"):
        epsilon_of(recs, delta=DELTA, accountant="gdp")
    with pytest.raises(ValueError, match="delta"):
        epsilon_of(recs, delta=0.0)
    with pytest.raises(TypeError, match="PrivacyRecord"):
        epsilon_of([(1.0, 0.1, 10)], delta=DELTA)  # type: ignore[list-item]


@pytest.mark.parametrize("accountant", ["rdp", pytest.param("prv", marks=pytest.mark.slow)])
def test_calibrate_noise_reaches_target_from_below(accountant):
    # Prepare
    target, q, steps = 3.0, 0.02, 200
    # Execute
    sigma = calibrate_noise(
        target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps, accountant=accountant
    )
    spent = epsilon_of([PrivacyRecord(sigma, q, steps)], delta=DELTA, accountant=accountant)
    # Assert: within budget, and tight (a little less noise would overshoot)
    assert spent <= target
    assert spent > target - 0.05
    slightly_less = epsilon_of([PrivacyRecord(sigma * 0.97, q, steps)], delta=DELTA, accountant=accountant)
    assert slightly_less > target - 0.01


def test_calibrate_noise_agrees_with_opacus_get_noise_multiplier():
    from opacus.accountants.utils import get_noise_multiplier

    # Prepare
    kw = dict(sample_rate=0.01, steps=500)
    # Execute
    ours = calibrate_noise(target_epsilon=2.0, delta=DELTA, **kw)
    theirs = get_noise_multiplier(target_epsilon=2.0, target_delta=DELTA, **kw)
    # Assert: both bisections stop within 0.01 epsilon of the target
    assert ours == pytest.approx(theirs, rel=0.02)


def test_calibrate_noise_accounts_for_prior_spend():
    # Prepare
    prior = [PrivacyRecord(1.0, 0.02, 200)]
    spent = epsilon_of(prior, delta=DELTA)
    target = spent + 1.0
    # Execute
    fresh = calibrate_noise(target_epsilon=target, delta=DELTA, sample_rate=0.02, steps=200)
    after = calibrate_noise(target_epsilon=target, delta=DELTA, sample_rate=0.02, steps=200, prior=prior)
    # Assert: less budget left -> more noise, and the total fits
    assert after > fresh
    assert epsilon_of(prior + [PrivacyRecord(after, 0.02, 200)], delta=DELTA) <= target


def test_calibrate_noise_refuses_when_budget_already_spent():
    prior = [PrivacyRecord(0.5, 0.1, 1000)]
    with pytest.raises(PrivacyBudgetError, match="already spent"):
        calibrate_noise(target_epsilon=1.0, delta=DELTA, sample_rate=0.01, steps=10, prior=prior)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"accountant": "moments"}, "unknown accountant"),
    ],
)
def test_calibrate_noise_rejects_bad_arguments(kwargs, match):
    base = dict(target_epsilon=1.0, delta=DELTA, sample_rate=0.01, steps=10)
    with pytest.raises(ValueError, match=match):
        calibrate_noise(**{**base, **kwargs})


def test_accountants_come_from_a_registry():
    # Prepare
    recs = [PrivacyRecord(1.1, 0.01, 500), PrivacyRecord(0.9, 0.02, 100)]
    # Execute
    rdp, prv = create_accountant("rdp"), create_accountant("prv")
    # Assert: each registered class answers what epsilon_of answers by name
    assert isinstance(rdp, accounting.RDPAccountant) and isinstance(prv, accounting.PRVAccountant)
    assert ACCOUNTANTS == tuple(ACCOUNTANT_TYPES) == ("rdp", "prv")
    assert rdp.epsilon(recs, delta=1e-5) == epsilon_of(recs, delta=1e-5, accountant="rdp")
    assert prv.epsilon(recs, delta=1e-5) == epsilon_of(recs, delta=1e-5, accountant="prv")
    for bad in ("moments", "RDP", None, ["rdp"]):
        with pytest.raises(ValueError, match=r"unknown accountant .*\['rdp', 'prv'\]"):
            create_accountant(bad)
