"""Owner-side administration of a running datasite: researchers and status."""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmtl.datasites.server import control
from fedmtl.datasites.server.accounts import register_researcher, server_view
from fedmtl.datasites.site import home as home_mod
from fedmtl.datasites.site import identity, syftio
from fedmtl.errors import DatasiteError

__all__ = ["DatasiteStatus", "add_researcher", "admin_client", "register_researcher", "review_list", "server_view",
           "status", "stop"]

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
MIN_PASSWORD = 10


def admin_client(home: str | Path):
    """Log in as the datasite admin, with the password stored in the home."""
    home = Path(home)
    cfg = home_mod.read_config(home)
    info = home_mod.running(home)
    if info is None:
        raise DatasiteError(
            f"datasite {cfg['name']!r} is not running; start it with `fedmtl datasite launch --home {home}`"
        )
    return syftio.login(info.url, cfg["admin_email"], home_mod.read_secret(home, "admin_password"))


def add_researcher(
    *, home: str | Path, email: str, password: str, name: str | None = None, institution: str = ""
) -> None:
    """Register a researcher account (role: data scientist)."""
    if not _EMAIL.match(email or ""):
        raise DatasiteError(f"{email!r} is not an email address")
    if len(password or "") < MIN_PASSWORD:
        raise DatasiteError(f"the researcher's password must have at least {MIN_PASSWORD} characters")
    if home_mod.running(Path(home)) is not None:
        try:  # the server's owner-only control socket: no syft import, no login
            if control.call(Path(home), "add_researcher", email=email, password=password, name=name,
                            institution=institution) is not None:
                return
        except RuntimeError as e:
            raise DatasiteError(f"could not register {email}: {e}") from None
    register_researcher(admin_client(home), email=email, password=password, name=name, institution=institution)


def review_list(home: str | Path, *, include_decided: bool = False) -> list[dict[str, Any]] | None:
    """The requests waiting for a person, from the running server's control socket: what
    :func:`fedmtl.datasites.review.manual_review.list_requests` returns, as dicts, without
    importing syft or logging in.

    Args:
        home: the datasite's home.
        include_decided: also the requests already decided (``review --list --all``).

    Returns:
        One dict per request (``RequestSummary.to_dict()``: request_id, syft_id, researcher,
        code_name, syft_status, ledger_status); ``None`` when the datasite is not running or
        no control socket answered with the list (an older server): then list with a syft
        login (``manual_review.list_requests(home, client=admin_client(home))``).
    """
    home = Path(home)
    if home_mod.running(home) is None:
        return None
    try:
        reply = control.call(home, "review_list", include_decided=bool(include_decided))
    except RuntimeError:  # an older server without the operation, or the listing failed there
        return None
    return None if reply is None else list(reply["requests"])


def stop(home: str | Path, timeout: float = 15.0) -> bool:
    """Stop the server of this home (False: it was not running). SIGTERM, then SIGKILL if it
    is still there after ``timeout`` seconds; returns once the process has exited, so the
    home can be backed up or relaunched."""
    home = Path(home)
    info = home_mod.running(home)
    if info is None:
        return False
    try:
        os.kill(info.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    except PermissionError:
        raise DatasiteError(
            f"the datasite's server (pid {info.pid}) belongs to another user; stop it as that user"
        ) from None
    if not _wait_exit(info.pid, timeout):
        try:
            os.kill(info.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _wait_exit(info.pid, 5.0)
    (home / "server.pid").unlink(missing_ok=True)
    return True


def _wait_exit(pid: int, timeout: float, poll: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not _exited(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
    return True


def _exited(pid: int) -> bool:
    """Whether ``pid`` has exited. An exited process that its parent has not reaped yet (a
    zombie, state Z in /proc/PID/stat on Linux) counts: a detached server's parent is init,
    which may reap it seconds later."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return Path("/proc/self/stat").exists()  # with /proc: gone since kill(); without: not known
    except OSError:
        return False
    fields = stat.rsplit(b")", 1)[-1].split()  # after "pid (comm)", which may hold spaces
    return bool(fields) and fields[0] in (b"Z", b"X")


@dataclass
class DatasiteStatus:
    name: str
    home: str
    running: bool
    url: str | None = None
    fingerprint: str = ""  # of this site's Ed25519 identity key: what its peers pin
    datasets: list[str] = field(default_factory=list)
    researchers: list[str] = field(default_factory=list)
    pending_requests: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        lines = [f"datasite {self.name} ({self.home})"]
        if self.fingerprint:
            lines.append(f"  fingerprint: {self.fingerprint}  (give it to the owners of the peer datasites, "
                         "and to your auditor for `fedmtl audit --verify-key`)")
        if not self.running:
            lines.append("  status: stopped")
            return "\n".join(lines)
        lines += [
            f"  status: running at {self.url}",
            f"  datasets: {', '.join(self.datasets) or '(none)'}",
            f"  researchers: {', '.join(self.researchers) or '(none)'}",
            f"  pending requests: {len(self.pending_requests)}",
        ]
        for r in self.pending_requests:
            lines.append(f"    - {r['id']}  {r['code']}  from {r['requester']}")
        return "\n".join(lines)


def status(home: str | Path) -> DatasiteStatus:
    home = Path(home).resolve()
    cfg = home_mod.read_config(home)
    info = home_mod.running(home)
    st = DatasiteStatus(name=cfg["name"], home=str(home), running=info is not None)
    try:
        st.fingerprint = identity.load_public(home).fingerprint
    except (OSError, ValueError, KeyError):
        pass  # an incomplete home (first launch failed): nothing to pin yet
    if info is None:
        return st
    st.url = info.url
    try:  # the server's owner-only control socket: no syft import, no login
        reply = control.call(home, "status")
    except RuntimeError:
        reply = None
    if reply is not None:
        for key in ("datasets", "researchers", "pending_requests"):
            setattr(st, key, list(reply[key]))
        return st
    for key, value in server_view(admin_client(home), admin_email=cfg["admin_email"]).items():
        setattr(st, key, value)
    return st
