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

import dataclasses
import hashlib
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from fedmtl import interrupts
from fedmtl.contract import protocol
from fedmtl.contract.jobspec import JobSpec
from fedmtl.contract.messages import Close, Reply
from fedmtl.contract.passes import CALLS_PER_PASS, PassOutcome, run_pass  # noqa: F401 - re-exported
from fedmtl.contract.strategies import make_strategy
from fedmtl.contract.transport import Transport
from fedmtl.datasites.review.autoreview import MANUAL_REVIEW_TAG  # set by the datasite's reviewer
from fedmtl.datasites.review.preview import Preview, preview
from fedmtl.datasites.rules.policy import Peer, Policy
from fedmtl.datasites.runtime import LocalTransport  # noqa: F401 - the dry run's transport
from fedmtl.datasites.site import syftio
from fedmtl.datasites.site.home import write_json_atomic
from fedmtl.datasites.template import TEMPLATE_NAME, make_round_function
from fedmtl.errors import DatasiteError, FedMTLError, JobError, PassLostError, PolicyError, RoundError
from fedmtl.models import model_to_vector, vector_to_model
from fedmtl.models.binned import read_range
from fedmtl.privacy.accounting import PrivacyRecord, epsilon_of
from fedmtl.privacy.keys import SigningKey, save_private_key
from fedmtl.privacy.quantization import average_by_group
from fedmtl.researcher import dataplane_client
from fedmtl.researcher.checkpoint import CheckpointStore
from fedmtl.researcher.local_site import run_local_passes
from fedmtl.researcher.result import JobResult
from fedmtl.schema import MERGE_HINT, describe_differences, schema_differences

