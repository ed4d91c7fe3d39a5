"""Attack class 3 — wedge the reviewer: a request whose spec makes the automatic reviewer
crash, hang or compute forever (rounds = 10**30, a spec that is not a table, NaN, a
10 000-entry list, a sample rate that implies 10**300 steps), so that it stays PENDING
and every request after it waits forever (a denial of service on the whole datasite).

Expected: the poisoned request is DENIED, and a legit job submitted right after it is
APPROVED at every site within 60 s. Then NaN / inf / -inf / negative / huge values in
EVERY numeric field of the job spec (``spec["job"]`` walked recursively, list entries
such as ``model.widths`` included) and in ``max_count`` are each DENIED, and a legit job
is still approved afterwards.

How the numeric matrix is covered (one parametrised test per (field, bad value)): every
case is judged IN PROCESS by the datasite's own review functions (``limits.spec_problems``,
``SiteSpec.parse``, then :func:`fedmtl.datasites.review.preview.preview`'s
``job_facts``/``decide``, in ``autoreview.facts_of``'s order and words) on ``riverside``'s
real policy (from its ledger), schema, identity key and training size, read from its home; it must give a denial that is not only about budget. A deterministic sample
(:data:`SAMPLED`: every field once with a rotating bad value, every bad value on
``job.rounds`` and on ``max_count``) is ALSO submitted to the real datasite and must be
denied there, with a reason the in-process review gives too: that pins the in-process
rule to what the running reviewer does, at ~35 syft requests instead of ~155.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import security_kit as K

from fedmtl.contract.site_spec import SiteSpec
from fedmtl.datasites.ledger.site_ledger import current_policy
from fedmtl.datasites.review.preview import preview
from fedmtl.datasites.rules import limits
from fedmtl.datasites.site import home as home_mod
from fedmtl.datasites.site import identity
from fedmtl.schema import Schema

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


def _sample() -> list[tuple[tuple, str]]:
    """The cases also sent to the real datasite: every field once, the bad value rotating
    with the field's index, plus every bad value on ``job.rounds`` and on ``max_count``."""
    names = list(BAD_NUMBERS)
    out = []
    for i, path in enumerate(NUMERIC_PATHS):
        values = [names[(i + k) % len(names)] for k in range(len(names))]
        out.append(next((path, v) for v in values if (path, v) not in HARMLESS))
    out += [(p, v) for p in (("job", "rounds"), ("max_count",)) for v in names]
    return [c for c in NUMERIC_CASES if c in set(out)]


#: the cases submitted to ``riverside`` as real syft requests (the rest are judged in process)
SAMPLED = _sample()


def _poisoned(federation, base: dict, case, tag: str) -> tuple[dict, str]:
    """``base`` under a job id of its own with ``case``'s bad number, and its func name."""
    path, value = case
    spec, fn = federation.variant_spec(base, tag)
    K.set_path(spec, path, BAD_NUMBERS[value])
    return spec, fn


@pytest.fixture(scope="module")
def numeric_base(federation) -> dict:
    base, _ = federation.legit_site_spec(NUMERIC_SITE)
    return base


@pytest.fixture(scope="module")
def site_review(federation) -> dict[str, Any]:
    """The arguments ``autoreview.facts_of`` gives ``limits.spec_problems``, read from
    ``riverside``'s home: its current policy, schema, name, identity key and training size."""
    home = federation.handles[NUMERIC_SITE].home
    meta = json.loads((Path(home) / "dataset_meta.json").read_text())
    return dict(
        policy=current_policy(home),
        schema=Schema.load(Path(home) / "schema.toml"),
        site=home_mod.read_config(home)["name"],
        own_key=identity.load_public(home).verify_key.to_bytes().hex(),
        n_train=int(meta["split_sizes"].get("train", meta["n_records"])),
    )


