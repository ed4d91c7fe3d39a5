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

_SYFT_LOGGERS = ("syft", "uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "kr8s")


def _silence_loggers() -> None:
    for name in _SYFT_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


_quiet_lock = threading.Lock()
_quiet_depth = 0
_saved_streams: tuple = ()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Swallow syft's stdout/stderr chatter while syft calls run.

    Thread-safe: ``sys.stdout`` is process-wide, so nested and concurrent uses (the job
    calls several datasites from threads) swap the streams once, on the outermost entry,
    and restore them on the last exit. ``FEDMTL_SYFT_VERBOSE=1`` shows everything.
    """
    global _quiet_depth, _saved_streams
    if os.environ.get("FEDMTL_SYFT_VERBOSE"):
        yield
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    with _quiet_lock:
        if _quiet_depth == 0:
            _saved_streams = (sys.stdout, sys.stderr)
            sink = io.StringIO()
            sys.stdout = sys.stderr = sink
            _silence_loggers()
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                sys.stdout, sys.stderr = _saved_streams


def console(err: bool = False):
    """The user's terminal stream, also while :func:`quiet` holds syft's output (another
    thread may be inside a syft call when we need to tell the user something)."""
    with _quiet_lock:
        if _quiet_depth > 0 and _saved_streams:
            return _saved_streams[1 if err else 0]
    return sys.stderr if err else sys.stdout


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
