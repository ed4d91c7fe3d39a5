"""A person reviews code requests on a running datasite (``fedmtl datasite review``).

The automatic reviewer (:mod:`fedmtl.datasites.review.autoreview`, inside the server process)
leaves a request ``pending_manual`` in the ledger, and pending in syft, when the policy
wants a person (``approval = "manual"``) or when the code is not an allowed template and
the owner switched ``templates_only`` off. This module is what that person uses:

* :func:`list_requests` -- requests pending in syft and/or ``pending_manual`` in the ledger;
* :func:`show_request` -- the code, its diff against the round template, the job spec, the
  epsilon the job would cost composed with what was already spent and the budget left,
  and a dry run of the round runtime on the datasite's mock data;
* :func:`decide_request` -- approve or deny with a reason: the decision goes to the
  signed ledger first (who, why, ``warning_shown`` for non-template code), then to syft.

A request is named by its ledger id (the job id, e.g. ``mtl-1a2b3c4d``), its syft
request id, or a unique prefix (8+ characters) of the syft id.

The dry run executes only the library's round runtime, never submitted code: for code
that is not the round template it is skipped (running it, even on mock data, would run
unreviewed code with the reviewer's privileges).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from fedmtl.contract import protocol
from fedmtl.contract.passes import run_pass
from fedmtl.datasites import runtime as rt
from fedmtl.datasites.ledger import site_ledger
from fedmtl.datasites.review.autoreview import _denied, binding_of, resolve_request, spec_of
from fedmtl.datasites.rules.policy import ADVISORY_ID
from fedmtl.datasites.rules.review import Decision, ReviewError, code_diff, decide, manual_decision
from fedmtl.datasites.runtime import LocalTransport
from fedmtl.datasites.site import home as home_mod
from fedmtl.datasites.site import identity, syftio
from fedmtl.datasites.template import TEMPLATE_NAME, TEMPLATE_SOURCE, normalise
from fedmtl.errors import JobError, LedgerError, ManualReviewError
from fedmtl.models import model_to_vector

#: the shortest syft-id prefix accepted as a request name
MIN_PREFIX = 8
_OPEN = ("pending", "pending_manual")


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class RequestSummary:
    """One request as the reviewer's list shows it."""

    request_id: str  # the ledger's id (the job id), or ``syft-<uid>``
    syft_id: str | None  # None: in the ledger, but syft no longer has it
    researcher: str
    code_name: str
    syft_status: str  # pending | approved | denied | missing
    ledger_status: str  # unknown | pending | pending_manual | approved | denied | finished | aborted

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class DryRunResult:
    """The round runtime's first pass on the mock data (or why it was not run)."""

    ran: bool
    ok: bool
    message: str
    report: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"ran": self.ran, "ok": self.ok, "message": self.message, "report": self.report,
                "metrics": self.metrics}


