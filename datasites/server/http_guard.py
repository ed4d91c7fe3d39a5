"""Bounds on every connection of a datasite's HTTP server (uvicorn), whatever its route.

uvicorn 0.34 closes idle kept-alive connections (``timeout_keep_alive``) but has no
deadline for a request's headers or body: a client that opens a connection and sends
nothing, or one byte a second, holds it for ever. :class:`GuardedHTTPProtocol` (given to
uvicorn as ``http=``) watches each connection once a second:

- **headers**: a request's headers (from the connection's start, or from the end of the
  previous response) must arrive within :data:`HEADER_TIMEOUT_S` and be at most
  :data:`MAX_HEADER_BYTES` long (408 / 431, then the connection is closed);
- **body**: after :data:`BODY_GRACE_S`, a body must keep arriving at :data:`MIN_BODY_RATE`
  on average (408 and closed); the clock stops while the server itself does not read;
- **connections**: beyond :data:`MAX_CONNECTIONS` open at once, a new one is closed at once.

:class:`BodyLimit` bounds the bodies of syft's own routes (``/api/v2/...``; the data plane
has its own, per job): at most :func:`syft_body_limit` bytes each, and at most
:data:`SYFT_INFLIGHT_FACTOR` times that being received at once (503 beyond; syft reads a
body whole before it checks who sent it). A datasite's first setup uploads the dataset as
one request body through this server, so until the home's setup is complete the bound is
:data:`FIRST_SETUP_MAX_BODY`; after it, the largest legitimate body is a round call over
syft carrying the model's weights, bounded by the policy's parameter cap.
"""

from __future__ import annotations

import logging
import resource
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from fedmtl.datasites.ledger import site_ledger
from fedmtl.datasites.site import home as home_mod

log = logging.getLogger("fedmtl.http_guard")

#: a request's headers arrive within this many seconds
HEADER_TIMEOUT_S = 10.0
#: and are at most this long (a data-plane auth header is a few hundred bytes)
MAX_HEADER_BYTES = 64 << 10
#: a body may take this long to get going ...
BODY_GRACE_S = 10.0
#: ... then it arrives at this many bytes per second on average, or the connection is closed
MIN_BODY_RATE = 16 << 10
#: connections open at once; a new one beyond is closed at once
MAX_CONNECTIONS = 1024
#: how often each connection is looked at
TICK_S = 1.0
#: idle kept-alive connections are closed after this many seconds (uvicorn's own timer)
KEEP_ALIVE_S = 5
#: the largest body of syft's routes while the home's first setup uploads the dataset
FIRST_SETUP_MAX_BODY = 4 << 30
#: the smallest bound on syft's bodies once set up (code requests, API calls)
SYFT_MIN_BODY = 64 << 20
#: bytes per model parameter a syft round call may carry (weights as float32, serialised,
#: with room for syft's framing)
SYFT_BYTES_PER_PARAM = 16
#: at most this many of the largest syft bodies are received at once
SYFT_INFLIGHT_FACTOR = 8
_RECHECK_S = 5.0


def _response(status: int, reason: str) -> bytes:
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").encode()


class GuardedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol (httptools, else h11) with header and body deadlines, a
    header size cap and a cap on open connections (see the module docs)."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._g_phase = "headers"
        self._g_since = self.loop.time()
        self._g_bytes = 0
        self._g_timer = None
        if len(self.connections) > MAX_CONNECTIONS:
            log.warning("more than %d connections open; a new one is closed", MAX_CONNECTIONS)
            transport.close()
            return
        self._g_timer = self.loop.call_later(TICK_S, self._g_tick)

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_g_timer", None) is not None:
            self._g_timer.cancel()
            self._g_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        phase = self._g_observe()
        self._g_bytes += len(data)
        super().data_received(data)
        # still no complete headers after this much: a header flood
        if phase == "headers" and self._g_bytes > MAX_HEADER_BYTES and self._g_current() == "headers" \
                and self.transport is not None and not self.transport.is_closing():
            self._g_cut(431, "Request Header Fields Too Large")

    def _g_current(self) -> str:
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return "headers"
        if cycle.more_body:
            return "body"
        return "app"

    def _g_observe(self) -> str:
        phase = self._g_current()
        if phase != self._g_phase:
            self._g_phase, self._g_since, self._g_bytes = phase, self.loop.time(), 0
        return phase

    def _g_tick(self) -> None:
        self._g_timer = None
        if self.transport is None or self.transport.is_closing():
            return
        phase = self._g_observe()
        now = self.loop.time()
        if phase == "body" and self.flow is not None and self.flow.read_paused:
            # the server is not reading (the app has not taken what it has): not the client's delay
            self._g_since, self._g_bytes = now, 0
        elapsed = now - self._g_since
        if phase == "headers" and elapsed > HEADER_TIMEOUT_S:
            self._g_cut(408, "Request Timeout")
            return
        if phase == "body" and elapsed > BODY_GRACE_S and self._g_bytes < MIN_BODY_RATE * (elapsed - BODY_GRACE_S):
            self._g_cut(408, "Request Timeout")
            return
        self._g_timer = self.loop.call_later(TICK_S, self._g_tick)

    def _g_cut(self, status: int, reason: str) -> None:
        cycle = self.cycle
        started = cycle is not None and not cycle.response_complete and cycle.response_started
        if not started and (cycle is None or not cycle.response_complete or self._g_bytes):
            try:
                self.transport.write(_response(status, reason))
            except Exception:  # noqa: BLE001 - closing anyway
                pass
        self.transport.close()


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft limit of open files to its hard limit (capped at
    65,536 when unlimited), so that many connections do not break ``accept``.

    Returns:
        The (soft, hard) limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-file limit to %s: %s", target, e)
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def uvicorn_options() -> dict[str, Any]:
    """The keyword arguments of ``uvicorn.Config``/``uvicorn.run`` that bound connections."""
    return {
        "http": GuardedHTTPProtocol,
        "timeout_keep_alive": KEEP_ALIVE_S,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
    }


def syft_body_limit(home: Path) -> Callable[[], int]:
    """``() -> bytes``: the bound on one body of syft's routes for the datasite at ``home``
    (re-read every few seconds: the setup completes, the policy changes)."""
    state: dict[str, Any] = {"at": -1e9, "value": FIRST_SETUP_MAX_BODY}
    lock = threading.Lock()

    def limit() -> int:
        with lock:
            now = time.monotonic()
            if now - state["at"] < _RECHECK_S:
                return state["value"]
            state["at"] = now
            try:
                if not home_mod.read_config(home).get("setup_complete"):
                    state["value"] = FIRST_SETUP_MAX_BODY
                else:
                    params = int(site_ledger.current_policy(home).max_model_params)
                    state["value"] = max(SYFT_MIN_BODY, SYFT_BYTES_PER_PARAM * params + (16 << 20))
            except Exception:  # noqa: BLE001 - keep the last bound; the datasite's own checks report
                log.exception("could not derive the bound on syft's request bodies")
            return state["value"]

    return limit


Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body above ``limit()`` bytes is refused (413, before it is
    read when its ``Content-Length`` says so), and bodies being received at once hold at most
    ``SYFT_INFLIGHT_FACTOR * limit()`` bytes (503 beyond). Paths under ``exempt`` pass
    untouched (the data plane bounds its bodies per job).

    Args:
        app: the ASGI app.
        limit: the bound on one body, in bytes.
        exempt: path prefixes this middleware leaves alone.
    """

    def __init__(self, app, *, limit: Callable[[], int], exempt: tuple[str, ...] = ()):
        self.app = app
        self.limit = limit
        self.exempt = tuple(exempt)
        self._lock = threading.Lock()
        self._inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("method") in ("GET", "HEAD") or \
                str(scope.get("path", "")).startswith(self.exempt):
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        declared = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                declared = int(value) if value.isdigit() else limit + 1
        if declared is not None and declared > limit:
            await _refuse(send, 413, f"request body of {declared} bytes; this datasite takes at most {limit}")
            return
        claim = declared if declared is not None else limit
        with self._lock:
            if self._inflight + claim > SYFT_INFLIGHT_FACTOR * limit:
                busy = True
            else:
                busy, self._inflight = False, self._inflight + claim
        if busy:
            await _refuse(send, 503, "too many large requests at once; retry shortly")
            return
        seen = 0
        started = False

        async def counted_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return message

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message.get("type") == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if not started:
                await _refuse(send, 413, f"request body above {limit} bytes")
        finally:
            with self._lock:
                self._inflight -= claim


async def _refuse(send: Send, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


__all__ = ["BODY_GRACE_S", "BodyLimit", "GuardedHTTPProtocol", "HEADER_TIMEOUT_S", "MAX_CONNECTIONS",
           "MAX_HEADER_BYTES", "MIN_BODY_RATE", "raise_open_file_limit", "syft_body_limit", "uvicorn_options"]
