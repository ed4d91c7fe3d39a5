"""Launch a hospital's datasite from its records export.

>>> site = launch(name="st-mary", records="records.csv", schema="schema.toml",
...               home="./st-mary", port=8081)            # doctest: +SKIP
>>> site.url, site.admin_email                             # doctest: +SKIP
>>> site.stop()                                            # doctest: +SKIP

First launch, in this order, so that a failure leaves nothing behind:

1. the schema and the records are validated (every problem in one error, nothing written);
2. the port is checked, the home is created: config, a generated (or
   ``FEDMTL_ADMIN_PASSWORD``) admin password that replaces syft's default, syft's server
   key, the Ed25519/X25519 identity keys, all owner-only;
3. the syft server starts on the port; guest sign-up is switched off;
4. the records become one syft dataset: the private asset and a synthetic mock, with the
   schema, per-task label counts and the public identity keys in its description.

If any step fails on first launch, the server is stopped and the new home removed.
A relaunch with the same home reuses everything in it; ``records``/``schema`` may then be
left out.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmtl.datasites import home as home_mod
from fedmtl.datasites import identity, syftio
from fedmtl.errors import DatasiteError
from fedmtl.schema import Schema

ADMIN_PASSWORD_ENV = "FEDMTL_ADMIN_PASSWORD"
META_FENCE = "fedmtl-meta"
ASSET_NAME = "records"


@dataclass
class DatasiteHandle:
    """A running datasite. ``stop()`` stops it; usable as a context manager."""

    name: str
    home: Path
    host: str
    port: int
    admin_email: str
    dataset: str
    _process: subprocess.Popen | None = field(default=None, repr=False)
    _thread_server: Any = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def admin_password(self) -> str:
        return home_mod.read_secret(self.home, "admin_password")

    def login_admin(self):
        return syftio.login(self.url, self.admin_email, self.admin_password)

    def is_running(self) -> bool:
        if self._process is not None:
            return self._process.poll() is None
        if self._thread is not None:
            return self._thread.is_alive()
        return home_mod.running(self.home) is not None

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``)."""
        if self._thread_server is not None:
            self._thread_server.should_exit = True
            if self._thread is not None:
                self._thread.join(timeout)
            from fedmtl.datasites import reviewer_thread

            reviewer_thread.stop_background()
            (self.home / "server.pid").unlink(missing_ok=True)
            self._thread_server = None
            return
        proc = self._process
        if proc is None:
            info = home_mod.running(self.home)
            if info is None:
                return
            _terminate_pid(info.pid, timeout)
            (self.home / "server.pid").unlink(missing_ok=True)
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        (self.home / "server.pid").unlink(missing_ok=True)

    def __enter__(self) -> "DatasiteHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _terminate_pid(pid: int, timeout: float) -> None:
    import signal

    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now. SO_REUSEADDR as uvicorn uses
    it: connections of a just-stopped server in TIME_WAIT do not block, a listener does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def launch(
    *,
    home: str | Path,
    name: str | None = None,
    records: str | Path | None = None,
    schema: str | Path | None = None,
    port: int = 8080,
    host: str = "127.0.0.1",
    admin_email: str | None = None,
    admin_password: str | None = None,
    in_process: bool = False,
    ready_timeout: float = 180.0,
    policy: str | Path | Any | None = None,
) -> DatasiteHandle:
    """Start (and on first launch, create) the datasite whose state lives in ``home``.

    ``policy`` is a policy file (TOML/YAML) or a :class:`~fedmtl.datasites.policy.Policy`.
    On first launch without one, the default policy applies (templates only, automatic
    approval of conforming requests, the schema's tasks). A policy given on relaunch
    replaces the current one; the change is recorded in the ledger.
    """
    home = Path(home).resolve()
    first = not home_mod.is_home(home)
    if first:
        if name is None or records is None or schema is None:
            raise DatasiteError(
                f"{home} is not a datasite home yet: a first launch needs --name, --records and --schema"
            )
        if home.exists() and any(home.iterdir()):
            raise DatasiteError(
                f"{home} exists and is not empty, and it is not a fedmtl datasite home; "
                "choose an empty or new folder for --home"
            )
    else:
        cfg = home_mod.read_config(home)
        if name is not None and name != cfg["name"]:
            raise DatasiteError(
                f"{home} belongs to datasite {cfg['name']!r}, not {name!r}; "
                f"use another --home for {name!r}, or --name {cfg['name']}"
            )
        name = cfg["name"]
        running = home_mod.running(home)
        if running is not None:
            raise DatasiteError(
                f"datasite {name!r} is already running at {running.url} (pid {running.pid}); "
                f"stop it first with `fedmtl datasite stop --home {home}`"
            )
    _check_name(name)
    pol = _load_policy(policy)

    # 1. validate before anything is written
    df = sch = None
    if records is not None or schema is not None:
        if records is None or schema is None:
            raise DatasiteError("give both --records and --schema, or neither (relaunch)")
        from fedmtl.datasites.records import load_records

        sch = Schema.load(schema)
        df = load_records(records, sch)
        if not first:
            cfg = home_mod.read_config(home)
            if cfg.get("records_sha256") != _sha256_file(Path(records)):
                raise DatasiteError(
                    f"{home} already holds a dataset made from other records "
                    f"(sha256 {cfg.get('records_sha256', '?')[:12]}...). A datasite publishes one "
                    "export; to publish new records, launch a new datasite with a new --home"
                )

    if not port_free(host, port):
        raise DatasiteError(
            f"port {port} on {host} is in use (another datasite or program); "
            f"choose another --port, or stop what uses it"
        )

    created_home = False
    handle: DatasiteHandle | None = None
    try:
        if first:
            created_home = not home.exists()
            _create_home(
                home,
                name=name,
                records=Path(records),
                schema=sch,
                admin_email=admin_email or f"admin@{name}.datasite",
                admin_password=admin_password or os.environ.get(ADMIN_PASSWORD_ENV),
            )
            created_home = True
            from fedmtl.datasites import site_ledger

            site_ledger.install_policy(home, pol or site_ledger.default_policy(sch), who="owner (first launch)")
        elif pol is not None:
            from fedmtl.datasites import site_ledger

            site_ledger.install_policy(home, pol, who="owner (relaunch)")
        cfg = home_mod.read_config(home)
        handle = DatasiteHandle(
            name=name,
            home=home,
            host=host,
            port=port,
            admin_email=cfg["admin_email"],
            dataset=cfg["dataset"],
        )
        _start(handle, in_process=in_process, ready_timeout=ready_timeout)
        if not cfg.get("setup_complete"):
            _first_setup(handle, df, sch)
            home_mod.write_config(home, {**cfg, "setup_complete": True})
        return handle
    except BaseException:
        if handle is not None:
            handle.stop()
        if first and created_home:
            shutil.rmtree(home, ignore_errors=True)
        raise


