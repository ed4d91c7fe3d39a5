"""Attack class 7 — the round data plane: "only the researcher who submitted an approved
job can drive it, only within what was approved, and records never leave".

The datasites serve ``POST /fedmtl/v1/round`` (fedmtl.datasites.server.dataplane). An attacker
who read the source holds: a researcher account, the approved job's site spec (it is in
their own request; or anyone's spec if they can guess it), any key of their own, raw HTTP.
Each attack below fails if the datasite executes anything: a reply ``ok=True`` or a new
file/charge in the job's folder or ledger counts as success of the attack.
"""

from __future__ import annotations

import copy
import struct
import threading

import httpx
import numpy as np
import pytest
import security_kit as K

pytestmark = pytest.mark.integration


def _wire():
    from fedmtl.contract import wire

    return wire


def _plane():
    from fedmtl.datasites.server import dataplane

    return dataplane


def _post(url: str, req, **headers) -> httpx.Response:
    """POST a :class:`fedmtl.contract.wire.SignedRequest` (its body and auth header), or raw bytes."""
    body, auth = (req.body, req.headers()) if hasattr(req, "auth") else (req, {})
    return httpx.post(url.rstrip("/") + _plane().ROUND_PATH, content=body, timeout=120,
                      headers={"content-type": "application/x-fedmtl", **auth, **headers})


def _reply(r: httpx.Response) -> dict:
    assert r.status_code in (200, 400, 401, 403, 409, 413, 429), r.status_code
    reply = _wire().decode(r.content)
    if r.status_code != 200:
        assert reply.get("ok") is False, (r.status_code, reply)
    return reply


def _signed(spec: dict, message: dict, key, *, site: str | None = None, seq: int | None = None):
    import time

    w = _wire()
    env = w.Envelope(job_id=str(spec["job_id"]), site=site or str(spec["site"]),
                     seq=seq if seq is not None else time.time_ns(), spec=spec, message=message)
    return w.sign_request(env, key)


def _signed_raw(spec: dict, body: bytes, key, *, stage: str = "spend"):
    """Any bytes as a body, with an auth header the job's key really signed (the key's
    holder sending garbage): only the decoder stands between it and the runtime."""
    import base64
    import hashlib
    import time

    w = _wire()
    claims = w.Claims(job_id=str(spec["job_id"]), site=str(spec["site"]), seq=time.time_ns(), stage=stage,
                      length=max(1, len(body)), sha256=hashlib.sha256(body).hexdigest())
    raw = claims.to_bytes()

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).decode().rstrip("=")

    return w.SignedRequest(body=body, auth=f"{b64(raw)}.{b64(key.sign(w.AUTH_DOMAIN + raw))}")


def _charges(home, job_id: str) -> int:
    st = K.site_ledger().open_ledger(home).request(job_id)
    return 0 if st is None else len(st.records)


def _refused(reply: dict, *needles: str) -> None:
    assert reply.get("ok") is not True, f"the datasite executed the attack: {reply}"
    assert K.leak_of(reply) is None
    text = str(reply.get("error", "")).lower()
    assert any(n.lower() in text for n in needles), f"refused for another reason than expected: {reply}"


@pytest.fixture(scope="module")
def approved(federation):
    """A legit job, approved at every site, not run yet; its key and specs."""
    from fedmtl.researcher.dataplane_client import load_or_create_key

    email = federation.researcher("dataplane")
    job = federation.job(K.legit_spec(name="plane"), email=email)
    job.submit()
    status = job.wait_for_review(timeout=K.DECISION_TIMEOUT)
    assert {v["status"] for v in status.values()} == {"approved"}, status
    return job, load_or_create_key(job.out / "secrets")


def _weights(federation, spec) -> np.ndarray:
    return np.zeros(federation.model_size(spec), dtype=np.float32)


def _advertise(federation, spec, p: int = 1) -> dict:
    return {"stage": "advertise", "pass": p, "attempt": 0, "weights": _weights(federation, spec)}


# ---------------------------------------------------------------------------------- keys


