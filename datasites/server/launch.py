"""Launch a hospital's datasite from its records export.

>>> site = launch(name="st-mary", records="records.csv", schema="schema.toml",
...               home="./st-mary", port=8081)            # doctest: +SKIP
>>> site.url, site.admin_email                             # doctest: +SKIP
>>> site.stop()                                            # doctest: +SKIP

First launch, in this order, so that a failure leaves nothing behind:

1. the schema and the records are validated (every problem in one error, nothing written);
   without a split column, ``test_fraction`` adds a seeded, stratified train/test column
   (:func:`fedmtl.datasites.data.records.add_test_split`) in memory; warnings (no test split,
   a declared range far wider than the data) go to ``warn`` and ``handle.warnings``;
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
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings as _warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fedmtl
from fedmtl.datasites.data.mock import make_mock
from fedmtl.datasites.data.records import add_test_split, describe_dataset, label_counts, load_records, range_warnings
from fedmtl.datasites.ledger import site_ledger
from fedmtl.datasites.rules.policy import Policy
from fedmtl.datasites.server.postgres import (  # noqa: F401 - DB_PASSWORD_ENV, PostgresDB, redact_db_url re-exported
    DB_PASSWORD_ENV,
    PostgresDB,
    check_database,
    database_url,
    drop_new_tables,
    redact_db_url,
    resolve_database,
    store_database,
)
from fedmtl.datasites.site import home as home_mod
from fedmtl.datasites.site import identity, syftio
from fedmtl.datasites.template import default_policy
from fedmtl.errors import DatasiteError, LaunchWarning
from fedmtl.schema import DEFAULT_NAME, Schema

ADMIN_PASSWORD_ENV = "FEDMTL_ADMIN_PASSWORD"
META_FENCE = "fedmtl-meta"
ASSET_NAME = syftio.ASSET_NAME

NO_SPLIT_WARNING = (
    "the datasite has no test split: the schema declares no split column and no "
    "--test-fraction was given, so evaluation runs on the training records themselves "
    "(optimistic metrics, nothing held out). To fix it, launch a new datasite (new --home) "
    "with --test-fraction 0.2 (a seeded split stratified by the first label), or add a "
    "split column (train/test) to the export and the schema; see docs/schema.md"
)


@dataclass
class DatasiteHandle:
    """A running datasite. ``stop()`` stops it; usable as a context manager."""

    name: str
    home: Path
    host: str
    port: int
    admin_email: str
    dataset: str
    warnings: list[str] = field(default_factory=list)
    database: str = ""  # where syft's state lives, for people (no password)
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
            from fedmtl.datasites.review import reviewer_thread

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


#: :func:`free_port` picks from these ports: below Linux's ephemeral range (32768-60999),
#: so that no outgoing connection's source port takes one between the pick and the server's
#: bind, and at random, so that two processes picking at the same moment (tests in two
#: processes, two demos) do not get the same one as the kernel's next ephemeral port
FREE_PORTS = range(20000, 32768)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now (see :data:`FREE_PORTS`).

    Raises:
        OSError: none of 200 random tries was free.
    """
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.choice(FREE_PORTS)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port on {host} in {FREE_PORTS.start}-{FREE_PORTS.stop - 1} after 200 tries")


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
    test_fraction: float | None = None,
    split_seed: int = 0,
    warn: Callable[[str], None] | None = None,
    db_url: str | None = None,
) -> DatasiteHandle:
    """Start (and on first launch, create) the datasite whose state lives in ``home``.

    ``policy`` is a policy file (TOML/YAML) or a :class:`~fedmtl.datasites.rules.policy.Policy`.
    On first launch without one, the default policy applies (templates only, automatic
    approval of conforming requests, the schema's tasks). A policy given on relaunch
    replaces the current one; the change is recorded in the ledger.

    ``test_fraction`` (first launch, records without a split column): hold out that share
    of the patients as the test split, stratified by the first label column, drawn with
    ``split_seed``; the split column is added to the published records and to the home's
    schema, and how it was made is recorded in ``dataset_meta.json`` and the dataset
    description (``"split"``). Without a split column and without ``test_fraction`` the
    datasite has no test split (evaluation runs on the training records), and a warning
    says so.

    ``warn`` receives each warning as it is found (before the server starts); by default
    each is issued as a :class:`LaunchWarning`. They are also kept in ``handle.warnings``.

    ``db_url`` (``postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME``) runs the datasite on
    that PostgreSQL database instead of SQLite in HOME/db; the password may instead come
    from ``FEDMTL_DB_PASSWORD``. The home's datasite.json records the URL without the
    password, HOME/secrets/db_password (0600) the password, so a relaunch (without
    ``db_url``) uses the same database. The database is checked before anything is
    written: reachable, the password right, on first launch empty of any datasite, on
    relaunch holding this one (a relaunch may give a new URL or password for it).
    """
    home = Path(home).resolve()
    first = not home_mod.is_home(home)
    found: list[str] = []

    def _warn(msg: str) -> None:
        found.append(msg)
        if warn is not None:
            warn(msg)
        else:
            _warnings.warn(msg, LaunchWarning, stacklevel=3)

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
    if not first and test_fraction is not None:
        raise DatasiteError(
            f"--test-fraction applies only to a datasite's first launch (it splits the records "
            f"before they are published); {home} already exists. To split differently, launch "
            "a new datasite with a new --home"
        )

    # 1. validate before anything is written
    df = sch = None
    split_info: dict[str, Any] = {"column": None, "source": "none"}
    if records is not None or schema is not None:
        if records is None or schema is None:
            raise DatasiteError("give both --records and --schema, or neither (relaunch)")
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
            made = cfg.get("split") or {}
            if made.get("source") == "launch" and sch.split_column is None:
                test_fraction, split_seed = made["test_fraction"], made["seed"]  # the same split again
        if sch.split_column is not None:
            if test_fraction is not None:
                add_test_split(df, sch, test_fraction, split_seed)  # raises: explains the clash
            split_info = {"column": sch.split_column, "source": "export"}
        elif test_fraction is not None:
            df, sch, split_info = add_test_split(df, sch, test_fraction, split_seed)
        for msg in range_warnings(df, sch):
            _warn(msg)
    elif test_fraction is not None:
        raise DatasiteError("--test-fraction needs --records and --schema (the records to split)")
    if sch is not None:
        if sch.split_column is None:
            _warn(NO_SPLIT_WARNING)
    elif not first and (home / "schema.toml").is_file():
        if Schema.load(home / "schema.toml").split_column is None:
            _warn(NO_SPLIT_WARNING)

    db, db_password_from = resolve_database(home, None if first else home_mod.read_config(home), db_url)
    db_tables = frozenset()
    if db is not None:
        db_server_id = None if first else home_mod.read_config(home)["server_id"]
        db_tables = check_database(db, server_id=db_server_id, password_from=db_password_from)

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
                split=split_info,
            )
            created_home = True
            site_ledger.install_policy(home, pol or default_policy(sch), who="owner (first launch)")
        elif pol is not None:
            site_ledger.install_policy(home, pol, who="owner (relaunch)")
        store_database(home, db)
        cfg = home_mod.read_config(home)
        handle = DatasiteHandle(
            name=name,
            home=home,
            host=host,
            port=port,
            admin_email=cfg["admin_email"],
            dataset=cfg["dataset"],
            warnings=found,
            database=database_url(home),
        )
        payload: _Background | None = None
        if not cfg.get("setup_complete"):
            if not in_process:
                # the first setup logs in with syft: import it while the server starts
                threading.Thread(target=syftio.import_syft, name="fedmtl-import-syft", daemon=True).start()
            if df is not None and sch is not None:
                # and the mock and description need only the records: make them meanwhile
                payload = _Background(upload_payload, home, df, sch, cfg.get("split") or split_info)
        _start(handle, in_process=in_process, ready_timeout=ready_timeout)
        if not cfg.get("setup_complete"):
            _first_setup(handle, df, sch, cfg.get("split") or split_info, payload=payload)
            home_mod.write_config(home, {**cfg, "setup_complete": True})
        return handle
    except BaseException:
        if handle is not None:
            handle.stop()
        if first and db is not None:
            drop_new_tables(db, db_tables)
        if first and created_home:
            shutil.rmtree(home, ignore_errors=True)
        raise


