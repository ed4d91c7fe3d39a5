"""The owner's control socket of a running datasite: status and researcher accounts in
well under a second, without importing syft or logging in.

The server process already holds syft's root client; it listens on ``HOME/control.sock``,
a Unix socket created with mode 0600 inside the owner's home. Whoever can connect to it
can already read ``HOME/secrets/admin_password``, so it grants nothing new. One request per
connection: a JSON line ``{"op": ..., ...}``, answered by a JSON line ``{"ok": true, ...}``
or ``{"ok": false, "error": ...}``.

Operations: ``status`` (datasets, researchers, pending requests) and ``add_researcher``
(email, password, name, institution), both run by :mod:`fedmtl.datasites.server.accounts` with the
server's root client, and ``review_list`` (``include_decided``: the requests ``fedmtl datasite
review --list`` prints, from the listing function the server process passes to :func:`serve`,
:func:`fedmtl.datasites.review.manual_review.list_requests`; read-only). :mod:`fedmtl.datasites.server.admin`
uses the socket when it answers and falls back to a syft login otherwise (an older server, a
foreign home).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from fedmtl.datasites.server import accounts

SOCKET = "control.sock"
#: where the socket is when HOME's path is too long for a Unix socket (108 bytes on Linux)
POINTER = "control.sock.path"
MAX_SOCKET_PATH = 100
MAX_REQUEST = 64 * 1024
log = logging.getLogger("fedmtl.control")

_stop = threading.Event()
_thread: threading.Thread | None = None


def socket_path(home: Path) -> Path:
    """Where this home's control socket is: ``HOME/control.sock``, or, for a home whose
    path is too long for a Unix socket, the path written in ``HOME/control.sock.path``."""
    pointer = Path(home) / POINTER
    if pointer.is_file():
        return Path(pointer.read_text(encoding="utf-8").strip())
    return Path(home) / SOCKET


def _bind_path(home: Path) -> Path:
    path = Path(home) / SOCKET
    (Path(home) / POINTER).unlink(missing_ok=True)
    if len(str(path)) <= MAX_SOCKET_PATH:
        return path
    short = Path(tempfile.mkdtemp(prefix="fedmtl-ctl-")) / "s"  # a fresh 0700 folder
    pointer = Path(home) / POINTER
    pointer.write_text(str(short), encoding="utf-8")
    os.chmod(pointer, 0o600)
    return short


# ----------------------------------------------------------------------------- server side


#: what ``review_list`` runs: ``(home, *, client, include_decided) -> [RequestSummary, ...]``
ListRequests = Callable[..., list]


def serve(home: Path, worker, *, admin_email: str, list_requests: ListRequests | None = None) -> None:
    """Start answering on ``HOME/control.sock`` in a daemon thread (server process only).

    Args:
        home: the datasite's home.
        worker: syft's server worker (its ``root_client`` runs the operations).
        admin_email: the owner's account, left out of the researcher list.
        list_requests: the manual reviewer's listing function
            (:func:`fedmtl.datasites.review.manual_review.list_requests`); without it there is
            no ``review_list`` operation. It is passed in, not imported, so that the owner's
            commands that import this module for :func:`call` stay free of torch and syft.
    """
    global _thread
    path = _bind_path(home)
    path.unlink(missing_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is created owner-only, never briefly wider
    try:
        srv.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    srv.listen(8)
    srv.settimeout(0.5)
    _stop.clear()
    ops = _operations(worker, admin_email, home=Path(home), list_requests=list_requests)

    def loop() -> None:
        while not _stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            with conn:
                conn.settimeout(30)
                _answer(conn, ops)
        srv.close()
        path.unlink(missing_ok=True)
        if path.parent.name.startswith("fedmtl-ctl-"):
            (Path(home) / POINTER).unlink(missing_ok=True)
            try:
                path.parent.rmdir()
            except OSError:
                pass

    _thread = threading.Thread(target=loop, name="fedmtl-control", daemon=True)
    _thread.start()


def stop_serving() -> None:
    _stop.set()
    if _thread is not None:
        _thread.join(timeout=2)


def _answer(conn: socket.socket, ops: dict[str, Callable[..., dict[str, Any]]]) -> None:
    try:
        raw = _read_line(conn)
        req = json.loads(raw)
        if not isinstance(req, dict) or req.get("op") not in ops:
            raise ValueError(f"unknown operation; known: {sorted(ops)}")
        args = {k: v for k, v in req.items() if k != "op"}
        reply = {"ok": True, **ops[req["op"]](**args)}
    except Exception as e:  # noqa: BLE001 - every failure is an answer, never a crash
        reply = {"ok": False, "error": str(e)[:2000]}
    try:
        conn.sendall(json.dumps(reply).encode("utf-8") + b"\n")
    except OSError:
        pass


def _read_line(conn: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too large")
    return buf


def _operations(worker, admin_email: str, *, home: Path | None = None,
                list_requests: ListRequests | None = None) -> dict[str, Callable[..., dict[str, Any]]]:
    lock = threading.Lock()
    state: dict[str, Any] = {}

    def client():
        if "client" not in state:
            state["client"] = worker.root_client
        return state["client"]

    def status() -> dict[str, Any]:
        with lock:
            return accounts.server_view(client(), admin_email=admin_email)

    def add_researcher(*, email: str, password: str, name: str | None = None,
                       institution: str = "") -> dict[str, Any]:
        with lock:
            accounts.register_researcher(client(), email=email, password=password, name=name,
                                         institution=institution)
            return {"email": email}

    ops: dict[str, Callable[..., dict[str, Any]]] = {"status": status, "add_researcher": add_researcher}
    if list_requests is not None and home is not None:

        def review_list(*, include_decided: bool = False) -> dict[str, Any]:
            if not isinstance(include_decided, bool):
                raise ValueError(f"include_decided must be true or false, got {include_decided!r}")
            with lock:
                rows = list_requests(home, client=client(), include_decided=include_decided)
            return {"requests": [r.to_dict() for r in rows]}

        ops["review_list"] = review_list
    return ops


# ----------------------------------------------------------------------------- client side


def call(home: Path, op: str, *, timeout: float = 60.0, **args: Any) -> dict[str, Any] | None:
    """Ask the running datasite of ``home``; ``None`` when no control socket answers (the
    caller then falls back to a syft login). Raises ``RuntimeError`` with the server's
    message when the operation failed."""
    path = socket_path(home)
    if not path.exists():
        return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        s.sendall(json.dumps({"op": op, **args}).encode("utf-8") + b"\n")
        raw = _read_line(s)
    except (ConnectionRefusedError, FileNotFoundError):
        return None
    finally:
        s.close()
    reply = json.loads(raw)
    if not reply.get("ok"):
        raise RuntimeError(reply.get("error") or "the datasite refused the request")
    return reply