@dataclass
class RequestDetails:
    """Everything a person needs to decide one request."""

    summary: RequestSummary
    code: str
    code_hash: str
    template: str | None  # the allowed template the code equals, or None
    diff: str  # unified diff template -> submitted code (normalised); "" when equal
    spec: dict[str, Any] | None
    problems: list[str]  # why the request is malformed (no/invalid spec, wrong site...)
    decision: Decision  # what the policy says now, against the current spend
    dry_run: DryRunResult | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "request": self.summary.to_dict(),
            "code": self.code,
            "code_hash": self.code_hash,
            "template": self.template,
            "diff": self.diff,
            "spec": self.spec,
            "problems": list(self.problems),
            "decision": self.decision.to_dict(),
            "dry_run": self.dry_run.to_dict() if self.dry_run else None,
        }

    def render(self) -> str:
        s, d = self.summary, self.decision
        lines = [
            f"request {s.request_id}",
            f"  syft id:     {s.syft_id or '(not in syft)'}",
            f"  researcher:  {s.researcher}",
            f"  status:      syft {s.syft_status}, ledger {s.ledger_status}",
            f"  code:        {s.code_name}  sha256 {self.code_hash}",
        ]
        if self.template:
            lines.append(f"               equals the allowed template {self.template!r}")
        else:
            lines.append("               NOT an allowed template")
        lines += ["", "--- code " + "-" * 60, self.code.rstrip(), ""]
        lines.append("--- diff against the round template (decorators and function name normalised) " + "-" * 4)
        lines.append(self.diff.rstrip() if self.diff else "(none: identical to the template)")
        lines += ["", "--- parameters (the job spec, a syft Constant) " + "-" * 22]
        if self.spec is None:
            lines.append("(none: the request carries no job spec)")
        else:
            lines.append(json.dumps(_spec_view(self.spec), indent=2, sort_keys=True))
        lines += ["", "--- privacy " + "-" * 58]
        lines.append(f"  epsilon of this job:            {_fmt(d.epsilon_job)}")
        lines.append(f"  dataset after this job:         {_fmt(d.epsilon_after_dataset)}")
        lines.append(f"  researcher after this job:      {_fmt(d.epsilon_after_researcher)}")
        for k, v in sorted(d.budget_left.items()):
            lines.append(f"  {k} budget left before it:{' ' * max(1, 8 - len(k))}{_fmt(v)}")
        lines += ["", "--- policy check " + "-" * 53, f"  {d.status}"]
        lines += [f"  - {r}" for r in (*self.problems, *d.reasons)]
        for w in d.warnings:
            lines += ["", f"  WARNING ({ADVISORY_ID}): {w}"]
        lines += ["", "--- dry run on the mock data " + "-" * 41]
        if self.dry_run is None:
            lines.append("(not requested)")
        else:
            dr = self.dry_run
            lines.append(("OK: " if dr.ok else ("FAILED: " if dr.ran else "not run: ")) + dr.message)
            for k in ("n_train", "n_test", "steps", "noise_multiplier", "epsilon_round", "loss"):
                if k in dr.report and dr.report[k] is not None:
                    lines.append(f"  {k}: {_fmt(dr.report[k])}")
            for task, vals in sorted(dr.metrics.items()):
                lines.append(f"  {task}: " + ", ".join(f"{m}={_fmt(v)}" for m, v in sorted(vals.items())))
        return "\n".join(lines)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.4g}"
    return str(x)


