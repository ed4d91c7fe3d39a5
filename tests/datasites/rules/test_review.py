"""The review decision matrix: each policy rule both approves and denies, with reasons
that name the rule and the numbers."""

from __future__ import annotations

from dataclasses import replace

import compliance_helpers as H  # registered by tests/datasites/conftest.py
import pytest

from fedmtl.datasites.rules.policy import code_hash
from fedmtl.datasites.rules.review import (
    Decision,
    ReviewError,
    SpendSummary,
    code_diff,
    decide,
    manual_decision,
)
from fedmtl.privacy.accounting import PrivacyRecord, epsilon_of

NONE = SpendSummary()
R = H.ROUND


def test_conforming_request_is_approved():
    d = decide(policy=H.make_policy(), request=H.make_facts(), spent=NONE)
    assert d.status == "approved" and d.reasons == () and d.warnings == ()
    assert d.epsilon_job == pytest.approx(epsilon_of([R] * 3, delta=1e-5))
    assert d.template == "fedmtl.round.v1" and d.automatic and d.reviewer == "auto"


# rule -> (facts overrides that pass, facts overrides that fail, spent that fail, parts of the reason)
MATRIX = {
    "tasks": (dict(tasks=("diabetes_5y", "fibrosis")), dict(tasks=("diabetes_5y", "hiv_status")), None,
              ["training.allowed_tasks", "['hiv_status']", "allowed: ['diabetes_5y', 'fibrosis']"]),
    "no task": (dict(tasks=("fibrosis",)), dict(tasks=()), None, ["training.allowed_tasks", "no task"]),
    "noise": (dict(noise_multiplier=1.0, records=(PrivacyRecord(1.0, 0.01, 10),)),
              dict(noise_multiplier=0.9, records=(PrivacyRecord(1.0, 0.01, 10),)), None,
              ["privacy.min_noise_multiplier", "0.9 is below the minimum 1", "noise_multiplier >= 1"]),
    "noise in records": (dict(records=(R, R)), dict(records=(R, PrivacyRecord(0.5, 0.01, 5))), None,
                         ["privacy.min_noise_multiplier", "0.5"]),
    "clipping": (dict(max_grad_norm=1.0), dict(max_grad_norm=1.5), None,
                 ["privacy.max_grad_norm", "1.5 is above the maximum 1", "max_grad_norm <= 1"]),
    "rounds": (dict(rounds=1), dict(rounds=6, records=(R,)), None, ["training.max_rounds", "rounds 6", "rounds <= 5"]),
    "local epochs": (dict(local_epochs=3), dict(local_epochs=4), None,
                     ["training.max_local_epochs", "local_epochs 4", "local_epochs <= 3"]),
    "min sites": (dict(n_sites=3), dict(n_sites=2), None, ["training.min_sites", "2 participating site(s)", "minimum 3"]),
    "secagg threshold": (dict(n_sites=4, secagg_threshold=4), dict(n_sites=3, secagg_threshold=1), None,
                         ["training.min_secagg_threshold", "threshold 1", "between 2 and the number of sites 3"]),
    "threshold above sites": (dict(secagg_threshold=3), dict(secagg_threshold=4), None,
                              ["training.min_secagg_threshold", "threshold 4"]),
    "per-site metrics": (dict(release_per_site_metrics=False), dict(release_per_site_metrics=True), None,
                         ["review.release_per_site_metrics"]),
    "delta": (dict(delta=1e-6), dict(delta=1e-4), None, ["privacy.delta", "0.0001 is above", "1e-05"]),
    "epsilon per job": (dict(rounds=4), dict(steps_per_round=60), None,
                        ["privacy.max_epsilon_per_job", "2.473", "per-job maximum 2"]),
    "template": (dict(), dict(code_name="mine", code_hash=code_hash("print(1)")), None,
                 ["review.templates_only", "'mine'", "PYSEC-2026-546", "no isolation", "allowed: fedmtl.round.v1"]),
    # budgets: the facts pass, what was already spent decides
    "dataset budget": (dict(), dict(), SpendSummary(dataset_records=(PrivacyRecord(1.0, 0.1, 50),)),
                       ["privacy.dataset_epsilon_budget", "'nafld' has spent epsilon 5.881", "reach 6.04",
                        "budget 6", "it costs 1.507 alone"]),
    "researcher budget": (dict(), dict(), SpendSummary(dataset_records=(PrivacyRecord(1.5, 0.1, 100),),
                                                       researcher_records=(PrivacyRecord(1.5, 0.1, 100),)),
                          ["privacy.researcher_epsilon_budget", "alice@uni.example has spent epsilon 3.923",
                           "reach 4.173", "budget 4"]),
}


