"""Thin helpers around syft 0.9.5 client calls: quiet output and clear errors.

syft prints banners, tqdm bars, ``SyftSuccess`` lines and warnings on stdout. Every call
fedmtl makes into syft goes through :func:`quiet`, so our users see our output only.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

from fedmtl.errors import CredentialsError, DatasiteError

#: the name of the records asset in a datasite's dataset (launch publishes it, the
#: reviewer reads its mock)
ASSET_NAME = "records"

_SYFT_LOGGERS = ("syft", "uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "kr8s")


def _silence_loggers() -> None:
    for name in _SYFT_LOGGERS:
        lg = logging.getLogger(name)
        if lg.level != logging.ERROR:  # setLevel clears every logger's cache: only when needed
            lg.setLevel(logging.ERROR)


class _Sink(io.StringIO):
    """Where syft's chatter goes while :func:`quiet` holds it (and is dropped: nothing
    reads it, and a long job must not pile it up). :func:`console` never returns one,
    so a user message cannot end up here."""

    def write(self, s: str) -> int:
        return len(s)


def _process_stream(fd: int):
    """The process's own stream for ``fd`` (1 or 2) as the interpreter opened it, saved
    once at import: the last fallback of :func:`console`."""
    s = sys.__stdout__ if fd == 1 else sys.__stderr__
    if s is None:  # no console (pythonw, some daemons)
        s = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    return s


_PROCESS_STREAMS = (_process_stream(1), _process_stream(2))

# The state of :func:`quiet`, changed only under ``_quiet_lock``:
#   _open_blocks  the quiet() blocks now open (one token each, in any thread)
#   _user_streams (stdout, stderr) as they were before the sink went in; written before
#                 the sink is installed, never a sink, so it is right whenever one is
_quiet_lock = threading.Lock()
_open_blocks: set[object] = set()
_user_streams: tuple | None = None


def _install_sink() -> None:
    global _user_streams
    current = (sys.stdout, sys.stderr)
    if not _open_blocks and not isinstance(current[0], _Sink) and not isinstance(current[1], _Sink):
        # the first block: what it replaces is the user's (later entries may find a
        # stream some library swapped in for a moment). One store, before the sink goes in
        _user_streams = current
    if not (isinstance(sys.stdout, _Sink) and isinstance(sys.stderr, _Sink)):
        sink = _Sink()
        sys.__dict__.update(stdout=sink, stderr=sink)  # both in one C call


def _remove_sink() -> None:
    """Put the user's streams back if a sink is in (idempotent)."""
    if _user_streams is None:
        return
    out, err = _user_streams
    sys.__dict__.update(
        stdout=out if isinstance(sys.stdout, _Sink) else sys.stdout,
        stderr=err if isinstance(sys.stderr, _Sink) else sys.stderr,
    )


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Swallow syft's stdout/stderr chatter while syft calls run.

    Thread-safe: ``sys.stdout`` is process-wide, so nested and concurrent uses (the job
    calls several datasites from threads) swap the streams on the first entry and put
    them back on the last exit. Safe against a signal (Ctrl-C) at any point: the entry
    is undone by the ``finally``, whatever step it had reached, and :func:`console`
    never depends on where it stopped. ``FEDMTL_SYFT_VERBOSE=1`` shows everything.
    """
    if os.environ.get("FEDMTL_SYFT_VERBOSE"):
        yield
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    token = object()
    try:
        with _quiet_lock:
            _install_sink()
            _open_blocks.add(token)
        _silence_loggers()
        yield
    finally:
        with _quiet_lock:
            try:
                _open_blocks.discard(token)
            finally:
                if not _open_blocks:
                    _remove_sink_surely()


def _remove_sink_surely() -> None:
    try:
        _remove_sink()
    except BaseException:
        _remove_sink()  # a Ctrl-C cut the first try short: finish the job, then let it through
        raise


def restore_streams() -> None:
    """Give the user's stdout/stderr back now, whatever state an interrupted
    :func:`quiet` left (the CLI calls it on Ctrl-C, before it says anything)."""
    with _quiet_lock:
        _open_blocks.clear()  # a block cut short before its exit would hold the sink forever
        _remove_sink()


def console(err: bool = False):
    """The user's stream, never syft's quieting sink: the current ``sys.stdout``/``sys.stderr``
    when no :func:`quiet` holds it (so a notebook or a test capturing output sees it),
    else the streams :func:`quiet` replaced (another thread may be inside a syft call, or
    a Ctrl-C may have cut a swap short), else the process's own, saved at import.
    It reads no state that a signal can leave half-written."""
    i = 1 if err else 0
    current = sys.stderr if err else sys.stdout
    if current is not None and not isinstance(current, _Sink):
        return current
    saved = _user_streams
    if saved is not None and saved[i] is not None and not isinstance(saved[i], _Sink):
        return saved[i]
    return _PROCESS_STREAMS[i]


def import_syft():
    """Import syft quietly (its import prints and warns)."""
    warnings.filterwarnings("ignore", module=r"syft(\.|$)")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    with quiet():
        import syft

        # syft's loguru logger writes to stderr; keep only errors.
        try:
            from loguru import logger as _loguru

            _loguru.remove()
        except Exception:  # noqa: BLE001 - loguru is optional for us
            pass
    return syft


def is_error(result: Any) -> bool:
    sy = import_syft()
    return isinstance(result, sy.SyftError)


def check(result: Any, what: str) -> Any:
    """Raise a DatasiteError if a syft call returned a SyftError."""
    if is_error(result):
        raise DatasiteError(f"{what} failed: {getattr(result, 'message', result)}")
    return result


def login(url: str, email: str, password: str):
    """Log in to a datasite, raising CredentialsError / DatasiteError with a clear message."""
    sy = import_syft()
    host, port = split_url(url)
    with quiet():
        try:
            client = sy.login(url=host, port=port, email=email, password=password)
        except Exception as e:  # noqa: BLE001 - syft raises several kinds here
            msg = str(e)
            # the server answered (unknown email: "Item not found", bad password:
            # "Invalid credentials"): a credentials problem, not a connection one
            if type(e).__name__ == "SyftException" or "credentials" in msg.lower():
                raise CredentialsError(
                    f"login to {url} as {email} failed: wrong email or password. "
                    "Ask the datasite's owner to check your account."
                ) from None
            raise DatasiteError(
                f"cannot reach the datasite at {url} ({type(e).__name__}: {msg.splitlines()[0] if msg else ''}); "
                "is it running? `fedmtl datasite status --home ...` tells"
            ) from None
    if is_error(client):
        raise CredentialsError(
            f"login to {url} as {email} failed: {client.message}. Check the email and password."
        )
    return client


def split_url(url: str) -> tuple[str, int]:
    from urllib.parse import urlparse

    p = urlparse(url if "://" in url else f"http://{url}")
    if p.port is None:
        raise DatasiteError(f"datasite URL {url!r} has no port; write it as http://HOST:PORT")
    return f"{p.scheme}://{p.hostname}", p.port
