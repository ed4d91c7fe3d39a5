"""Attack class 10 — exhausting a datasite through its data plane: "strangers get nothing
for free; a caller without the job's key cannot make a datasite hold memory or
connections in proportion to what it sends".

The attacker holds raw sockets and, at best, an approved job's site spec (with its public
data-plane key) and keys of its own. Each test fails if the attack works: the server's
resident memory (``/proc/<pid>/status`` VmRSS) grows by more than :data:`RSS_BOUND_MB`, a
connection the attacker leaves half-open is not closed by the server, a body is read
before its request is authenticated (the answer is anything but a refusal), more
requests than the bound are served at once, a replayed sequence number is accepted
after a restart. A legitimate job runs over the data plane while the memory attack lasts
and must complete.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import struct
import threading
import time
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
import security_kit as K

from fedmtl.contract import wire
from fedmtl.datasites.server import dataplane, http_guard
from fedmtl.datasites.server.launch import launch
from fedmtl.privacy.keys import SigningKey
from fedmtl.researcher.dataplane_client import DataPlaneTransport, load_or_create_key

pytestmark = pytest.mark.integration

RSS_BOUND_MB = 100
ATTEMPTS = 30
BIG = 256 << 20
#: how long a socket read waits for the server (closing a slow connection takes
#: HEADER_TIMEOUT_S or BODY_GRACE_S plus a few ticks)
READ_TIMEOUT_S = max(http_guard.HEADER_TIMEOUT_S, http_guard.BODY_GRACE_S) + 30


# ----------------------------------------------------------------------------- helpers


def _pid(h) -> int:
    return int(json.loads((h.home / "server.pid").read_text())["pid"])


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class RssWatch:
    """The largest VmRSS of a process while the block runs (sampled every 0.1 s)."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()

    def __enter__(self) -> "RssWatch":
        self.base = _rss_mb(self.pid)
        self.peak = self.base
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, _rss_mb(self.pid))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mb(self.pid))

    @property
    def growth(self) -> float:
        return self.peak - self.base


def _connect(url: str) -> socket.socket:
    u = urlparse(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=READ_TIMEOUT_S)
    return sock


def _head(url: str, path: str, length: int, headers: dict[str, str]) -> bytes:
    u = urlparse(url)
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (f"POST {path} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: application/x-fedmtl\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


def _read_until_closed(sock: socket.socket) -> tuple[bytes, bool]:
    """(what the server sent, whether it closed the connection) within READ_TIMEOUT_S."""
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data, True
            data += chunk
    except ConnectionResetError:
        return data, True
    except (socket.timeout, TimeoutError):
        return data, False


def _status(data: bytes) -> int | None:
    line = data.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) >= 2 and line[1].isdigit() else None


def _attempt(url: str, headers: dict[str, str], *, declared: int = BIG, send: int = 4 << 20) -> tuple[int | None, bool]:
    """One memory attempt: headers declaring ``declared`` bytes, then up to ``send`` bytes
    of body (as fast as the server takes them). (status read, closed by the server)."""
    with _connect(url) as sock:
        sock.sendall(_head(url, dataplane.ROUND_PATH, declared, headers))
        block, sent = b"\0" * (64 << 10), 0
        try:
            while sent < send:
                sock.sendall(block)
                sent += len(block)
        except OSError:
            pass  # the server closed the connection: the rest is never read
        data, closed = _read_until_closed(sock)
    return _status(data), closed


def _sign_claims(key, **claims) -> str:
    raw = wire.Claims(**claims).to_bytes()

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).decode().rstrip("=")

    return f"{b64(raw)}.{b64(key.sign(wire.AUTH_DOMAIN + raw))}"


def _spend(spec: dict, key, *, seq: int | None = None) -> wire.SignedRequest:
    env = wire.Envelope(job_id=str(spec["job_id"]), site=str(spec["site"]), seq=seq or time.time_ns(), spec=spec,
                        message={"stage": "spend"})
    return wire.sign_request(env, key)


def _post(url: str, req: wire.SignedRequest) -> httpx.Response:
    return httpx.post(url.rstrip("/") + dataplane.ROUND_PATH, content=req.body, headers=req.headers(), timeout=120)


def _approve(federation, purpose: str):
    email = federation.researcher(purpose)
    job = federation.job(K.legit_spec(name=purpose[:12]), email=email)
    job.submit()
    status = job.wait_for_review(timeout=K.DECISION_TIMEOUT)
    assert {v["status"] for v in status.values()} == {"approved"}, status
    return job, load_or_create_key(job.out / "secrets")


def _run(job, key, federation) -> None:
    urls = {n: h.url for n, h in federation.handles.items()}
    transport = DataPlaneTransport(urls, job.site_specs, key)
    try:
        result = job.run(progress=False, transport=transport)
    finally:
        transport.close()
    assert result.rounds_done == int(job.spec.rounds)


@pytest.fixture(scope="module")
def approved(federation):
    """A legit job approved at every site: its spec is the attacker's material."""
    return _approve(federation, "exhaustion")