@pytest.mark.parametrize("rule", list(MATRIX))
def test_each_rule_approves_and_denies(rule):
    # Prepare
    ok, bad, bad_spent, parts = MATRIX[rule]
    policy = H.make_policy()
    # Execute
    good = decide(policy=policy, request=H.make_facts(**ok), spent=NONE)
    denied = decide(policy=policy, request=H.make_facts(**bad), spent=bad_spent or NONE)
    # Assert
    assert good.status == "approved", good.explain()
    assert denied.status == "denied"
    rule_key = parts[0]
    (reason,) = [r for r in denied.reasons if r.startswith(rule_key + ":")]
    for part in parts:
        assert part in reason, f"{part!r} not in {reason!r}"


def test_several_violations_give_several_reasons():
    d = decide(policy=H.make_policy(), request=H.make_facts(noise_multiplier=0.5, max_grad_norm=9.0, n_sites=1), spent=NONE)
    rules = [r.split(":")[0] for r in d.reasons]
    assert d.status == "denied"
    assert {"privacy.min_noise_multiplier", "privacy.max_grad_norm", "training.min_sites"} <= set(rules)
    assert "privacy.max_epsilon_per_job" in rules  # noise 0.5 is also too expensive
    assert d.explain().count("\n  - ") == len(d.reasons)


def test_budgets_compose_records_not_add_epsilons():
    spent = SpendSummary(dataset_records=(R,) * 3, researcher_records=(R,) * 3)
    d = decide(policy=H.make_policy(), request=H.make_facts(), spent=spent)
    six = epsilon_of([R] * 6, delta=1e-5)
    assert d.epsilon_after_dataset == pytest.approx(six) and d.epsilon_after_researcher == pytest.approx(six)
    assert six < 2 * d.epsilon_job  # composition is cheaper than the sum
    assert d.budget_left["dataset"] == pytest.approx(6.0 - epsilon_of([R] * 3, delta=1e-5))
    assert d.status == "approved"


def test_manual_mode_needs_a_person_for_conforming_requests():
    policy = H.make_policy(approval="manual")
    pending = decide(policy=policy, request=H.make_facts(), spent=NONE)
    denied = decide(policy=policy, request=H.make_facts(n_sites=1), spent=NONE)
    assert pending.status == "pending_manual" and "review.approval" in pending.reasons[0]
    assert denied.status == "denied"
    approved = manual_decision(pending, approve=True, reviewer="owner@h", reason="fine")
    assert approved.status == "approved" and not approved.automatic and approved.reviewer == "owner@h"


def test_non_template_code_when_templates_only_is_off():
    # Prepare
    policy = H.make_policy(templates_only=False)
    facts = H.make_facts(code_name="mine", code_hash=code_hash("print(1)"))
    # Execute
    d = decide(policy=policy, request=facts, spent=NONE)
    # Assert: never automatic, the advisory warning attached
    assert d.status == "pending_manual"
    assert any("PYSEC-2026-546" in w and "no isolation" in w for w in d.warnings)
    with pytest.raises(ReviewError, match="warnings_acknowledged=True"):
        manual_decision(d, approve=True, reviewer="owner@h", reason="ok")
    ok = manual_decision(d, approve=True, reviewer="owner@h", reason="read it", warnings_acknowledged=True)
    assert ok.status == "approved" and ok.warning_shown is True
    no = manual_decision(d, approve=False, reviewer="owner@h", reason="imports os")
    assert no.status == "denied" and no.warning_shown is False and "imports os" in no.reasons[-1]
    # the same code with a rule broken is denied outright
    assert decide(policy=policy, request=replace(facts, n_sites=1), spent=NONE).status == "denied"


def test_a_person_cannot_override_a_policy_denial():
    d = decide(policy=H.make_policy(), request=H.make_facts(max_grad_norm=5.0), spent=NONE)
    with pytest.raises(ReviewError, match="cannot approve a request the policy decided as 'denied'"):
        manual_decision(d, approve=True, reviewer="owner@h", reason="please", warnings_acknowledged=True)
    with pytest.raises(ReviewError, match="needs a reason"):
        manual_decision(d, approve=False, reviewer="owner@h", reason=" ")


def test_decision_round_trips_through_json_with_infinite_epsilon():
    d = decide(policy=H.make_policy(), request=H.make_facts(records=(PrivacyRecord(0.0, 0.1, 5),)), spent=NONE)
    assert d.status == "denied" and d.epsilon_job == float("inf")
    import json

    again = Decision.from_dict(json.loads(json.dumps(d.to_dict(), allow_nan=False)))
    assert again == d


