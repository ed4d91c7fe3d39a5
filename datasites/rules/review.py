"""Reviewing a code request against the datasite policy: pure decision logic.

:func:`decide` takes the facts of one request (who asks, which code, which job
parameters, which privacy records the job will spend) and what the dataset and the
researcher have already spent, and returns a :class:`Decision`:

* ``denied`` when any rule is broken; every reason names the rule (the policy key) and
  the numbers, so a researcher can fix the job spec from the message alone;
* ``pending_manual`` when the request conforms but the policy wants a person
  (``approval = "manual"``), or the code is not an allowed template and the owner has
  switched ``templates_only`` off (then the PYSEC-2026-546 warning is attached);
* ``approved`` otherwise.

Epsilon is never added up: the job's records are composed with the records the dataset
(or the researcher) already spent, with the policy's accountant at the policy's delta.

:func:`manual_decision` turns a ``pending_manual`` decision into a person's approval
or denial; :func:`code_diff` shows a reviewer how submitted code differs from a template.

This module imports neither syft nor torch.
"""

from __future__ import annotations

import difflib
import hashlib
import math
from dataclasses import dataclass, replace
from typing import Any, Literal, Mapping

from fedmtl.datasites.rules.budget import check_budget, exceeds
from fedmtl.datasites.rules.policy import ADVISORY_ID, ADVISORY_TEXT, Policy
from fedmtl.errors import ReviewError
from fedmtl.privacy.accounting import PrivacyRecord, epsilon_of

Status = Literal["approved", "denied", "pending_manual"]
STATUSES: tuple[str, ...] = ("approved", "denied", "pending_manual")