def test_a_request_signed_with_another_key_is_refused(federation, approved):
    from fedmtl.privacy.keys import SigningKey

    job, _ = approved
    site, h = next(iter(federation.handles.items()))
    spec = job.site_specs[site]
    before = _charges(h.home, job.job_id)
    r = _reply(_post(h.url, _signed(spec, _advertise(federation, spec), SigningKey.generate())))
    _refused(r, "signature")
    assert _charges(h.home, job.job_id) == before


def test_the_attackers_own_key_in_the_spec_is_not_the_approved_spec(federation, approved):
    from fedmtl.privacy.keys import SigningKey

    job, _ = approved
    site, h = next(iter(federation.handles.items()))
    mine = SigningKey.generate()
    spec = copy.deepcopy(job.site_specs[site])
    spec["dataplane_key"] = mine.verify_key.to_bytes().hex()
    r = _reply(_post(h.url, _signed(spec, _advertise(federation, spec), mine)))
    # the site verifies with the key of the spec it approved, never one the request brings
    _refused(r, "not the one approved", "signature")
    assert _charges(h.home, job.job_id) == 0


@pytest.mark.parametrize("field", ["max_count", "roster", "job_rounds", "schema_range"])
def test_any_other_field_of_the_approved_spec_is_refused(federation, approved, field):
    job, key = approved
    site, h = next(iter(federation.handles.items()))
    spec = copy.deepcopy(job.site_specs[site])
    if field == "max_count":
        spec["max_count"] = int(spec["max_count"]) + 1
    elif field == "roster":
        spec["roster"] = {k: v for k, v in list(spec["roster"].items())[:2]}
    elif field == "job_rounds":
        spec["job"]["rounds"] = int(spec["job"]["rounds"]) + 5
    else:
        col = next(c for c in spec["schema"]["columns"] if c.get("type") == "numeric" and "max" in c)
        col["max"] = float(col["max"]) * 10
    r = _reply(_post(h.url, _signed(spec, _advertise(federation, spec), key)))
    _refused(r, "not the one approved")
    assert _charges(h.home, job.job_id) == 0


def test_a_spec_for_another_site_is_refused(federation, approved):
    job, key = approved
    (a, ha), (b, hb) = list(federation.handles.items())[:2]
    spec = job.site_specs[a]
    r = _reply(_post(hb.url, _signed(spec, _advertise(federation, spec), key)))
    _refused(r, "this datasite is")
    r = _reply(_post(hb.url, _signed(spec, _advertise(federation, spec), key, site=b)))
    _refused(r, "this datasite is")
    assert _charges(hb.home, job.job_id) == 0


def test_a_job_that_was_never_approved_is_refused(federation):
    from fedmtl.researcher.dataplane_client import load_or_create_key

    email = federation.researcher("dataplane-unreviewed")
    job = federation.job(K.legit_spec(name="never"), email=email)  # created, never submitted
    key = load_or_create_key(job.out / "secrets")
    site, h = next(iter(federation.handles.items()))
    spec = job.site_specs[site]
    _refused(_reply(_post(h.url, _signed(spec, _advertise(federation, spec), key))), "never reviewed")
    assert not (h.home / "jobs" / job.job_id).exists(), "an unapproved job left state on the datasite"


def test_a_spec_without_a_dataplane_key_runs_over_syft_only(federation, approved):
    from fedmtl.privacy.keys import SigningKey

    job, _ = approved
    site, h = next(iter(federation.handles.items()))
    spec = copy.deepcopy(job.site_specs[site])
    del spec["dataplane_key"]
    r = _reply(_post(h.url, _signed(spec, _advertise(federation, spec), SigningKey.generate())))
    _refused(r, "no data-plane key", "signature")


# ---------------------------------------------------------------------------------- bodies


