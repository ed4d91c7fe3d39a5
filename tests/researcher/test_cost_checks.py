"""``job.cost()`` runs the site's own review ahead of time (fedmtl.datasites.review.preview):
it names every rule that would deny a job in the review's words, and its ``fits`` is the
review's budget decision (records composed, not epsilons added) on any history.

Pure tests first (the preview against the reviewer's functions and a ledger); one case
against a real datasite that then reviews the same job.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from fedmtl.contract.jobspec import JobSpec
from fedmtl.contract.site_spec import SiteSpec
from fedmtl.datasites.ledger import site_ledger
from fedmtl.datasites.ledger.ledger import Ledger
from fedmtl.datasites.review.autoreview import job_facts
from fedmtl.datasites.review.preview import preview, rule_of
from fedmtl.datasites.rules import limits
from fedmtl.datasites.rules.policy import Policy
from fedmtl.datasites.rules.review import Decision
from fedmtl.datasites.server import admin
from fedmtl.datasites.template import TEMPLATE_NAME, TEMPLATE_SHA256
from fedmtl.privacy.accounting import epsilon_of
from fedmtl.privacy.keys import SigningKey
from fedmtl.researcher.job import Job, price, price_table
from fedmtl.researcher.session import Session
from fedmtl.schema import Schema

SITE = "st-mary"
OWN_KEY = SigningKey.generate().verify_key.to_bytes().hex()
PEERS = {name: SigningKey.generate().verify_key.to_bytes().hex() for name in ("general", "riverside")}
ROSTER = {SITE: OWN_KEY, **PEERS}
N_TRAIN = 800
SCHEMA = Schema.from_dict({
    "dataset": {"name": "toy"},
    "columns": [
        {"name": "id", "role": "id", "type": "numeric"},
        {"name": "age", "role": "feature", "type": "numeric", "min": 18, "max": 90},
        {"name": "diabetes", "role": "label", "type": "binary", "missing": True},
    ],
})
ME = "ada@uni.example"
PW = "researcher-password-1"
BUDGET_RULES = ("privacy.max_epsilon_per_job", "privacy.researcher_epsilon_budget")


def _policy(**overrides) -> Policy:
    pins = {name: hashlib.sha256(bytes.fromhex(key)).hexdigest() for name, key in PEERS.items()}
    return Policy.default(allowed_tasks=["diabetes"], templates={TEMPLATE_NAME: TEMPLATE_SHA256}, peers=pins,
                          **overrides)


def _site_spec(spec: JobSpec, job_id: str = "plan-0001") -> dict:
    return {"job": spec.for_sites(sorted(ROSTER)).to_dict(), "job_id": job_id, "site": SITE, "roster": ROSTER,
            "schema": SCHEMA.to_dict(), "max_count": N_TRAIN, "template": TEMPLATE_NAME}


def _job(**kw) -> JobSpec:
    base = dict(name="plan", tasks=[{"label": "diabetes"}], rounds=3, local_steps=10, sample_rate=0.02,
                noise_multiplier=1.0, secagg={"threshold": 2}, scaling="range")
    base.update(kw)
    return JobSpec(**base)


def _review(policy: Policy, site_spec: dict, led: Ledger) -> Decision:
    """What the site's reviewer decides (autoreview.review_one's path for a well-formed spec)."""
    facts = job_facts(SiteSpec.parse(site_spec), n_train=N_TRAIN, request_id=site_spec["job_id"],
                      roster=tuple(sorted(ROSTER.items())), site=SITE, researcher=ME, dataset="toy",
                      code_name=f"{TEMPLATE_NAME}_x", code_hash=TEMPLATE_SHA256)
    return led.review_and_record(facts)


# -- the rules, in the review's words ----------------------------------------------------------


def test_spec_bounds_name_each_rule_as_the_review_does():
    # Prepare: too many local epochs and too many rounds
    spec = _site_spec(_job(local_steps=None, local_epochs=9.0, rounds=80))
    # Execute
    seen = preview(spec, policy=_policy(), schema=SCHEMA, site=SITE, own_key=OWN_KEY, n_train=N_TRAIN,
                   researcher_records=[])
    # Assert: denied, each rule named, and the reasons are the reviewer's first gate word for word
    problems, _ = limits.spec_problems(spec, policy=_policy(), schema=SCHEMA, site=SITE, own_key=OWN_KEY,
                                       n_train=N_TRAIN)
    assert seen.status == "denied"
    assert seen.would_deny == problems
    rules = {c.rule for c in seen.checks}
    assert {"training.max_local_epochs", "training.max_rounds"} <= rules


def test_policy_rules_after_the_bounds_are_the_decisions_reasons():
    # Prepare: noise below the site's minimum; a per-job maximum the job exceeds
    policy = _policy(max_epsilon_per_job=0.5)
    spec = _site_spec(_job(noise_multiplier=0.5))
    with tempfile.TemporaryDirectory() as tmp:
        led = Ledger.open(Path(tmp), SigningKey.generate())
        led.record_policy(policy, who="owner")
        # Execute
        seen = preview(spec, policy=policy, schema=SCHEMA, site=SITE, own_key=OWN_KEY, n_train=N_TRAIN,
                       researcher=ME, dataset="toy", researcher_records=[])
        decision = _review(policy, spec, led)
    # Assert: the same status and the same reasons as the reviewer's
    assert decision.status == seen.status == "denied"
    assert seen.would_deny == list(decision.reasons)
    assert [c.rule for c in seen.checks][:2] == ["privacy.min_noise_multiplier", "privacy.max_epsilon_per_job"]
    assert seen.fits is False


def test_a_conforming_job_is_approved_and_a_manual_site_says_so():
    spec = _site_spec(_job())
    auto = preview(spec, policy=_policy(), schema=SCHEMA, site=SITE, own_key=OWN_KEY, n_train=N_TRAIN,
                   researcher_records=[])
    manual = preview(spec, policy=_policy(approval="manual"), schema=SCHEMA, site=SITE, own_key=OWN_KEY,
                     n_train=N_TRAIN, researcher_records=None)
    assert auto.status == "approved" and auto.checks == () and auto.fits is True
    assert manual.status == "pending_manual" and manual.fits is None and manual.budget_left is None
    assert any(u.startswith("privacy.researcher_epsilon_budget") for u in manual.unknown)
    assert rule_of("no key here") == "spec"


# -- one budget rule: cost()'s fits is the review's decision on any history ---------------------

_jobs = st.builds(
    dict,
    rounds=st.integers(1, 6),
    noise_multiplier=st.sampled_from([0.8, 1.0, 1.5, 2.5]),
    sample_rate=st.sampled_from([0.01, 0.05, 0.1]),
    local_steps=st.sampled_from([5, 20, 50]),
)
_history = st.lists(st.tuples(_jobs, st.integers(0, 6)), max_size=3)  # (job, passes run)


@settings(max_examples=30, deadline=None)
@given(past=_history, new=_jobs, share=st.floats(0.6, 1.4), job_share=st.floats(0.5, 1.0))
def test_fits_equals_the_reviews_budget_decision_on_random_histories(past, new, share, job_share):
    with tempfile.TemporaryDirectory() as tmp:
        # Prepare: jobs approved earlier (some passes charged, the rest committed) under a loose policy
        led = Ledger.open(Path(tmp), SigningKey.generate())
        led.record_policy(_policy(max_epsilon_per_job=1e5, researcher_epsilon_budget=1e5,
                                  dataset_epsilon_budget=1e5), who="owner")
        for i, (kw, ran) in enumerate(past):
            spec = _site_spec(_job(**kw), job_id=f"old-{i}")
            assert _review(led.current_policy(), spec, led).status == "approved"
            recs = _job(**kw).for_sites(sorted(ROSTER)).job_records(N_TRAIN)
            for p, rec in enumerate(recs[:ran], start=1):
                led.charge_pass(request_id=f"old-{i}", pass_no=p, records=[rec], participants=sorted(ROSTER))
        # a policy whose budgets sit around what the new job would bring the researcher to
        spec = _site_spec(_job(**new), job_id="new-job")
        mine = led.spend_summary(dataset="toy", researcher=ME).researcher_records  # the spend view's records
        total = epsilon_of([*mine, *_job(**new).for_sites(sorted(ROSTER)).job_records(N_TRAIN)], delta=1e-5)
        rs = total * share
        policy = _policy(researcher_epsilon_budget=rs, dataset_epsilon_budget=rs,
                         max_epsilon_per_job=rs * job_share)
        led.record_policy(policy, who="owner")
        # Execute
        seen = preview(spec, policy=policy, schema=SCHEMA, site=SITE, own_key=OWN_KEY, n_train=N_TRAIN,
                       researcher=ME, dataset="toy", researcher_records=list(mine))
        decision = _review(policy, spec, led)
    # Assert: fits is exactly the review's budget verdict, and the budget left is the review's
    denied_by_budget = any(r.startswith(BUDGET_RULES) for r in decision.reasons)
    event("denied" if denied_by_budget else "fits")
    assert seen.fits is (not denied_by_budget), decision.explain()
    assert seen.budget_left == pytest.approx(decision.budget_left["researcher"])
    assert seen.status == decision.status
    assert seen.would_deny == [r for r in decision.reasons if not r.startswith(
        "privacy.dataset_epsilon_budget")]


# -- a real datasite: cost() names the rule, then its review denies with it ---------------------


@pytest.mark.integration
def test_cost_names_the_rules_real_sites_then_deny_by(federation, tmp_path):
    # Prepare: the shared federation (tests/researcher/conftest.py: three demo datasites,
    # pinned to each other after launch, so the launch-time policy they publish pins no peer)
    handles = federation
    me = "planner@uni.example"
    for h in handles:
        admin.add_researcher(home=h.home, email=me, password=PW)
    session = Session.connect([{"url": h.url, "email": me, "password": PW} for h in handles])
    spec = JobSpec(name="too-long", tasks=[{"label": "diabetes_5y"}], rounds=80, local_epochs=9.0,
                   sample_rate=0.02, noise_multiplier=1.0, secagg={"threshold": 2}, scaling="range")
    job = Job.create(session, spec, out=tmp_path / "job")
    # Execute: price it (no approved job yet: the policies published at launch), then submit it
    rows = job.cost()
    job.submit()
    status = job.wait_for_review(timeout=60)
    # Assert: cost() named the rules at every site, and each site denied with exactly those reasons
    for h in handles:
        row = rows[h.name]
        assert row["review"] == "denied", row
        assert {"training.max_local_epochs", "training.max_rounds"} <= {c["rule"] for c in row["checks"]}
        assert status[h.name]["status"] == "denied"
        state = site_ledger.open_ledger(h.home).request(job.job_id)
        assert state is not None and list(state.decision.reasons) == row["would_deny"]
    assert "would deny (training.max_local_epochs)" in price_table(rows)


# -- price(): where the policy and your records come from ---------------------------------------


class _Code:
    """A site's approved round functions: each answers the spend query with ``view``."""

    def __init__(self, views):
        self.views = views

    def __getattr__(self, name):
        if name not in self.views:
            raise AttributeError(name)
        reply = {"ok": True, "view": self.views[name]}
        return lambda *, data, message: SimpleNamespace(get=lambda: reply)  # syft's result: .get()


