"""Who may use the review console: the owner who launched it, from their own browser.

Threats it answers (the researcher is malicious and controls every string a request
carries; other local users and web pages the owner visits may try the console's port):

* **A per-launch secret.** :class:`Guard` draws a random token when the console starts;
  the command prints it once, in the URL to open. The first visit exchanges it for an
  HttpOnly, ``SameSite=Strict`` session cookie (and redirects to drop it from the address
  bar). Every page and every change needs that cookie; tokens and cookies are compared
  in constant time (:func:`hmac.compare_digest`).
* **CSRF.** Every change is a POST that must carry the session's CSRF token in a form
  field, *and* an ``Origin`` (or, without one, a ``Referer``) naming the console itself.
* **DNS rebinding.** A request whose ``Host`` is not the console's own address is refused.
* **Headers.** A Content-Security-Policy without any script, ``X-Frame-Options: DENY``,
  ``nosniff``, ``no-store`` (see :data:`SECURITY_HEADERS`).

This module is pure (no FastAPI): :mod:`fedmtl.datasites.console.app` calls it.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import threading
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import urlsplit

COOKIE = "fedmtl_console"
CSRF_FIELD = "csrf"
#: every response carries these; no page of the console runs script, so none is allowed
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'none'; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'; img-src 'self' data:; style-src 'self'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # same-origin: our own POSTs still carry Origin/Referer, nothing leaks to other sites
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_MAX_SESSIONS = 32


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only listens on this machine.

    Args:
        host: the address the console would bind.

    Returns:
        True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1).
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Session:
    """One browser's session: the cookie's value and its CSRF token."""

    sid: str
    csrf: str


class Guard:
    """The console's secret, its sessions and the checks every request passes.

    Args:
        host: the address the console listens on (what ``Host`` and ``Origin`` must name).
        port: its port.
        token: the per-launch secret (default: 32 random bytes, URL-safe).
    """

    def __init__(self, host: str, port: int, *, token: str | None = None):
        self.host = host
        self.port = int(port)
        self.token = token or secrets.token_urlsafe(32)
        self._sessions: list[Session] = []
        self._lock = threading.Lock()

    # -- the secret and sessions -----------------------------------------------------------
    @property
    def origin(self) -> str:
        """``http://HOST:PORT``, as a browser sends it in ``Origin``."""
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{h}:{self.port}"

    def launch_url(self) -> str:
        """The URL the command prints once: the console with its secret."""
        return f"{self.origin}/?token={self.token}"

    def token_ok(self, given: str | None) -> bool:
        """Whether ``given`` is this launch's secret (constant time)."""
        return isinstance(given, str) and hmac.compare_digest(given.encode(), self.token.encode())

    def new_session(self) -> Session:
        """A fresh session (cookie value and CSRF token); the oldest goes beyond 32."""
        s = Session(sid=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32))
        with self._lock:
            self._sessions = [*self._sessions[-(_MAX_SESSIONS - 1):], s]
        return s

    def session(self, cookie: str | None) -> Session | None:
        """The session whose id is ``cookie`` (each compared in constant time), or None."""
        if not isinstance(cookie, str) or not cookie:
            return None
        found = None
        with self._lock:
            for s in self._sessions:
                if hmac.compare_digest(cookie.encode(), s.sid.encode()):
                    found = s
        return found

    # -- request checks ----------------------------------------------------------------------
    def host_ok(self, host_header: str | None) -> bool:
        """Whether ``Host`` names the console (refuses DNS-rebound names)."""
        if not host_header:
            return False
        allowed = {f"{self.host}:{self.port}", f"[{self.host}]:{self.port}"}
        if is_loopback(self.host):
            allowed |= {f"localhost:{self.port}", f"127.0.0.1:{self.port}"}
        return host_header.lower() in allowed

    def same_origin(self, headers: Mapping[str, str]) -> bool:
        """Whether a POST comes from the console's own pages: its ``Origin`` is the
        console's; without an ``Origin``, its ``Referer`` is a console URL. Neither: refused."""
        origins = {self.origin}
        if is_loopback(self.host):
            origins |= {f"http://localhost:{self.port}", f"http://127.0.0.1:{self.port}"}
        origin = headers.get("origin")
        if origin is not None:
            return origin in origins
        referer = headers.get("referer")
        if not referer:
            return False
        parts = urlsplit(referer)
        return f"{parts.scheme}://{parts.netloc}" in origins

    def csrf_ok(self, session: Session, given: str | None) -> bool:
        """Whether the form's CSRF field is this session's token (constant time)."""
        return isinstance(given, str) and hmac.compare_digest(given.encode(), session.csrf.encode())


__all__ = ["COOKIE", "CSRF_FIELD", "Guard", "SECURITY_HEADERS", "Session", "is_loopback"]