def test_malformed_bodies_are_refused_before_anything_runs(federation, approved):
    job, key = approved
    w = _wire()
    site, h = next(iter(federation.handles.items()))
    spec = job.site_specs[site]
    good = _signed(spec, {"stage": "spend"}, key)
    header = b'{"v":{"$a":0,"dtype":"object","shape":[1]},"buffers":[8]}'
    bodies = {
        "empty": b"",
        "garbage": b"\x80\x04\x95" + b"x" * 100,  # a pickle opcode stream
        "bad magic": b"NOTFMTL" + good.body[7:],
        "truncated": good.body[: len(good.body) // 2],
        "object dtype (pickle)": w.MAGIC + struct.pack(">I", len(header)) + header + b"\x00" * 8,
        "trailing bytes": good.body + b"zz",
        "deep JSON": w.MAGIC + struct.pack(">I", 100_000) + b"[" * 50_000 + b"]" * 50_000,
    }
    for name, body in bodies.items():
        r = _reply(_post(h.url, _signed_raw(spec, body, key)))
        assert r.get("ok") is not True, f"{name}: executed"
        assert r.get("kind") in ("WireError", "DataPlaneRefused"), f"{name}: {r}"
    # the key holder's own header on a body that is not the one it signed
    flipped = good.body[:40] + bytes([good.body[40] ^ 1]) + good.body[41:]
    r = _post(h.url, flipped, **{w.AUTH_HEADER: good.auth})
    assert r.status_code == 400, r.status_code
    _refused(_reply(r), "not the one its signed header declares")


def test_an_oversized_unsigned_request_is_refused_unread(federation):
    """A body announced above the limit without a signed header is answered before it is
    read, and the connection is closed (raw socket: the attacker sends only the headers)."""
    import socket
    from urllib.parse import urlparse

    plane = _plane()
    h = next(iter(federation.handles.values()))
    u = urlparse(h.url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        sock.sendall((f"POST {plane.ROUND_PATH} HTTP/1.1\r\nHost: {u.hostname}\r\n"
                      f"Content-Length: {plane.MAX_REQUEST_BYTES + 1}\r\n\r\n").encode() + b"x" * 1024)
        answer = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break  # the server closed the connection
            answer += chunk
    status_line = answer.split(b"\r\n")[0]
    assert b" 401 " in status_line + b" ", status_line


# ---------------------------------------------------------------------------------- order


def test_a_replayed_request_is_refused(federation, approved):
    job, key = approved
    site, h = next(iter(federation.handles.items()))
    spec = job.site_specs[site]
    body = _signed(spec, {"stage": "spend"}, key)
    first = _reply(_post(h.url, body))
    assert first.get("ok") is True, first  # the owner of the key may read their own spend
    again = _reply(_post(h.url, body))  # the same signed header and body again
    _refused(again, "sequence number")
    older = _reply(_post(h.url, _signed(spec, {"stage": "spend"}, key, seq=1)))
    _refused(older, "sequence number")


def test_the_legit_job_runs_over_the_data_plane_and_releases_nothing_per_site(federation, approved):
    """Last: runs the approved job to its end over the data plane, recording every reply."""
    from fedmtl.researcher.dataplane_client import DataPlaneTransport

    job, key = approved
    urls = {n: h.url for n, h in federation.handles.items()}

    class Recorder(DataPlaneTransport):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.replies, self._rlock = [], threading.Lock()

        def call(self, site, message):
            reply = super().call(site, message)
            with self._rlock:
                self.replies.append((site, message.get("stage"), message.get("pass"), reply))
            return reply

    rec = Recorder(urls, job.site_specs, key)
    result = job.run(progress=False, transport=rec)
    failed = [(s, st, p, r.get("error")) for s, st, p, r in rec.replies if not r.get("ok")]
    assert not failed, failed
    assert result.rounds_done == int(job.spec.rounds)
    leaks = [f"{s} {st} pass {p}: {k}" for s, st, p, r in rec.replies for k in K.forbidden_keys(r)]
    assert not leaks, leaks
    for s, st, p, r in rec.replies:
        assert K.leak_of({k: v for k, v in r.items() if k != "ok"}) is None, (s, st, p)
    # the runtime's own limits hold on this path too: beyond the approved passes, replays
    site, h = next(iter(federation.handles.items()))
    spec = job.site_specs[site]
    last = max(int(p) for _, _, p, _ in rec.replies if p is not None)
    beyond = rec.call(site, _advertise(federation, spec, p=last + 1))
    _refused(beyond, "not approved", "beyond the approved", "finished")
    replay = rec.call(site, _advertise(federation, spec, p=1))
    _refused(replay, "not approved", "replay", "finished")
    # every site charged the job in its ledger, and finished it
    for name, hh in federation.handles.items():
        led = K.site_ledger().open_ledger(hh.home)
        assert led.request_status(job.job_id) == "finished", name
        assert _charges(hh.home, job.job_id) > 0, name