#: seconds :meth:`Job.run` waits, before each pass, for sites that are down (``rejoin_wait``)
REJOIN_WAIT = 30.0
#: the first pause between two asks of a site that is down; it doubles up to REJOIN_MAX_DELAY
REJOIN_FIRST_DELAY = 0.5
REJOIN_MAX_DELAY = 8.0

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
        conn = self.session.sites.get(site)
        if conn is None:
            why = self.session.down.get(self.session.down_key(site) or site, "not connected")
            return {"ok": False, "error": f"{site} is not connected ({why})", "kind": "Unreachable"}
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
        #: the data-plane key of a job not yet written to ``out`` (see :meth:`claim`)
        self._unclaimed_key: SigningKey | None = None

    # -- creation ------------------------------------------------------------------
    @classmethod
    def create(cls, session, spec, *, out: str | Path) -> "Job":
        """A job of ``spec`` over ``session``'s sites, prepared in memory: nothing is written
        until :meth:`claim` (called by :meth:`submit` and :meth:`run`), so pricing a job
        (:meth:`cost`) or dry-running it leaves ``out`` untouched and can be repeated.

        Args:
            session: the connected :class:`~fedmtl.researcher.session.Session`.
            spec: the :class:`~fedmtl.contract.jobspec.JobSpec`.
            out: the job's folder (``job.json``, its data-plane key, checkpoints).

        Returns:
            The job, not yet submitted.

        Raises:
            JobError: ``out`` already holds a job, or the sites' schemas differ.
            JobSpecError: ``spec`` does not fit the sites' schemas.
        """
        out = Path(out)
        if (out / "job.json").exists():
            raise JobError(_already_held(out))
        schemas = session.schemas
        # the roster is every connected site, or the spec's `sites`: a down site may be in it
        # unless the spec names only connected sites
        roster_connected = bool(spec.sites) and all(s in session.sites for s in spec.sites)
        down = {} if roster_connected else dict(session.down)
        if down:
            raise JobError(
                "a new job needs every site of its roster to review it, and "
                + "; ".join(f"{k} is down ({why})" for k, why in sorted(down.items()))
                + ". Relaunch it (or wait for it) and connect again, or leave it out of the job (the spec's "
                "`sites`, naming it in the sites file with name = \"...\", or a sites file without it)")
        spec.validate(schemas)  # both scalings need every numeric feature's declared range
        sites = spec.participating(sorted(schemas))
        # the threshold the sites review (given, or a majority of these sites) and, for
        # small sites, the small-site recipe of the fields the spec left out
        n_train = {s: _n_train(session.sites[s].meta) for s in sites}
        spec = spec.for_sites(sites, n_train)
        first = schemas[sites[0]]
        for s in sites[1:]:
            differ = schema_differences([schemas[s], first], columns_only=True)
            if differ:
                raise JobError(f"{s}'s schema differs from {sites[0]}'s: {describe_differences(differ)}; "
                               f"a job needs one shared schema: {MERGE_HINT}")
        token = secrets.token_hex(4)
        job_id = f"{_slug(spec.name)}-{token}"
        roster = {s: session.sites[s].identity.verify_key.to_bytes().hex() for s in sites}
        max_count = max(session.sites[s].n_records for s in sites)
        # the job's own data-plane key: its public half goes into every site's spec (the
        # approval binds it), the private half goes to OUT/secrets when the job is claimed
        signing_key = SigningKey.generate()
        dataplane_key = signing_key.verify_key.to_bytes().hex()
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
            # what the epsilon estimates need while a site is down
            "n_train": n_train,
        }
        job = cls(session, out, state)
        job._unclaimed_key = signing_key
        return job

    def claim(self) -> None:
        """Write the job to its folder: ``job.json``, created exclusively (a folder that
        holds a job already is never taken over, not even by a job prepared at the same
        time), then its data-plane key (``secrets/``, 0600). :meth:`submit` and :meth:`run`
        call it first; a job that was resumed or already claimed is left as it is.

        Raises:
            JobError: the folder holds a job already.
        """
        key = self._unclaimed_key
        if key is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.out / "job.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise JobError(_already_held(self.out) + " (written after this job was prepared; nothing was sent)") \
                from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.state, f)
            f.flush()
            os.fsync(f.fileno())
        folder = self.out / "secrets"
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)
        save_private_key(folder / dataplane_client.KEY_FILE, key.to_bytes())
        self._unclaimed_key = None

    @classmethod
    def resume(cls, session, out: str | Path, *, log: Callable[[str], None] | None = None,
               need_threshold: bool = True) -> "Job":
        """Reattach to a job in ``out`` (after the researcher process died, or to run more
        passes). Sites of the job that are down (``session.down``) do not stop it while the
        sites that answer can still reach the job's secure-aggregation threshold: a line
        names the down ones, and :meth:`run` lets each rejoin when it answers again.

        Args:
            session: the connected :class:`~fedmtl.researcher.session.Session`.
            out: the job's folder.
            log: where the line about down sites goes (default: standard error).
            need_threshold: refuse when fewer sites answer than the threshold (to run
                passes); ``False`` to close the job at the sites that answer
                (:meth:`finish`, :meth:`abort`).

        Returns:
            The job.

        Raises:
            JobError: ``out`` holds no job; a site of the job is neither connected nor down
                (the sites file lacks it); or fewer sites answer than the threshold.
        """
        path = Path(out) / "job.json"
        if not path.exists():
            raise JobError(f"no job in {out} (no job.json)")
        state = json.loads(path.read_text())
        urls = state.get("urls") or {}
        down = {s: session.down_key(s, urls.get(s)) for s in state["sites"] if s not in session.sites}
        missing = sorted(s for s, key in down.items() if key is None)
        if missing:
            raise JobError(f"to resume, connect to every site of the job; {missing} not in the sites file")
        job = cls(session, Path(out), state)
        if down:
            why = "; ".join(f"{s} ({session.down[key]})" for s, key in sorted(down.items()))
            answering = len(state["sites"]) - len(down)
            threshold = int(job.spec.secagg.threshold)
            if answering < threshold and need_threshold:
                raise JobError(
                    f"job {job.job_id} cannot go on: down: {why}; {answering} site(s) answer, fewer than its "
                    f"secure-aggregation threshold {threshold}. Relaunch the down sites (or wait for them) "
                    "and resume again")
            (log or _stderr)(f"job {job.job_id}: down: {why}; going on with the {answering} sites that answer "
                             f"(threshold {threshold}); a down site rejoins when it answers")
        return job

    def _save(self) -> None:
        self.claim()
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
        ``budget_left`` there and whether the job ``fits``, and the site's own review run
        ahead of time on this job's site specs: ``review``, ``would_deny`` and ``checks``
        name each rule that would deny it, in the review's words. A datasite publishes no
        budgets: your budget left is read through an approved job of yours at that site
        (this one once approved, else your newest approved one); before your first
        approved job there it is ``None`` and ``budget_from`` says why.

        Args:
            budget: read your spend view at each site (syft calls; no round runs).

        Returns:
            Per site, the row :func:`price` describes."""
        return price(self.session, self.spec, sites=self.sites, budget=budget,
                     prefer=self.state["func_name"], site_specs=self.site_specs)

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
        self.claim()  # before anything is sent: one folder, one job
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
        since submission. A site that is not connected (``session.down``) is ``down``, with
        why as the reason."""
        out: dict[str, dict[str, Any]] = {}
        for s in self.sites:
            conn = self.session.sites.get(s)
            if conn is None:
                key = self.session.down_key(s, (self.state.get("urls") or {}).get(s))
                out[s] = {"status": "down", "reason": self.session.down.get(key or s, "not connected")}
                continue
            try:
                with syftio.quiet():
                    reqs = [
                        r for r in conn.client.requests.get_all()
                        if getattr(r.code, "service_func_name", None) == self.state["func_name"]
                    ]
            except Exception as e:  # noqa: BLE001 - a site that went away since the connect is down
                out[s] = {"status": "down", "reason": f"cannot reach it ({type(e).__name__})"}
                continue
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
            known = self.state.get("urls") or {}
            urls = {s: self.session.sites[s].url if s in self.session.sites else known[s] for s in self.sites}
            # a site that is down cannot say; it serves the same software as the others
            missing = [] if not has_key else [s for s, u in urls.items()
                                              if s in self.session.sites and not dp.offers_dataplane(u)]
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

    # -- closing -----------------------------------------------------------------------
    def finish(self, *, reason: str = "finished by its researcher") -> dict[str, dict[str, Any]]:
        """Finish the job at every site: each records ``job_finished`` in its ledger, runs no
        pass of it any more and stops reserving its unspent passes against your budget.

        Args:
            reason: why, written to each site's ledger (at most 500 characters).

        Returns:
            Per site, the job's state there after it (:meth:`close`).

        Raises:
            JobError: ``reason`` is not a string of at most 500 characters.
        """
        return self.close("finish", reason=reason)

    def abort(self, *, reason: str) -> dict[str, dict[str, Any]]:
        """Abort the job at every site (``job_aborted``); otherwise as :meth:`finish`.

        Args:
            reason: why, written to each site's ledger (at most 500 characters).

        Returns:
            Per site, the job's state there after it (:meth:`close`).

        Raises:
            JobError: ``reason`` is not a string of at most 500 characters.
        """
        return self.close("abort", reason=reason)

    def close(self, action: str, *, reason: str) -> dict[str, dict[str, Any]]:
        """Ask every site of the job to close it (a ``close`` request, authenticated like
        every round call: the job's data-plane signature, or syft's approved code). Closing a
        job a site already closed (its last pass, its idle time, an earlier call) returns
        its state there; a site that does not answer is reported, not fatal: call again.

        Args:
            action: ``"finish"`` or ``"abort"``.
            reason: why, written to each site's ledger.

        Returns:
            Per site: ``{"status", "closed_now", "closed", "passes_charged",
            "epsilon_charged", "passes_reserved"}`` from the site's ledger, or
            ``{"status": "not closed", "error", "kind"}`` when it refused or did not answer.
            The answers are also kept in ``job.json`` (``closed``), and the charged epsilon
            in the result (:meth:`result`).

        Raises:
            JobError: ``action`` or ``reason`` is malformed.
        """
        try:
            msg = Close.from_dict({"action": action, "reason": reason})
        except RoundError as e:
            raise JobError(str(e)) from None
        transport = self.transport()
        out = {s: _close_at(transport, s, msg) for s in self.sites}
        self.state["closed"] = {"action": action, "reason": reason, "at": time.time(), "sites": out}
        self._read_charged(transport)
        return out

    def charged(self, transport: Transport | None = None) -> dict[str, dict[str, Any]]:
        """What each site's ledger charged this job, read back from your spend view there.

        Args:
            transport: the transport to ask through (default :meth:`transport`).

        Returns:
            Per site: ``{"epsilon", "passes", "status"}`` (the epsilon the site composed
            for this job's charged passes, at its policy's delta; the passes it charged;
            the job's status there), or ``{"error"}`` when the site did not answer or
            holds no request of this job.
        """
        transport = transport or self.transport()
        out: dict[str, dict[str, Any]] = {}
        for s in self.sites:
            r = Reply.from_dict(transport.call(s, {"stage": "spend"}))
            if not r.ok:
                out[s] = {"error": str(r.error)}
                continue
            rows = [q for q in (r.view or {}).get("requests", []) if q.get("request_id") == self.job_id]
            if not rows:
                out[s] = {"error": f"{s}'s ledger holds no request of job {self.job_id} of yours"}
                continue
            row = rows[0]
            out[s] = {"epsilon": float(row.get("epsilon_charged") or 0.0),
                      "passes": [int(p) for p in row.get("rounds_executed", [])], "status": row.get("status")}
        return out

    def _read_charged(self, transport: Transport) -> None:
        """Keep :meth:`charged` in ``job.json`` (what a site did not answer keeps its last
        answer, if any)."""
        known = dict(self.state.get("charged") or {})
        for s, row in self.charged(transport).items():
            if "error" not in row or s not in known:
                known[s] = row
        self.state["charged"] = known
        self._save()

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
            plane: str = "auto", passes: int | None = None, rejoin_wait: float = REJOIN_WAIT,
            log: Callable[[str], None] | None = None):
        """Run (or continue) every pass; returns the :class:`JobResult`.

        A site that dropped out at an earlier pass (or is not connected) is asked again
        before each later pass, with back-off (0.5 s, doubling, at most 8 s apart) for at
        most ``rejoin_wait`` seconds, and takes part again as soon as it answers; the pass
        then goes ahead with whoever answers. Sites that answer are never waited for. The
        passes a site missed are missing from its ``site_passes`` in the result and were
        not charged by it (its ledger charges only the passes it ran). A line says when a
        site is waited for, rejoins, or is given up on for a pass.

        Args:
            progress: show a progress bar.
            review_timeout: seconds to wait for the sites' review before the first pass.
            transport: the transport of the round calls (default: :meth:`transport`).
            plane: which transport :meth:`transport` picks (``auto``, ``dataplane``, ``syft``).
            passes: run at most this many passes in this call (the job stays open: run
                again to continue, or :meth:`finish` / :meth:`abort` it).
            rejoin_wait: seconds to wait, before each pass, for sites that are down
                (default :data:`REJOIN_WAIT`; 0: ask once, never wait).
            log: where the lines about down sites go (default: standard error).

        Returns:
            The :class:`JobResult`; with the library's own transport, what each site charged
            is read back from its ledger at the end (:meth:`charged`) and is its ``epsilon``.

        Raises:
            JobError: ``passes`` or ``rejoin_wait`` is malformed; too few sites approved;
                fewer sites than the threshold answer before a pass; or a pass failed.
        """
        if passes is not None and (isinstance(passes, bool) or not isinstance(passes, int) or passes < 1):
            raise JobError(f"passes must be a whole number >= 1 (or None: every pass left), got {passes!r}")
        if isinstance(rejoin_wait, bool) or not isinstance(rejoin_wait, (int, float)) or \
                not 0 <= rejoin_wait < float("inf"):
            raise JobError(f"rejoin_wait must be seconds >= 0 (0: do not wait), got {rejoin_wait!r}")
        say = log or _stderr
        chosen = transport is None
        if transport is None:
            st = self.wait_for_review(review_timeout)
            # a site that is down is not known to have denied: it rejoins when it answers
            # (and refuses then, if it did not approve)
            denied = {s: v for s, v in st.items() if v["status"] not in ("approved", "down")}
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
        # the final model takes the Platt recalibration unless its heads stay at the sites
        # (a strategy that personalises them: there is no global head)
        recalibrate = not bool(np.asarray(strategy.personal_mask(groups)).any())
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
        stop = last if passes is None else min(last, done + passes)
        try:
            for p in range(done + 1, stop + 1):
                interrupts.check()  # a Ctrl-C a library swallowed during the last pass stops here
                down = self._await_rejoin(approved, site_status, pass_no=p, wait=float(rejoin_wait), say=say)
                answering = [s for s in approved if s not in down]
                threshold = int(self.spec.secagg.threshold)
                if len(answering) < threshold:
                    raise JobError(
                        f"job {self.job_id}: pass {p} cannot run: down: "
                        + "; ".join(f"{s} ({why})" for s, why in sorted(down.items()))
                        + f"; {len(answering)} site(s) answer, fewer than the secure-aggregation threshold "
                        f"{threshold}. Nothing was sent; relaunch the down sites (or wait for them) and run or "
                        "resume the job again (a larger rejoin_wait / --rejoin-wait waits longer)")
                attempt = int(self.state["attempts"].get(str(p), -1)) + 1
                self.state["attempts"][str(p)] = attempt
                self._save()
                try:
                    outcome = run_pass(
                        transport=transport, site_specs=self.site_specs, sites=answering, pass_no=p,
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
                    history.append({"round": self.spec.rounds_before(p), "pass": p, "lost": str(e)})
                    if p == last:
                        what = "the final evaluation release" + (" and the risks' recalibration" if recalibrate else "")
                        say(f"job {self.job_id}: its last pass ({what}) is lost: {e}. The result holds the trained "
                            "model without final metrics" + (", and its risks are not recalibrated" if recalibrate else ""))
                    store.save(p, {
                        "spec_hash": self.state["spec_hash"], "global_vector": weights,
                        "strategy_state": strategy.state_dict(), "metrics": history,
                        "epsilon": self._epsilon(p), "site_status": site_status,
                    })
                    if bar:
                        bar.update(1)
                    continue
                # a site that was down before the pass missed it: recorded like one that dropped out
                dropped = {**{s: f"down: {why}" for s, why in down.items()}, **outcome.dropped}
                record: dict[str, Any] = {"round": self.spec.rounds_before(p), "pass": p,
                                          "survivors": outcome.survivors, "dropped": dropped,
                                          "seconds": outcome.seconds}
                if "stats" in outcome.arrays:
                    scaling = protocol.derive_scaling(next(iter(self.site_specs.values())), outcome.arrays["stats"],
                                                      n_sites=len(outcome.survivors))
                    self.state["scaling"] = scaling
                    self._save()
                    record["stats"] = True
                if "metrics" in outcome.arrays:
                    # each binary task's Platt recalibration, fitted on the summed, noised
                    # histograms of the sites' training splits (not the test splits); the
                    # metrics are read under it, and the final model takes it on
                    record["metrics"], platt = protocol.read_release(
                        outcome.arrays["metrics"], next(iter(self.site_specs.values())),
                        n_sites=len(outcome.survivors), recalibrate=recalibrate)
                    record["site_metrics"] = {s: r["site_metrics"] for s, r in outcome.reports.items() if "site_metrics" in r}
                    if platt:
                        record["calibration"] = {t: [float(a), float(b)] for t, (a, b) in platt.items()}
                    if platt and p == last:
                        weights = _recalibrated(model, weights, platt)
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
                    site_status[s] = "dropped: " + dropped[s] if s in dropped else "ok"
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
        if chosen:
            if done <= last and stop == last:
                self._close_where_missed(transport, history, last, log=log)
            self._read_charged(transport)
        return self.result()

    def _close_where_missed(self, transport: Transport, history: list[Mapping[str, Any]], last: int, *,
                            log: Callable[[str], None] | None = None) -> None:
        """After the job's last pass: a site that did not take part in it has not closed the
        job (a site closes it when it runs the last pass), so its unspent passes would stay
        reserved; ask each such site that answers to finish it (idempotent at the site). A
        site that is down closes the job itself after its idle time
        (``limits.job_idle_close_s``), or when :meth:`finish` reaches it later."""
        final = next((r for r in reversed(history) if r.get("pass") == last), None)
        if final is not None and "lost" in final:
            return  # the sites ran (or closed) it while this process was gone: closed there
        took = set((final or {}).get("survivors") or [])
        missed = [s for s in self.sites if s not in took and s in self.session.sites]
        if not missed:
            return
        msg = Close.from_dict({"action": "finish", "reason": "the job's last pass ran without this site"})
        closed = dict((self.state.get("closed") or {}).get("sites") or {})
        for s in missed:
            closed[s] = _close_at(transport, s, msg)
            (log or _stderr)(f"job {self.job_id}: {s} missed the last pass; "
                             + (f"it did not answer ({closed[s]['error']}): run job.finish() later, or it closes "
                                "the job itself after its idle time" if closed[s]["status"] == "not closed" else
                                f"closed there ({closed[s].get('status')})"))
        self.state["closed"] = {"action": "finish", "reason": "the job's last pass ran", "at": time.time(),
                                "sites": closed}
        self._save()

    def _await_rejoin(self, sites: list[str], site_status: Mapping[str, str], *, pass_no: int, wait: float,
                      say: Callable[[str], None]) -> dict[str, str]:
        """Before pass ``pass_no``: ask each of ``sites`` that is not connected or dropped
        out at the last pass whether it answers; wait for the ones that do not, with
        back-off, at most ``wait`` seconds, reconnecting each as soon as it answers.

        Returns:
            The sites still down -> why (the pass goes ahead without them).
        """
        urls = self.state.get("urls") or {}
        pending: dict[str, str] = {}
        for s in sites:
            if s in self.session.sites and not str(site_status.get(s, "")).startswith("dropped"):
                continue
            if self.session.url_of(s) is None and self.session.url_of(urls.get(s, s)) is None:
                continue  # a session without an address for it (in-process sites): nothing to ask
            if s in self.session.sites and self.session.answers(s):
                continue  # it answers: it dropped out for another reason, and waiting cannot help
            why = str(site_status.get(s) or "")
            for prefix in ("dropped: ", "down: ", "refused: "):  # asked again: it may answer now
                why = why.removeprefix(prefix)
            pending[s] = why or "not connected"
        if not pending:
            return {}
        deadline = time.monotonic() + wait
        delay = REJOIN_FIRST_DELAY
        waited = False
        while True:
            for s in [s for s, why in pending.items() if not why.startswith("refused: ")]:
                joined, why = self._try_rejoin(s, urls.get(s))
                if joined:
                    say(f"job {self.job_id}: {s} answers again and rejoins at pass {pass_no}")
                    del pending[s]
                elif why is not None:  # it answered but cannot rejoin: waiting cannot help
                    say(f"job {self.job_id}: pass {pass_no} goes ahead without {s}: {why}")
                    pending[s] = why
            left = deadline - time.monotonic()
            asked = {s: why for s, why in pending.items() if not why.startswith("refused: ")}
            if not asked or left <= 0:
                break
            if not waited:
                say(f"job {self.job_id}: waiting up to {wait:g} s for "
                    + "; ".join(f"{s} (down: {why})" for s, why in sorted(asked.items()))
                    + f" before pass {pass_no}")
                waited = True
            time.sleep(min(delay, left))
            delay = min(delay * 2, REJOIN_MAX_DELAY)
        for s in sorted(pending):
            if not pending[s].startswith("refused: "):
                say(f"job {self.job_id}: pass {pass_no} goes ahead without {s}: it did not answer "
                    f"{'within ' + format(wait, 'g') + ' s (rejoin_wait)' if wait else '(rejoin_wait=0)'}; "
                    "it is asked again before the next pass")
        return pending

    def _try_rejoin(self, site: str, url: str | None) -> tuple[bool, str | None]:
        """Reconnect ``site`` if it answers: ``(True, None)``; ``(False, None)`` while it
        does not answer; ``(False, "refused: why")`` when it answers but cannot rejoin."""
        key = site if self.session.url_of(site) is not None else url
        try:
            if site in self.session.sites and not self.session.answers(key):
                return False, None
            roster = self.site_specs[site].get("roster", {}).get(site)
            conn = self.session.reconnect(key, verify_key=roster)
            if conn.name != site:
                return False, f"refused: {key} is site {conn.name!r} now, not {site!r}"
        except DatasiteError as e:
            if str(e).startswith("cannot reach"):
                return False, None
            return False, f"refused: {e}"
        except FedMTLError as e:
            return False, f"refused: {e}"
        self.state.setdefault("n_train", {})[site] = _n_train(self.session.sites[site].meta)
        return True, None

    def _epsilon(self, passes_done: int) -> dict[str, float]:
        """Epsilon each site has charged for this job after ``passes_done`` passes
        (training rounds and evaluation releases, as the site's ledger charges them)."""
        out = {}
        for s in self.sites:
            conn = self.session.sites.get(s)
            # a site that is down: the size kept when the job was made (older jobs: the
            # roster's largest site, an upper bound)
            n_train = _n_train(conn.meta) if conn is not None else int(
                (self.state.get("n_train") or {}).get(s) or self.site_specs[s]["max_count"])
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
        # what each site's ledger charged, as last read back (run, finish, abort); where a
        # site never answered, the figure its passes would have cost, marked as such
        epsilon, source = dict(ckpt.epsilon), {}
        for s in self.sites:
            row = (self.state.get("charged") or {}).get(s) or {}
            if "epsilon" in row:
                epsilon[s], source[s] = float(row["epsilon"]), "ledger"
            else:
                source[s] = "estimate: " + str(row.get("error") or "not read back from the site")
        return JobResult(
            spec=self.spec,
            model_config=dict(self.model.config),
            preprocessor=pre.to_dict(),
            global_vector=np.asarray(ckpt.global_vector, dtype=np.float32),
            metrics=[_metrics_row(r) for r in ckpt.metrics if "metrics" in r],
            epsilon=epsilon,
            rounds_done=self.spec.rounds_before(int(ckpt.round) + 1),
            site_status=dict(ckpt.site_status),
            epsilon_source=source,
            site_passes=_site_passes(ckpt.metrics, self.sites),
            lost_passes=[int(r["pass"]) for r in ckpt.metrics if "lost" in r],
        )


# ---------------------------------------------------------------------------- planning

#: a datasite's automatic reviewer answers within seconds (it polls every 1-3 s)
AUTO_REVIEW_SECONDS = 30.0
PENDING_AUTO = "queued for the automatic reviewer"
PENDING_MANUAL = "waiting for a person (this datasite approves by hand)"


def price(session, spec, *, sites=None, budget: bool = True, prefer: str | None = None,
          site_specs: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """What ``spec`` costs each of ``session``'s sites that it runs on, and which of the
    site's review rules would deny it, without submitting.

    Per site::

        n_train            training records (the site's published split size)
        rounds             training rounds
        noise_multiplier   the one the site trains with (fixed, or calibrated to
                           target_epsilon on that site's n_train)
        epsilon            the whole job at delta: rounds and evaluation releases, as
                           the site's ledger will charge them (fedmtl.contract.jobspec.JobSpec.epsilon_for_site)
        budget_left        your researcher budget left there before this job (budget
                           minus what you spent and committed, composed), or None if unknown
        fits               whether the review's own budget check passes (the per-job
                           maximum and your budget, records composed), or None if unknown
        budget_from        where budget_left came from, or why it is unknown
        review             what the site's automatic review would decide ("approved",
                           "denied", "pending_manual"), or None without a published policy
        would_deny         the review's reasons, word for word
        checks             [{"rule": "training.max_local_epochs", "reason": ...}, ...]
        unchecked          the rules the researcher cannot check, each with why
        policy_from        where the site's policy came from, or why it is unknown

    The review is the site's own (:func:`fedmtl.datasites.review.preview.preview`: the
    spec bounds of :mod:`fedmtl.datasites.rules.limits`, then
    :func:`fedmtl.datasites.rules.review.decide`), run on the policy the site publishes:
    its current policy in your spend view, or before your first approved job there the
    policy of its first launch in its dataset metadata (an owner may have changed it since).
    The dataset's total budget is never checked (other researchers' spend is not published).

    Your spend view is read through an approved job of yours at that site (``prefer``,
    the name of this job's round function, first; otherwise your newest approved job
    there; the call runs no round and charges nothing). Before your first approved job at
    a site you have spent and committed nothing there, so with a published policy
    ``fits`` is known then too. Once this job is approved, its own reserved passes are
    among your committed records. ``budget=False`` skips the lookups (no syft calls).

    Args:
        session: the connected :class:`~fedmtl.researcher.session.Session`.
        spec: the :class:`~fedmtl.contract.jobspec.JobSpec`.
        sites: the sites to price (default: those the spec runs on).
        budget: read your spend view at each site.
        prefer: the round function to read the spend view through first.
        site_specs: the site specs the job binds (:meth:`Job.cost` passes its own);
            built as :meth:`Job.create` builds them otherwise.

    Returns:
        Per site, the row above.

    Raises:
        JobSpecError: ``spec`` does not fit the sites' schemas (``sites`` not given).
    """
    if sites is None:
        schemas = session.schemas
        spec.validate(schemas)
        sites = spec.participating(sorted(schemas))
    sites = list(sites)
    out: dict[str, dict[str, Any]] = {}
    for s in sites:
        conn = session.sites[s]
        n_train = _n_train(conn.meta)
        row: dict[str, Any] = {
            "n_train": n_train,
            "rounds": int(spec.rounds),
            "noise_multiplier": float(spec.noise_for_site(n_train)),
            "epsilon": float(spec.epsilon_for_site(n_train)),
            "budget_left": None,
            "fits": None,
            "budget_from": "not asked (--no-budget; from Python: budget=False)",
            "review": None,
            "would_deny": [],
            "checks": [],
            "unchecked": [],
            "policy_from": "",
        }
        view: Mapping[str, Any] | None = None
        records: list[PrivacyRecord] | None = None
        if budget:
            found = _spend_view(session, s, prefer=prefer)
            view, row["budget_from"] = found.view, found.source
            records = _view_records(view, any_approved=found.any_approved)
            if found.this_job:  # approved here: its own reservation is among your records already
                records = None
                row["unchecked"].append(
                    "privacy.researcher_epsilon_budget: this job is approved here and its passes are reserved "
                    "in your records; the site checked your budget when it approved it")
            left = _view_budget_left(view, conn)
            if left is not None:  # a site that publishes no records: the figures added up
                row["budget_left"], row["fits"] = left, bool(row["epsilon"] <= left)
        policy, row["policy_from"] = _published_policy(conn, view)
        if policy is not None:
            spec_for_site = (site_specs or {}).get(s) or _pricing_site_spec(session, spec, sites, s)
            seen = _preview_site(conn, s, spec_for_site, policy, n_train=n_train, records=records,
                                 peers_known=view is not None and view.get("policy") is not None)
            row["review"] = seen.status
            row["would_deny"] = seen.would_deny
            row["checks"] = [c.to_dict() for c in seen.checks]
            row["unchecked"] = [*seen.unknown, *(u for u in row["unchecked"] if u not in seen.unknown)]
            if seen.fits is not None:
                row["fits"], row["budget_left"] = seen.fits, seen.budget_left
        out[s] = row
    return out


def price_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """:func:`price`'s answer as a text table, then per site each rule its review would
    deny the job by (the review's words), and a line per site whose budget is unknown."""
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
        for c in r.get("checks") or []:
            lines.append(f"{s}: would deny ({c['rule']}): {c['reason']}")
        if r.get("review") == "pending_manual":
            lines.append(f"{s}: would wait for a person (this site approves requests by hand)")
    for s, r in sorted(rows.items()):
        if r["budget_left"] is None:
            lines.append(f"{s}: budget left unknown: {r['budget_from']}")
    for s, r in sorted(rows.items()):
        if r.get("review") is None and r.get("policy_from"):
            lines.append(f"{s}: review not checked: {r['policy_from']}")
    return "\n".join(lines)


def _pricing_site_spec(session, spec, sites: list[str], site: str) -> dict[str, Any]:
    """The site spec a job of ``spec`` over ``sites`` would bind at ``site``, as
    :meth:`Job.create` builds it, with a placeholder job id and data-plane key (neither
    changes what the review decides)."""
    spec = spec.for_sites(sites, {s: _n_train(session.sites[s].meta) for s in sites})
    return {
        "job": spec.to_dict(),
        "job_id": f"{_slug(spec.name)}-00000000",
        "site": site,
        "roster": {s: session.sites[s].identity.verify_key.to_bytes().hex() for s in sites},
        "schema": session.sites[sites[0]].schema.to_dict(),
        "max_count": int(max(session.sites[s].n_records for s in sites)),
        "template": TEMPLATE_NAME,
        "dataplane_key": "0" * 64,
    }


def _published_policy(conn, view: Mapping[str, Any] | None) -> tuple[Policy | None, str]:
    """(the site's policy as it publishes it, where from): the current one in your spend
    view, else the first launch's in the dataset metadata, else ``None`` and why."""
    for raw, source in (((view or {}).get("policy"), "the site's current policy, from your spend view"),
                        (conn.meta.get("policy"), "the policy the site published at its first launch "
                                                  "(its dataset metadata; the owner may have changed it since)")):
        if raw:
            try:
                return Policy.from_dict(raw, source=f"{conn.name}'s published policy"), source
            except PolicyError as e:
                return None, f"the site's published policy does not parse here ({e}); update fedmtl"
    return None, ("this site publishes no policy (launched by an older fedmtl): its review "
                  "cannot be run ahead of time")


def _view_records(view: Mapping[str, Any] | None, *, any_approved: bool) -> list[PrivacyRecord] | None:
    """Your records spent and committed at a site (the spend view's ``records``); ``[]``
    where no job of yours is approved there (a denied or pending job spends and commits
    nothing); ``None`` when unknown."""
    if view is not None and isinstance(view.get("records"), list):
        return [PrivacyRecord.from_dict(r) for r in view["records"]]
    return None if any_approved else []


def _preview_site(conn, site: str, site_spec: Mapping[str, Any], policy: Policy, *, n_train: int,
                  records: list[PrivacyRecord] | None, peers_known: bool) -> Preview:
    """The site's review of ``site_spec`` run ahead of time. The pinned peers of a
    launch-time policy are stale (owners pin peers after launching): then the roster is
    taken as pinned and ``review.peers`` is listed as unchecked."""
    unknown: list[str] = []
    if not peers_known:
        own = conn.identity.verify_key.to_bytes().hex()
        roster = site_spec.get("roster") if isinstance(site_spec.get("roster"), Mapping) else {}
        pins = [Peer(name=str(n), fingerprint=hashlib.sha256(bytes.fromhex(str(k))).hexdigest())
                for n, k in roster.items() if n != site and k != own]
        try:
            policy = dataclasses.replace(policy, peers=tuple(pins))
        except (PolicyError, ValueError):
            pass  # a malformed roster: the spec bounds deny it anyway
        unknown.append("review.peers: whether this site pins the other sites is known from your spend "
                       "view only (owners pin peers after launching)")
    seen = preview(site_spec, policy=policy, schema=conn.schema, site=site,
                   own_key=conn.identity.verify_key.to_bytes().hex(), n_train=n_train,
                   dataset=str(getattr(conn.dataset, "name", "") or ""), researcher_records=records)
    return dataclasses.replace(seen, unknown=(*seen.unknown, *unknown))


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


class _Spend(NamedTuple):
    """Your spend view at a site, as :func:`_spend_view` found it."""

    view: Mapping[str, Any] | None  # None: unknown
    source: str  # where it came from, or why it is unknown
    any_approved: bool  # whether a fedmtl job of yours is approved there
    this_job: bool = False  # read through the job being priced (approved there)


def _spend_view(session, site: str, *, prefer: str | None) -> _Spend:
    """Your spend view at ``site``, read through the ``spend`` query of an approved job of
    yours there (``prefer`` first)."""
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
        return _Spend(None, f"could not list your requests at {site} ({type(e).__name__})", True)
    if not approved:
        return _Spend(None, (f"{site} publishes no budgets; your budget left there is known once a job of "
                             "yours is approved there (then `fedmtl job price` shows it; from Python: job.cost() "
                             "or job.spend())"), False)
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
        job = "this job" if name == prefer else f"your approved job {name}"
        return _Spend(view, f"your spend view at {site}, read through {job}", True, name == prefer)
    return _Spend(None, f"could not read your spend view at {site}: {last}", True)


def _view_budget_left(view: Mapping[str, Any] | None, conn) -> float | None:
    """The spend view's ``budget_left`` for this site's dataset, or ``None``."""
    if not view:
        return None
    left = view.get("budget_left") or {}
    value = left.get(conn.dataset.name) if getattr(conn.dataset, "name", None) in left else (
        next(iter(left.values())) if len(left) == 1 else None)
    return None if value is None else float(value)


def _close_at(transport: Transport, site: str, msg: Close) -> dict[str, Any]:
    """Send the ``close`` request ``msg`` to ``site``: the job's state there, or
    ``{"status": "not closed", "error", "kind"}`` when it refused or did not answer."""
    r = Reply.from_dict(transport.call(site, msg.to_dict()))
    if r.ok and r.view is not None:
        return dict(r.view)
    return {"status": "not closed", "error": r.error, "kind": r.kind}


def _recalibrated(model, weights: np.ndarray, platt: Mapping[str, tuple[float, float]]) -> np.ndarray:
    """``weights`` with each binary head's Platt recalibration folded in
    (:meth:`~fedmtl.models.nets.MultiTaskNet.recalibrate`)."""
    vector_to_model(model, np.asarray(weights, dtype=np.float32))
    model.recalibrate(platt, logit_range=read_range())
    return model_to_vector(model).astype(np.float64)


def _site_passes(history: list[Mapping[str, Any]], sites: list[str]) -> dict[str, list[int]]:
    """Per site, the passes whose aggregate holds its vector (the pass's survivors), from
    the checkpoint's history (one record per pass, in order; a pass whose aggregate was
    lost names no survivors)."""
    out: dict[str, list[int]] = {s: [] for s in sites}
    for i, record in enumerate(history):
        p = int(record.get("pass", i + 1))
        for s in record.get("survivors") or []:
            out.setdefault(s, []).append(p)
    return out


def _metrics_row(record: Mapping[str, Any]) -> dict[str, Any]:
    row = {"round": record["round"], "pooled": record["metrics"], "sites": record.get("site_metrics", {})}
    if record.get("calibration"):
        row["calibration"] = record["calibration"]
    return row


def _initial_vector(model) -> np.ndarray:
    return model_to_vector(model)


def _already_held(out: Path) -> str:
    return (f"{out} already holds a job: continue it with `fedmtl train --sites FILE --out {out}` (from Python: "
            f"Job.resume(session, {str(out)!r})), or give the new job another out folder")


def _stderr(line: str) -> None:
    tqdm.write(line, file=sys.stderr)


def _slug(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return (s or "job")[:24]


def _progress(enabled: bool, *, total: int, initial: int, desc: str):
    if not enabled:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="pass")