def _load_policy(policy):
    if policy is None:
        return None
    from fedmtl.datasites.policy import Policy

    return policy if isinstance(policy, Policy) else Policy.load(policy)


def _check_name(name: str) -> None:
    import re

    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", name or ""):
        raise DatasiteError(
            f"datasite name {name!r} is invalid: use lower-case letters, digits and '-' (e.g. st-mary)"
        )


def _create_home(
    home: Path,
    *,
    name: str,
    records: Path,
    schema: Schema,
    admin_email: str,
    admin_password: str | None,
) -> None:
    from syft.server.credentials import SyftSigningKey
    from syft.types.uid import UID

    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    (home / "logs").mkdir(exist_ok=True)
    password = admin_password or home_mod.generate_password()
    if len(password) < 8:
        raise DatasiteError(f"the admin password (from {ADMIN_PASSWORD_ENV}) must have at least 8 characters")
    home_mod.write_secret(home, "admin_password", password)
    with syftio.quiet():
        key = str(SyftSigningKey.generate())
        server_id = UID().no_dash
    home_mod.write_secret(home, "syft_signing_key", key)
    identity.create(home, name)
    schema.save(home / "schema.toml")
    home_mod.write_config(
        home,
        {
            "name": name,
            "server_id": server_id,
            "admin_email": admin_email,
            "dataset": f"{name}-records",
            "records_file": str(records.resolve()),
            "records_sha256": _sha256_file(records),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "setup_complete": False,
        },
    )