def _load_policy(policy):
    if policy is None:
        return None
    return policy if isinstance(policy, Policy) else Policy.load(policy)


def published_dataset_name(site: str, schema: Schema) -> str:
    """The name a first launch publishes the records under: the schema's ``[dataset] name``,
    or ``SITE-records`` where the schema names none (:data:`fedmtl.schema.DEFAULT_NAME`).

    Args:
        site: the datasite's name.
        schema: the records schema of the first launch.

    Returns:
        The dataset's name (researchers find the dataset by its metadata, not its name; the
        ledger keys the per-dataset privacy budget by it).
    """
    own = schema.name.strip()
    return own if own and own != DEFAULT_NAME else f"{site}-records"


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
    split: dict[str, Any] | None = None,
) -> None:
    # syft's server key is an Ed25519 (PyNaCl) seed in hex and its server id a uuid4 without
    # dashes (syft.server.credentials.SyftSigningKey, syft.types.uid.UID): made here without
    # importing syft, which takes seconds
    import secrets as _secrets
    import uuid

    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    (home / "logs").mkdir(exist_ok=True)
    password = admin_password or home_mod.generate_password()
    if len(password) < 8:
        raise DatasiteError(f"the admin password (from {ADMIN_PASSWORD_ENV}) must have at least 8 characters")
    home_mod.write_secret(home, "admin_password", password)
    key = _secrets.token_bytes(32).hex()
    server_id = uuid.uuid4().hex
    home_mod.write_secret(home, "syft_signing_key", key)
    identity.create(home, name)
    schema.save(home / "schema.toml")
    home_mod.write_config(
        home,
        {
            "name": name,
            "server_id": server_id,
            "admin_email": admin_email,
            "dataset": published_dataset_name(name, schema),
            "records_file": str(records.resolve()),
            "records_sha256": _sha256_file(records),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "split": split or {"column": schema.split_column, "source": "export" if schema.split_column else "none"},
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

    from fedmtl.datasites.review import reviewer_thread
    from fedmtl.datasites.server import http_guard
    from fedmtl.datasites.server import process as server

    with syftio.quiet():
        app, worker = server.build_app(handle.home)
    # the same header/body deadlines and connection cap as the server process
    config = uvicorn.Config(app, host=handle.host, port=handle.port, log_level="warning", access_log=False,
                            **http_guard.uvicorn_options())
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


def dataset_meta(
    schema: Schema, df, public: identity.PublicIdentity, split_info: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The dataset's machine-readable metadata. ``split`` says where the test split came
    from: ``{"column", "source": "export" | "launch" | "none"}``, and for a split made at
    launch ``"test_fraction"``, ``"seed"`` and ``"stratified_by"`` (a label or None)."""
    split = schema.split_column
    if split_info is None:
        split_info = {"column": split, "source": "export" if split else "none"}
    return {
        "fedmtl_version": _version(),
        "site": public.site,
        "schema": schema.to_dict(),
        "label_counts": label_counts(df, schema),
        "n_records": int(len(df)),
        "split_sizes": (
            {str(k): int(v) for k, v in df[split].value_counts().items()} if split else {}
        ),
        "split": dict(split_info),
        "identity": public.to_dict(),
    }


def _version() -> str:
    return fedmtl.__version__


def home_split(home: str | Path) -> dict[str, Any]:
    """Where a datasite's test split came from (see :func:`dataset_meta`); for a home made
    before this was recorded, read from its schema."""
    home = Path(home)
    made = home_mod.read_config(home).get("split")
    if made:
        return made
    path = home / "schema.toml"
    split = Schema.load(path).split_column if path.is_file() else None
    return {"column": split, "source": "export" if split else "none"}


def split_note(split_info: dict[str, Any]) -> str:
    """One sentence for the dataset description: where the test split comes from."""
    src = split_info.get("source")
    if src == "launch":
        how = (f"stratified by {split_info['stratified_by']!r}" if split_info.get("stratified_by")
               else "not stratified")
        return (f"The train/test split ({split_info['column']!r}) was made at launch: test fraction "
                f"{split_info['test_fraction']:g}, seed {split_info['seed']}, {how}.")
    if src == "export":
        return f"The train/test split ({split_info['column']!r}) comes with the hospital's export."
    return ("No test split: evaluation runs on the training records (nothing is held out), so "
            "its metrics are optimistic.")


class _Background:
    """``fn(*args)`` run in a daemon thread; :meth:`result` waits and returns it (or raises
    what it raised)."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._out: tuple[bool, Any] | None = None

        def run() -> None:
            try:
                self._out = (True, fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to result()
                self._out = (False, e)

        self._thread = threading.Thread(target=run, name="fedmtl-launch-prepare", daemon=True)
        self._thread.start()

    def result(self) -> Any:
        self._thread.join()
        assert self._out is not None
        ok, value = self._out
        if not ok:
            raise value
        return value


@dataclass(frozen=True)
class UploadPayload:
    """What a first launch publishes, computed from the records alone (no syft, no server)."""

    meta: dict[str, Any]
    description: str
    data: Any  # the private asset, as syft stores it
    mock: Any


def upload_payload(home: Path, df, schema: Schema, split_info: dict[str, Any]) -> UploadPayload:
    """The dataset's metadata, description, private asset and mock for ``home``'s first
    launch. Writes nothing; needs the home's identity keys."""
    public = identity.load_public(home)
    meta = dataset_meta(schema, df, public, split_info)
    # the policy of the first launch, so `job.cost()` can run the review ahead of time before
    # any job is approved here (the spend view carries the current one afterwards)
    meta["policy"] = site_ledger.current_policy(home).to_dict()
    mock = make_mock(df, schema, seed=0)
    description = (
        describe_dataset(schema, df)
        + f"\n{split_note(split_info)}\n"
        + f"\n\n## Machine-readable metadata\n\n```json {META_FENCE}\n"
        + json.dumps(meta, indent=1, sort_keys=True)
        + "\n```\n"
    )
    return UploadPayload(meta=meta, description=description, data=_plain(df), mock=_plain(mock))


def _first_setup(
    handle: DatasiteHandle,
    df,
    schema: Schema | None,
    split_info: dict[str, Any],
    *,
    payload: _Background | None = None,
) -> None:
    if df is None or schema is None:
        raise DatasiteError(
            f"{handle.home} was created but its dataset was never uploaded; "
            "relaunch with --records and --schema"
        )
    sy = syftio.import_syft()
    client = handle.login_admin()
    made: UploadPayload = (
        payload.result() if payload is not None else upload_payload(handle.home, df, schema, split_info)
    )
    home_mod.write_json_atomic(handle.home / "dataset_meta.json", made.meta)
    description = made.description
    with syftio.quiet():
        syftio.check(client.settings.allow_guest_signup(enable=False), "disabling guest sign-up")
        ds = sy.Dataset(name=handle.dataset, description=description)
        ds.add_asset(
            sy.Asset(
                name=ASSET_NAME,
                description="Patient records (private); the mock is synthetic",
                data=made.data,
                mock=made.mock,
            )
        )
        syftio.check(_upload_dataset(client, ds), "uploading the dataset")


def _upload_dataset(client, dataset):
    """syft 0.9.5's ``DatasiteClient.upload_dataset``, step for step, except that the
    dataset record sent last no longer carries a second copy of each asset's data and mock.

    syft uploads each asset's private data and mock to blob storage as one twin object,
    then sends the dataset record (``dataset.add``), whose assets still hold the data and
    the mock: both are serialised and sent again, and the server drops them (its
    ``create_and_store_twin`` pops them when the asset already has an ``action_id``). Here
    the asset keeps its shape (what the server would infer from the mock) and holds empty
    action objects instead, so the record is small."""
    from syft.client.datasite_client import add_default_uploader
    from syft.service.action.action_object import ActionObject
    from syft.service.dataset.dataset import get_shape_or_len
    from syft.types.twin_object import TwinObject
    from syft.util.util import get_mb_size

    user = client.users.get_current_user()
    dataset = add_default_uploader(user, dataset)
    size = 0.0
    for i, asset in enumerate(dataset.asset_list):
        asset = add_default_uploader(user, asset)
        dataset.asset_list[i] = asset
        twin = TwinObject(
            private_obj=ActionObject.from_obj(asset.data),
            mock_obj=ActionObject.from_obj(asset.mock),
            syft_server_location=client.id,
            syft_client_verify_key=client.verify_key,
        )
        twin._save_to_blob_storage(allow_empty=False).unwrap()
        syftio.check(client.api.services.action.set(twin, ignore_detached_objs=False), "storing the asset")
        asset.action_id = twin.id
        asset.server_uid = client.id
        size += get_mb_size(asset.data)
        if asset.shape is None:
            asset.shape = get_shape_or_len(asset.mock)
        asset.data = ActionObject.empty()  # uploaded above; not sent twice
        asset.mock = ActionObject.empty()
    dataset.mb_size = size
    dataset.check()
    return client.api.services.dataset.add(dataset=dataset)


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