def test_code_diff_shows_changed_lines():
    new = H.TEMPLATE_SRC.replace("train(spec, weights)", "__import__('os').system('id')")
    diff = code_diff(new, H.TEMPLATE_SRC, template_name="fedmtl.round.v1")
    assert diff.startswith("--- fedmtl.round.v1\n+++ submitted\n")
    assert "-    return train(spec, weights)" in diff and "+    return __import__('os').system('id')" in diff
    assert code_diff(H.TEMPLATE_SRC, H.TEMPLATE_SRC) == ""


def test_facts_round_trip():
    f = H.make_facts(records=(R, R))
    assert type(f).from_dict(f.to_dict()) == f
    assert H.make_facts(rounds=2).privacy_records() == [R, R]


# -- budget denials say what would still fit -------------------------------------------------
EVAL = PrivacyRecord(5.0, 1.0, 1)  # one evaluation release (sample rate 1, one step)


def _eps(recs):
    return epsilon_of(list(recs), delta=1e-5)


def _reason(d, rule):
    (reason,) = [r for r in d.reasons if r.startswith(rule + ":")]
    return reason


def test_per_job_denial_names_the_maximum_and_the_most_rounds_at_the_same_noise():
    # Prepare: 60 steps a round at noise 1.5; 3 rounds cost 2.473 > 2, 1 round 1.507
    facts = H.make_facts(steps_per_round=60)
    # Execute
    d = decide(policy=H.make_policy(), request=facts, spent=NONE)
    # Assert: the rule key first, the old numbers kept, then the largest epsilon and rounds
    reason = _reason(d, "privacy.max_epsilon_per_job")
    one, two = PrivacyRecord(1.5, 0.05, 60), [PrivacyRecord(1.5, 0.05, 60)] * 2
    assert _eps([one]) <= 2.0 < _eps(two)  # the search's answer is the true boundary
    assert "The largest epsilon that fits is the maximum 2" in reason
    assert ", and at noise_multiplier 1.5 at most 1 round(s) fit (epsilon 1.507 alone)" in reason


def test_dataset_budget_denial_names_the_largest_epsilon_and_rounds_that_still_fit():
    spent = SpendSummary(dataset_records=(PrivacyRecord(1.0, 0.1, 50),))
    d = decide(policy=H.make_policy(), request=H.make_facts(), spent=spent)
    reason = _reason(d, "privacy.dataset_epsilon_budget")
    # composed with what was spent: 2 rounds fit the budget 6, 3 do not
    assert _eps([*spent.dataset_records, R, R]) <= 6.0 < _eps([*spent.dataset_records, R, R, R])
    assert _eps([R, R]) == pytest.approx(1.28672, abs=1e-5)  # shown rounded down: never overshoots
    assert "At noise_multiplier 1.5 at most 2 round(s) fit: the largest epsilon that still fits at that " \
           "noise is 1.286 (the job alone)" in reason


def test_researcher_budget_denial_when_not_even_one_round_fits():
    spent = SpendSummary(dataset_records=(PrivacyRecord(1.5, 0.1, 100),),
                         researcher_records=(PrivacyRecord(1.5, 0.1, 100),))
    d = decide(policy=H.make_policy(), request=H.make_facts(), spent=spent)
    reason = _reason(d, "privacy.researcher_epsilon_budget")
    assert _eps([*spent.researcher_records, R]) > 4.0
    assert "Not even 1 round at noise_multiplier 1.5 fits (it costs epsilon 1.024 alone)" in reason
    assert "raise noise_multiplier" in reason


def test_budget_denial_when_the_budget_is_already_spent():
    spent = SpendSummary(dataset_records=(PrivacyRecord(1.0, 0.1, 200),))
    d = decide(policy=H.make_policy(), request=H.make_facts(), spent=spent)
    assert "Nothing fits here any more: what was spent already exceeds the budget" in \
        _reason(d, "privacy.dataset_epsilon_budget")