def _start(handle: DatasiteHandle, *, in_process: bool, ready_timeout: float) -> None:
    home = handle.home
    if in_process:
        _start_in_process(handle)
    else:
        log = open(home / "logs" / "server.log", "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
        handle._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedmtl.datasites.server",
                "--home",
                str(home),
                "--host",
                handle.host,
                "--port",
                str(handle.port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # Ctrl-C in the terminal reaches us, and we stop it
        )
        log.close()
    _wait_ready(handle, ready_timeout)


def _start_in_process(handle: DatasiteHandle) -> None:
    import uvicorn

    from fedmtl.datasites import reviewer_thread, server

    with syftio.quiet():
        app, worker = server.build_app(handle.home)
    config = uvicorn.Config(app, host=handle.host, port=handle.port, log_level="warning", access_log=False)
    srv = uvicorn.Server(config)
    handle._thread_server = srv
    handle._thread = threading.Thread(target=srv.run, name=f"datasite-{handle.name}", daemon=True)
    handle._thread.start()
    reviewer_thread.start_background(handle.home, worker)
    (handle.home / "server.pid").write_text(
        json.dumps({"pid": os.getpid(), "host": handle.host, "port": handle.port})
    )


def _wait_ready(handle: DatasiteHandle, timeout: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    url = f"{handle.url}/api/v2/metadata"
    while time.monotonic() < deadline:
        if handle._process is not None and handle._process.poll() is not None:
            tail = _log_tail(handle.home)
            raise DatasiteError(
                f"datasite {handle.name!r} exited during start-up (code {handle._process.returncode}). "
                f"Last lines of {handle.home / 'logs' / 'server.log'}:\n{tail}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.3)
    handle.stop()
    raise DatasiteError(
        f"datasite {handle.name!r} did not answer on {handle.url} within {timeout:.0f}s. "
        f"Last lines of the log:\n{_log_tail(handle.home)}"
    )


def _log_tail(home: Path, n: int = 15) -> str:
    path = home / "logs" / "server.log"
    if not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def dataset_meta(schema: Schema, df, public: identity.PublicIdentity) -> dict[str, Any]:
    from fedmtl.datasites.records import label_counts

    split = schema.split_column
    return {
        "fedmtl_version": _version(),
        "site": public.site,
        "schema": schema.to_dict(),
        "label_counts": label_counts(df, schema),
        "n_records": int(len(df)),
        "split_sizes": (
            {str(k): int(v) for k, v in df[split].value_counts().items()} if split else {}
        ),
        "identity": public.to_dict(),
    }


def _version() -> str:
    import fedmtl

    return fedmtl.__version__


def _first_setup(handle: DatasiteHandle, df, schema: Schema | None) -> None:
    from fedmtl.datasites.mock import make_mock
    from fedmtl.datasites.records import describe_dataset

    if df is None or schema is None:
        raise DatasiteError(
            f"{handle.home} was created but its dataset was never uploaded; "
            "relaunch with --records and --schema"
        )
    sy = syftio.import_syft()
    client = handle.login_admin()
    public = identity.load_public(handle.home)
    meta = dataset_meta(schema, df, public)
    home_mod.write_json_atomic(handle.home / "dataset_meta.json", meta)
    mock = make_mock(df, schema, seed=0)
    description = (
        describe_dataset(schema, df)
        + f"\n\n## Machine-readable metadata\n\n```json {META_FENCE}\n"
        + json.dumps(meta, indent=1, sort_keys=True)
        + "\n```\n"
    )
    with syftio.quiet():
        syftio.check(client.settings.allow_guest_signup(enable=False), "disabling guest sign-up")
        ds = sy.Dataset(name=handle.dataset, description=description)
        ds.add_asset(
            sy.Asset(
                name=ASSET_NAME,
                description="Patient records (private); the mock is synthetic",
                data=_plain(df),
                mock=_plain(mock),
            )
        )
        syftio.check(client.upload_dataset(ds), "uploading the dataset")


def _plain(df):
    """Categoricals as plain strings: syft's serde stores plain dtypes reliably."""
    out = df.copy()
    for c in out.columns:
        if str(out[c].dtype) in ("category", "string"):
            out[c] = out[c].astype(object).where(out[c].notna(), None)
    return out.reset_index(drop=True)


def parse_meta(description: str) -> dict[str, Any]:
    """The machine-readable block of a fedmtl dataset description."""
    start = description.find(f"```json {META_FENCE}")
    if start < 0:
        raise DatasiteError("this dataset was not published by fedmtl (no metadata block)")
    body = description[start:].split("\n", 1)[1]
    return json.loads(body.split("```", 1)[0])
