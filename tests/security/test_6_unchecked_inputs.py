"""Attack class 6 — what the attacker controls that a check might not look at: the job id
(the key of the ledger's approval, of the runtime's state folder and of the pass
counter) and the site the spec is addressed to.

- An approved job id resubmitted by the same researcher with another spec (more rounds;
  or the same ``spec["job"]`` with a Sybil roster, another ``max_count`` or a re-typed
  schema: fields outside the JobSpec and its hash) must not inherit the approval, and the
  ledger must keep the approved spec.
- Another researcher submitting the legit code + spec of a job id already approved for
  someone else must be denied, and the approval stays with its owner.
- A spec addressed to another site (``spec["site"]``) must be denied where it is sent.
- Job ids that are paths, hidden names, too long, empty or not text must be denied.
"""

from __future__ import annotations

import copy

import pytest
import security_kit as K

pytestmark = pytest.mark.integration

SITE = "st-mary"


@pytest.fixture(scope="module")
def approved_job(federation):
    """A legit job of the 'victim' researcher, approved at every site."""
    email = federation.researcher("victim")
    job = federation.job(K.legit_spec(name="victim"), email=email)
    job.submit()
    status = job.wait_for_review(timeout=K.DECISION_TIMEOUT)
    assert {v["status"] for v in status.values()} == {"approved"}, f"the legit job was not approved: {status}"
    return job, email


def _ledger_state(federation, site: str, job_id: str):
    return K.site_ledger().open_ledger(federation.handles[site].home).request(job_id)


def _more_rounds(spec: dict) -> None:
    spec["job"]["rounds"] = 3


def _sybil_roster(spec: dict) -> None:
    from fedmtl.privacy.keys import SigningKey

    for name in ("evil-a", "evil-b"):
        spec["roster"][name] = SigningKey.generate().verify_key.to_bytes().hex()


def _max_count(spec: dict) -> None:
    spec["max_count"] = 1


def _schema(spec: dict) -> None:
    col = next(c for c in spec["schema"]["columns"] if c["name"] == "id")
    col.update(role="feature", min=0.0, max=1e6)


#: edits outside ``spec["job"]`` keep the JobSpec (and its hash) the same: the approval
#: must bind the whole site spec, not only the job part
RESUBMISSIONS = {
    "more-rounds": _more_rounds,
    "same-job-sybil-roster": _sybil_roster,
    "same-job-other-max_count": _max_count,
    "same-job-id-column-as-feature": _schema,
}


@pytest.mark.parametrize("label", list(RESUBMISSIONS))
def test_approved_job_id_resubmitted_with_another_spec_is_denied(federation, approved_job, label):
    job, email = approved_job
    before = _ledger_state(federation, SITE, job.job_id)
    assert before is not None and before.status == "approved"
    # Prepare: the same job id (same researcher, same template) with one field changed,
    # under a fresh template name (syft keeps one request per code text)
    spec = copy.deepcopy(job.site_specs[SITE])
    RESUBMISSIONS[label](spec)
    fn = f"{job.state['func_name']}_v{list(RESUBMISSIONS).index(label)}"
    sub = federation.forge(f"same-id/{label}", SITE, spec, fn, email=email)
    # Execute
    decision = federation.wait(sub)
    # Assert: denied, and the ledger's approval of the job id is unchanged
    print(f"{sub.label}: {decision.status}: {decision.reason[:300]}")
    federation.assert_denied(sub, decision, allow_refused=False)
    after = _ledger_state(federation, SITE, job.job_id)
    assert after.status in ("approved", "finished") and after.facts.rounds == before.facts.rounds == 1, (
        f"the ledger's approval of {job.job_id} changed: rounds {after.facts.rounds}, status {after.status}"
    )
    assert after.facts.spec_hash == before.facts.spec_hash
    assert dict(after.facts.roster) == dict(before.facts.roster)


def test_other_researcher_cannot_take_over_an_approved_job_id(federation, approved_job):
    job, victim = approved_job
    # Prepare: the attacker sends exactly the victim's code and spec (same name, same id)
    spec = copy.deepcopy(job.site_specs[SITE])
    sub = federation.forge("takeover", SITE, spec, job.state["func_name"])
    # Execute
    decision = federation.wait(sub)
    # Assert: denied; calling the name gives the attacker nothing; the approval is the victim's
    print(f"{sub.label}: {decision.status}: {decision.reason[:300]}")
    federation.assert_denied(sub, decision, allow_refused=False)
    federation.assert_no_leak(sub, message={"stage": "spend"})
    st = _ledger_state(federation, SITE, job.job_id)
    assert st.facts.researcher == victim and st.status == "approved"


def test_spec_addressed_to_another_site_is_denied(federation):
    # general's legit spec, sent to st-mary
    base, _ = federation.legit_site_spec("general")
    spec, fn = federation.variant_spec(base, "elsewhere")
    sub = federation.forge("spec-for-general-sent-to-st-mary", SITE, spec, fn)
    decision = federation.wait(sub)
    print(f"{sub.label}: {decision.status}: {decision.reason[:300]}")
    federation.assert_denied(sub, decision, allow_refused=False)


BAD_JOB_IDS = {
    "path-traversal": "../../secrets",
    "absolute-path": "/etc/passwd",
    "hidden-name": ".hidden",
    "too-long": "x" * 300,
    "empty": "",
    "not-text": 12345,
    "upper-case-and-spaces": "My Job",
}


@pytest.mark.parametrize("label", list(BAD_JOB_IDS))
def test_malformed_job_id_is_denied(federation, label):
    base, _ = federation.legit_site_spec(SITE)
    spec, fn = federation.variant_spec(base, f"j{list(BAD_JOB_IDS).index(label)}")
    spec["job_id"] = BAD_JOB_IDS[label]
    sub = federation.forge(f"job-id-{label}", SITE, spec, fn)
    decision = federation.wait(sub)
    print(f"{sub.label}: {decision.status}: {decision.reason[:300]}")
    federation.assert_denied(sub, decision, allow_refused=False)