def _fake_site(name, key, *, policy=None, approved=(), view=None):
    requests = [SimpleNamespace(code=SimpleNamespace(service_func_name=f), status=SimpleNamespace(name="APPROVED"))
                for f in approved]
    client = SimpleNamespace(requests=SimpleNamespace(get_all=lambda: list(requests)),
                             code=_Code({f: view for f in approved}))
    meta = {"n_records": 1000, "split_sizes": {"train": N_TRAIN}, "schema": SCHEMA.to_dict()}
    if policy is not None:
        meta["policy"] = policy.to_dict()
    return SimpleNamespace(name=name, meta=meta, client=client, asset="asset", dataset=SimpleNamespace(name="toy"),
                           schema=SCHEMA, n_records=1000, identity=SimpleNamespace(verify_key=key))


def test_price_runs_the_review_on_the_published_policy_and_your_records():
    # Prepare: three sites. st-mary: launch-time policy only (no peers pinned yet), no job of
    # yours approved; general: your spend view with its current policy and heavy spend;
    # riverside: an older site that publishes no policy
    keys = {n: SigningKey.generate().verify_key for n in (SITE, "general", "riverside")}
    fps = {n: hashlib.sha256(k.to_bytes()).hexdigest() for n, k in keys.items()}
    launch_time = Policy.default(allowed_tasks=["diabetes"], templates={TEMPLATE_NAME: TEMPLATE_SHA256})
    current = Policy.default(allowed_tasks=["diabetes"], templates={TEMPLATE_NAME: TEMPLATE_SHA256},
                             peers={n: fps[n] for n in (SITE, "riverside")})
    spend = _job(noise_multiplier=0.9, rounds=6, local_steps=50).job_records(N_TRAIN) * 3
    view = {"budget_left": {"toy": 1.0}, "policy": current.to_dict(), "records": [r.to_dict() for r in spend]}
    old = f"{TEMPLATE_NAME}_old_1"
    session = SimpleNamespace(sites={
        SITE: _fake_site(SITE, keys[SITE], policy=launch_time),
        "general": _fake_site("general", keys["general"], approved=[old], view=view),
        "riverside": _fake_site("riverside", keys["riverside"]),
    })
    session.schemas = {n: SCHEMA for n in session.sites}
    # Execute
    rows = price(session, _job(local_steps=None, local_epochs=9.0))
    # Assert: each site with a policy names the rule; budgets composed as the review composes them
    for s in (SITE, "general"):
        assert rows[s]["review"] == "denied"
        assert "training.max_local_epochs" in {c["rule"] for c in rows[s]["checks"]}
    assert rows[SITE]["budget_left"] is None  # the spec bounds deny before any arithmetic, as the review does
    assert any(u.startswith("review.peers") for u in rows[SITE]["unchecked"])
    assert not any(u.startswith("review.peers") for u in rows["general"]["unchecked"])
    assert rows["riverside"]["review"] is None and "publishes no policy" in rows["riverside"]["policy_from"]
    # a conforming job: st-mary (nothing of yours spent) fits; general's composed budget does not
    rows = price(session, _job())
    assert rows[SITE]["review"] == "approved" and rows[SITE]["fits"] is True
    assert rows[SITE]["budget_left"] == pytest.approx(5.0)
    left = 5.0 - epsilon_of(spend, delta=1e-5)
    assert rows["general"]["budget_left"] == pytest.approx(left)
    assert rows["general"]["fits"] is False and rows["general"]["review"] == "denied"
    assert [c["rule"] for c in rows["general"]["checks"]] == ["privacy.researcher_epsilon_budget"]