# ----------------------------------------------------------------------------- memory


def test_unauthenticated_big_bodies_hold_no_memory_while_a_legit_job_runs(federation, approved):
    job, key = approved
    site, h = next(iter(federation.handles.items()))
    wrong = SigningKey.generate()
    # Prepare: one legit job first, so the datasite has loaded its records and models
    warm, warm_key = _approve(federation, "exhaustion-warm")
    _run(warm, warm_key, federation)
    legit, legit_key = _approve(federation, "exhaustion-legit")
    # three kinds of stranger: no header, garbage, a valid-looking header signed by another key
    kinds = [
        {},
        {wire.AUTH_HEADER: "garbage.garbage"},
        {wire.AUTH_HEADER: _sign_claims(wrong, job_id=job.job_id, site=site, seq=time.time_ns(), stage="advertise",
                                        length=BIG, sha256="0" * 64)},
    ]
    results: list[tuple[int | None, bool]] = []
    lock = threading.Lock()

    def attack(i: int) -> None:
        r = _attempt(h.url, kinds[i % len(kinds)])
        with lock:
            results.append(r)

    # Execute: ATTEMPTS parallel 256 MiB attempts while a legit job runs over the data plane
    with RssWatch(_pid(h)) as rss:
        threads = [threading.Thread(target=attack, args=(i,)) for i in range(ATTEMPTS)]
        for t in threads:
            t.start()
        _run(legit, legit_key, federation)
        for t in threads:
            t.join()
    # Assert
    assert len(results) == ATTEMPTS
    assert all(closed for _, closed in results), f"the server kept attack connections open: {results}"
    assert all(s in (None, 401) for s, _ in results), f"an unauthenticated body was answered otherwise: {results}"
    assert rss.growth < RSS_BOUND_MB, f"RSS grew by {rss.growth:.0f} MB under {ATTEMPTS} unauthenticated bodies"


@pytest.mark.parametrize("kind", ["no header", "wrong key", "over the job's limit"])
def test_a_refused_request_is_answered_before_its_body_and_closed(federation, approved, kind):
    job, key = approved
    site, h = next(iter(federation.handles.items()))
    claims = dict(job_id=job.job_id, site=site, seq=time.time_ns(), stage="advertise", length=BIG, sha256="0" * 64)
    headers = {
        "no header": {},
        "wrong key": {wire.AUTH_HEADER: _sign_claims(SigningKey.generate(), **claims)},
        # the job's own key, a length above what the approved model's weights need
        "over the job's limit": {wire.AUTH_HEADER: _sign_claims(key, **claims)},
    }[kind]
    # Execute: headers only; the server must answer without waiting for a byte of body
    with _connect(h.url) as sock:
        sock.sendall(_head(h.url, dataplane.ROUND_PATH, BIG, headers))
        data, closed = _read_until_closed(sock)
    # Assert
    assert _status(data) == {"no header": 401, "wrong key": 401, "over the job's limit": 413}[kind], data[:200]
    assert closed, "the server kept the connection open for the rest of the body"
    reply = wire.decode(data.split(b"\r\n\r\n", 1)[1])
    assert reply["ok"] is False


# ----------------------------------------------------------------------------- slow connections


@pytest.mark.parametrize("what", ["nothing", "half the headers", "half the headers on syft's route"])
def test_half_open_connections_are_closed_by_the_server(federation, what):
    h = next(iter(federation.handles.values()))
    path = "/api/v2/api_call" if "syft" in what else dataplane.ROUND_PATH
    partial = b"" if what == "nothing" else _head(h.url, path, 1000, {})[:-20]
    # Execute: 50 connections that never finish their headers
    socks = [_connect(h.url) for _ in range(50)]
    for s in socks:
        if partial:
            s.sendall(partial)
    outcomes = [_read_until_closed(s) for s in socks]
    for s in socks:
        s.close()
    # Assert
    assert all(closed for _, closed in outcomes), "a half-open connection was left open"
    assert all(_status(d) in (None, 408) for d, _ in outcomes), [d[:60] for d, _ in outcomes]


@pytest.mark.parametrize("route", ["data plane", "syft"])
def test_a_slow_body_is_cut_off(federation, approved, route):
    job, key = approved
    site, h = next(iter(federation.handles.items()))
    length = 100_000  # within a spend request's limit: only the rate is wrong
    if route == "data plane":
        # the job's key and a valid header: only the rate is wrong
        headers = {wire.AUTH_HEADER: _sign_claims(key, job_id=job.job_id, site=site, seq=time.time_ns(),
                                                  stage="spend", length=length, sha256="0" * 64)}
        path = dataplane.ROUND_PATH
    else:
        headers, path = {}, "/api/v2/api_call"
    stop = threading.Event()
    with _connect(h.url) as sock:
        sock.sendall(_head(h.url, path, length, headers))

        def trickle() -> None:
            while not stop.wait(0.5):
                try:
                    sock.sendall(b"x" * 16)
                except OSError:
                    return

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        data, closed = _read_until_closed(sock)
        stop.set()
        t.join()
    assert closed, "a body trickling at 32 bytes/s kept its connection"
    status = _status(data)
    # the data plane's 429/413 would also do, but the header is valid and the job idle: 408
    assert status in (None, 408), data[:200]


