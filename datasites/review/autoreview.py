"""Automatic review of pending code requests, inside the datasite process.

For each pending syft request it builds the :class:`~fedmtl.datasites.rules.review.RequestFacts`
(code hash, the job spec from the syft ``Constant``, the privacy records the job would
spend on this dataset), lets the ledger decide against the policy and record request and
decision in one signed append, then approves or denies the request in syft with the
reasons. A decision of ``pending_manual`` leaves the request for a person
(``fedmtl datasite review``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedmtl.contract.site_spec import SiteSpec
from fedmtl.datasites.ledger import site_ledger
from fedmtl.datasites.rules import limits
from fedmtl.datasites.rules.review import Decision, RequestFacts
from fedmtl.datasites.site import home as home_mod
from fedmtl.datasites.site import identity, syftio
from fedmtl.datasites.template import code_sha256, is_template, source_problems
from fedmtl.fsutil import canonical_json
from fedmtl.schema import Schema

log = logging.getLogger("fedmtl.autoreview")


def spec_of(request) -> dict[str, Any] | None:
    """The site spec a request carries as its syft ``Constant`` named ``spec``, as bound
    (untrusted: :func:`fedmtl.datasites.rules.limits.spec_problems` bounds it, then
    :meth:`SiteSpec.parse <fedmtl.contract.site_spec.SiteSpec.parse>` reads it)."""
    kwargs = getattr(request.code, "input_policy_init_kwargs", None) or {}
    for rules in kwargs.values():
        if isinstance(rules, dict) and "spec" in rules:
            val = getattr(rules["spec"], "val", None)
            return val if isinstance(val, dict) else None
    return None


#: the syft tag on a request left for a person, so the researcher's status() can say so
MANUAL_REVIEW_TAG = "fedmtl:pending_manual"

#: the keyword arguments the round template takes, in its order
TEMPLATE_KWARGS = ("data", "spec", "message")


def binding_problems(request, *, server_id, asset_id) -> list[str]:
    """Why syft would run something other than the round template bound to this
    datasite's records, or ``[]``.

    Looks at exactly what syft 0.9.5 executes: ``exec(parsed_code)`` then
    ``eval(f"{unique_func_name}(**kwargs)")``, where ``parsed_code`` wraps every top-level
    statement of ``raw_code`` and calls ``service_func_name(**input_kwargs)``, with the
    kwargs the input policy resolves and any nested codes as globals."""
    from syft.service.code.user_code import parse_user_code
    from syft.service.policy.policy import Constant, Matches, MixedInputPolicy, OutputPolicyExecuteCount, UserOwned
    from syft.service.request.request import UserCodeStatusChange

    code = request.code
    problems: list[str] = []
    changes = list(getattr(request, "changes", []) or [])
    if len(changes) != 1 or type(changes[0]).__name__ != UserCodeStatusChange.__name__:
        problems.append(
            f"the request carries {len(changes)} change(s) of kinds "
            f"{sorted({type(c).__name__ for c in changes})}; a round request is one code request"
        )
    name = getattr(code, "service_func_name", None)
    raw = getattr(code, "raw_code", None)
    problems += source_problems(raw, name)
    unique = getattr(code, "unique_func_name", None)
    if not isinstance(unique, str) or not unique.isidentifier():
        problems.append(f"syft's function name {unique!r} is not a plain identifier")
    if list(getattr(code, "input_kwargs", None) or []) != list(TEMPLATE_KWARGS):
        problems.append(
            f"the code's inputs are {list(getattr(code, 'input_kwargs', None) or [])}; a round function "
            f"takes exactly {list(TEMPLATE_KWARGS)}"
        )
    if not problems:
        # what syft will exec, derived from the very code reviewed here
        expected = parse_user_code(
            raw_code=raw,
            func_name=unique,
            original_func_name=name,
            function_input_kwargs=list(TEMPLATE_KWARGS),
        )
        if getattr(code, "parsed_code", None) != expected:
            problems.append("the code syft would execute (parsed_code) is not the submitted function")
    if getattr(code, "nested_codes", None):
        problems.append("the code calls other syft code (nested codes); the template calls none")
    if getattr(code, "uses_datasite", False):
        problems.append("the code asks for the datasite client; the template does not")
    if getattr(code, "input_policy_type", None) is not MixedInputPolicy:
        problems.append(
            f"the input policy is {getattr(code.input_policy_type, '__name__', code.input_policy_type)!r}; "
            "a round request uses syft's MixedInputPolicy"
        )
    if getattr(code, "output_policy_type", None) is not OutputPolicyExecuteCount:
        problems.append(
            f"the output policy is {getattr(code.output_policy_type, '__name__', code.output_policy_type)!r}; "
            "a round request uses syft's OutputPolicyExecuteCount"
        )
    kwargs = getattr(code, "input_policy_init_kwargs", None) or {}
    if not isinstance(kwargs, dict) or len(kwargs) != 1:
        problems.append("the inputs must be bound on exactly one datasite (this one)")
        return problems
    (ident, rules), = kwargs.items()
    if getattr(ident, "server_id", None) != server_id:
        problems.append("the inputs are bound on another datasite, not this one")
    if not isinstance(rules, dict) or sorted(rules) != sorted(TEMPLATE_KWARGS):
        problems.append(
            f"the input policy binds {sorted(rules) if isinstance(rules, dict) else rules!r}; it must bind "
            f"exactly {list(TEMPLATE_KWARGS)}"
        )
        return problems
    data, spec, message = (rules[k] for k in TEMPLATE_KWARGS)
    if type(data) is not Matches or getattr(data, "val", None) != asset_id:
        problems.append("'data' must be bound to this datasite's records asset")
    if type(spec) is not Constant or not isinstance(getattr(spec, "val", None), dict):
        problems.append("'spec' must be a syft Constant holding the job spec (a dict)")
    if type(message) is not UserOwned or getattr(message, "type", None) is not dict:
        problems.append("'message' must be a caller-supplied dict (MixedInputPolicy message=dict)")
    return problems


_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,79}$")


def facts_of(home: Path, request, *, server_id=None, asset_id=None):
    """Build the review facts of a syft request and the problems that deny it outright.

    Every check that does not need arithmetic on the researcher's numbers runs first;
    every number of the spec is bounded (:mod:`fedmtl.datasites.rules.limits`) before any
    privacy or model computation uses it."""
    cfg = home_mod.read_config(home)
    meta = json.loads((Path(home) / "dataset_meta.json").read_text())
    code = request.code
    raw = getattr(code, "raw_code", None)
    problems: list[str] = binding_problems(request, server_id=server_id, asset_id=asset_id)
    if not problems and is_template(raw, code.service_func_name):
        code_hash = code_sha256(raw)
    else:
        # exactly the bytes submitted: never equal to an allowed template's hash
        raw_bytes = raw.encode("utf-8", "replace") if isinstance(raw, str) else repr(raw).encode()
        code_hash = "custom:" + hashlib.sha256(raw_bytes).hexdigest()
    spec = spec_of(request)
    researcher = str(getattr(request, "requesting_user_email", "") or "unknown")
    base = dict(
        researcher=researcher,
        dataset=cfg["dataset"],
        code_name=str(getattr(code, "service_func_name", "")),
        code_hash=code_hash,
    )
    site_spec = None
    job_id = spec.get("job_id") if isinstance(spec, dict) else None
    request_id = job_id if isinstance(job_id, str) and _NAME.match(job_id) else f"syft-{request.id}"
    roster: tuple[tuple[str, str], ...] = ()
    if spec is None:
        problems.append("the request carries no job spec (a syft Constant named 'spec' holding a table)")
    else:
        own = identity.load_public(home).verify_key.to_bytes().hex()
        policy = site_ledger.current_policy(home)
        n_train = int(meta["split_sizes"].get("train", meta["n_records"]))
        spec_problems, roster = limits.spec_problems(
            spec, policy=policy, schema=_home_schema(home), site=cfg["name"], own_key=own, n_train=n_train
        )
        problems += spec_problems
        if not spec_problems:
            try:
                site_spec = SiteSpec.parse(spec)
            except Exception as e:  # noqa: BLE001 - any malformed spec is a denial reason
                problems.append(f"the job spec is invalid: {e}")
    if site_spec is None or problems:
        return RequestFacts(
            request_id=request_id, tasks=(), noise_multiplier=0.0, max_grad_norm=0.0, rounds=0,
            local_epochs=0, sample_rate=0.0, steps_per_round=0, delta=1e-5, n_sites=0,
            secagg_threshold=0, roster=roster, **base,
        ), problems
    return job_facts(site_spec, n_train=n_train, request_id=request_id, roster=roster, site=cfg["name"],
                     **base), problems


def job_facts(site_spec: SiteSpec, *, n_train: int, request_id: str, roster, site: str,
              researcher: str, dataset: str, code_name: str, code_hash: str):
    """The review facts of a well-formed site spec whose numbers :mod:`limits` bounded:
    what the job costs this site (privacy records pass by pass) and what it asks.

    Args:
        site_spec: the parsed site spec.
        n_train: this datasite's training records.
        request_id: the ledger's id of the request.
        roster: ``((site, key hex), ...)`` as :func:`limits.spec_problems` returned it.
        site: this datasite.
        researcher: who asked.
        dataset: this datasite's dataset.
        code_name: the request's function name.
        code_hash: the request's code hash.

    Returns:
        The :class:`~fedmtl.datasites.rules.review.RequestFacts`; its ``spec_hash`` is
        over exactly the mapping the request bound, and ``passes`` / ``eval_passes`` come
        from the job's :class:`~fedmtl.contract.schedule.PassSchedule`, the one the
        runtime charges by.
    """
    job = site_spec.job
    schedule = site_spec.schedule
    noise = float(job.noise_for_site(n_train)) if job.dp else 0.0
    if job.local_epochs is not None:
        local_epochs = float(job.local_epochs)
    elif job.local_steps is not None:
        local_epochs = job.local_steps * job.sample_rate_for_site(n_train)
    else:
        local_epochs = 1.0
    return RequestFacts(
        request_id=request_id,
        researcher=researcher,
        dataset=dataset,
        code_name=code_name,
        code_hash=code_hash,
        tasks=tuple(t.label for t in job.tasks),
        noise_multiplier=noise,
        max_grad_norm=float(job.max_grad_norm),
        rounds=int(job.rounds),
        local_epochs=max(1, int(round(float(local_epochs)))) if local_epochs else 1,
        sample_rate=float(job.sample_rate),
        steps_per_round=int(job.steps_per_round(n_train)),
        delta=float(job.delta),
        n_sites=len(roster),
        # given, or a majority of the roster: what every party of the job will use
        secagg_threshold=int(job.threshold_for(len(roster))),
        release_per_site_metrics=bool(job.per_site_metrics),
        spec_hash=site_spec_hash(site_spec.to_dict()),
        records=tuple(job.job_records(n_train)),
        passes=schedule.last_pass,
        eval_passes=schedule.n_eval_passes,
        eval_noise_multiplier=float(job.eval_noise_multiplier),
        roster=tuple(roster),
        site=site,
    )


def _home_schema(home: Path):
    return Schema.load(Path(home) / "schema.toml")


def resolve_request(home: Path, req, led, *, server_id=None, asset_id=None):
    """(facts, problems, ledger state) of a syft request. A job id the ledger already holds
    for another request (other code, spec or researcher) is never inherited: the request
    is then known under ``syft-<uid>`` and carries the reason."""
    facts, problems = facts_of(home, req, server_id=server_id, asset_id=asset_id)
    known = led.request(facts.request_id)
    if known is not None and not same_request(known.facts, facts):
        problems = [*problems, reused_id_reason(facts.request_id, known.facts)]
        facts = replace(facts, request_id=f"syft-{req.id}")
        known = led.request(facts.request_id)
    return facts, problems, known


def site_spec_hash(spec: dict[str, Any]) -> str:
    """sha256 of the whole site spec (job, roster, schema, site, counts): what the
    approval binds, so a reused job id with any other field is another request."""
    return hashlib.sha256(canonical_json(spec)).hexdigest()


class Reviewer:
    """Decides the pending requests of one datasite; cheap when nothing is new.

    Each request is reviewed inside its own error boundary: an exception while reviewing
    one request denies that request (the reason names the error) and the next is
    reviewed. Requests already decided (in syft) are remembered and never re-examined."""

    def __init__(self, home: Path, client):
        self.home = Path(home)
        self.client = client
        self.seen: set[str] = set()
        self._server_id = None
        self._asset_id = None
        self._db_stamp: tuple | None = None

    def _db_changed(self) -> bool:
        """Whether syft's SQLite database (HOME/db) changed since the last poll: a stat of
        its files, so an idle datasite costs no request reads at all. Unknown (another
        database) counts as changed."""
        db = self.home / "db"
        files = sorted(db.glob("datasite.sqlite*")) if db.is_dir() else []
        if not files:
            return True
        stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)
        changed = stamp != self._db_stamp
        self._db_stamp = stamp
        return changed

    def _binding(self):
        if self._asset_id is None:
            self._server_id, self._asset_id = binding_of(self.home, self.client)
        return self._server_id, self._asset_id

    def _tag_manual(self, req) -> None:
        """Tag a request that waits for a person (researchers see the tag in status())."""
        if MANUAL_REVIEW_TAG in (getattr(req, "tags", None) or []):
            return
        try:
            with syftio.quiet():
                self.client.api.services.request.set_tags(req, [*(req.tags or []), MANUAL_REVIEW_TAG])
        except Exception:  # noqa: BLE001 - a missing tag only makes status() less precise
            log.warning("could not tag request %s as waiting for a person", req.id)

    def poll(self) -> int:
        """Review every new pending request; returns how many were decided."""
        if not (self.home / "dataset_meta.json").exists():
            return 0  # first launch still uploading
        if not self._db_changed():
            return 0  # nothing was written since the last look: no request can be new
        with syftio.quiet():
            reqs = self.client.requests.get_all()
        n = 0
        for req in reqs:
            key = str(req.id)
            if key in self.seen:
                continue
            if req.status.name != "PENDING":
                self.seen.add(key)
                continue
            try:
                status = review_one(self.home, req, self._binding())
            except Exception as e:  # noqa: BLE001 - one bad request never stops the reviewer
                log.exception("reviewing request %s failed; denying it", req.id)
                status = "denied"
                _deny(req, f"the datasite could not review this request ({type(e).__name__}: "
                           f"{str(e)[:200]}); it is denied")
            if status != "pending_manual":
                self.seen.add(key)  # a person's later decision writes the database again
            else:
                self._tag_manual(req)
            n += 1
        return n


def binding_of(home: Path, client) -> tuple[Any, Any]:
    """(this server's id, the action id of this datasite's records asset), read with an
    admin client: what a round request must be bound to."""
    ds_name = home_mod.read_config(home)["dataset"]
    with syftio.quiet():
        datasets = [d for d in client.datasets.get_all() if d.name == ds_name]
    if len(datasets) != 1 or not datasets[0].assets:
        raise RuntimeError(f"dataset {ds_name!r} is not on this datasite (found {len(datasets)})")
    return client.api.server_uid, datasets[0].assets[0].action_id


def review_one(home: Path, req, binding) -> str:
    """Decide one pending syft request through the ledger; returns the status."""
    led = site_ledger.open_ledger(home)
    server_id, asset_id = binding
    facts, problems, known = resolve_request(home, req, led, server_id=server_id, asset_id=asset_id)
    if known is None:
        if problems:
            decision = _denied(problems)
            led.record_review(facts, decision)
        else:
            decision = led.review_and_record(facts)
        status, reasons = decision.status, list(decision.reasons)
    else:
        status = known.status
        reasons = list(known.decision.reasons) if known.decision else []
    with syftio.quiet():
        if status == "approved":
            req.approve()
        elif status == "denied":
            _deny(req, "; ".join(reasons) or "denied by the datasite policy")
    log.info("request %s (%s): %s", req.id, facts.request_id, status)
    return status


def _deny(req, reason: str) -> None:
    with syftio.quiet():
        req.deny(reason=reason[:4000])


def review_pending(home: Path, client) -> None:
    """Review the pending requests once (a fresh :class:`Reviewer`)."""
    Reviewer(home, client).poll()


def same_request(a, b) -> bool:
    """Whether two RequestFacts are the same request (same code, job spec, researcher)."""
    return (a.code_hash, a.spec_hash, a.researcher) == (b.code_hash, b.spec_hash, b.researcher)


def reused_id_reason(request_id: str, earlier) -> str:
    return (
        f"job id {request_id!r} is already used in the ledger by another request (code "
        f"{earlier.code_hash[:12]}..., from {earlier.researcher}); a reused id never inherits a "
        "decision: submit the job again (a new job gets a new id)"
    )


def _denied(problems: list[str]):
    return Decision(
        status="denied",
        reasons=tuple(problems),
        epsilon_job=float("nan"),
        epsilon_after_dataset=float("nan"),
        epsilon_after_researcher=float("nan"),
        budget_left={},
    )
