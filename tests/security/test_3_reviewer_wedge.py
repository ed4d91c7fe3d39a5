"""Attack class 3 — wedge the reviewer: a request whose spec makes the automatic reviewer
crash, hang or compute forever (rounds = 10**30, a spec that is not a table, NaN, a
10 000-entry list, a sample rate that implies 10**300 steps), so that it stays PENDING
and every request after it waits forever (a denial of service on the whole datasite).

Expected: the poisoned request is DENIED, and a legit job submitted right after it is
APPROVED at every site within 60 s. Then NaN / inf / -inf / negative / huge values in
EVERY numeric field of the job spec (``spec["job"]`` walked recursively, list entries
such as ``model.widths`` included) and in ``max_count`` are each DENIED, and a legit job
is still approved afterwards.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import pytest
import security_kit as K

pytestmark = pytest.mark.integration


def _job(key: str, value: Any) -> Callable[[dict], Any]:
    def poison(spec: dict) -> dict:
        spec["job"][key] = value
        return spec

    return poison


def _tiny_sample_rate(spec: dict) -> dict:
    spec["job"].pop("local_steps", None)
    spec["job"]["local_epochs"] = 1.0
    spec["job"]["sample_rate"] = 1e-300  # one local epoch = 10**300 DP-SGD steps
    return spec


def _widths(spec: dict) -> dict:
    spec["job"]["model"]["widths"] = [1] * 10_000
    return spec


POISONS: dict[str, Callable[[dict], Any]] = {
    "rounds=10**30": _job("rounds", 10**30),
    "spec-is-a-list": lambda spec: [1, 2, 3],
    "spec-is-a-string": lambda spec: "rounds = 1",
    "noise_multiplier=NaN": _job("noise_multiplier", math.nan),
    "model.widths-10000-entries": _widths,
    "sample_rate=1e-300-local_epochs=1": _tiny_sample_rate,
}


def _legit_job_approved_everywhere(federation, purpose: str) -> dict:
    email = federation.researcher(purpose)
    job = federation.job(K.legit_spec(name=purpose[:20]), email=email)
    job.submit()
    return job, job.wait_for_review(timeout=K.DECISION_TIMEOUT)


@pytest.mark.parametrize("poison", list(POISONS))
def test_poisoned_request_does_not_wedge_the_reviewer(federation, poison):
    # Prepare: the poisoned request at every site, then at once an honest researcher's job
    subs = []
    for site in K.SITES:
        base, _ = federation.legit_site_spec(site)
        spec, fn = federation.variant_spec(base, "poison")
        subs.append(federation.forge(f"{poison}@{site}", site, POISONS[poison](spec), fn))
    assert any(s.submitted for s in subs), f"syft refused every poisoned request: {[s.error for s in subs]}"
    # Execute
    job, status = _legit_job_approved_everywhere(federation, f"wedge-{list(POISONS).index(poison)}")
    # Assert: the legit job went through everywhere, the poisoned request was denied
    assert {v["status"] for v in status.values()} == {"approved"}, (
        f"after a poisoned request ({poison}) the legit job {job.job_id} was not approved everywhere "
        f"within {K.DECISION_TIMEOUT:.0f}s: {status}"
    )
    for sub in subs:
        decision = federation.wait(sub)
        print(f"{sub.label}: {decision.status}: {decision.reason[:300]}")
        federation.assert_denied(sub, decision)


# -- every numeric field of the spec ------------------------------------------------------
NUMERIC_SITE = "riverside"
BAD_NUMBERS: dict[str, Any] = {
    "nan": math.nan,
    "inf": math.inf,
    "-inf": -math.inf,
    "negative": -1,
    "huge-float": 1e300,
    "huge-int": 10**30,
}
NUMERIC_PATHS = [("job", *p) for p in K.walk_numbers(K.legit_spec().to_dict())] + [("max_count",)]
#: values that are not attacks: a negative seed is a valid torch seed, and the seed only
#: initialises the (public, identical at every party) model weights
HARMLESS = {(("job", "seed"), "negative")}
NUMERIC_CASES = [(p, v) for p in NUMERIC_PATHS for v in BAD_NUMBERS if (p, v) not in HARMLESS]


def _case_id(case) -> str:
    path, value = case
    return f"{K.path_str(path)}={value}"


@pytest.fixture(scope="module")
def numeric_batch(federation):
    base, _ = federation.legit_site_spec(NUMERIC_SITE)
    subs = {}
    for i, (path, value) in enumerate(NUMERIC_CASES):
        spec, fn = federation.variant_spec(base, f"n{i:03d}")
        K.set_path(spec, path, BAD_NUMBERS[value])
        label = _case_id((path, value))
        subs[label] = federation.forge(label, NUMERIC_SITE, spec, fn)
    return K.Batch(federation, subs)


def test_every_numeric_field_is_walked():
    """The walk reaches list entries and nested tables (a guard on the walk itself)."""
    paths = {K.path_str(p) for p in NUMERIC_PATHS}
    assert {"job.rounds", "job.model.widths.0", "job.model.widths.1", "job.secagg.clip",
            "job.tasks.0.weight", "job.noise_multiplier", "job.sample_rate", "max_count"} <= paths


@pytest.mark.parametrize("case", NUMERIC_CASES, ids=[_case_id(c) for c in NUMERIC_CASES])
def test_bad_number_in_any_field_is_denied(numeric_batch, federation, case):
    sub, decision = numeric_batch.decision(_case_id(case))
    print(f"{sub.label}: {decision.status}: {decision.reason[:200]}")
    # the genuine template with a bad number: a denied syft request never runs, so the
    # code is called only if it was approved (that keeps 150 requests quick)
    federation.assert_denied(sub, decision, execute=False)


def test_legit_job_still_approved_after_the_numeric_poison(federation, numeric_batch):
    job, status = _legit_job_approved_everywhere(federation, "after-numeric")
    assert {v["status"] for v in status.values()} == {"approved"}, (
        f"after {len(NUMERIC_CASES)} poisoned requests the legit job {job.job_id} was not approved "
        f"everywhere within {K.DECISION_TIMEOUT:.0f}s: {status}"
    )
