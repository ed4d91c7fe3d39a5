"""The round data plane: the messages of an *approved* job, served by the datasite itself.

syft stays the control plane: accounts, the code request, its review and approval, the
ledger. Once a job is approved, its round messages may travel over this lean endpoint of
the same server (same port, behind the same TLS proxy) instead of syft code calls: one
HTTP request per stage instead of eight, no serialisation of the private table per call.
The syft path stays available (``Job.run(transport="syft")``) and is what runs when a site
does not offer this one.

``POST /fedmtl/v1/round`` takes a body of :mod:`fedmtl.contract.wire` with its signed auth header
(:data:`fedmtl.contract.wire.AUTH_HEADER`) and answers the runtime's reply (``{"ok": ..., ...}``,
encoded the same way). **Strangers get nothing for free: the body is not read before the
request is authenticated.** Checked in this order:

Before one byte of the body is read (each refusal answers at once and closes the
connection, so the rest of the body is never read):

1. the auth header is there, at most :data:`fedmtl.contract.wire.MAX_AUTH_HEADER` long, well formed
   (401); it names this site (403);
2. the ledger of this site holds an approval of the job (``approved``; a ``finished`` or
   ``aborted`` job answers only its spend query and its ``close`` request, which returns
   its state) (403). The approved site spec is the one whose hash the
   approval bound (the signed ledger's ``spec_hash``); the datasite finds it once per job in
   syft's store (the code request that carried it) and keeps, in memory, only what
   admission needs: the job's data-plane key, its model's parameter count, its roster size;
3. the header's signature verifies with that key (401);
4. ``seq`` is above every sequence number this site accepted for the job (409);
5. the declared length fits the job's limit for the stage (413): the ``advertise`` stage
   carries the model's weights (4 bytes per parameter), the others secure-aggregation
   messages whose size grows with the roster; every request also carries the spec
   (:meth:`ApprovedJob.limit`). ``Content-Length`` must be the signed length;
6. fewer than :data:`MAX_CONCURRENT` requests are being served, and fewer than
   :data:`MAX_CONCURRENT_PER_JOB` of this job (429).

Then the body is streamed into SHA-256, never more than the signed length; a body of
another length or digest is refused (400). Only then is it decoded (no pickle: only JSON
types, bytes and plain arrays; bounded nesting), and the envelope must repeat the signed
claims and carry exactly the approved spec. The sequence number is recorded (persisted in
the owner-only job folder, so it survives a restart) before the round runtime
(:func:`fedmtl.datasites.runtime.handle`) runs: pass and stage order, the privacy ledger
charge before computing, secure aggregation. Slow headers and slow bodies are cut off for
every route of the server by :mod:`fedmtl.datasites.server.http_guard`.

The records are read from syft's store once per server process and kept in memory; stages
other than the training/evaluation one never receive them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fedmtl.contract import protocol, wire
from fedmtl.contract.site_spec import SiteSpec
from fedmtl.datasites import runtime
from fedmtl.datasites.ledger import site_ledger
from fedmtl.datasites.review.autoreview import binding_of, site_spec_hash
from fedmtl.datasites.site import syftio
from fedmtl.errors import DataPlaneRefused, JobClosedRefused
from fedmtl.fsutil import write_json_atomic
from fedmtl.models import model_to_vector
from fedmtl.privacy.keys import VerifyKey

log = logging.getLogger("fedmtl.dataplane")

ROUND_PATH = "/fedmtl/v1/round"
PING_PATH = "/fedmtl/v1/ping"
#: 2: the request is authenticated by a signed header before its body is read
VERSION = 2
#: no request is ever larger than this, whatever the job (a 16M-parameter model's weights in
#: float32 are 64 MiB; the policy's parameter cap is far lower by default)
MAX_REQUEST_BYTES = 256 << 20
#: what every request may carry besides its stage's payload: the envelope, ids, numbers
BASE_ALLOWANCE = 64 << 10
#: what a secure-aggregation message may carry per roster member (keys, encrypted shares,
#: signatures: a few hundred bytes each; generous)
PER_SITE_ALLOWANCE = 32 << 10
#: the site spec travels in every request; its wire form is close to its canonical JSON
SPEC_FACTOR = 2
#: data-plane requests served at once by this datasite, and per job; more are answered 429
MAX_CONCURRENT = 8
MAX_CONCURRENT_PER_JOB = 2
#: how long a failed look-up of an approved spec is remembered (no look-up storm)
LOOKUP_RETRY_S = 30.0
_JOB_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,79}$")
_HEX_KEY = re.compile(r"^[0-9a-f]{64}$")
#: stages whose call reads the records
DATA_STAGES = frozenset({"advertise"})
#: stages a finished or aborted job still answers (its spend view; closing it again
#: returns its state)
FINISHED_STAGES = frozenset({"spend", "close"})
#: the ledger statuses of a job that answers only :data:`FINISHED_STAGES`
CLOSED_STATUSES = frozenset({"finished", "aborted"})
MEDIA_TYPE = "application/x-fedmtl"


@dataclass(frozen=True)
class ApprovedJob:
    """What admission needs of an approved job, derived from the approved site spec.

    Attributes:
        job_id: the job (the ledger's request id).
        spec_hash: the approved spec's hash (what the ledger's approval binds).
        verify_key: the job's data-plane key (``spec["dataplane_key"]``).
        n_params: the parameter count of the job's model.
        n_sites: the size of the job's secure-aggregation roster.
        spec_bytes: the length of the spec's canonical JSON.
    """

    job_id: str
    spec_hash: str
    verify_key: VerifyKey
    n_params: int
    n_sites: int
    spec_bytes: int

    def limit(self, stage: str) -> int:
        """The largest body a request of ``stage`` of this job may have, in bytes.

        Args:
            stage: the stage the request's signed header names.

        Returns:
            ``BASE_ALLOWANCE + SPEC_FACTOR * spec_bytes + PER_SITE_ALLOWANCE * n_sites``,
            plus 4 bytes per model parameter for ``advertise`` (the weights, float32),
            never above :data:`MAX_REQUEST_BYTES`.
        """
        n = BASE_ALLOWANCE + SPEC_FACTOR * self.spec_bytes + PER_SITE_ALLOWANCE * max(1, self.n_sites)
        if stage in DATA_STAGES:
            n += 4 * self.n_params
        return min(n, MAX_REQUEST_BYTES)


def approved_job(spec: dict[str, Any], spec_hash: str) -> ApprovedJob:
    """The :class:`ApprovedJob` of an approved site spec.

    Args:
        spec: the site spec whose hash the ledger's approval bound.
        spec_hash: that hash.

    Returns:
        What admission needs of the job.

    Raises:
        DataPlaneRefused: the spec names no data-plane key (the job runs over syft only).
        ConfigError: the spec does not parse (:meth:`SiteSpec.parse
            <fedmtl.contract.site_spec.SiteSpec.parse>`).
    """
    site_spec = SiteSpec.parse(spec)
    key_hex = site_spec.dataplane_key
    if not isinstance(key_hex, str) or not _HEX_KEY.match(key_hex):
        raise DataPlaneRefused("the job's spec names no data-plane key; this job runs over syft only")
    model, _ = protocol.build_model(site_spec)
    return ApprovedJob(
        job_id=site_spec.job_id,
        spec_hash=spec_hash,
        verify_key=VerifyKey.from_bytes(bytes.fromhex(key_hex)),
        n_params=int(model_to_vector(model).size),
        n_sites=len(site_spec.roster),
        spec_bytes=len(json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)),
    )


@dataclass(frozen=True)
class Ticket:
    """A request whose signed header was verified: its claims, its job, its body limit."""

    claims: wire.Claims
    job: ApprovedJob
    limit: int


class Gate:
    """Counts the requests being served, in all and per job; never waits (a request
    beyond a bound is refused at once)."""

    def __init__(self, total: int = MAX_CONCURRENT, per_job: int = MAX_CONCURRENT_PER_JOB):
        self.total, self.per_job = total, per_job
        self._lock = threading.Lock()
        self._busy = 0
        self._jobs: dict[str, int] = {}

    def enter(self, job_id: str) -> bool:
        """Take a slot for ``job_id``; ``False`` (nothing taken) when a bound is reached."""
        with self._lock:
            if self._busy >= self.total or self._jobs.get(job_id, 0) >= self.per_job:
                return False
            self._busy += 1
            self._jobs[job_id] = self._jobs.get(job_id, 0) + 1
            return True

    def leave(self, job_id: str) -> None:
        """Give back a slot taken by :meth:`enter`."""
        with self._lock:
            self._busy -= 1
            left = self._jobs.get(job_id, 1) - 1
            if left:
                self._jobs[job_id] = left
            else:
                self._jobs.pop(job_id, None)


class DataPlane:
    """The data plane of one datasite.

    Args:
        home: the datasite's home.
        site: its name.
        load_records: reads its private records (called once per process).
        find_spec: ``(job_id, spec_hash) -> spec or None``: the site spec with that hash
            that a code request of this datasite carried (see :func:`spec_finder`).
    """

    def __init__(self, home: Path, site: str, load_records: Callable[[], Any],
                 find_spec: Callable[[str, str], dict[str, Any] | None]):
        self.home = Path(home)
        self.site = site
        self._load_records = load_records
        self._find_spec = find_spec
        self._records: Any = None
        self._records_lock = threading.Lock()
        self._seq_lock = threading.Lock()
        self._jobs_lock = threading.Lock()
        self._jobs: dict[str, ApprovedJob] = {}
        self._misses: dict[tuple[str, str], float] = {}
        self.gate = Gate()

    # -- the records, once per process ----------------------------------------------
    def records(self):
        """The private records (read from syft's store on first use)."""
        with self._records_lock:
            if self._records is None:
                self._records = self._load_records()
            return self._records

    # -- before the body -------------------------------------------------------------
    def admit(self, auth: str | None, content_length: str | None) -> Ticket:
        """Check a request's signed header before its body is read.

        Args:
            auth: the value of its :data:`fedmtl.contract.wire.AUTH_HEADER` (``None``: absent).
            content_length: its ``Content-Length`` header (``None``: absent).

        Returns:
            The :class:`Ticket` of an authenticated request that may send its body.

        Raises:
            DataPlaneRefused: with the HTTP status to answer (400, 401, 403, 409, 413).
        """
        try:
            claims, signed, sig = wire.read_auth(auth)
        except wire.WireError as e:
            raise DataPlaneRefused(str(e), status=401) from None
        if claims.site != self.site:
            raise DataPlaneRefused(f"this datasite is {self.site!r}; the request is for {claims.site!r}")
        if not _JOB_ID.match(claims.job_id):
            raise DataPlaneRefused(f"job id {claims.job_id!r} is malformed")
        job, status = self._approved(claims.job_id)
        try:
            wire.verify_auth(signed, sig, job.verify_key)
        except wire.WireError as e:
            raise DataPlaneRefused(str(e), status=401) from None
        # only the job's own key holder learns that it is closed here
        _refuse_unless_open(claims.job_id, status, claims.stage)
        last = self._last_seq(claims.job_id)
        if claims.seq <= last:
            raise DataPlaneRefused(f"sequence number {claims.seq} is not above the last accepted ({last}): "
                                   "a replayed or reordered request is refused", status=409)
        limit = job.limit(claims.stage)
        if claims.length > limit:
            raise DataPlaneRefused(f"a {claims.stage!r} request of job {claims.job_id!r} is at most {limit} "
                                   f"bytes; this one declares {claims.length}", status=413)
        if content_length is not None and content_length.strip() != str(claims.length):
            raise DataPlaneRefused("Content-Length is not the body length the signed header declares",
                                   status=400)
        return Ticket(claims=claims, job=job, limit=limit)

    def _approved(self, job_id: str) -> tuple[ApprovedJob, str]:
        """The job ``job_id`` this datasite approved (it may have closed it since), with its
        ledger status; a job never approved is refused."""
        st = site_ledger.open_ledger(self.home).request(job_id)
        if st is None:
            raise DataPlaneRefused(f"job {job_id!r} was never reviewed here")
        if st.status != "approved" and st.status not in CLOSED_STATUSES:
            raise DataPlaneRefused(f"job {job_id!r} is {st.status}, not approved")
        spec_hash = st.facts.spec_hash
        with self._jobs_lock:
            job = self._jobs.get(job_id)
            if job is not None and job.spec_hash == spec_hash:
                return job, st.status
            missed = self._misses.get((job_id, spec_hash))
            if missed is not None and time.monotonic() - missed < LOOKUP_RETRY_S:
                raise DataPlaneRefused(f"the approved spec of job {job_id!r} is not on this datasite")
            try:
                spec = self._find_spec(job_id, spec_hash)
            except Exception:  # noqa: BLE001 - the store failed: refuse, remember, say why in the log
                log.exception("looking up the approved spec of job %s failed", job_id)
                spec = None
            if spec is None or site_spec_hash(spec) != spec_hash:
                self._misses[(job_id, spec_hash)] = time.monotonic()
                raise DataPlaneRefused(f"the approved spec of job {job_id!r} is not on this datasite")
            job = approved_job(spec, spec_hash)
            self._jobs[job_id] = job
            return job, st.status

    # -- the body --------------------------------------------------------------------
    def handle(self, ticket: Ticket, body: bytes | bytearray) -> bytes:
        """The reply body for a request whose body was read in full and whose length and
        digest match its signed header. Never raises."""
        try:
            env = self._open(ticket, body)
        except (wire.WireError, DataPlaneRefused) as e:
            log.warning("data-plane request refused: %s", e)
            return refusal_body(e)
        except Exception as e:  # noqa: BLE001 - never leak internals
            log.exception("data-plane admission failed")
            return wire.encode({"ok": False, "error": f"internal error ({type(e).__name__}); see the "
                                "datasite's log", "kind": "InternalError"})
        stage = env.message.get("stage")
        data = self.records() if stage in DATA_STAGES else None
        reply = runtime.handle(data=data, spec=env.spec, message=env.message)
        try:
            return wire.encode(reply)
        except wire.WireError as e:
            log.exception("data-plane reply not encodable")
            return wire.encode({"ok": False, "error": f"reply not encodable: {e}", "kind": "InternalError"})

    def _open(self, ticket: Ticket, body: bytes | bytearray) -> wire.Envelope:
        env = wire.open_request(memoryview(body), ticket.claims, max_bytes=ticket.limit)
        spec = env.spec
        if spec.get("site") != self.site or spec.get("job_id") != env.job_id:
            raise DataPlaneRefused(f"this datasite is {self.site!r} and the job {env.job_id!r}; the spec is "
                                   f"for {spec.get('site')!r}, job {spec.get('job_id')!r}")
        if site_spec_hash(spec) != ticket.job.spec_hash:
            raise DataPlaneRefused(f"the spec of this request is not the one approved for job {env.job_id!r}")
        self._check_approved(env)
        self._accept_seq(env)
        return env

    def _check_approved(self, env: wire.Envelope) -> None:
        # again, after the body: the job may have finished meanwhile
        st = site_ledger.open_ledger(self.home).request(env.job_id)
        _refuse_unless_open(env.job_id, st.status if st else "unknown", env.message.get("stage"))

    def _seq_path(self, job_id: str) -> Path:
        return self.home / "jobs" / job_id / "dataplane.json"

    def _last_seq(self, job_id: str) -> int:
        path = self._seq_path(job_id)
        if not path.exists():
            return 0
        return int(json.loads(path.read_text()).get("seq", 0))

    def _accept_seq(self, env: wire.Envelope) -> None:
        path = self._seq_path(env.job_id)
        with self._seq_lock:
            last = self._last_seq(env.job_id)
            if env.seq <= last:
                raise DataPlaneRefused(f"sequence number {env.seq} is not above the last accepted "
                                       f"({last}): a replayed or reordered request is refused", status=409)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(path.parent, 0o700)
            write_json_atomic(path, {"seq": int(env.seq)}, mode=0o600)


def _refuse_unless_open(job_id: str, status: str, stage: Any) -> None:
    """Refuse ``stage`` of a job whose ledger status is ``status`` unless the job is approved
    (or closed, for :data:`FINISHED_STAGES`); a closed job's pass stages get
    :class:`JobClosedRefused`, which the researcher reads as such."""
    if status == "approved" or (status in CLOSED_STATUSES and stage in FINISHED_STAGES):
        return
    if status in CLOSED_STATUSES:
        raise JobClosedRefused(f"job {job_id!r} is {status} at this datasite; no pass of it runs any more")
    raise DataPlaneRefused(f"job {job_id!r} is {status}, not approved")


def refusal_body(e: Exception) -> bytes:
    """The wire-encoded reply of a refused request."""
    return wire.encode({"ok": False, "error": str(e), "kind": type(e).__name__})


def records_loader(home: Path, worker) -> Callable[[], Any]:
    """Reads this datasite's private records from syft's store (in this process)."""

    def load():
        client = worker.root_client
        _, asset_id = binding_of(home, client)
        with syftio.quiet():
            obj = client.api.services.action.get(asset_id)
            data = getattr(obj, "syft_action_data", obj)
        return data

    return load


def _spec_of_code(code) -> dict[str, Any] | None:
    kwargs = getattr(code, "input_policy_init_kwargs", None) or {}
    for rules in kwargs.values() if isinstance(kwargs, dict) else ():
        if isinstance(rules, dict) and "spec" in rules:
            val = getattr(rules["spec"], "val", None)
            return val if isinstance(val, dict) else None
    return None


def spec_finder(worker) -> Callable[[str, str], dict[str, Any] | None]:
    """``(job_id, spec_hash) -> spec``: the site spec with that hash among the code
    requests in this datasite's syft store (in process, as the admin), or ``None``."""
    from syft.service.context import AuthedServiceContext
    from syft.service.user.user_roles import ServiceRole

    def find(job_id: str, spec_hash: str) -> dict[str, Any] | None:
        admin = AuthedServiceContext(server=worker, credentials=worker.verify_key, role=ServiceRole.ADMIN)
        with syftio.quiet():
            codes = worker.services.user_code.get_all(admin)
        codes = codes.unwrap() if hasattr(codes, "unwrap") else codes
        for code in reversed(list(codes or [])):
            spec = _spec_of_code(code)
            if isinstance(spec, dict) and spec.get("job_id") == job_id and site_spec_hash(spec) == spec_hash:
                return spec
        return None

    return find


def mount(app, plane: DataPlane) -> None:
    """Add the data-plane routes to the datasite's FastAPI ``app``."""
    from fastapi import Request, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect

    # FastAPI reads the handlers' annotations; with postponed evaluation they are strings
    # that must resolve in this module's namespace
    globals().update(Request=Request, Response=Response)

    def refused(e: DataPlaneRefused, *, close: bool = True) -> Response:
        # close: the rest of an unread body is never read
        return Response(refusal_body(e), media_type=MEDIA_TYPE, status_code=e.status,
                        headers={"connection": "close"} if close else None)

    @app.get(PING_PATH)
    def ping() -> dict[str, Any]:
        return {"fedmtl_dataplane": VERSION}

    @app.post(ROUND_PATH)
    async def round_call(request: Request) -> Response:
        auth = request.headers.get(wire.AUTH_HEADER)
        try:
            wire.read_auth(auth)  # a stranger's garbage is refused without a thread
            ticket = await run_in_threadpool(plane.admit, auth, request.headers.get("content-length"))
        except wire.WireError as e:
            return refused(DataPlaneRefused(str(e), status=401))
        except DataPlaneRefused as e:
            log.warning("data-plane request refused before its body: %s", e)
            return refused(e)
        job_id = ticket.claims.job_id
        if not plane.gate.enter(job_id):
            return refused(DataPlaneRefused(
                f"too many data-plane requests at once (at most {plane.gate.total} at this datasite, "
                f"{plane.gate.per_job} per job); retry shortly", status=429))
        try:
            digest, body = hashlib.sha256(), bytearray()
            try:
                async for chunk in request.stream():
                    if len(body) + len(chunk) > ticket.claims.length:
                        return refused(DataPlaneRefused("the body is longer than its signed length", status=413))
                    digest.update(chunk)
                    body += chunk
            except ClientDisconnect:
                return Response(status_code=400)
            if len(body) != ticket.claims.length or digest.hexdigest() != ticket.claims.sha256:
                return refused(DataPlaneRefused("the body is not the one its signed header declares (length or "
                                                "SHA-256 differ)", status=400), close=False)
            return Response(await run_in_threadpool(plane.handle, ticket, body), media_type=MEDIA_TYPE)
        finally:
            plane.gate.leave(job_id)


__all__ = ["ApprovedJob", "DataPlane", "DataPlaneRefused", "Gate", "MAX_REQUEST_BYTES", "PING_PATH", "ROUND_PATH",
           "Ticket", "VERSION", "approved_job", "mount", "records_loader", "spec_finder"]
