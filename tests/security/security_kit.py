"""The attacker's kit for the security suite: legit job specs to start from, raw syft
submissions (:meth:`Federation.forge`), waiting for the automatic reviewer, trying to
execute what was submitted, and the checks that fail a test when an attack succeeds.

Imported by the tests as ``import security_kit as K`` (registered by
tests/security/conftest.py: pytest runs with --import-mode=importlib, so sibling modules
are not importable by path).
"""

from __future__ import annotations

import copy
import itertools
import linecache
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fedmtl.datasites.server import admin
from fedmtl.datasites.site import syftio

PW = "researcher-password-1"
#: the attacker's own account (all forged requests come from it unless said otherwise)
ATTACKER = "mallory@evil.example"
#: how long the automatic reviewer has to decide one request (the spec: "within ~60 s")
DECISION_TIMEOUT = 60.0
SITES = ("general", "riverside", "st-mary")
#: keys an ``advertise`` reply must never carry: per-site figures outside secure aggregation
FORBIDDEN_REPORT_KEYS = frozenset({"loss", "losses", "counts", "n_train", "n_test", "site_metrics", "n_records"})


# ----------------------------------------------------------------------------- helpers


def JobSpec():  # noqa: N802 - returns the class
    from fedmtl.contract.jobspec import JobSpec

    return JobSpec


def protocol():
    from fedmtl.contract import protocol

    return protocol


def site_ledger():
    """The datasite's open ledger and policy (``open_ledger(home)``)."""
    from fedmtl.datasites.ledger import site_ledger

    return site_ledger


def legit_spec_kwargs(**overrides: Any) -> dict[str, Any]:
    """A short, cheap, conforming job: what an honest researcher sends.

    rounds=1, local_steps=2, sample_rate=0.02, noise_multiplier=1.0, secagg threshold 2.
    ``eval_every`` is left at the spec's default unless another value evaluates fewer
    passes (the default policy allows one pass of released evaluation statistics)."""
    kw: dict[str, Any] = dict(
        name="legit",
        tasks=[{"label": "diabetes_5y"}, {"label": "dyslipidemia_5y"}],
        rounds=1,
        local_steps=2,
        sample_rate=0.02,
        lr=0.5,
        noise_multiplier=1.0,
        secagg={"threshold": 2, "clip": 1.0},
    )
    kw.update(overrides)
    if "eval_every" not in overrides:
        every = _fewest_eval_passes(kw)
        if every is not None:
            kw["eval_every"] = every
    return kw


def _fewest_eval_passes(kw: dict[str, Any]) -> int | None:
    """The ``eval_every`` (``None``: the spec's default) that evaluates the fewest passes."""
    count = getattr(protocol(), "eval_pass_count", None)
    if count is None:
        return 1000
    best, best_n = None, None
    for every in (None, 0, 1000, 1):
        try:
            n = int(count(JobSpec()(**(kw if every is None else {**kw, "eval_every": every}))))
        except Exception:  # noqa: BLE001 - a candidate the spec refuses is skipped
            continue
        if best_n is None or n < best_n:
            best, best_n = every, n
    return best


def legit_spec(**overrides: Any):
    return JobSpec()(**legit_spec_kwargs(**overrides))


def func_name_of(job_id: str) -> str:
    """The per-job template name the library uses for ``job_id``."""
    from fedmtl.datasites.template import TEMPLATE_NAME

    return f"{TEMPLATE_NAME}_{job_id.replace('-', '_')}"


def template_text(name: str) -> str:
    """The library's round template, exactly as the library submits it, under ``name``."""
    from fedmtl.datasites.template import TEMPLATE_NAME, TEMPLATE_SOURCE

    return TEMPLATE_SOURCE.replace(f"def {TEMPLATE_NAME}(", f"def {name}(", 1)


