"""The datasite home folder: where one datasite keeps its state and its secrets.

Layout::

    HOME/
      datasite.json        name, server id, admin email, host/port, dataset name, the
                           database (``"database"``: SQLite in db/, or a PostgreSQL URL
                           without its password) -- no secrets
      schema.toml          the schema the records were validated against
      public_keys.json     the datasite's public identity keys (also published in syft)
      secrets/             mode 0700; every file in it mode 0600
        admin_password     the datasite admin password (replaces syft's "changethis")
        syft_signing_key   syft's own server key
        identity_ed25519   Ed25519 identity signing key (raw, 32 bytes, hex)
        identity_x25519    X25519 identity agreement key (raw, 32 bytes, hex)
        db_password        the PostgreSQL password, when the datasite runs on PostgreSQL
      db/                  syft's SQLite database (datasets, users, requests), the default
      blob/                syft's blob store
      logs/server.log      syft's and uvicorn's output
      server.pid           present while the server runs

Back up the whole folder while the datasite is stopped; it is all a datasite needs (on
PostgreSQL, back up its database too: ``pg_dump``).
"""

from __future__ import annotations

import json
import os
import secrets as _secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmtl.errors import DatasiteError
from fedmtl.fsutil import write_json_atomic  # noqa: F401 - re-exported (runtime, researcher.job)
from fedmtl.privacy.keys import save_private_key

CONFIG = "datasite.json"
MARKER_KIND = "fedmtl-datasite"


def config_path(home: Path) -> Path:
    return Path(home) / CONFIG


def is_home(home: Path) -> bool:
    return config_path(home).is_file()


def read_config(home: Path) -> dict[str, Any]:
    path = config_path(home)
    if not path.is_file():
        raise DatasiteError(
            f"{home} is not a fedmtl datasite home (no {CONFIG}); "
            "create one with `fedmtl datasite launch --home ...`"
        )
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasiteError(f"{path} is corrupt ({e}); restore the home from a backup") from e
    if cfg.get("kind") != MARKER_KIND:
        raise DatasiteError(f"{path} was not written by fedmtl; use another --home")
    return cfg


def write_config(home: Path, cfg: dict[str, Any]) -> None:
    write_json_atomic(config_path(home), {**cfg, "kind": MARKER_KIND})


#: the secret (in HOME/secrets) that holds the PostgreSQL password
DB_PASSWORD_SECRET = "db_password"


def database(cfg: dict[str, Any]) -> dict[str, Any]:
    """Where a home's datasite keeps syft's state (datasets, users, requests), from its
    config: ``{"backend": "sqlite"}`` (HOME/db; also homes made before the option) or
    ``{"backend": "postgresql", "host", "port", "user", "database", "url",
    "password_secret"}``, where ``url`` carries no password and ``password_secret`` names
    the owner-only file in HOME/secrets that holds it (None: no password)."""
    db = cfg.get("database") or {"backend": "sqlite"}
    if db.get("backend") not in ("sqlite", "postgresql"):
        raise DatasiteError(
            f"the home's {CONFIG} names an unknown database backend {db.get('backend')!r}; "
            "expected 'sqlite' or 'postgresql' (was it edited by hand?)"
        )
    return dict(db)


def secrets_dir(home: Path) -> Path:
    d = Path(home) / "secrets"
    d.mkdir(mode=0o700, exist_ok=True)
    os.chmod(d, 0o700)
    return d


def write_secret(home: Path, name: str, value: str) -> Path:
    """Write a secret owner-only (0600), atomically."""
    path = secrets_dir(home) / name
    save_private_key(path, value.encode("utf-8"))
    return path


def read_secret(home: Path, name: str) -> str:
    path = Path(home) / "secrets" / name
    if not path.is_file():
        raise DatasiteError(f"secret {name!r} missing from {path.parent}; the home is incomplete")
    return path.read_text(encoding="utf-8").strip()


def generate_password() -> str:
    return _secrets.token_urlsafe(24)


@dataclass(frozen=True)
class RunningInfo:
    pid: int
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def running(home: Path) -> RunningInfo | None:
    """The server of this home, if its process is alive."""
    pidfile = Path(home) / "server.pid"
    if not pidfile.is_file():
        return None
    try:
        info = json.loads(pidfile.read_text())
        pid = int(info["pid"])
    except (ValueError, KeyError, json.JSONDecodeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return RunningInfo(pid=pid, host=info["host"], port=int(info["port"]))