def _spec_view(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec as a reviewer reads it: the schema and the roster's keys shortened."""
    out = {k: v for k, v in spec.items() if k not in ("schema", "roster")}
    out["roster"] = {s: f"{str(k)[:16]}..." for s, k in (spec.get("roster") or {}).items()}
    if "schema" in spec:
        out["schema"] = f"({len((spec.get('schema') or {}).get('columns', []))} columns, as published)"
    return out


# ----------------------------------------------------------------------------- finding requests


def _client(client):
    """The owner's admin client the caller logged in with (the CLI's ``admin_client``):
    this module does not log in itself (it sits below the server package)."""
    if client is None:
        raise ManualReviewError("no syft client: log in as the owner first (fedmtl.datasites.server.admin.admin_client)")
    return client


def _syft_status(req) -> str:
    try:
        name = req.status.name.lower()
    except Exception:  # noqa: BLE001 - syft may fail to compute a status
        return "unknown"
    return {"rejected": "denied"}.get(name, name)


def _request_id(req) -> str:
    spec = spec_of(req)
    return str(spec.get("job_id")) if spec and spec.get("job_id") else f"syft-{req.id}"


def _binding(home: Path, client) -> dict:
    """What a round request must be bound to on this datasite (server id, records asset)."""
    server_id, asset_id = binding_of(home, client)
    return {"server_id": server_id, "asset_id": asset_id}


def _code_requests(client) -> list:
    with syftio.quiet():
        out = []
        for r in client.requests.get_all():
            try:
                if r.code is not None and not syftio.is_error(r.code):
                    out.append(r)
            except Exception:  # noqa: BLE001 - not a code request
                continue
        return out


def _summary(home: Path, req, led, client) -> RequestSummary:
    facts, _, known = resolve_request(home, req, led, **_binding(home, client))
    return RequestSummary(
        request_id=facts.request_id,
        syft_id=str(req.id),
        researcher=facts.researcher,
        code_name=facts.code_name,
        syft_status=_syft_status(req),
        ledger_status=known.status if known else "unknown",
    )


def list_requests(home: str | Path, *, client=None, include_decided: bool = False) -> list[RequestSummary]:
    """Requests waiting for a person: pending in syft, or ``pending``/``pending_manual``
    in the ledger (also when syft no longer holds them). ``include_decided`` lists all."""
    home = Path(home)
    home_mod.read_config(home)
    client = _client(client)
    led = site_ledger.open_ledger(home)
    out: list[RequestSummary] = []
    seen: set[str] = set()
    for req in _code_requests(client):
        s = _summary(home, req, led, client)
        seen.add(s.request_id)
        if include_decided or s.syft_status == "pending" or s.ledger_status in _OPEN:
            out.append(s)
    for st in led.requests():
        if st.request_id not in seen and (include_decided or st.status in _OPEN):
            out.append(
                RequestSummary(
                    request_id=st.request_id, syft_id=None, researcher=st.facts.researcher,
                    code_name=st.facts.code_name, syft_status="missing", ledger_status=st.status,
                )
            )
    return out


def find_request(home: str | Path, name: str, *, client=None):
    """The syft request named ``name`` (ledger id, syft id or a unique syft-id prefix)."""
    home = Path(home)
    client = _client(client)
    name = (name or "").strip()
    if not name:
        raise ManualReviewError("give a request id (see `fedmtl datasite review --list`)")
    reqs = _code_requests(client)
    exact = [r for r in reqs if name in (str(r.id), f"syft-{r.id}", _request_id(r))]
    if not exact and len(name) >= MIN_PREFIX:
        exact = [r for r in reqs if str(r.id).startswith(name)]
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        ids = ", ".join(str(r.id) for r in exact)
        raise ManualReviewError(
            f"{name!r} names {len(exact)} requests ({ids}); give the full syft request id"
        )
    if site_ledger.open_ledger(home).request(name) is not None:
        raise ManualReviewError(
            f"request {name!r} is in the ledger but this datasite's syft server no longer holds it; "
            "nothing can be approved (a denial needs no action)"
        )
    pending = [s.request_id for s in list_requests(home, client=client)]
    raise ManualReviewError(
        f"no request {name!r} on this datasite; pending requests: {', '.join(pending) or '(none)'}. "
        "Use the id from `fedmtl datasite review --list` (job id or syft id)"
    )


# ----------------------------------------------------------------------------- reviewing


def _assess(home: Path, req, led, client):
    """(facts, problems, decision now, ledger state) of one syft request."""
    facts, problems, known = resolve_request(home, req, led, **_binding(home, client))
    policy = led.current_policy()
    if policy is None:
        raise ManualReviewError(f"the ledger of {home} has no policy; relaunch the datasite with --policy")
    spent = led.spend_summary(dataset=facts.dataset, researcher=facts.researcher)
    if problems:
        decision = _denied(problems)
        try:  # still show the numbers where the spec allows it
            numbers = decide(policy=policy, request=facts, spent=spent)
            decision = replace(
                numbers, status="denied", reasons=tuple(problems) + numbers.reasons
                if numbers.status == "denied" else tuple(problems),
            )
        except Exception:  # noqa: BLE001 - a malformed spec has no epsilon
            pass
    else:
        decision = decide(policy=policy, request=facts, spent=spent)
    return facts, problems, decision, known


def show_request(
    home: str | Path, name: str, *, client=None, dry_run: bool = True
) -> RequestDetails:
    """The details of request ``name`` (see the module docstring)."""
    home = Path(home)
    client = _client(client)
    req = find_request(home, name, client=client)
    led = site_ledger.open_ledger(home)
    facts, problems, decision, known = _assess(home, req, led, client)
    with syftio.quiet():
        code = str(req.code.raw_code or "")
    try:
        diff = code_diff(normalise(code), normalise(TEMPLATE_SOURCE), name=facts.code_name,
                         template_name=TEMPLATE_NAME)
    except SyntaxError:
        diff = code_diff(code, TEMPLATE_SOURCE, name=facts.code_name, template_name=TEMPLATE_NAME)
    spec = spec_of(req)
    summary = _summary(home, req, led, client)
    details = RequestDetails(
        summary=summary, code=code, code_hash=facts.code_hash, template=decision.template,
        diff=diff, spec=spec, problems=list(problems), decision=decision,
    )
    if dry_run:
        if decision.template is None:
            details.dry_run = DryRunResult(
                ran=False, ok=False,
                message="the code is not the round template; the dry run executes only the "
                "library's round runtime, never submitted code",
            )
        elif problems or spec is None:
            details.dry_run = DryRunResult(ran=False, ok=False, message="the job spec is invalid (see above)")
        else:
            details.dry_run = dry_run_site(spec, mock_of(home, client=client))
    return details


def mock_of(home: str | Path, *, client=None):
    """The datasite's published mock of its records (what researchers see)."""
    home = Path(home)
    cfg = home_mod.read_config(home)
    client = _client(client)
    with syftio.quiet():
        for ds in client.datasets.get_all():
            if ds.name == cfg["dataset"]:
                return ds.assets[syftio.ASSET_NAME].mock
    raise ManualReviewError(f"dataset {cfg['dataset']!r} is not on the datasite; was its first launch complete?")


def dry_run_site(spec: Mapping[str, Any], mock, *, passes: int = 1) -> DryRunResult:
    """Run the round runtime for the first ``passes`` pass(es) of the job ``spec`` on
    ``mock``, locally, in throw-away homes (fresh identities, no ledger). Every site of
    the job's roster is simulated with this mock, so the whole secure-aggregation pass
    runs. Never raises for a failing job: the result says what failed."""
    import secrets as _secrets
    import tempfile

    import pandas as pd

    if not isinstance(mock, pd.DataFrame):
        return DryRunResult(ran=False, ok=False, message=f"the mock asset is a {type(mock).__name__}, not a table")
    roster = list(spec.get("roster") or {}) or [str(spec.get("site"))]
    own = str(spec.get("site"))
    names = {s: f"dryrun-{i}" for i, s in enumerate(roster)}  # never a real site's name
    with tempfile.TemporaryDirectory(prefix="fedmtl-review-dryrun-") as tmp:
        keys = {}
        for s, n in names.items():
            h = Path(tmp) / n
            h.mkdir()
            (h / rt.DRY_RUN_MARKER).write_text("dry run: no ledger\n")
            keys[n] = identity.create(h, n).public.verify_key.to_bytes().hex()
            rt.register_home(n, h)
        job_id = f"dryrun-{_secrets.token_hex(3)}"
        specs = {n: {**spec, "site": n, "roster": keys, "job_id": job_id} for n in names.values()}
        try:
            any_spec = next(iter(specs.values()))
            model, _ = protocol.build_model(any_spec)
            weights = model_to_vector(model)
            transport = LocalTransport({n: mock for n in names.values()}, specs)
            report: dict[str, Any] = {}
            metrics: dict[str, Any] = {}
            done = 0
            job = protocol.job_of(any_spec)
            # a standard-scaling job releases statistics in pass 1: the dry run goes on
            # through its first training pass, with the scaling derived from them
            extra = 1 if getattr(job, "stats_pass", False) else 0
            scaling = None
            for p in range(1, min(passes + extra, protocol.last_pass(job)) + 1):
                out = run_pass(transport=transport, site_specs=specs, sites=list(names.values()), pass_no=p,
                               attempt=0, weights=weights, model=model, scaling=scaling)
                if "stats" in out.arrays and not out.dropped:
                    scaling = protocol.derive_scaling(any_spec, out.arrays["stats"], n_sites=len(out.survivors))
                if out.dropped:
                    why = "; ".join(f"{w}" for w in out.dropped.values())
                    return DryRunResult(ran=True, ok=False, message=f"pass {p} failed: {why}")
                report = dict(out.reports.get(names.get(own, ""), {}) or next(iter(out.reports.values()), {}))
                if "metrics" in out.arrays:
                    metrics, _ = protocol.read_release(out.arrays["metrics"], any_spec, n_sites=len(out.survivors),
                                                       recalibrate=False)
                done = p
        except JobError as e:
            return DryRunResult(ran=True, ok=False, message=str(e))
        except Exception as e:  # noqa: BLE001 - report, do not crash the review
            return DryRunResult(ran=True, ok=False, message=f"{type(e).__name__}: {e}")
        finally:
            for n in names.values():
                rt.unregister_home(n)
    return DryRunResult(
        ran=True, ok=True,
        message=f"pass{'es' if done > 1 else ''} 1{f'..{done}' if done > 1 else ''} ran through secure "
        f"aggregation with {len(names)} simulated site(s) on this datasite's mock data "
        f"({len(mock)} rows)",
        report=report, metrics=metrics,
    )


@dataclass(frozen=True)
class ManualOutcome:
    """What :func:`decide_request` did."""

    request_id: str
    syft_id: str
    decision: Decision
    recorded: bool  # False: the ledger already held this decision (only syft was updated)
    syft_status: str

    def render(self) -> str:
        d = self.decision
        verb = "approved" if d.status == "approved" else "denied"
        lines = [f"request {self.request_id} {verb} by {d.reviewer}; syft status: {self.syft_status}"]
        lines.append("  recorded in the ledger" + (" (advisory warning shown)" if d.warning_shown else "")
                     if self.recorded else "  the ledger already held this decision; syft updated")
        return "\n".join(lines)


def decide_request(
    home: str | Path,
    name: str,
    *,
    approve: bool,
    reviewer: str,
    reason: str,
    warnings_acknowledged: bool = False,
    client=None,
) -> ManualOutcome:
    """A person's decision on request ``name``: recorded in the ledger, then applied in syft.

    Approval is refused (:class:`~fedmtl.datasites.rules.review.ReviewError`) when the policy
    would deny the request now (rule and numbers in the message), and for code that is
    not an allowed template unless ``warnings_acknowledged`` (the caller showed the
    PYSEC-2026-546 warning; the ledger records ``warning_shown``).
    """
    home = Path(home)
    client = _client(client)
    req = find_request(home, name, client=client)
    led = site_ledger.open_ledger(home)
    for attempt in range(2):
        facts, problems, auto, known = _assess(home, req, led, client)
        if known is not None and known.status not in _OPEN:
            final = known.decision
            want = "approved" if approve else "denied"
            status = known.status if final is None else final.status
            if status == want and _syft_status(req) == "pending":
                return _apply(req, facts.request_id, final, recorded=False)
            who = f" by {final.reviewer}" if final else ""
            raise ManualReviewError(
                f"request {facts.request_id} was already decided{who}: {known.status}; decisions are final"
            )
        if auto.status == "approved":
            # the policy would approve it now (e.g. approval switched to auto): a person may too
            auto = replace(auto, status="pending_manual")
        decision = manual_decision(
            auto, approve=approve, reviewer=reviewer, reason=reason,
            warnings_acknowledged=warnings_acknowledged,
        )
        try:
            if known is None:
                led.record_review(facts, decision)
            else:
                led.record_decision(facts.request_id, decision)
        except LedgerError:
            if attempt == 0:  # the automatic reviewer recorded it meanwhile: look again
                continue
            raise
        return _apply(req, facts.request_id, decision, recorded=True)
    raise AssertionError("unreachable")


def _apply(req, request_id: str, decision: Decision, *, recorded: bool) -> ManualOutcome:
    """Approve or deny ``req`` in syft as ``decision`` says (tolerating the automatic
    reviewer having applied the ledger's decision first)."""
    want = "approved" if decision.status == "approved" else "denied"
    err = None
    with syftio.quiet():
        try:
            if want == "approved":
                res = req.approve(disable_warnings=True)
            else:
                res = req.deny(reason="; ".join(decision.reasons) or "denied by the datasite's reviewer")
            if syftio.is_error(res):
                err = getattr(res, "message", str(res))
        except Exception as e:  # noqa: BLE001 - syft raises its own types
            err = f"{type(e).__name__}: {e}"
    now = _syft_status(req)
    if now != want:
        raise ManualReviewError(
            f"request {request_id}: the decision ({want}) is in the ledger, but syft did not apply it "
            f"({err or 'status is ' + now}). The datasite's automatic reviewer applies ledger decisions "
            "to pending requests; check `fedmtl datasite status` and logs/server.log"
        )
    return ManualOutcome(request_id=request_id, syft_id=str(req.id), decision=decision, recorded=recorded,
                         syft_status=now)


__all__ = [
    "DryRunResult",
    "ManualOutcome",
    "ManualReviewError",
    "RequestDetails",
    "RequestSummary",
    "ReviewError",
    "decide_request",
    "dry_run_site",
    "find_request",
    "list_requests",
    "mock_of",
    "show_request",
]