def function_from_source(src: str, name: str) -> Callable:
    """Exec ``src`` and return its ``name``, with the source registered in linecache so
    that syft's ``inspect.getsource`` reads exactly ``src``."""
    filename = f"<security-test-{name}-{next(_COUNTER)}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    ns: dict[str, Any] = {}
    exec(compile(src, filename, "exec"), ns)  # noqa: S102 - the test's own attack source
    return ns[name]


_COUNTER = itertools.count()


def walk_numbers(obj: Any, path: tuple = ()) -> list[tuple]:
    """Every path to an int/float (not bool) inside nested dicts and lists."""
    out: list[tuple] = []
    if isinstance(obj, dict):
        for k in sorted(obj):
            out += walk_numbers(obj[k], (*path, k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out += walk_numbers(v, (*path, i))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out.append(path)
    return out


def set_path(obj: Any, path: tuple, value: Any) -> None:
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _resolve(x: Any) -> Any:
    """The value behind a syft result pointer (an ActionObject: ``.get()`` downloads it,
    as the library's transport does); anything else as it is."""
    if not hasattr(x, "syft_action_data"):
        return x
    try:
        with syftio.quiet():
            return x.get()
    except Exception:  # noqa: BLE001 - an unreadable pointer: look at what is cached
        try:
            return x.syft_action_data
        except Exception:  # noqa: BLE001
            return None


def leak_of(result: Any) -> str | None:
    """What in ``result`` shows the code ran on the private records, or ``None``.

    A pandas object or array of records anywhere, a string rendering of the table, or a
    successful reply of the round runtime (``{"ok": True, ...}``: the template ran)."""
    import pandas as pd

    seen = 0

    def visit(x: Any, where: str) -> str | None:
        nonlocal seen
        seen += 1
        if seen > 10_000:
            return None
        x = _resolve(x)
        if isinstance(x, (pd.DataFrame, pd.Series, pd.Index)):
            return f"{where}: a pandas {type(x).__name__} of shape {getattr(x, 'shape', '?')}"
        if isinstance(x, np.ndarray) and x.dtype == object:
            return f"{where}: an object array of shape {x.shape}"
        if isinstance(x, str):
            cols = sum(c in x for c in ("diabetes_5y", "hx_diabetes", "dyslipidemia_5y", "fib4", "split"))
            return f"{where}: a text rendering of the records" if cols >= 2 else None
        if isinstance(x, dict):
            if x.get("ok") is True:
                return f"{where}: the round runtime ran and answered ok=True (keys {sorted(map(str, x))})"
            for k, v in x.items():
                r = visit(v, f"{where}[{k!r}]")
                if r:
                    return r
        if isinstance(x, (list, tuple)):
            for i, v in enumerate(x[:1000]):
                r = visit(v, f"{where}[{i}]")
                if r:
                    return r
        return None

    return visit(result, "result")


def forbidden_keys(obj: Any, where: str = "reply", *, skip: tuple[str, ...] = ("message",)) -> list[str]:
    """Paths of keys in :data:`FORBIDDEN_REPORT_KEYS` anywhere in ``obj`` (dicts and
    lists), not looking inside the protocol ``message``."""
    found: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in skip:
                continue
            if k in FORBIDDEN_REPORT_KEYS:
                found.append(f"{where}[{k!r}]")
            found += forbidden_keys(v, f"{where}[{k!r}]", skip=skip)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found += forbidden_keys(v, f"{where}[{i}]", skip=skip)
    return found


def budget_only(reason: str) -> bool:
    """Whether a deny reason is only about privacy budgets (which would mean earlier
    requests were approved and spent it, not that this request was recognised)."""
    parts = [p.strip() for p in reason.replace("\n", ";").split(";") if p.strip()]
    budget = ("privacy.dataset_epsilon_budget", "privacy.researcher_epsilon_budget")
    return bool(parts) and all(p.startswith(budget) or p.startswith("-") for p in parts) and any(
        p.startswith(budget) for p in parts
    )


# ----------------------------------------------------------------------------- submissions


@dataclass
class Submission:
    """One raw code request: where it went, under which name, and what syft answered."""

    label: str
    site: str
    email: str
    func_name: str
    spec: Any
    client: Any = field(repr=False)
    asset: Any = field(repr=False)
    request: Any = field(default=None, repr=False)
    error: str | None = None  # syft refused the submission itself
    caller_supplies: tuple[str, ...] = ()  # kwargs the caller passes at execution

    @property
    def submitted(self) -> bool:
        return self.request is not None


@dataclass
class Decision:
    status: str  # APPROVED | REJECTED | PENDING | REFUSED (never became a request)
    reason: str = ""

    @property
    def denied(self) -> bool:
        return self.status == "REJECTED"


class Federation:
    """Three running datasites and the attacker's tools (see the module docs)."""

    def __init__(self, handles, work: Path):
        self.handles = {h.name: h for h in handles}
        self.work = Path(work)
        self._accounts: set[str] = set()
        self._sessions: dict[str, Any] = {}
        self._jobs = itertools.count()
        self._model_sizes: dict[str, int] = {}

    # -- accounts and sessions -----------------------------------------------------------
    def researcher(self, purpose: str) -> str:
        """The email of a researcher account of its own for ``purpose`` (made on every
        site on first use). Separate accounts keep each test's privacy budget apart."""
        slug = "".join(c if c.isalnum() else "-" for c in purpose.lower()).strip("-")
        email = f"{slug}@uni.example"
        self.ensure_account(email)
        return email

    def ensure_account(self, email: str) -> None:
        if email in self._accounts:
            return
        for h in self.handles.values():
            admin.add_researcher(home=h.home, email=email, password=PW)
        self._accounts.add(email)

    def session(self, email: str = ATTACKER):
        from fedmtl.researcher.session import Session

        self.ensure_account(email)
        if email not in self._sessions:
            self._sessions[email] = Session.connect(
                [{"url": h.url, "email": email, "password": PW} for h in self.handles.values()]
            )
        return self._sessions[email]

    def client(self, site: str, email: str = ATTACKER):
        return self.session(email).sites[site].client

    # -- legit jobs ----------------------------------------------------------------------
    def job(self, spec=None, *, email: str = ATTACKER):
        """A job of ``spec`` (default: :func:`legit_spec`) built by the library, not
        submitted: its ``site_specs`` and ``state['func_name']`` are valid material."""
        spec = spec or legit_spec()
        out = self.work / f"job-{next(self._jobs)}"
        return self.session(email).job(spec, out=out)

    def legit_site_spec(self, site: str, *, email: str = ATTACKER, **spec_overrides: Any) -> tuple[dict, str]:
        """(a deep copy of a fresh legit job's spec for ``site``, its func_name)."""
        job = self.job(legit_spec(**spec_overrides), email=email)
        return copy.deepcopy(job.site_specs[site]), job.state["func_name"]

    def variant_spec(self, base: dict, tag: str) -> tuple[dict, str]:
        """``base`` under a job id of its own (so the code, named after the job, is unique
        in syft) and the matching template name."""
        spec = copy.deepcopy(base)
        job_id = f"{base['job_id']}-{tag}"[:60].rstrip("-")
        spec["job_id"] = job_id
        return spec, func_name_of(job_id)

    def model_size(self, site_spec: dict) -> int:
        from fedmtl.models import model_to_vector

        key = repr(site_spec.get("job", {}).get("model")) if isinstance(site_spec, dict) else "x"
        if key not in self._model_sizes:
            try:
                model, _ = protocol().build_model(site_spec)
                self._model_sizes[key] = int(model_to_vector(model).size)
            except Exception:  # noqa: BLE001 - a poisoned spec: any size will do
                self._model_sizes[key] = 8
        return self._model_sizes[key]

    # -- raw submission --------------------------------------------------------------------
    def forge(
        self,
        label: str,
        site: str,
        spec: Any,
        func_name: str,
        *,
        email: str = ATTACKER,
        source: str | None = None,
        def_name: str | None = None,
        bind: Callable[[Any, Any, Any], dict] | None = None,
        input_policy: Any = None,
        output_policy: Any = None,
        mutate: Callable[[Any], None] | None = None,
        caller_supplies: tuple[str, ...] = (),
        limit: int = 32,
    ) -> Submission:
        """Submit one code request with the raw syft client, as an attacker would.

        ``source``/``def_name``: the code (default: the library's template under
        ``func_name``). ``bind(sy, asset, spec)`` returns the MixedInputPolicy keyword
        rules (default: data=asset, spec=Constant(spec), message=dict). ``input_policy``/
        ``output_policy`` replace the policies. ``mutate(code)`` edits the built
        ``SubmitUserCode`` (func_name, code, input_kwargs...) before it is sent.
        Never raises on a refusal by syft: the Submission then carries ``error``."""
        sy = syftio.import_syft()
        from syft.service.policy.policy import OutputPolicyExecuteCount

        conn = self.session(email).sites[site]
        client = conn.client
        sub = Submission(label=label, site=site, email=email, func_name=func_name, spec=spec,
                         client=client, asset=conn.asset, caller_supplies=caller_supplies)
        try:
            with syftio.quiet():
                asset = conn.asset
                if source is None:
                    source = template_text(func_name)
                    def_name = func_name
                fn = function_from_source(source, def_name or func_name)
                if input_policy is None:
                    rules = bind(sy, asset, spec) if bind else {
                        "data": asset, "spec": sy.Constant(val=spec), "message": dict
                    }
                    input_policy = sy.MixedInputPolicy(client=client, **rules)
                if output_policy is None:
                    output_policy = OutputPolicyExecuteCount(limit=limit)
                code = sy.syft_function(input_policy=input_policy, output_policy=output_policy)(fn)
                if mutate is not None:
                    mutate(code)
                sub.func_name = code.func_name
                res = client.code.request_code_execution(code)
        except Exception as e:  # noqa: BLE001 - syft refused it: the attack never became a request
            sub.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            return sub
        if syftio.is_error(res):
            sub.error = f"SyftError: {getattr(res, 'message', res)}"
            return sub
        sub.request = res
        return sub

    def wait(self, sub: Submission, *, timeout: float = DECISION_TIMEOUT, deadline: float | None = None) -> Decision:
        """Poll ``sub``'s request until it is no longer PENDING (or the deadline)."""
        if not sub.submitted:
            return Decision("REFUSED", sub.error or "")
        end = deadline if deadline is not None else time.monotonic() + timeout
        while True:
            with syftio.quiet():
                try:
                    status = sub.request.status.name
                except Exception:  # noqa: BLE001 - a transient read error: poll again
                    status = "PENDING"
            if status != "PENDING" or time.monotonic() >= end:
                break
            time.sleep(1.0)
        reason = ""
        if status not in ("PENDING", "APPROVED"):
            with syftio.quiet():
                try:
                    reason = str(sub.request.deny_reason or "")
                except Exception as e:  # noqa: BLE001
                    reason = f"(deny reason unreadable: {e})"
        return Decision(status, reason)

    def wait_decided(self, client, func_name: str, timeout: float = DECISION_TIMEOUT) -> str:
        """The status name (PENDING, APPROVED, REJECTED) of ``client``'s newest request
        for code ``func_name`` once it is not PENDING, or PENDING after ``timeout``."""
        end = time.monotonic() + timeout
        while True:
            with syftio.quiet():
                reqs = [
                    r for r in client.requests.get_all()
                    if getattr(r.code, "service_func_name", None) == func_name
                ]
                status = reqs[-1].status.name if reqs else "MISSING"
            if status not in ("PENDING", "MISSING") or time.monotonic() >= end:
                return status
            time.sleep(1.0)

    def try_execute(self, sub: Submission, *, message: dict | None = None) -> Any:
        """Call the submitted code as its author would; return what came back (or the
        exception). Used after an attack that could have been approved."""
        if message is None:
            size = self.model_size(sub.spec) if isinstance(sub.spec, dict) else 8
            message = {"stage": "advertise", "pass": 1, "attempt": 0, "weights": np.zeros(size, dtype=np.float32)}
        kwargs: dict[str, Any] = {"data": sub.asset, "message": message}
        if "spec" in sub.caller_supplies:
            kwargs["spec"] = sub.spec
        try:
            with syftio.quiet():
                fn = getattr(sub.client.code, sub.func_name)
                out = fn(**kwargs)
                return _resolve(out)
        except Exception as e:  # noqa: BLE001 - refused: that is the expected outcome
            return e

    # -- assertions --------------------------------------------------------------------------
    def assert_denied(
        self, sub: Submission, decision: Decision, *, allow_refused: bool = True, execute: bool = True
    ) -> None:
        """The attack failed: never approved, denied automatically with a reason that is not
        only about privacy budget (or, where ``allow_refused``, refused by syft before it
        became a request), and calling the code returns no data.

        ``execute``: try to call the code as its author would, whatever the decision; with
        ``False`` it is called only when the request was approved (a denied syft request
        never runs), so that a failure still says whether records came back."""
        leak = None
        if sub.submitted and (execute or decision.status == "APPROVED"):
            leak = leak_of(self.try_execute(sub))
        assert decision.status != "APPROVED", (
            f"ATTACK SUCCEEDED: {sub.label!r} on {sub.site} was APPROVED by the datasite"
            + (f"; calling it returned data: {leak}" if leak else "")
        )
        assert leak is None, f"ATTACK SUCCEEDED: calling {sub.label!r} on {sub.site} returned data: {leak}"
        if decision.status == "REFUSED":
            assert allow_refused, f"{sub.label!r}: syft refused the submission ({decision.reason})"
            return
        assert decision.status != "PENDING", (
            f"{sub.label!r} on {sub.site} is still PENDING after {DECISION_TIMEOUT:.0f}s: the automatic "
            "reviewer did not deny it (a request that fails review must be denied, not left waiting)"
        )
        assert decision.denied, f"{sub.label!r}: unexpected status {decision.status}"
        assert decision.reason.strip(), f"{sub.label!r} was denied without a reason"
        assert not budget_only(decision.reason), (
            f"{sub.label!r} was denied only for privacy budget ({decision.reason!r}): earlier attacks "
            "must have been approved and spent it; this request was not recognised as an attack"
        )

    def assert_no_leak(self, sub: Submission, *, message: dict | None = None) -> None:
        """Calling the submitted code (with ``message``) returns no records."""
        if not sub.submitted:
            return
        leak = leak_of(self.try_execute(sub, message=message))
        assert leak is None, f"ATTACK SUCCEEDED: calling {sub.label!r} on {sub.site} returned data: {leak}"


class Batch:
    """Many submissions sent at once, decided against one shared deadline: the suite
    submits a whole attack class, then each parametrised test looks at its own one."""

    def __init__(self, fed: Federation, subs: dict[str, Submission]):
        self.fed = fed
        self.subs = subs
        n = sum(1 for s in subs.values() if s.submitted)
        # the reviewer decides one request at a time: a minute, plus a little per request
        self.deadline = time.monotonic() + DECISION_TIMEOUT + 0.5 * n
        self._decisions: dict[str, Decision] = {}

    def decision(self, label: str) -> tuple[Submission, Decision]:
        sub = self.subs[label]
        if label not in self._decisions:
            self._decisions[label] = self.fed.wait(sub, deadline=self.deadline)
        return sub, self._decisions[label]
