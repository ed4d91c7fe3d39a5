"""A federated multi-task DP job: submit, follow, run, resume.

The researcher acts as the secure-aggregation server: each pass (see
:mod:`fedmtl.contract.protocol`) it relays the five stages between the sites, sums the
masked vectors (masks cancel), recovers dropped sites' masks from the survivors' shares,
de-quantises, and applies the strategy. It never sees one site's update.

Everything the job needs to continue lives in its output folder: ``job.json`` (the spec,
the per-site specs, the request names), ``checkpoints/`` (after every pass), and
``aggregates/`` (the aggregated update and metric sums of each pass, which is all the
researcher learns). ``Job.resume`` continues from the last completed pass; a site never
trains or charges a pass twice.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from tqdm.auto import tqdm

from fedmtl.contract import protocol
from fedmtl.contract.jobspec import JobSpec
from fedmtl.contract.passes import CALLS_PER_PASS, PassOutcome, run_pass  # noqa: F401 - re-exported
from fedmtl.contract.strategies import make_strategy
from fedmtl.contract.transport import Transport
from fedmtl.datasites.review.autoreview import MANUAL_REVIEW_TAG  # set by the datasite's reviewer
from fedmtl.datasites.runtime import LocalTransport  # noqa: F401 - the dry run's transport
from fedmtl.datasites.site import syftio
from fedmtl.datasites.site.home import write_json_atomic
from fedmtl.datasites.template import TEMPLATE_NAME, make_round_function
from fedmtl.errors import JobError, PassLostError
from fedmtl.models import model_to_vector
from fedmtl.privacy.accounting import epsilon_of
from fedmtl.privacy.quantization import average_by_group
from fedmtl.researcher import dataplane_client
from fedmtl.researcher.checkpoint import CheckpointStore
from fedmtl.researcher.local_site import run_local_passes
from fedmtl.researcher.result import JobResult

# ---------------------------------------------------------------------------- transports


class SyftTransport:
    """A :class:`~fedmtl.contract.transport.Transport` that calls the approved round
    template on each datasite through syft.

    Args:
        session: the researcher's :class:`~fedmtl.researcher.session.Session` (its
            ``sites[site]`` hold the syft client and the records asset).
        func_name: the name the approved template has on every site.
    """

    name = "syft"

    def __init__(self, session, func_name: str):
        self.session = session
        self.func_name = func_name

    def call(self, site: str, message: Mapping[str, Any]) -> dict[str, Any]:
        """Call the template on ``site`` with ``message``; its reply (``{"ok": False, ...}``
        when syft fails or the site cannot be reached: a dropout)."""
        conn = self.session.sites[site]
        try:
            with syftio.quiet():
                fn = getattr(conn.client.code, self.func_name)
                out = fn(data=conn.asset, message=message)
                out = out.get() if hasattr(out, "get") else out
        except Exception as e:  # noqa: BLE001 - a site that fails is a dropout
            return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                    "kind": "Unreachable"}
        if not isinstance(out, dict):
            msg = getattr(out, "message", None) or repr(out)[:200]
            return {"ok": False, "error": str(msg), "kind": "SyftError"}
        return out


# ---------------------------------------------------------------------------- the pass




# ---------------------------------------------------------------------------- the job


class Job:
    """A job over a :class:`~fedmtl.researcher.session.Session`'s sites."""

    def __init__(self, session, out: Path, state: dict[str, Any]):
        self.session = session
        self.out = Path(out)
        self.state = state
        self.spec = JobSpec.from_dict(state["spec"])
        self.site_specs: dict[str, dict] = state["site_specs"]
        self._model = None

    # -- creation ------------------------------------------------------------------
    @classmethod
    def create(cls, session, spec, *, out: str | Path) -> "Job":
        out = Path(out)
        if (out / "job.json").exists():
            raise JobError(f"{out} already holds a job; use Job.resume(session, {str(out)!r}) or another --out")
        schemas = session.schemas
        spec.validate(schemas)  # both scalings need every numeric feature's declared range
        sites = spec.participating(sorted(schemas))
        # the threshold the sites review: given, or a majority of these sites
        spec = spec.for_sites(sites)
        first = schemas[sites[0]]
        for s in sites[1:]:
            if schemas[s].to_dict()["columns"] != first.to_dict()["columns"]:
                raise JobError(f"{s}'s schema differs from {sites[0]}'s; a job needs one shared schema")
        token = secrets.token_hex(4)
        job_id = f"{_slug(spec.name)}-{token}"
        roster = {s: session.sites[s].identity.verify_key.to_bytes().hex() for s in sites}
        max_count = max(session.sites[s].n_records for s in sites)
        # the job's own data-plane key: its public half goes into every site's spec (the
        # approval binds it), the private half stays in OUT/secrets (see dataplane_client)
        dataplane_key = dataplane_client.load_or_create_key(out / "secrets").verify_key.to_bytes().hex()
        site_specs = {
            s: {
                "job": spec.to_dict(),
                "job_id": job_id,
                "site": s,
                "roster": roster,
                "schema": first.to_dict(),
                "max_count": int(max_count),
                "template": TEMPLATE_NAME,
                "dataplane_key": dataplane_key,
            }
            for s in sites
        }
        state = {
            "job_id": job_id,
            "func_name": f"{TEMPLATE_NAME}_{job_id.replace('-', '_')}",
            "spec": spec.to_dict(),
            "spec_hash": spec.spec_hash(),
            "sites": sites,
            "site_specs": site_specs,
            "submitted": False,
            "attempts": {},
            "urls": {s: session.sites[s].url for s in sites},
        }
        out.mkdir(parents=True, exist_ok=True)
        job = cls(session, out, state)
        job._save()
        return job

    @classmethod
    def resume(cls, session, out: str | Path) -> "Job":
        """Reattach to a job in ``out`` (after the researcher process died)."""
        path = Path(out) / "job.json"
        if not path.exists():
            raise JobError(f"no job in {out} (no job.json)")
        state = json.loads(path.read_text())
        missing = [s for s in state["sites"] if s not in session.sites]
        if missing:
            raise JobError(f"to resume, connect to every site of the job; missing {missing}")
        return cls(session, Path(out), state)

    def _save(self) -> None:
        write_json_atomic(self.out / "job.json", self.state)

    @property
    def job_id(self) -> str:
        return self.state["job_id"]

    @property
    def sites(self) -> list[str]:
        return list(self.state["sites"])

    @property
    def model(self):
        if self._model is None:
            self._model, _ = protocol.build_model(next(iter(self.site_specs.values())))
        return self._model

    # -- dry run -------------------------------------------------------------------
    def dry_run(self, *, passes: int = 2) -> dict[str, Any]:
        """Run the exact round code on every site's mock data, locally (throw-away
        identities, no ledger), through secure aggregation; raise on any error."""
        return run_local_passes(self, {s: self.session.sites[s].mock() for s in self.sites}, passes=passes)

    # -- planning --------------------------------------------------------------------
    def cost(self, *, budget: bool = True) -> dict[str, dict[str, Any]]:
        """What this job will cost each site, before (or after) submitting it.

        Per site (see :func:`price`): ``epsilon`` of the whole job at the site's delta
        (training rounds and evaluation releases, on the site's published training-split
        size), the ``noise_multiplier`` it trains with, and, with ``budget``, your
        ``budget_left`` there and whether the job ``fits``. A datasite publishes no
        budgets: your budget left is read through an approved job of yours at that site
        (this one once approved, else your newest approved one); before your first
        approved job there it is ``None`` and ``budget_from`` says why."""
        return price(self.session, self.spec, sites=self.sites, budget=budget,
                     prefer=self.state["func_name"])

    # -- submission ------------------------------------------------------------------
    def submit(self) -> dict[str, dict[str, Any]]:
        """Send one code request per site: the round template with this site's spec as
        a syft ``Constant``.

        Returns per site ``{"status", "request", "job_id", "epsilon"}``: the request's
        status right after submission (``pending`` until the site reviews it; see
        :meth:`status`), syft's request id (what the data owner's ``fedmtl datasite
        review`` lists next to the job id), this job's id and the epsilon the job will
        cost there. A submission cut short (a site unreachable) can be retried: sites
        already sent a request are not sent another."""
        if self.state["submitted"]:
            raise JobError(f"job {self.job_id} was already submitted")
        sy = syftio.import_syft()  # syft (seconds to import) only where a job talks to it
        from syft.service.policy.policy import OutputPolicyExecuteCount

        limit = CALLS_PER_PASS * protocol.last_pass(self.spec) * 4
        sent: dict[str, str] = self.state.setdefault("requests", {})
        self.state.setdefault("submitted_at", time.time())
        summary: dict[str, dict[str, Any]] = {}
        for s in self.sites:
            status = "pending"
            if s not in sent:
                conn = self.session.sites[s]
                fn = make_round_function(self.state["func_name"])
                with syftio.quiet():
                    policy = sy.MixedInputPolicy(
                        data=conn.asset, spec=sy.Constant(val=self.site_specs[s]), message=dict, client=conn.client
                    )
                    code = sy.syft_function(input_policy=policy, output_policy=OutputPolicyExecuteCount(limit=limit))(fn)
                    req = conn.client.code.request_code_execution(code)
                syftio.check(req, f"submitting job {self.job_id} to {s}")
                sent[s] = str(getattr(req, "id", "") or self.job_id)
                self._save()
                status = _request_status(req) or status
            summary[s] = {"status": status, "request": sent[s], "job_id": self.job_id,
                          "epsilon": self._job_epsilon(s)}
        self.state["submitted"] = True
        self._save()
        return summary

    def _job_epsilon(self, site: str) -> float:
        return float(self.spec.epsilon_for_site(_n_train(self.session.sites[site].meta)))

    def status(self) -> dict[str, dict[str, Any]]:
        """Per site: ``{"status", "reason"}``, status one of ``not submitted``,
        ``pending``, ``approved`` or ``denied``.

        A denial's reason is the site's (each rule's reason starts with its policy key and
        says what to change). A pending request's reason is ``"queued for the automatic
        reviewer"`` while it is fresh, or ``"waiting for a person (this datasite approves
        by hand)"``: syft shows a researcher no more than ``pending`` for both, and a
        datasite's automatic reviewer decides a request within seconds of its arrival, so
        a request still pending after :data:`AUTO_REVIEW_SECONDS` (counted from
        :meth:`submit`) waits for the data owner (the site approves by hand, or the
        request carried a warning); at once if the datasite tags the syft request
        :data:`MANUAL_REVIEW_TAG`. A pending entry also has ``waiting_s``, the seconds
        since submission."""
        out: dict[str, dict[str, Any]] = {}
        for s in self.sites:
            conn = self.session.sites[s]
            with syftio.quiet():
                reqs = [
                    r for r in conn.client.requests.get_all()
                    if getattr(r.code, "service_func_name", None) == self.state["func_name"]
                ]
            if not reqs:
                out[s] = {"status": "not submitted", "reason": ""}
                continue
            r = reqs[-1]
            st = _request_status(r) or "pending"
            reason = ""
            if st == "denied":
                with syftio.quiet():
                    reason = str(r.deny_reason or "")
                out[s] = {"status": st, "reason": reason}
            elif st == "pending":
                waited = self._waiting_seconds(r)
                manual = MANUAL_REVIEW_TAG in (getattr(r, "tags", None) or []) or waited > AUTO_REVIEW_SECONDS
                out[s] = {"status": st, "reason": PENDING_MANUAL if manual else PENDING_AUTO,
                          "waiting_s": round(waited, 1)}
            else:
                out[s] = {"status": st, "reason": reason}
        return out

    def _waiting_seconds(self, request) -> float:
        """Seconds since this job was submitted (the researcher's own clock), or since
        syft's request time when the job predates the record."""
        start = self.state.get("submitted_at")
        if start is None:
            start = getattr(getattr(request, "request_time", None), "utc_timestamp", None)
        return max(0.0, time.time() - float(start)) if start is not None else 0.0

    def transport(self, plane: str = "auto") -> Transport:
        """The transport of this job's round calls: ``"dataplane"`` (the datasites' lean
        endpoint, signed with this job's key), ``"syft"`` (approved syft code calls), or
        ``"auto"``: the data plane when the job has a key and every site offers it, else
        syft."""
        if plane not in ("auto", "dataplane", "syft"):
            raise JobError(f"plane must be 'auto', 'dataplane' or 'syft', got {plane!r}")
        if plane != "syft":
            dp = dataplane_client
            has_key = all("dataplane_key" in self.site_specs[s] for s in self.sites) and \
                (self.out / "secrets" / dp.KEY_FILE).exists()
            urls = {s: self.session.sites[s].url for s in self.sites}
            missing = [] if not has_key else [s for s, u in urls.items() if not dp.offers_dataplane(u)]
            if has_key and not missing:
                return dp.DataPlaneTransport(urls, self.site_specs, dp.load_or_create_key(self.out / "secrets"))
            if plane == "dataplane":
                why = "the job was created without a data-plane key" if not has_key else \
                    f"{missing} do not offer the data plane"
                raise JobError(f"job {self.job_id} cannot use the data plane: {why}; use plane='syft'")
        return SyftTransport(self.session, self.state["func_name"])

    def spend(self) -> dict[str, dict[str, Any]]:
        """Per site: your own requests, epsilon spent and budget left there (read from the
        site's ledger through your approved job; other researchers' entries stay hidden)."""
        transport = self.transport()
        out = {}
        for s in self.sites:
            r = transport.call(s, {"stage": "spend"})
            out[s] = r.get("view", {}) if r.get("ok") else {"error": r.get("error")}
        return out

    def wait_for_review(self, timeout: float = 120.0, poll: float = 1.0) -> dict[str, dict[str, Any]]:
        """Wait until no site's request is ``pending`` any more, or ``timeout`` seconds
        have passed; returns :meth:`status` (per site ``status`` and ``reason``).

        Checks every ``poll`` seconds. It does not raise: on timeout the sites still
        deciding are ``pending``, with the reason (queued for the automatic reviewer,
        or waiting for a person). A site that approves by hand may take hours; call it
        again later (or :meth:`run`, which waits the same way before the first pass)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if all(v["status"] != "pending" for v in st.values()) or time.monotonic() > deadline:
                return st
            time.sleep(poll)

    # -- running -----------------------------------------------------------------------
    def _tasks(self):
        return protocol.tasks_of(next(iter(self.site_specs.values())))

    def run(self, *, progress: bool = True, review_timeout: float = 120.0, transport: Transport | None = None,
            plane: str = "auto"):
        """Run (or continue) every pass; returns the :class:`JobResult`. ``plane`` picks
        the transport of the round calls (see :meth:`transport`)."""
        if transport is None:
            st = self.wait_for_review(review_timeout)
            denied = {s: v for s, v in st.items() if v["status"] != "approved"}
            approved = [s for s in self.sites if s not in denied]
            if denied:
                why = "; ".join(f"{s}: {v['status']}{' (' + v['reason'] + ')' if v['reason'] else ''}"
                                for s, v in sorted(denied.items()))
                if not self.spec.allow_partial:
                    raise JobError(f"not every site approved job {self.job_id}: {why}. "
                                   "Fix the spec, or set allow_partial = true to run with the rest")
                if len(approved) < int(self.spec.secagg.threshold):
                    raise JobError(f"only {len(approved)} site(s) approved, fewer than the "
                                   f"threshold {self.spec.secagg.threshold}: {why}")
            transport = self.transport(plane)
        else:
            approved = self.sites
        self.last_transport = getattr(transport, "name", type(transport).__name__)
        store = CheckpointStore(self.out / "checkpoints")
        ckpt = store.latest(spec_hash=self.state["spec_hash"])
        strategy = make_strategy(self.spec.strategy)
        model = self.model
        groups = protocol.groups_of(model)
        tasks = self._tasks()
        if ckpt is not None:
            weights = np.asarray(ckpt.global_vector, dtype=np.float64)
            strategy.load_state_dict(ckpt.strategy_state)
            history = list(ckpt.metrics)
            done = int(ckpt.round)
            site_status = dict(ckpt.site_status)
        else:
            weights = _initial_vector(model).astype(np.float64)
            history, done, site_status = [], 0, {}
        last = protocol.last_pass(self.spec)
        # standard scaling: the mean/std derived from the statistics pass (pass 1), kept in
        # job.json so that a resumed job sends the same ones
        scaling = self.state.get("scaling")
        bar = _progress(progress, total=last, initial=done, desc=f"job {self.job_id}")
        try:
            for p in range(done + 1, last + 1):
                attempt = int(self.state["attempts"].get(str(p), -1)) + 1
                self.state["attempts"][str(p)] = attempt
                self._save()
                try:
                    outcome = run_pass(
                        transport=transport, site_specs=self.site_specs, sites=approved, pass_no=p,
                        attempt=attempt, weights=weights, model=model,
                        on_stage=(lambda name, p=p: bar.set_postfix_str(f"pass {p}: {name}")) if bar else None,
                        scaling=None if self.spec.is_stats_pass(p) else scaling,
                    )
                except PassLostError as e:
                    if self.spec.is_stats_pass(p):
                        raise JobError(
                            f"job {self.job_id}: the sites completed its statistics pass while this process was "
                            "gone, and its aggregate (the features' mean/std) was never saved here; the job "
                            "cannot scale its features without it. Submit the job again under a new name"
                        ) from None
                    # the sites finished (and charged) this pass while this process was gone:
                    # its aggregate is lost; keep the weights and go on with the next pass
                    history.append({"round": self.spec.rounds_before(p), "lost": str(e)})
                    store.save(p, {
                        "spec_hash": self.state["spec_hash"], "global_vector": weights,
                        "strategy_state": strategy.state_dict(), "metrics": history,
                        "epsilon": self._epsilon(p), "site_status": site_status,
                    })
                    if bar:
                        bar.update(1)
                    continue
                record: dict[str, Any] = {"round": self.spec.rounds_before(p), "survivors": outcome.survivors,
                                          "dropped": outcome.dropped, "seconds": outcome.seconds}
                if "stats" in outcome.arrays:
                    scaling = protocol.derive_scaling(next(iter(self.site_specs.values())), outcome.arrays["stats"],
                                                      n_sites=len(outcome.survivors))
                    self.state["scaling"] = scaling
                    self._save()
                    record["stats"] = True
                if "metrics" in outcome.arrays:
                    record["metrics"] = protocol.compute_metrics(outcome.arrays["metrics"], tasks)
                    record["site_metrics"] = {s: r["site_metrics"] for s, r in outcome.reports.items() if "site_metrics" in r}
                if "update" in outcome.arrays:
                    avg, totals = average_by_group(outcome.arrays["update"], outcome.arrays["counts"], groups=groups)
                    agg_dir = self.out / "aggregates"
                    agg_dir.mkdir(exist_ok=True)
                    np.savez(agg_dir / f"pass-{p}.npz", average_update=avg,
                             counts=outcome.arrays["counts"], weights_in=weights)
                    weights = strategy.aggregate_fit(weights, avg, totals, groups=groups)
                    record["counts"] = totals
                history.append(record)
                for s in approved:
                    site_status[s] = "dropped: " + outcome.dropped[s] if s in outcome.dropped else "ok"
                epsilon = self._epsilon(p)
                store.save(p, {
                    "spec_hash": self.state["spec_hash"], "global_vector": weights,
                    "strategy_state": strategy.state_dict(), "metrics": history,
                    "epsilon": epsilon, "site_status": site_status,
                })
                if bar:
                    bar.update(1)
        finally:
            if bar:
                bar.close()
        return self.result()

    def _epsilon(self, passes_done: int) -> dict[str, float]:
        """Epsilon each site has charged for this job after ``passes_done`` passes
        (training rounds and evaluation releases, as the site's ledger charges them)."""
        out = {}
        for s in self.sites:
            n_train = _n_train(self.session.sites[s].meta)
            recs = [r for p in range(1, passes_done + 1) for r in self.spec.pass_records(n_train, p)]
            out[s] = float(epsilon_of(recs, delta=self.spec.delta, accountant=self.spec.accountant)) if recs else 0.0
        return out

    def result(self) -> JobResult:
        """The job's result from its newest checkpoint."""
        ckpt = CheckpointStore(self.out / "checkpoints").latest(spec_hash=self.state["spec_hash"])
        if ckpt is None:
            raise JobError(f"job {self.job_id} has not completed a pass yet")
        # the scaling the sites used: declared ranges, or the statistics pass's mean/std
        pre = protocol.scaling_preprocessor(next(iter(self.site_specs.values())), self.state.get("scaling"))
        return JobResult(
            spec=self.spec,
            model_config=dict(self.model.config),
            preprocessor=pre.to_dict(),
            global_vector=np.asarray(ckpt.global_vector, dtype=np.float32),
            metrics=[_metrics_row(r) for r in ckpt.metrics if "metrics" in r],
            epsilon=dict(ckpt.epsilon),
            rounds_done=self.spec.rounds_before(int(ckpt.round) + 1),
            site_status=dict(ckpt.site_status),
        )


# ---------------------------------------------------------------------------- planning

#: a datasite's automatic reviewer answers within seconds (it polls every 1-3 s)
AUTO_REVIEW_SECONDS = 30.0
PENDING_AUTO = "queued for the automatic reviewer"
PENDING_MANUAL = "waiting for a person (this datasite approves by hand)"


def price(session, spec, *, sites=None, budget: bool = True, prefer: str | None = None) -> dict[str, dict[str, Any]]:
    """What ``spec`` costs each of ``session``'s sites that it runs on, without submitting.

    Per site::

        n_train            training records (the site's published split size)
        rounds             training rounds
        noise_multiplier   the one the site trains with (fixed, or calibrated to
                           target_epsilon on that site's n_train)
        epsilon            the whole job at delta: rounds and evaluation releases, as
                           the site's ledger will charge them (fedmtl.contract.jobspec.JobSpec.epsilon_for_site)
        budget_left        your researcher budget left there, or None if unknown
        fits               epsilon <= budget_left, or None if unknown
        budget_from        where budget_left came from, or why it is unknown

    A datasite publishes its schema and counts, not its policy or anyone's spend: your
    budget left is your own spend view, read through an approved job of yours at that
    site (``prefer``, the name of this job's round function, first; otherwise your newest
    approved job there; the call runs no round and charges nothing). Before your first
    approved job at a site it is unknown. It is your budget minus what your rounds there
    have spent so far (approved jobs not yet run are not subtracted; the reviewer counts
    them). ``fits`` is a planning figure: the site composes the job's records with what
    you spent (usually cheaper than adding epsilons) and also checks its per-job maximum
    and the dataset's budget; its reviewer decides.
    ``budget=False`` skips the lookups (no syft calls)."""
    if sites is None:
        schemas = session.schemas
        spec.validate(schemas)
        sites = spec.participating(sorted(schemas))
    out: dict[str, dict[str, Any]] = {}
    for s in sites:
        n_train = _n_train(session.sites[s].meta)
        row: dict[str, Any] = {
            "n_train": n_train,
            "rounds": int(spec.rounds),
            "noise_multiplier": float(spec.noise_for_site(n_train)),
            "epsilon": float(spec.epsilon_for_site(n_train)),
            "budget_left": None,
            "fits": None,
            "budget_from": "not asked (budget=False)",
        }
        if budget:
            left, source = _budget_left(session, s, prefer=prefer)
            row["budget_left"], row["budget_from"] = left, source
            if left is not None:
                row["fits"] = bool(row["epsilon"] <= left)
        out[s] = row
    return out


def price_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """:func:`price`'s answer as a text table, with a line per site whose budget is unknown."""
    head = ("site", "n_train", "rounds", "noise", "epsilon", "budget left", "fits")

    def num(x: Any) -> str:
        return "-" if x is None else f"{float(x):.4g}"

    body = [
        (s, str(r["n_train"]), str(r["rounds"]), num(r["noise_multiplier"]), num(r["epsilon"]),
         num(r["budget_left"]), "-" if r["fits"] is None else ("yes" if r["fits"] else "no"))
        for s, r in sorted(rows.items())
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head).rstrip()] + [fmt.format(*b).rstrip() for b in body]
    for s, r in sorted(rows.items()):
        if r["budget_left"] is None:
            lines.append(f"{s}: budget left unknown: {r['budget_from']}")
    return "\n".join(lines)