def test_the_rounds_search_keeps_the_evaluation_releases():
    # Prepare: 3 rounds + 1 final evaluation release, as the reviewer derives them from a spec
    facts = H.make_facts(records=(R, R, R, EVAL), eval_passes=1, eval_noise_multiplier=5.0)
    spent = SpendSummary(dataset_records=(PrivacyRecord(1.0, 0.1, 50),))
    policy = H.make_policy(dataset_epsilon_budget=6.03)
    # Execute
    d = decide(policy=policy, request=facts, spent=spent)
    # Assert: 1 round fits with the release, 2 do not
    reason = _reason(d, "privacy.dataset_epsilon_budget")
    assert "at most 1 round(s) fit" in reason
    assert _eps([*spent.dataset_records, R, EVAL]) <= 6.03 < _eps([*spent.dataset_records, R, R, EVAL])
    assert _eps([R, EVAL]) == pytest.approx(1.26416, abs=1e-5)
    assert "the largest epsilon that still fits at that noise is 1.264 (the job alone)" in reason
    # and when the releases alone no longer fit, nothing does
    spent = SpendSummary(dataset_records=(PrivacyRecord(0.9, 0.1, 300),))
    d = decide(policy=policy, request=facts, spent=spent)
    assert "what was spent, with the job's evaluation releases alone, already exceeds the budget" in \
        _reason(d, "privacy.dataset_epsilon_budget")


def test_the_rounds_search_stops_at_the_policys_max_rounds():
    # 8 rounds, above max_rounds 5; a budget that 7 rounds would meet but 8 do not
    policy = H.make_policy(max_epsilon_per_job=2.3, dataset_epsilon_budget=2.3, researcher_epsilon_budget=2.3)
    d = decide(policy=policy, request=H.make_facts(rounds=8), spent=NONE)
    assert _eps([R] * 7) <= 2.3 < _eps([R] * 8)
    assert any(r.startswith("training.max_rounds:") for r in d.reasons)
    assert "at most 5 round(s) fit" in _reason(d, "privacy.dataset_epsilon_budget")


def test_the_rounds_search_is_a_binary_search(monkeypatch):
    # Prepare: a policy allowing 64 rounds and a 64-round job far too expensive
    import fedmtl.datasites.rules.review as review

    calls = []
    real = review.epsilon_of

    def counting(records, **kw):
        calls.append(len(records))
        return real(records, **kw)

    monkeypatch.setattr(review, "epsilon_of", counting)
    policy = H.make_policy(max_rounds=64, max_epsilon_per_job=3.0, dataset_epsilon_budget=3.5,
                           researcher_epsilon_budget=3.2)
    # Execute
    d = decide(policy=policy, request=H.make_facts(rounds=64), spent=NONE)
    # Assert: 5 compositions for the decision itself, then about log2(64) per denied rule
    rules = [r.split(":")[0] for r in d.reasons]
    assert {"privacy.max_epsilon_per_job", "privacy.dataset_epsilon_budget", "privacy.researcher_epsilon_budget"} <= set(rules)
    assert len(calls) <= 5 + 3 * (6 + 2)
    for rule, limit in (("privacy.max_epsilon_per_job", 3.0), ("privacy.dataset_epsilon_budget", 3.5),
                        ("privacy.researcher_epsilon_budget", 3.2)):
        k = int(_reason(d, rule).split("at most ")[1].split(" round")[0])
        assert _eps([R] * k) <= limit < _eps([R] * (k + 1)), rule


def test_irregular_records_get_no_rounds_hint_but_keep_the_rule_and_numbers():
    facts = H.make_facts(records=(R, PrivacyRecord(1.5, 0.05, 200)))
    d = decide(policy=H.make_policy(), request=facts, spent=NONE)
    reason = _reason(d, "privacy.max_epsilon_per_job")
    assert "The largest epsilon that fits is the maximum 2" in reason and "round(s) fit" not in reason


def test_the_hints_add_no_semicolon_to_a_reason():
    # syft shows a denial as the reasons joined with "; ": a hint must not add a split point
    cases = [
        (H.make_facts(steps_per_round=60), NONE),
        (H.make_facts(), SpendSummary(dataset_records=(PrivacyRecord(1.0, 0.1, 50),))),
        (H.make_facts(), SpendSummary(dataset_records=(PrivacyRecord(1.5, 0.1, 100),),
                                      researcher_records=(PrivacyRecord(1.5, 0.1, 100),))),
        (H.make_facts(), SpendSummary(dataset_records=(PrivacyRecord(1.0, 0.1, 200),))),
    ]
    # the semicolons each message had before its hint
    budget_rules = {"privacy.max_epsilon_per_job": 1, "privacy.dataset_epsilon_budget": 2,
                    "privacy.researcher_epsilon_budget": 2}
    seen = set()
    for facts, spent in cases:
        for reason in decide(policy=H.make_policy(), request=facts, spent=spent).reasons:
            rule = reason.split(":")[0]
            if rule in budget_rules:
                seen.add(rule)
                assert reason.count(";") == budget_rules[rule], reason
    assert seen == set(budget_rules)
