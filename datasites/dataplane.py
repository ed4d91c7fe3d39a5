"""The round data plane: the messages of an *approved* job, served by the datasite itself.

syft stays the control plane: accounts, the code request, its review and approval, the
ledger. Once a job is approved, its round messages may travel over this lean endpoint of
the same server (same port, behind the same TLS proxy) instead of syft code calls: one
HTTP request per stage instead of eight, no serialisation of the private table per call.
The syft path stays available (``Job.run(transport="syft")``) and is what runs when a site
does not offer this one.

``POST /fedmtl/v1/round`` takes a request of :mod:`fedmtl.wire` and answers the runtime's
reply (``{"ok": ..., ...}``, encoded the same way). A request is executed only when all
of these hold, checked in this order, before anything is read from the records:

1. it decodes within the size limit (no pickle: only JSON types, bytes and plain arrays);
2. it names this site (envelope and spec) and the job id of its spec;
3. the spec carries the researcher's per-job Ed25519 key (``dataplane_key``) and the
   request is signed by that key — so only whoever submitted the job can drive it;
4. the ledger of this site holds an approval of exactly this spec: the request id is the
   job id and its approved ``spec_hash`` is the hash of the whole site spec (the same hash
   the reviewer bound when it approved); a spec that differs in any field is refused;
   a ``finished`` job answers only its spend query;
5. ``seq`` is above every sequence number this site accepted for the job (no replay;
   persisted in the owner-only job folder).

Then the round runtime (:func:`fedmtl.datasites.runtime.handle`) does what it does for the
syft template: pass and stage order, the privacy ledger charge before computing, secure
aggregation. The records are read from syft's store once per server process and kept in
memory; stages other than the training/evaluation one never receive them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable

from fedmtl import wire
from fedmtl.datasites.home import write_json_atomic
from fedmtl.errors import FedMTLError

log = logging.getLogger("fedmtl.dataplane")

ROUND_PATH = "/fedmtl/v1/round"
PING_PATH = "/fedmtl/v1/ping"
VERSION = 1
#: requests larger than this are refused before they are decoded (a 16M-parameter model's
#: weights in float32 are 64 MiB; the policy's parameter cap is far lower by default)
MAX_REQUEST_BYTES = 256 << 20
_JOB_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,79}$")
_HEX_KEY = re.compile(r"^[0-9a-f]{64}$")
#: stages whose call reads the records
DATA_STAGES = frozenset({"advertise"})


class DataPlaneRefused(FedMTLError):
    """A data-plane request this datasite refuses (not signed, not approved, a replay...)."""


class DataPlane:
    """The data plane of one datasite (its home, its name, how to read its records)."""

    def __init__(self, home: Path, site: str, load_records: Callable[[], Any]):
        self.home = Path(home)
        self.site = site
        self._load_records = load_records
        self._records: Any = None
        self._records_lock = threading.Lock()
        self._seq_lock = threading.Lock()

    # -- the records, once per process ----------------------------------------------
    def records(self):
        with self._records_lock:
            if self._records is None:
                self._records = self._load_records()
            return self._records

    # -- one request -------------------------------------------------------------------
    def handle(self, raw: bytes) -> bytes:
        """The reply body for one request body. Never raises."""
        try:
            env = self._admit(raw)
        except (wire.WireError, DataPlaneRefused) as e:
            log.warning("data-plane request refused: %s", e)
            return wire.encode({"ok": False, "error": str(e), "kind": type(e).__name__})
        except Exception as e:  # noqa: BLE001 - never leak internals
            log.exception("data-plane admission failed")
            return wire.encode({"ok": False, "error": f"internal error ({type(e).__name__}); see the "
                                "datasite's log", "kind": "InternalError"})
        from fedmtl.datasites import runtime

        stage = env.message.get("stage")
        data = self.records() if stage in DATA_STAGES else None
        reply = runtime.handle(data=data, spec=env.spec, message=env.message)
        try:
            return wire.encode(reply)
        except wire.WireError as e:
            log.exception("data-plane reply not encodable")
            return wire.encode({"ok": False, "error": f"reply not encodable: {e}", "kind": "InternalError"})

    def _admit(self, raw: bytes) -> wire.Envelope:
        env, body, sig = wire.open_request(raw, max_bytes=MAX_REQUEST_BYTES)
        spec = env.spec
        if env.site != self.site or spec.get("site") != self.site:
            raise DataPlaneRefused(f"this datasite is {self.site!r}; the request is for "
                                   f"{env.site!r} (spec: {spec.get('site')!r})")
        if not _JOB_ID.match(env.job_id) or spec.get("job_id") != env.job_id:
            raise DataPlaneRefused(f"job id {env.job_id!r} is malformed or not the spec's")
        key_hex = spec.get("dataplane_key")
        if not isinstance(key_hex, str) or not _HEX_KEY.match(key_hex):
            raise DataPlaneRefused("the job's spec names no data-plane key; this job runs over syft only")
        from fedmtl.privacy.keys import VerifyKey

        wire.verify_request(body, sig, VerifyKey.from_bytes(bytes.fromhex(key_hex)))
        self._check_approved(env)
        self._check_seq(env)
        return env

    def _check_approved(self, env: wire.Envelope) -> None:
        from fedmtl.datasites import site_ledger
        from fedmtl.datasites.autoreview import site_spec_hash

        st = site_ledger.open_ledger(self.home).request(env.job_id)
        if st is None:
            raise DataPlaneRefused(f"job {env.job_id!r} was never reviewed here")
        allowed = {"approved", "finished"} if env.message.get("stage") == "spend" else {"approved"}
        if st.status not in allowed:
            raise DataPlaneRefused(f"job {env.job_id!r} is {st.status}, not approved")
        if st.facts.spec_hash != site_spec_hash(env.spec):
            raise DataPlaneRefused(f"the spec of this request is not the one approved for job {env.job_id!r}")

    def _check_seq(self, env: wire.Envelope) -> None:
        folder = self.home / "jobs" / env.job_id
        path = folder / "dataplane.json"
        with self._seq_lock:
            last = 0
            if path.exists():
                last = int(json.loads(path.read_text()).get("seq", 0))
            if env.seq <= last:
                raise DataPlaneRefused(f"sequence number {env.seq} is not above the last accepted "
                                       f"({last}): a replayed or reordered request is refused")
            folder.mkdir(parents=True, exist_ok=True)
            os.chmod(folder, 0o700)
            write_json_atomic(path, {"seq": int(env.seq)}, mode=0o600)


def records_loader(home: Path, worker) -> Callable[[], Any]:
    """Reads this datasite's private records from syft's store (in this process)."""

    def load():
        from fedmtl.datasites import syftio
        from fedmtl.datasites.autoreview import binding_of

        client = worker.root_client
        _, asset_id = binding_of(home, client)
        with syftio.quiet():
            obj = client.api.services.action.get(asset_id)
            data = getattr(obj, "syft_action_data", obj)
        return data

    return load


def mount(app, plane: DataPlane) -> None:
    """Add the data-plane routes to the datasite's FastAPI ``app``."""
    from fastapi import Request, Response

    media = "application/x-fedmtl"
    # FastAPI reads the handlers' annotations; with postponed evaluation they are strings
    # that must resolve in this module's namespace
    globals().update(Request=Request, Response=Response)

    @app.get(PING_PATH)
    def ping() -> dict[str, Any]:
        return {"fedmtl_dataplane": VERSION, "site": plane.site}

    @app.post(ROUND_PATH)
    async def round_call(request: Request) -> Response:
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_REQUEST_BYTES):
            return Response(wire.encode({"ok": False, "error": "request too large", "kind": "WireError"}),
                            media_type=media, status_code=413)
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > MAX_REQUEST_BYTES:
                return Response(wire.encode({"ok": False, "error": "request too large", "kind": "WireError"}),
                                media_type=media, status_code=413)
            chunks.append(chunk)
        raw = b"".join(chunks)
        from starlette.concurrency import run_in_threadpool

        return Response(await run_in_threadpool(plane.handle, raw), media_type=media)


__all__ = ["DataPlane", "DataPlaneRefused", "MAX_REQUEST_BYTES", "PING_PATH", "ROUND_PATH", "mount", "records_loader"]
