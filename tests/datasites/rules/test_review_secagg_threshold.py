"""Review's secure-aggregation threshold rule: t > n/2 of the roster, whatever the policy's
``min_secagg_threshold`` (which stays an extra floor)."""

from __future__ import annotations

import compliance_helpers as H  # registered by tests/datasites/conftest.py
import pytest

from fedmtl.datasites.rules.review import SpendSummary, decide

NONE = SpendSummary()
RULE = "training.min_secagg_threshold"


def _threshold_reasons(decision) -> list[str]:
    return [r for r in decision.reasons if r.startswith(RULE + ":")]


@pytest.mark.parametrize(("n", "t"), [(3, 2), (4, 3), (5, 3), (6, 4), (7, 4), (5, 5)])
def test_a_majority_threshold_is_approved(n, t):
    d = decide(policy=H.make_policy(), request=H.make_facts(n_sites=n, secagg_threshold=t), spent=NONE)
    assert d.status == "approved", d.explain()


@pytest.mark.parametrize(("n", "t"), [(4, 2), (5, 2), (6, 3), (10, 5)])
def test_at_most_half_the_roster_is_denied_with_the_threshold_to_use(n, t):
    # Execute
    d = decide(policy=H.make_policy(), request=H.make_facts(n_sites=n, secagg_threshold=t), spent=NONE)
    # Assert: one reason, naming the numbers and what to set
    assert d.status == "denied"
    (reason,) = _threshold_reasons(d)
    assert f"secagg threshold {t} is not more than half of the {n} sites in the roster" in reason
    assert f"set secagg.threshold >= {n // 2 + 1}" in reason


def test_the_policy_minimum_stays_an_extra_floor():
    # t = 3 is a majority of 5, but this datasite asks for at least 4
    policy = H.make_policy(min_secagg_threshold=4, min_sites=5)
    d = decide(policy=policy, request=H.make_facts(n_sites=5, secagg_threshold=3), spent=NONE)
    assert d.status == "denied"
    (reason,) = _threshold_reasons(d)
    assert "between 4 and the number of sites 5" in reason
    assert decide(policy=policy, request=H.make_facts(n_sites=5, secagg_threshold=4), spent=NONE).status == "approved"
