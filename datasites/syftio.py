"""Thin helpers around syft 0.9.5 client calls: quiet output and clear errors.

syft prints banners, tqdm bars, ``SyftSuccess`` lines and warnings on stdout. Every call
fedmtl makes into syft goes through :func:`quiet`, so our users see our output only.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

from fedmtl.errors import CredentialsError, DatasiteError

_SYFT_LOGGERS = ("syft", "uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "kr8s")


def _silence_loggers() -> None:
    for name in _SYFT_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Swallow syft's stdout/stderr chatter (kept in the yielded buffer for debugging)."""
    if os.environ.get("FEDMTL_SYFT_VERBOSE"):
        yield io.StringIO()
        return
    buf = io.StringIO()
    os.environ.setdefault("TQDM_DISABLE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            _silence_loggers()
            yield buf


def import_syft():
    """Import syft quietly (its import prints and warns)."""
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