# ----------------------------------------------------------------------------- concurrency


def test_requests_beyond_the_per_job_bound_are_refused_at_once(federation, approved):
    job, key = approved
    site, h = next(iter(federation.handles.items()))
    spec = job.site_specs[site]
    per_job = dataplane.MAX_CONCURRENT_PER_JOB
    holders = []
    try:
        # Prepare: per_job authenticated requests that send their headers and hold the body
        for _ in range(per_job):
            req = _spend(spec, key)
            s = _connect(h.url)
            s.sendall(_head(h.url, dataplane.ROUND_PATH, len(req.body), {wire.AUTH_HEADER: req.auth}))
            s.sendall(req.body[:10])
            holders.append((s, req))
        # Execute: one more, complete, while they hold their slots (admission runs in a thread:
        # give the holders a moment to be admitted, and look again)
        statuses = []
        for _ in range(20):
            time.sleep(0.5)
            r = _post(h.url, _spend(spec, key))
            statuses.append(r.status_code)
            if r.status_code == 429:
                break
        # Assert
        assert statuses[-1] == 429, f"more than {per_job} requests of one job were served at once: {statuses}"
        assert wire.decode(r.content)["ok"] is False
    finally:
        for s, req in holders:
            try:
                s.sendall(req.body[10:])
                s.recv(65536)
            except OSError:
                pass
            s.close()
    # the holders, completed, were served (they were never refused)
    assert _post(h.url, _spend(spec, key)).status_code == 200


# ----------------------------------------------------------------------------- hardening


def test_a_deeply_nested_header_is_a_wire_error(federation, approved):
    job, key = approved
    site, h = next(iter(federation.handles.items()))
    depth = 50_000  # far beyond any parser's recursion, within a spend request's size limit
    body = wire.MAGIC + struct.pack(">I", 2 * depth) + b"[" * depth + b"]" * depth
    auth = _sign_claims(key, job_id=job.job_id, site=site, seq=time.time_ns(), stage="spend", length=len(body),
                        sha256=hashlib.sha256(body).hexdigest())
    r = httpx.post(h.url + dataplane.ROUND_PATH, content=body, timeout=60, headers={wire.AUTH_HEADER: auth})
    reply = wire.decode(r.content)
    assert reply["ok"] is False and reply["kind"] == "WireError", reply
    assert "nested" in reply["error"], reply


def test_the_ping_names_no_site(federation):
    for name, h in federation.handles.items():
        r = httpx.get(h.url + dataplane.PING_PATH, timeout=30)
        assert r.status_code == 200
        assert r.json() == {"fedmtl_dataplane": dataplane.VERSION}
        assert name not in r.text


def test_weights_limit_follows_the_approved_model(federation, approved):
    """The advertise limit is the approved model's weights plus a bounded allowance: a
    request with exactly the model's weights fits, one with twice as many does not."""
    job, key = approved
    site, h = next(iter(federation.handles.items()))
    spec = job.site_specs[site]
    n = federation.model_size(spec)
    for size, fits in ((n, True), (2 * n + (1 << 20), False)):
        env = wire.Envelope(job_id=job.job_id, site=site, seq=time.time_ns(), spec=spec,
                            message={"stage": "advertise", "pass": 99, "attempt": 0,
                                     "weights": np.zeros(size, dtype=np.float32)})
        r = _post(h.url, wire.sign_request(env, key))
        assert (r.status_code != 413) is fits, (size, r.status_code)


def test_zz_a_sequence_number_is_refused_after_a_restart(federation, approved):
    """Last in this file: restarts one datasite of the shared federation (same home, port)."""
    job, key = approved
    site, h = next(iter(federation.handles.items()))
    spec = job.site_specs[site]
    req = _spend(spec, key)
    first = _post(h.url, req)
    assert first.status_code == 200 and wire.decode(first.content)["ok"] is True
    # Execute: stop the datasite and launch it again from the same home
    h.stop()
    h2 = launch(home=h.home, port=h.port)
    federation.handles[site] = h2
    again = _post(h2.url, req)
    older = _post(h2.url, _spend(spec, key, seq=req_seq(req) - 1))
    fresh = _post(h2.url, _spend(spec, key))
    # Assert
    for r in (again, older):
        assert r.status_code == 409, r.status_code
        reply = wire.decode(r.content)
        assert reply["ok"] is False and "sequence number" in reply["error"], reply
    assert fresh.status_code == 200 and wire.decode(fresh.content)["ok"] is True


def req_seq(req: wire.SignedRequest) -> int:
    return wire.read_auth(req.auth)[0].seq
