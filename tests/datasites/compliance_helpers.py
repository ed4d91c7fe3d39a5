"""Helpers shared by the policy / review / ledger / audit tests (no server needed).

Not a conftest (that one belongs to the records tests): test files load this module
with :func:`load` below, so the two never collide.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from fedmtl.datasites.rules.policy import Policy, code_hash
from fedmtl.datasites.rules.review import RequestFacts, manual_decision
from fedmtl.privacy.accounting import PrivacyRecord
from fedmtl.privacy.keys import SigningKey

TEMPLATE_SRC = "def fedmtl_round(spec, weights):\n    return train(spec, weights)\n"
TEMPLATE_HASH = code_hash(TEMPLATE_SRC)
ROUND = PrivacyRecord(noise_multiplier=1.5, sample_rate=0.05, steps=20)  # epsilon 1.024 alone
ALICE, BOB = "alice@uni.example", "bob@lab.example"
OWNER = "owner@hospital.example"


def make_policy(**overrides: Any) -> Policy:
    kw: dict[str, Any] = dict(
        allowed_tasks=("diabetes_5y", "fibrosis"),
        templates={"fedmtl.round.v1": TEMPLATE_HASH},
        min_noise_multiplier=1.0,
        max_grad_norm=1.0,
        max_epsilon_per_job=2.0,
        researcher_epsilon_budget=4.0,
        dataset_epsilon_budget=6.0,
        min_sites=3,
        min_secagg_threshold=2,
        max_rounds=5,
        max_local_epochs=3,
    )
    kw.update(overrides)
    return Policy.default(**kw)


_ids = itertools.count()


def make_facts(**overrides: Any) -> RequestFacts:
    """A conforming request: 3 rounds of ROUND (epsilon ~1.507 at delta 1e-5)."""
    kw: dict[str, Any] = dict(
        request_id=f"req-{next(_ids)}",
        researcher=ALICE,
        dataset="nafld",
        code_name="fedmtl.round.v1",
        code_hash=TEMPLATE_HASH,
        tasks=("diabetes_5y",),
        noise_multiplier=1.5,
        max_grad_norm=1.0,
        rounds=3,
        local_epochs=1,
        sample_rate=0.05,
        steps_per_round=20,
        delta=1e-5,
        n_sites=3,
        secagg_threshold=2,
        spec_hash="ab" * 32,
    )
    kw.update(overrides)
    return RequestFacts(**kw)


class FakeClock:
    """Deterministic timestamps, one hour apart, from 2026-01-05 09:00 UTC."""

    def __init__(self, start: float = 1767603600.0, step: float = 3600.0):
        self.t, self.step = start, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def populate(home: Path, key: SigningKey) -> dict[str, str]:
    """A realistic ledger: two researchers with auto-approved jobs and their rounds, a
    denied non-template request, a manual approval of non-template code with the
    advisory warning shown, two policy changes. Returns request ids by role."""
    from fedmtl.datasites.ledger.ledger import Ledger

    led = Ledger.open(home, key, clock=FakeClock())
    led.record_policy(make_policy(), who=OWNER)
    a = make_facts(researcher=ALICE)
    assert led.review_and_record(a).status == "approved"
    for r in (1, 2, 3):
        led.charge_pass(request_id=a.request_id, pass_no=r, records=[ROUND], participants=["s1", "s2", "s3"])
    led.finish_job(a.request_id)
    b = make_facts(researcher=BOB, tasks=("fibrosis",), rounds=2)
    assert led.review_and_record(b).status == "approved"
    led.charge_pass(request_id=b.request_id, pass_no=1, records=[ROUND], participants=["s1", "s2", "s3"])
    bad = make_facts(researcher=BOB, code_name="<script>alert(1)</script>", code_hash=code_hash("import os"))
    assert led.review_and_record(bad).status == "denied"
    led.record_policy(make_policy(templates_only=False), who=OWNER)
    m = make_facts(researcher=ALICE, code_name="custom", code_hash=code_hash("custom()"), rounds=1)
    d = led.review_and_record(m)
    assert d.status == "pending_manual"
    led.record_decision(
        m.request_id,
        manual_decision(d, approve=True, reviewer=OWNER, reason="read every line", warnings_acknowledged=True),
    )
    led.charge_pass(request_id=m.request_id, pass_no=1, records=[ROUND], participants=["s1", "s2", "s3"])
    led.charge_pass(request_id=b.request_id, pass_no=2, records=[ROUND], participants=["s1", "s2"])
    led.finish_job(b.request_id)
    led.close()
    return {"alice": a.request_id, "bob": b.request_id, "denied": bad.request_id, "manual": m.request_id}