@dataclass(frozen=True)
class RequestFacts:
    """What a reviewer needs to know about one code request.

    ``records`` are the privacy records the whole job will spend on this dataset; when
    empty they are derived as ``rounds`` records of ``steps_per_round`` steps at
    ``noise_multiplier`` and ``sample_rate``.
    """

    request_id: str
    researcher: str
    dataset: str
    code_name: str
    code_hash: str
    tasks: tuple[str, ...]
    noise_multiplier: float
    max_grad_norm: float
    rounds: int
    local_epochs: int
    sample_rate: float
    steps_per_round: int
    delta: float
    n_sites: int
    secagg_threshold: int
    release_per_site_metrics: bool = False
    spec_hash: str = ""
    records: tuple[PrivacyRecord, ...] = ()
    #: passes the job may charge (rounds + the final evaluation); 0: ``rounds``
    passes: int = 0
    eval_passes: int = 0
    eval_noise_multiplier: float = 0.0
    #: ((site, Ed25519 public key hex), ...) of the job's secure-aggregation roster
    roster: tuple[tuple[str, str], ...] = ()
    #: this datasite's own name (its roster entry needs no pin)
    site: str = ""

    def privacy_records(self) -> list[PrivacyRecord]:
        if self.records:
            return list(self.records)
        return [
            PrivacyRecord(
                noise_multiplier=self.noise_multiplier,
                sample_rate=self.sample_rate,
                steps=self.steps_per_round,
            )
            for _ in range(self.rounds)
        ]

    def to_dict(self) -> dict[str, Any]:
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d["tasks"] = list(self.tasks)
        d["records"] = [r.to_dict() for r in self.records]
        d["roster"] = [list(x) for x in self.roster]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RequestFacts":
        d = dict(d)
        d["tasks"] = tuple(d.get("tasks", ()))
        d["records"] = tuple(PrivacyRecord.from_dict(r) for r in d.get("records", ()))
        d["roster"] = tuple((str(a), str(b)) for a, b in d.get("roster", ()))
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown RequestFacts field(s) {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class SpendSummary:
    """Records already spent (or committed) on the dataset and by this researcher."""

    dataset_records: tuple[PrivacyRecord, ...] = ()
    researcher_records: tuple[PrivacyRecord, ...] = ()


@dataclass(frozen=True)
class Decision:
    """The outcome of a review. ``reasons`` explain a denial (or why a person is needed);
    ``warnings`` must be shown to a person before they approve. ``budget_left`` is the
    dataset and researcher budget left *before* this job (what was spent and committed
    already, :class:`~fedmtl.datasites.rules.budget.BudgetCheck.left`);
    ``epsilon_after_*`` is where the job would bring them."""

    status: Status
    reasons: tuple[str, ...]
    epsilon_job: float
    epsilon_after_dataset: float
    epsilon_after_researcher: float
    budget_left: Mapping[str, float]
    warnings: tuple[str, ...] = ()
    automatic: bool = True
    reviewer: str = "auto"
    template: str | None = None
    warning_shown: bool = False

    @property
    def approved(self) -> bool:
        return self.status == "approved"

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reasons": list(self.reasons),
            "epsilon_job": _num(self.epsilon_job),
            "epsilon_after_dataset": _num(self.epsilon_after_dataset),
            "epsilon_after_researcher": _num(self.epsilon_after_researcher),
            "budget_left": {k: _num(v) for k, v in self.budget_left.items()},
            "warnings": list(self.warnings),
            "automatic": self.automatic,
            "reviewer": self.reviewer,
            "template": self.template,
            "warning_shown": self.warning_shown,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Decision":
        return cls(
            status=d["status"],
            reasons=tuple(d.get("reasons", ())),
            epsilon_job=_unnum(d["epsilon_job"]),
            epsilon_after_dataset=_unnum(d["epsilon_after_dataset"]),
            epsilon_after_researcher=_unnum(d["epsilon_after_researcher"]),
            budget_left={k: _unnum(v) for k, v in d.get("budget_left", {}).items()},
            warnings=tuple(d.get("warnings", ())),
            automatic=bool(d.get("automatic", True)),
            reviewer=d.get("reviewer", "auto"),
            template=d.get("template"),
            warning_shown=bool(d.get("warning_shown", False)),
        )

    def explain(self) -> str:
        """One message for the researcher: status, epsilon, each reason on its own line."""
        head = (
            f"request {self.status}: job epsilon {self.epsilon_job:.4g}; dataset after "
            f"{self.epsilon_after_dataset:.4g}; researcher after {self.epsilon_after_researcher:.4g}"
        )
        lines = [head] + [f"  - {r}" for r in self.reasons] + [f"  ! {w}" for w in self.warnings]
        return "\n".join(lines)


def _num(x: float) -> float | str:
    """JSON has no infinity or NaN: write them as the strings "inf" / "nan"."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def _unnum(x: Any) -> float:
    return float(x)  # float("inf"), float("nan") parse the strings back


def non_template_warning(code_name: str, code_hash: str) -> str:
    return (
        f"code {code_name!r} (sha256 {code_hash[:16]}...) is not an allowed template. "
        f"{ADVISORY_TEXT}. Approve it only after reading every line; it will run with "
        "the datasite's own privileges."
    )


def _named_as_template(code_name: str, template_name: str) -> bool:
    """Each job submits a template under its own name, ``<template>_<job>``."""
    import re

    return bool(re.fullmatch(rf"{re.escape(template_name)}(_[a-z0-9_]+)?", code_name or ""))


def roster_pins(policy: Policy, roster, *, own_site: str) -> tuple[list[str], list[str]]:
    """(the roster's sites this datasite federates with, a denial per site it does not).

    A roster entry counts only when its key's fingerprint is a pinned peer of the policy
    under the same name (``[[peers]]``, ``fedmtl datasite peers add``); this datasite's
    own entry is checked against its identity key elsewhere and needs no pin."""
    pins = {peer.fingerprint: peer.name for peer in policy.peers}
    ok: list[str] = []
    denials: list[str] = []
    seen: set[str] = set()
    for site, key_hex in roster:
        fp = hashlib.sha256(bytes.fromhex(key_hex)).hexdigest()
        if fp in seen:
            denials.append(f"review.peers: key {fp[:16]}... appears twice in the roster")
            continue
        seen.add(fp)
        if site == own_site:
            ok.append(site)
        elif fp not in pins:
            denials.append(
                f"review.peers: roster site {site!r} with key fingerprint {fp} is not a pinned peer of "
                "this datasite; its owner pins peers with `fedmtl datasite peers add`"
            )
        elif pins[fp] != site:
            denials.append(
                f"review.peers: roster site {site!r} uses the key pinned for {pins[fp]!r}"
            )
        else:
            ok.append(site)
    return ok, denials


def _job_shape(r: RequestFacts) -> tuple[PrivacyRecord, list[PrivacyRecord]] | None:
    """(the record of one training round, the job's other records) when the job is
    ``rounds`` equal training rounds plus releases (its evaluation passes and, with
    standard scaling, its statistics pass: Gaussian mechanisms, one step at sample rate 1);
    ``None`` otherwise. A training round is the record at the job's noise multiplier and
    steps per round; everything else stays in every candidate job."""
    recs = r.privacy_records()
    if not r.records:
        return (recs[0], []) if recs else None
    train = [x for x in recs if x.noise_multiplier == r.noise_multiplier and x.steps == r.steps_per_round]
    if len(train) > r.rounds:  # a round indistinguishable from a release: keep the releases apart
        train = [x for x in train if not (x.sample_rate == 1.0 and x.steps == 1)]
    others = list(recs)
    for x in train:
        others.remove(x)
    if r.rounds < 1 or len(train) != r.rounds or len(set(train)) != 1:
        return None
    return train[0], others


def _most_rounds(r: RequestFacts, p: Policy, fits) -> tuple[int, float, float] | None:
    """(the most training rounds, at the job's own noise multiplier, that ``fits``
    accepts, the epsilon of that job alone, its noise multiplier), or ``None`` when the
    job's records are not equal rounds.

    A binary search over 0..min(max_rounds, rounds - 1) rounds (the job's own ``rounds``
    does not fit: that is why it is denied); each step composes with the policy's
    accountant. The job's evaluation releases stay in every candidate (fewer rounds
    never release more often), so the count is on the safe side."""
    shape = _job_shape(r)
    if shape is None:
        return None
    rec, others = shape

    def job(k: int) -> list[PrivacyRecord]:
        return [rec] * k + others

    lo, hi = 0, max(0, min(int(p.max_rounds), int(r.rounds) - 1))
    while lo < hi:  # invariant: lo rounds are reported (0 = none fits), hi is the upper end
        mid = (lo + hi + 1) // 2
        if fits(job(mid)):
            lo = mid
        else:
            hi = mid - 1
    eps_k = epsilon_of(job(lo), delta=p.delta, accountant=p.accountant) if lo else 0.0
    return lo, float(eps_k), float(rec.noise_multiplier)


def _rounds_hint(r: RequestFacts, p: Policy, fits) -> str:
    """``", and at noise_multiplier s at most k round(s) fit (epsilon e alone)"``, or ``""``
    (no semicolon: syft joins a denial's reasons with ``"; "``)."""
    found = _most_rounds(r, p, fits)
    if found is None:
        return ""
    k, eps_k, sigma = found
    if k == 0:
        return f", and at noise_multiplier {sigma:g} not even 1 round fits (raise noise_multiplier)"
    return f", and at noise_multiplier {sigma:g} at most {k} round(s) fit (epsilon {_floor4(eps_k)} alone)"


def _fit_hint(r: RequestFacts, p: Policy, fits) -> str:
    """What still fits a budget: the largest epsilon (of the most rounds of this job at
    its noise multiplier that fit) and those rounds; or that nothing fits any more."""
    found = _most_rounds(r, p, fits)
    if found is None:
        return ""
    k, eps_k, sigma = found
    if k == 0:
        rec, others = _job_shape(r)  # type: ignore[misc] - found implies a shape
        if not fits(others):
            return (". Nothing fits here any more: what was spent"
                    + (", with the job's evaluation releases alone," if others else "")
                    + " already exceeds the budget")
        one = epsilon_of([rec, *others], delta=p.delta, accountant=p.accountant)
        return (f". Not even 1 round at noise_multiplier {sigma:g} fits (it costs epsilon {one:.4g} alone): "
                "raise noise_multiplier, or lower sample_rate or steps per round")
    return (f". At noise_multiplier {sigma:g} at most {k} round(s) fit: the largest epsilon that "
            f"still fits at that noise is {_floor4(eps_k)} (the job alone)")


def _floor4(x: float) -> str:
    """``x`` to 4 significant digits, rounded down (a suggested epsilon never overshoots)."""
    if not math.isfinite(x) or x <= 0:
        return f"{x:g}"
    scale = 10 ** (3 - math.floor(math.log10(x)))
    return f"{math.floor(x * scale) / scale:g}"


def decide(*, policy: Policy, request: RequestFacts, spent: SpendSummary) -> Decision:
    """Review ``request`` against ``policy`` given what was already ``spent``."""
    r, p = request, policy
    denials: list[str] = []
    manual: list[str] = []
    warnings: list[str] = []

    # -- code
    template = p.template_for(r.code_hash)
    if template is None:
        allowed = ", ".join(f"{t.name} ({t.sha256[:12]}...)" for t in p.templates) or "none"
        if p.templates_only:
            denials.append(
                f"review.templates_only: code {r.code_name!r} with sha256 {r.code_hash[:16]}... is "
                f"not an allowed template (allowed: {allowed}). This datasite runs only allowed "
                f"templates because of {ADVISORY_TEXT}. Submit the library's round template "
                "unchanged, with your parameters in the job spec."
            )
        else:
            manual.append(
                f"review.templates_only: code {r.code_name!r} is not an allowed template "
                f"(allowed: {allowed}); a person must review it ({ADVISORY_ID})"
            )
            warnings.append(non_template_warning(r.code_name, r.code_hash))
    elif not _named_as_template(r.code_name, template.name):
        warnings.append(
            f"code is named {r.code_name!r} but its hash is that of template {template.name!r}"
        )

    # -- job parameters
    tasks = list(r.tasks)
    bad_tasks = [t for t in tasks if t not in p.allowed_tasks]
    if not tasks:
        denials.append("training.allowed_tasks: the job names no task; give at least one label column")
    elif bad_tasks:
        denials.append(
            f"training.allowed_tasks: task label column(s) {bad_tasks} may not be trained on here; "
            f"allowed: {list(p.allowed_tasks)}"
        )
    nms = sorted({r.noise_multiplier, *(rec.noise_multiplier for rec in r.privacy_records())})
    if nms[0] < p.min_noise_multiplier:
        denials.append(
            f"privacy.min_noise_multiplier: noise_multiplier {nms[0]:g} is below the minimum "
            f"{p.min_noise_multiplier:g}; set noise_multiplier >= {p.min_noise_multiplier:g}"
        )
    if not r.max_grad_norm > 0:
        denials.append(f"privacy.max_grad_norm: max_grad_norm must be > 0, got {r.max_grad_norm:g}")
    elif r.max_grad_norm > p.max_grad_norm:
        denials.append(
            f"privacy.max_grad_norm: clipping norm max_grad_norm {r.max_grad_norm:g} is above the "
            f"maximum {p.max_grad_norm:g}; set max_grad_norm <= {p.max_grad_norm:g}"
        )
    if r.rounds < 1 or r.rounds > p.max_rounds:
        denials.append(
            f"training.max_rounds: rounds {r.rounds} is outside 1..{p.max_rounds}; "
            f"set rounds <= {p.max_rounds}"
        )
    if r.local_epochs < 1 or r.local_epochs > p.max_local_epochs:
        denials.append(
            f"training.max_local_epochs: local_epochs {r.local_epochs} is outside "
            f"1..{p.max_local_epochs}; set local_epochs <= {p.max_local_epochs}"
        )
    n_sites = r.n_sites
    if r.roster:
        pinned, unpinned = roster_pins(p, r.roster, own_site=r.site)
        denials += unpinned
        n_sites = len(pinned)
    if n_sites < p.min_sites:
        denials.append(
            f"training.min_sites: the job has {n_sites} participating site(s) (pinned), fewer than the "
            f"minimum {p.min_sites} for secure aggregation; add sites this datasite federates with"
        )
    if r.secagg_threshold < p.min_secagg_threshold or r.secagg_threshold > n_sites:
        denials.append(
            f"training.min_secagg_threshold: secagg threshold {r.secagg_threshold} must be between "
            f"{p.min_secagg_threshold} and the number of sites {n_sites}"
        )
    # a fixed rule on top of the policy's floor: t > n/2 of the whole roster, so no two
    # disjoint groups of t sites exist and a server that lies about dropouts cannot
    # collect both kinds of share of one site
    n_roster = len(r.roster) if r.roster else r.n_sites
    in_range = p.min_secagg_threshold <= r.secagg_threshold <= n_sites
    if in_range and 2 * r.secagg_threshold <= n_roster:
        denials.append(
            f"training.min_secagg_threshold: secagg threshold {r.secagg_threshold} is not more than half of "
            f"the {n_roster} sites in the roster; a server that lies about dropouts could unmask one "
            f"site's update; set secagg.threshold >= {n_roster // 2 + 1} (floor(n/2) + 1)"
        )
    if r.eval_passes > p.max_eval_passes:
        denials.append(
            f"limits.max_eval_passes: the job releases evaluation statistics in {r.eval_passes} passes; "
            f"at most {p.max_eval_passes} allowed here; set eval_every = 0 (final evaluation only)"
        )
    if r.eval_passes and r.eval_noise_multiplier < p.min_eval_noise_multiplier:
        denials.append(
            f"limits.min_eval_noise_multiplier: eval_noise_multiplier {r.eval_noise_multiplier:g} is below "
            f"the minimum {p.min_eval_noise_multiplier:g}"
        )
    if r.release_per_site_metrics and not p.release_per_site_metrics:
        denials.append(
            "review.release_per_site_metrics: the job asks for per-site metrics, which this "
            "datasite does not release; set release_per_site_metrics = false"
        )
    if not 0 < r.delta <= p.delta:
        denials.append(
            f"privacy.delta: the job's delta {r.delta:g} is above this datasite's delta {p.delta:g}; "
            f"set delta <= {p.delta:g} (all budgets here are at delta={p.delta:g})"
        )

    # -- privacy: compose records, never add epsilons (one check, shared with the ledger)
    job = r.privacy_records()
    eps = lambda recs: epsilon_of(list(recs), delta=p.delta, accountant=p.accountant)  # noqa: E731
    check = lambda before, limit: check_budget(  # noqa: E731
        before=before, new=job, limit=limit, delta=p.delta, accountant=p.accountant)
    per_job = check((), p.max_epsilon_per_job)
    ds = check(spent.dataset_records, p.dataset_epsilon_budget)
    rs = check(spent.researcher_records, p.researcher_epsilon_budget)
    eps_job, eps_ds_before, eps_rs_before, eps_ds, eps_rs = per_job.after, ds.before, rs.before, ds.after, rs.after
    at = f"at delta={p.delta:g} ({p.accountant})"
    if per_job.over:
        denials.append(
            f"privacy.max_epsilon_per_job: the job costs epsilon {eps_job:.4g} {at}, above the "
            f"per-job maximum {p.max_epsilon_per_job:g}; raise noise_multiplier, or lower rounds, "
            "sample_rate or steps per round. The largest epsilon that fits is the maximum "
            f"{p.max_epsilon_per_job:g} (e.g. target_epsilon <= {p.max_epsilon_per_job:g})"
            + _rounds_hint(r, p, lambda recs: not exceeds(eps(recs), p.max_epsilon_per_job))
        )
    if ds.over:
        denials.append(
            f"privacy.dataset_epsilon_budget: dataset {r.dataset!r} has spent epsilon "
            f"{eps_ds_before:.4g}; with this job it would reach {eps_ds:.4g} {at}, above its budget "
            f"{p.dataset_epsilon_budget:g}; make the job cheaper (it costs {eps_job:.4g} alone)"
            + _fit_hint(r, p, lambda recs: not exceeds(eps([*spent.dataset_records, *recs]), p.dataset_epsilon_budget))
        )
    if rs.over:
        denials.append(
            f"privacy.researcher_epsilon_budget: researcher {r.researcher} has spent epsilon "
            f"{eps_rs_before:.4g} on this dataset; with this job it would reach {eps_rs:.4g} {at}, "
            f"above the per-researcher budget {p.researcher_epsilon_budget:g}; make the job cheaper "
            f"(it costs {eps_job:.4g} alone)"
            + _fit_hint(r, p, lambda recs: not exceeds(eps([*spent.researcher_records, *recs]), p.researcher_epsilon_budget))
        )

    if denials:
        status: Status = "denied"
        reasons = denials
    elif manual or warnings or p.approval == "manual":
        # automatic approval only with zero warnings: any warning waits for a person
        status = "pending_manual"
        reasons = manual + [f"review: a person must see this warning: {w}" for w in warnings if not manual] + (
            ["review.approval: this datasite approves every request by hand"]
            if p.approval == "manual"
            else []
        )
    else:
        status = "approved"
        reasons = []
    return Decision(
        status=status,
        reasons=tuple(reasons),
        epsilon_job=eps_job,
        epsilon_after_dataset=eps_ds,
        epsilon_after_researcher=eps_rs,
        budget_left={"dataset": ds.left, "researcher": rs.left},
        warnings=tuple(warnings),
        automatic=True,
        reviewer="auto",
        template=template.name if template else None,
        warning_shown=False,
    )


def manual_decision(
    auto: Decision,
    *,
    approve: bool,
    reviewer: str,
    reason: str,
    warnings_acknowledged: bool = False,
) -> Decision:
    """A person's decision on a request that :func:`decide` left ``pending_manual``.

    A person may deny anything, but may approve only a ``pending_manual`` request (a
    policy denial cannot be overridden: change the policy instead). When ``auto``
    carries warnings (non-template code, PYSEC-2026-546), approving requires
    ``warnings_acknowledged=True``: the UI must have shown them, and the returned
    decision records ``warning_shown=True`` for the ledger.
    """
    if not reviewer:
        raise ReviewError("a manual decision needs the reviewer's name or email")
    if not reason or not reason.strip():
        raise ReviewError("a manual decision needs a reason; it goes to the ledger and the researcher")
    if approve:
        if auto.status != "pending_manual":
            raise ReviewError(
                f"cannot approve a request the policy decided as {auto.status!r}: "
                + ("; ".join(auto.reasons) or "nothing to approve")
                + ". Change the policy (recorded in the ledger) if it should be allowed."
            )
        if auto.warnings and not warnings_acknowledged:
            raise ReviewError(
                "show the reviewer these warnings and pass warnings_acknowledged=True to approve:\n"
                + "\n".join(auto.warnings)
            )
    status: Status = "approved" if approve else "denied"
    return replace(
        auto,
        status=status,
        reasons=(*auto.reasons, f"manual ({reviewer}): {reason.strip()}") if not approve
        else (f"manual ({reviewer}): {reason.strip()}",),
        automatic=False,
        reviewer=reviewer,
        warning_shown=bool(auto.warnings) and warnings_acknowledged,
    )


def code_diff(code: str, template_code: str, *, name: str = "submitted", template_name: str = "template") -> str:
    """Unified diff of the template (``---``) against the submitted code (``+++``);
    empty when they are equal."""
    return "".join(
        difflib.unified_diff(
            template_code.splitlines(keepends=True),
            code.splitlines(keepends=True),
            fromfile=template_name,
            tofile=name,
        )
    )


__all__ = [
    "Decision",
    "RequestFacts",
    "ReviewError",
    "SpendSummary",
    "STATUSES",
    "code_diff",
    "decide",
    "manual_decision",
    "non_template_warning",
]