def _in_process_denial(site_review: dict[str, Any], spec: dict) -> list[str]:
    """The reasons the datasite's review denies ``spec`` with (``[]``: it would not deny).

    Runs the review's own functions in ``autoreview.facts_of``'s order and words:
    ``limits.spec_problems``, then ``SiteSpec.parse`` (a refusal is "the job spec is
    invalid"), then :func:`preview` (``job_facts`` + ``decide``, a researcher with nothing
    spent; the dataset budget, which it cannot know, is left out). Anything else that raises
    is a denial too, as the reviewer's per-request error boundary makes it."""
    problems, _ = limits.spec_problems(spec, **site_review)
    if problems:
        return problems
    try:
        SiteSpec.parse(spec)
    except Exception as e:  # noqa: BLE001 - facts_of denies any spec the parser refuses
        return [f"the job spec is invalid: {e}"]
    try:
        verdict = preview(spec, researcher_records=(), **site_review)
    except Exception as e:  # noqa: BLE001 - the reviewer denies a request whose review raises
        return [f"the datasite could not review this request ({type(e).__name__}: {str(e)[:200]})"]
    return verdict.would_deny if verdict.status == "denied" else []


@pytest.fixture(scope="module")
def numeric_batch(federation, numeric_base):
    subs = {}
    for case in SAMPLED:
        spec, fn = _poisoned(federation, numeric_base, case, f"n{NUMERIC_CASES.index(case):03d}")
        label = _case_id(case)
        subs[label] = federation.forge(label, NUMERIC_SITE, spec, fn)
    return K.Batch(federation, subs)


def test_every_numeric_field_is_walked():
    """The walk reaches list entries and nested tables (a guard on the walk itself)."""
    paths = {K.path_str(p) for p in NUMERIC_PATHS}
    assert {"job.rounds", "job.model.widths.0", "job.model.widths.1", "job.secagg.clip",
            "job.tasks.0.weight", "job.noise_multiplier", "job.sample_rate", "max_count"} <= paths


def test_the_sample_covers_every_field_and_every_value():
    """Every field and every bad value reaches the real datasite at least once."""
    assert {p for p, _ in SAMPLED} == set(NUMERIC_PATHS)
    assert {v for _, v in SAMPLED} == set(BAD_NUMBERS)
    assert {c for c in NUMERIC_CASES if c[0] == ("max_count",)} <= set(SAMPLED)
    assert len(SAMPLED) < len(NUMERIC_CASES) // 3


@pytest.mark.parametrize("case", NUMERIC_CASES, ids=[_case_id(c) for c in NUMERIC_CASES])
def test_bad_number_in_any_field_is_denied(numeric_batch, numeric_base, site_review, federation, case):
    # Prepare: the genuine site spec with one bad number
    spec, _ = _poisoned(federation, numeric_base, case, "inproc")
    # Execute: the datasite's review, in process
    reasons = _in_process_denial(site_review, spec)
    # Assert: denied, and not only for privacy budget
    print(f"{_case_id(case)} in process: {reasons[:3]}")
    assert reasons, f"ATTACK SUCCEEDED: the datasite's review does not deny {_case_id(case)}"
    assert not K.budget_only("; ".join(reasons)), (
        f"{_case_id(case)} is denied in process only for privacy budget ({reasons}): not recognised as an attack"
    )
    if case not in SAMPLED:
        return
    # the sampled case also went to the real datasite: the running reviewer must agree
    sub, decision = numeric_batch.decision(_case_id(case))
    print(f"{sub.label}: {decision.status}: {decision.reason[:200]}")
    # a denied syft request never runs, so the code is called only if it was approved
    federation.assert_denied(sub, decision, execute=False)
    if decision.status == "REJECTED":
        assert any(r[:80] in decision.reason for r in reasons), (
            f"{sub.label}: the datasite denied it for {decision.reason[:300]!r}, none of the in-process "
            f"review's reasons {reasons}: the in-process check no longer matches the running reviewer"
        )


def test_legit_job_still_approved_after_the_numeric_poison(federation, numeric_batch):
    job, status = _legit_job_approved_everywhere(federation, "after-numeric")
    assert {v["status"] for v in status.values()} == {"approved"}, (
        f"after {len(SAMPLED)} poisoned requests the legit job {job.job_id} was not approved "
        f"everywhere within {K.DECISION_TIMEOUT:.0f}s: {status}"
    )
