"""The datasite's review, run ahead of time on what a site publishes: which rules would
deny a job, in the review's own words.

A researcher prices a job (:func:`fedmtl.researcher.job.price`) before submitting it. The
site's automatic reviewer (:mod:`fedmtl.datasites.review.autoreview`) bounds the site spec
with :func:`fedmtl.datasites.rules.limits.spec_problems` (a problem there denies the
request with exactly those reasons), then decides the request's
:class:`~fedmtl.datasites.rules.review.RequestFacts` (:func:`autoreview.job_facts`) with
:func:`fedmtl.datasites.rules.review.decide`, composing the job's privacy records with what
the researcher spent and has committed. :func:`preview` runs those same three functions on
the site's published policy, schema, identity and training size, and the researcher's own
records from their spend view, so planning and review cannot disagree about a rule.

What a researcher cannot know is left out and named in :attr:`Preview.unknown`: the
dataset's total spend (other researchers' jobs) and, before the researcher's own records
are known, their budget. The code checks assume the library's round template, the code
:meth:`fedmtl.researcher.job.Job.submit` sends.

Pure: no syft, no torch, no network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from fedmtl.contract.site_spec import SiteSpec
from fedmtl.datasites.review.autoreview import job_facts
from fedmtl.datasites.rules import limits
from fedmtl.datasites.rules.budget import exceeds
from fedmtl.datasites.rules.policy import Policy
from fedmtl.datasites.rules.review import SpendSummary, decide
from fedmtl.datasites.template import TEMPLATE_SHA256
from fedmtl.privacy.accounting import PrivacyRecord
from fedmtl.schema import Schema

#: the rule a denial reason names: the policy key (``training.max_local_epochs``)
_RULE = re.compile(r"\b((?:review|privacy|training|limits)\.[a-z_]+)")
#: the dataset budget composes every researcher's spend, which no researcher sees
DATASET_BUDGET = "privacy.dataset_epsilon_budget"
RESEARCHER_BUDGET = "privacy.researcher_epsilon_budget"
PER_JOB = "privacy.max_epsilon_per_job"


@dataclass(frozen=True)
class Check:
    """One rule that would deny the job.

    Attributes:
        rule: the policy key the reason names (``training.max_local_epochs``), or
            ``"spec"`` for a bound on the spec's shape that names no key.
        reason: the reason, word for word as the site's review gives it.
    """

    rule: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "reason": self.reason}


@dataclass(frozen=True)
class Preview:
    """What the site's automatic review would decide, as far as the researcher can know.

    Attributes:
        status: ``"denied"`` when a check below would deny; ``"pending_manual"`` when the
            site approves by hand (or a warning needs a person); ``"approved"`` otherwise.
        checks: the rules that would deny, in the review's order and words.
        epsilon_job: the job's epsilon at the policy's delta with its accountant, as the
            review computes it (``nan`` when the spec is out of bounds).
        budget_left: your researcher budget left before this job, as the review computes
            it (budget minus spent and committed, composed); ``None`` when unknown.
        fits: whether the job keeps the per-job maximum and your researcher budget
            (the review's own composition); ``None`` when unknown.
        unknown: the rules this preview could not check, each with why.
    """

    status: str
    checks: tuple[Check, ...]
    epsilon_job: float
    budget_left: float | None
    fits: bool | None
    unknown: tuple[str, ...] = field(default=())

    @property
    def would_deny(self) -> list[str]:
        """The reasons, word for word as the review gives them."""
        return [c.reason for c in self.checks]


def rule_of(reason: str) -> str:
    """The policy key a review reason names (its first ``section.key``), or ``"spec"``.

    Args:
        reason: a denial reason of the review.

    Returns:
        The key, e.g. ``"training.max_local_epochs"``.
    """
    m = _RULE.search(reason)
    return m.group(1) if m else "spec"


def preview(
    site_spec: Mapping[str, Any],
    *,
    policy: Policy,
    schema: Schema,
    site: str,
    own_key: str,
    n_train: int,
    researcher: str = "you",
    dataset: str = "",
    researcher_records: Sequence[PrivacyRecord] | None = None,
    code_name: str = "",
    code_hash: str = TEMPLATE_SHA256,
) -> Preview:
    """Run the site's review of ``site_spec`` ahead of time.

    Args:
        site_spec: the site spec the job would bind at ``site`` (as
            :meth:`fedmtl.researcher.job.Job.create` builds it).
        policy: the site's policy (as it publishes it).
        schema: the site's schema.
        site: the site's name.
        own_key: the site's Ed25519 identity key (hex), as it publishes it.
        n_train: the site's training records.
        researcher: who asks (only named in reasons).
        dataset: the site's dataset (only named in reasons).
        researcher_records: your records spent and committed at the site (the spend
            view's ``records``); ``None`` when unknown: the researcher budget is not checked.
        code_name: the function name the request will carry.
        code_hash: the code's hash; the library's round template by default.

    Returns:
        The :class:`Preview`.
    """
    unknown = [f"{DATASET_BUDGET}: the dataset's total spend (all researchers) is not published"]
    if researcher_records is None:
        unknown.append(f"{RESEARCHER_BUDGET}: your spend at this site is not known yet")
    problems, roster = limits.spec_problems(dict(site_spec), policy=policy, schema=schema, site=site,
                                            own_key=own_key, n_train=n_train)
    if problems:  # the review denies with exactly these, before any arithmetic
        return Preview(status="denied", checks=tuple(Check(rule_of(p), p) for p in problems),
                       epsilon_job=float("nan"), budget_left=None, fits=None, unknown=tuple(unknown))
    parsed = SiteSpec.parse(dict(site_spec))
    job_id = str(site_spec["job_id"])
    facts = job_facts(parsed, n_train=n_train, request_id=job_id, roster=roster, site=site,
                      researcher=researcher, dataset=dataset,
                      code_name=code_name or f"fedmtl_round_{job_id.replace('-', '_')}", code_hash=code_hash)
    known = researcher_records is not None
    d = decide(policy=policy, request=facts,
               spent=SpendSummary(researcher_records=tuple(researcher_records or ())))
    reasons = [r for r in d.reasons if not r.startswith(DATASET_BUDGET)
               and (known or not r.startswith(RESEARCHER_BUDGET))]
    checks = tuple(Check(rule_of(r), r) for r in reasons) if d.status == "denied" else ()
    if checks:
        status = "denied"
    elif d.status != "denied":
        status = d.status
    else:  # denied only by what is not published: what the review says otherwise
        status = "pending_manual" if policy.approval == "manual" else "approved"
    fits = None
    if known:
        fits = not (exceeds(d.epsilon_job, policy.max_epsilon_per_job)
                    or exceeds(d.epsilon_after_researcher, policy.researcher_epsilon_budget))
    return Preview(status=status, checks=checks, epsilon_job=float(d.epsilon_job),
                   budget_left=float(d.budget_left["researcher"]) if known else None, fits=fits,
                   unknown=tuple(unknown))


__all__ = ["Check", "Preview", "preview", "rule_of"]