def _n_train(meta: Mapping[str, Any]) -> int:
    """The training records a site charges against: its published train split size, or
    all its records when it has no split column."""
    return int((meta.get("split_sizes") or {}).get("train", meta["n_records"]))


def _request_status(request) -> str | None:
    """``pending``, ``approved`` or ``denied`` (syft says ``rejected``), or ``None``."""
    try:
        with syftio.quiet():
            st = request.status.name.lower()
    except Exception:  # noqa: BLE001 - a status syft cannot give is unknown
        return None
    return "denied" if st in ("rejected", "denied") else st


def _budget_left(session, site: str, *, prefer: str | None) -> tuple[float | None, str]:
    """(your researcher budget left at ``site``, where it came from), read through the
    ``spend`` query of an approved fedmtl job of yours there."""
    conn = session.sites[site]
    approved: list[str] = []
    try:
        with syftio.quiet():
            reqs = list(conn.client.requests.get_all())
            for r in reversed(reqs):  # newest first
                if r.status.name.lower() != "approved":
                    continue
                name = getattr(r.code, "service_func_name", None)
                if isinstance(name, str) and name.startswith(f"{TEMPLATE_NAME}_") and name not in approved:
                    approved.append(name)
    except Exception as e:  # noqa: BLE001 - unreachable: the budget is unknown
        return None, f"could not list your requests at {site} ({type(e).__name__})"
    if not approved:
        return None, (f"{site} publishes no budgets; your budget left there is known once a job of "
                      "yours is approved there (then job.cost() or job.spend() show it)")
    if prefer in approved:
        approved.remove(prefer)
        approved.insert(0, prefer)
    last = ""
    for name in approved:
        r = SyftTransport(session, name).call(site, {"stage": "spend"})
        view = r.get("view") if r.get("ok") else None
        if not view:
            last = str(r.get("error") or "no spend view")
            continue
        left = view.get("budget_left") or {}
        value = left.get(conn.dataset.name) if getattr(conn.dataset, "name", None) in left else (
            next(iter(left.values())) if len(left) == 1 else None)
        if value is not None:
            job = "this job" if name == prefer else f"your approved job {name}"
            return float(value), f"your spend view at {site}, read through {job}"
        last = f"the spend view names no budget for this dataset ({sorted(left)})"
    return None, f"could not read your spend view at {site}: {last}"


def _metrics_row(record: Mapping[str, Any]) -> dict[str, Any]:
    return {"round": record["round"], "pooled": record["metrics"], "sites": record.get("site_metrics", {})}


def _initial_vector(model) -> np.ndarray:
    return model_to_vector(model)


def _slug(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return (s or "job")[:24]


def _progress(enabled: bool, *, total: int, initial: int, desc: str):
    if not enabled:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="pass")
