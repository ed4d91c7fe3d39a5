"""The researcher's side of the round data plane (see :mod:`fedmtl.datasites.server.dataplane`).

:class:`DataPlaneTransport` sends each stage's message of an approved job straight to the
datasite's ``/fedmtl/v1/round`` endpoint: one HTTP request on a kept-alive connection,
signed with the job's own Ed25519 key (its public half is in the approved spec), with a
strictly increasing sequence number per site. It is a
:class:`~fedmtl.contract.transport.Transport`, like the syft transport, so
:func:`fedmtl.contract.passes.run_pass` runs unchanged over either.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from fedmtl.contract import wire
from fedmtl.datasites.server.dataplane import PING_PATH, ROUND_PATH, VERSION

KEY_FILE = "dataplane.key"
#: how long a request refused as one too many at once (HTTP 429) is sent again, with
#: back-off (a site serves a few requests at once; a busy one is not a dropout)
BUSY_WAIT_S = 60.0


def _verify_option():
    # the same trust store the syft client (requests) is told to use
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE") or True


def load_or_create_key(folder: Path):
    """The job's data-plane signing key in ``folder`` (0600), made on first use."""
    from fedmtl.privacy.keys import SigningKey, load_private_key, save_private_key

    path = Path(folder) / KEY_FILE
    if path.exists():
        return SigningKey.from_bytes(load_private_key(path))
    key = SigningKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    save_private_key(path, key.to_bytes())
    return key


def offers_dataplane(url: str, *, timeout: float = 5.0) -> bool:
    """Whether the datasite at ``url`` serves this version of the data plane."""
    import httpx

    try:
        r = httpx.get(url.rstrip("/") + PING_PATH, timeout=timeout, verify=_verify_option())
        return r.status_code == 200 and r.json().get("fedmtl_dataplane") == VERSION
    except Exception:  # noqa: BLE001 - not offered, or not reachable: the syft path decides
        return False


class DataPlaneTransport:
    """A :class:`~fedmtl.contract.transport.Transport` over the data plane.

    Args:
        urls: site -> the datasite's base URL.
        site_specs: site -> the approved site spec (its ``job_id`` and ``dataplane_key``).
        signing_key: the job's data-plane :class:`~fedmtl.privacy.keys.SigningKey`.
        timeout: seconds one request may take.
    """

    name = "dataplane"

    def __init__(self, urls: Mapping[str, str], site_specs: Mapping[str, dict], signing_key, *,
                 timeout: float = 3600.0):
        import httpx

        self.site_specs = dict(site_specs)
        self.key = signing_key
        self._clients = {s: httpx.Client(base_url=u.rstrip("/"), timeout=timeout, verify=_verify_option())
                         for s, u in urls.items()}
        self._seq: dict[str, int] = {}
        self._lock = threading.Lock()
        self.requests = 0

    def _next_seq(self, site: str) -> int:
        with self._lock:
            # wall-clock nanoseconds: still increasing after this process restarts
            seq = max(self._seq.get(site, 0) + 1, time.time_ns())
            self._seq[site] = seq
            self.requests += 1
            return seq

    def call(self, site: str, message: Mapping[str, Any]) -> dict[str, Any]:
        """Send one stage's ``message`` to ``site``; its reply (``{"ok": False, ...}`` when
        the site refuses or cannot be reached: a dropout). A request refused as one too
        many at once (HTTP 429) is sent again, with back-off, for up to :data:`BUSY_WAIT_S`
        seconds."""
        spec = self.site_specs[site]
        env = wire.Envelope(job_id=str(spec["job_id"]), site=site, seq=self._next_seq(site), spec=spec,
                            message=dict(message))
        try:
            req = wire.sign_request(env, self.key)
            deadline = time.monotonic() + BUSY_WAIT_S
            attempt = 0
            while True:
                r = self._clients[site].post(ROUND_PATH, content=req.body, headers=req.headers())
                if r.status_code != 429 or time.monotonic() >= deadline:
                    break
                # exponential back-off, capped, with jitter so that waiting jobs spread out
                time.sleep(min(2.0, 0.05 * 2 ** attempt) * (0.5 + random.random()))
                attempt += 1
        except Exception as e:  # noqa: BLE001 - a site that fails is a dropout
            return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                    "kind": "Unreachable"}
        try:
            out = wire.decode(r.content)
        except wire.WireError as e:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code} from {site}'s data plane", "kind": "Unreachable"}
            return {"ok": False, "error": f"unreadable reply: {e}", "kind": "Unreachable"}
        if not isinstance(out, dict):
            return {"ok": False, "error": "reply is not a table", "kind": "Unreachable"}
        if r.status_code != 200 and out.get("ok") is not False:
            return {"ok": False, "error": f"HTTP {r.status_code} from {site}'s data plane", "kind": "Unreachable"}
        return out

    def close(self) -> None:
        for c in self._clients.values():
            c.close()


__all__ = ["DataPlaneTransport", "load_or_create_key", "offers_dataplane"]
