"""The datasite server process: ``python -m fedmtl.datasites.server --home HOME``.

It runs one PySyft 0.9.5 datasite (FastAPI + uvicorn) whose state lives in the home
folder: the SQLite database (or, with ``launch --db``, a PostgreSQL database that the
home's config names), the blob store, syft's own signing key and server id. So stopping
and relaunching with the same home keeps datasets, users and requests.

We do not use ``sy.orchestra.launch(port=...)``: it makes a fresh server id and signing key
on every start (state would not survive a restart), and ``Datasite.named`` derives the
server key from the name, which anyone can guess. syft's own chatter goes to
``HOME/logs/server.log``, not to the terminal.

The process reads ``HOME/datasite.json`` (written by :mod:`fedmtl.datasites.server.launch`) and
the admin password from ``HOME/secrets/admin_password``. It writes ``HOME/server.pid``
while it runs and removes it on exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from fedmtl.datasites.site import home as home_mod
from fedmtl.datasites.site import syftio


def build_app(home: Path):
    """Build the FastAPI app of the datasite whose home is ``home``."""
    from fastapi import APIRouter, FastAPI
    from syft.server.routes import make_routes

    cfg = home_mod.read_config(home)
    secrets = home / "secrets"
    blob_dir = home / "blob"
    blob_dir.mkdir(exist_ok=True)
    # syft prints its database URL, password included, while it starts: not to the log
    with syftio.quiet():
        worker = _datasite(home, cfg, secrets, blob_dir)
    refuse_guests(worker)
    from fedmtl.datasites import runtime

    runtime.register_home(cfg["name"], home)
    app = FastAPI(title=cfg["name"])
    api = APIRouter()
    api.include_router(make_routes(worker=worker))
    app.include_router(api, prefix="/api/v2")
    from fedmtl.datasites.server import dataplane, http_guard

    dataplane.mount(app, dataplane.DataPlane(home, cfg["name"], dataplane.records_loader(home, worker),
                                             dataplane.spec_finder(worker)))
    # syft's routes read a body whole before they check who sent it: bound it (the data
    # plane bounds its own, per job, after authenticating the request)
    app.add_middleware(http_guard.BodyLimit, limit=http_guard.syft_body_limit(home),
                       exempt=(dataplane.ROUND_PATH,))
    return app, worker


def db_config(home: Path, cfg: dict):
    """syft's database config for the home: SQLite in HOME/db (the default), or the
    PostgreSQL database of ``cfg["database"]`` with the password from HOME/secrets."""
    db = home_mod.database(cfg)
    if db["backend"] == "postgresql":
        from syft.store.db.postgres import PostgresDBConfig

        secret = db.get("password_secret")
        return PostgresDBConfig(
            host=db["host"],
            port=int(db["port"]),
            user=db["user"],
            password=home_mod.read_secret(home, secret) if secret else "",
            database=db["database"],
        )
    from syft.store.db.sqlite import SQLiteDBConfig

    (home / "db").mkdir(exist_ok=True)
    return SQLiteDBConfig(path=home / "db", filename="datasite.sqlite")


def _datasite(home: Path, cfg: dict, secrets: Path, blob_dir: Path):
    from syft.server.credentials import SyftSigningKey
    from syft.server.datasite import Datasite
    from syft.store.blob_storage.on_disk import (
        OnDiskBlobStorageClientConfig,
        OnDiskBlobStorageConfig,
    )
    from syft.types.uid import UID

    return Datasite(
        name=cfg["name"],
        id=UID.from_string(cfg["server_id"]),
        signing_key=SyftSigningKey.from_string(
            (secrets / "syft_signing_key").read_text().strip()
        ),
        db_config=db_config(home, cfg),
        root_email=cfg["admin_email"],
        root_password=(secrets / "admin_password").read_text().strip(),
        blob_storage_config=OnDiskBlobStorageConfig(
            client_config=OnDiskBlobStorageClientConfig(base_directory=blob_dir),
        ),
        deployment_type="remote",
        in_memory_workers=True,
        enable_warnings=False,
        log_level=logging.WARNING,
    )


#: API paths a client without an account (syft's GUEST role) may still call: the public
#: server metadata (the same as ``GET /api/v2/metadata``), nothing that reads data
GUEST_PATHS = frozenset({"metadata"})

GUEST_REFUSED = (
    "this datasite serves registered researchers only: log in with the account its owner "
    "made for you (`sy.login(url=..., port=..., email=..., password=...)`)"
)

DATABASE_UNAVAILABLE = (
    "this datasite's database is unavailable at the moment (its owner's log says why); "
    "nothing was done: retry in a minute, your login is still valid"
)
log = logging.getLogger("fedmtl.datasite")


def database_unavailable(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is the database failing, not the caller: a
    connection refused or cut, a server shutting down, a disk the database cannot write
    (SQLAlchemy's ``OperationalError``/``InterfaceError``, the DB-API's own classes)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ in ("OperationalError", "InterfaceError", "DisconnectionError"):
            return True
        e = e.__cause__ or e.__context__
    return False


def refuse_guests(worker) -> None:
    """Guests see nothing: a client that holds no account on this datasite (syft's GUEST
    role: ``sy.login_as_guest``, or any key it does not know) gets an error for every API
    call, so it cannot list datasets, read a description (schema, label counts, split
    sizes, public keys), an asset, its mock, a blob or an action object.

    syft 0.9.5 lets guests list datasets (``dataset.get_all``/``search`` are GUEST-level)
    and runs non-blocking calls from the queue without checking roles at all, so three
    locks, each enough against the routes it covers:

    1. every API call is checked at its entry, before syft dispatches, queues or forwards
       it: a signed call whose key maps to the GUEST (or no) role is answered with an
       error, whatever its path and its ``blocking`` flag (and any caller's queued call
       gets the role check syft gives blocking calls only);
    2. no service method lists the GUEST role any more (the API a guest downloads is
       empty, and syft's own role check refuses them too);
    3. syft's own switch ``allow_guest_sessions`` is off (persisted in the settings, set
       at every start so homes made before this rule get it).

    Registered researchers (DATA_SCIENTIST) and the owner keep every right they had.
    """
    from syft.service.context import AuthedServiceContext
    from syft.service.response import SyftError
    from syft.service.service import ServiceConfigRegistry, UserServiceConfigRegistry
    from syft.service.settings.settings import ServerSettingsUpdate
    from syft.service.user.user_roles import ServiceRole

    # 3. syft's switch (its check runs only for blocking calls, hence 1.)
    admin = AuthedServiceContext(server=worker, credentials=worker.verify_key, role=ServiceRole.ADMIN)
    worker.services.settings._update(admin, ServerSettingsUpdate(allow_guest_sessions=False)).unwrap()
    if hasattr(worker, "_settings"):
        worker._settings = None  # syft caches the settings it read before the update

    # 2. role levels (the registry is per process; this process runs one datasite)
    for config in ServiceConfigRegistry.get_registered_configs().values():
        if ServiceRole.GUEST in config.roles:
            config.roles = [r for r in config.roles if r not in (ServiceRole.GUEST, ServiceRole.NONE)]

    # 1. the gate at the entry of every API call
    original = worker.handle_api_call_with_unsigned_result

    def gated(api_call, *args, **kwargs):
        try:
            credentials = api_call.credentials
            path = api_call.message.path
            role = worker.get_role_for_credentials(credentials=credentials)
        except Exception as e:  # noqa: BLE001 - unsigned, malformed or unknown: refused
            if database_unavailable(e):  # not the caller's fault: say so, and log it here
                log.error("the database is unavailable: %s: %s", type(e).__name__, str(e).splitlines()[0][:300])
                return SyftError(message=DATABASE_UNAVAILABLE)
            return SyftError(message=GUEST_REFUSED)
        if path in GUEST_PATHS:
            return original(api_call, *args, **kwargs)
        if role.value < ServiceRole.DATA_SCIENTIST.value:
            return SyftError(message=GUEST_REFUSED)
        if path != "queue" and path not in UserServiceConfigRegistry.from_role(role):
            # syft checks the role only for blocking calls; a queued call would skip it
            return SyftError(message=f"as a {role.name}, you have no access to {path}")
        return original(api_call, *args, **kwargs)

    worker.handle_api_call_with_unsigned_result = gated


THREADS_ENV = "FEDMTL_TORCH_THREADS"


def apply_thread_limit() -> int | None:
    """CPU threads for training in this datasite process: ``FEDMTL_TORCH_THREADS`` when
    set (several datasites sharing one machine: give each its share of the cores, or
    their thread pools oversubscribe it), else torch's default (every core)."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        logging.getLogger("fedmtl.datasite").warning("%s=%r is not a positive integer; ignored", THREADS_ENV, raw)
        return None
    import torch

    torch.set_num_threads(int(raw))
    return int(raw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedmtl.datasites.server")
    parser.add_argument("--home", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", required=True, type=int)
    args = parser.parse_args(argv)
    home = args.home.resolve()
    os.environ["FEDMTL_HOME"] = str(home)

    import uvicorn

    app, worker = build_app(home)
    apply_thread_limit()
    from fedmtl.datasites.review import manual_review, reviewer_thread

    reviewer_thread.start_background(home, worker)
    from fedmtl.datasites.server import control, http_guard
    from fedmtl.datasites.site import home as home_mod

    try:  # a convenience for the owner's commands: never a reason not to start
        control.serve(home, worker, admin_email=home_mod.read_config(home)["admin_email"],
                      list_requests=manual_review.list_requests)
    except OSError as e:
        logging.getLogger("fedmtl.datasite").warning("control socket not available (%s); status and "
                                                     "add-researcher will log in with syft", e)
    pidfile = home / "server.pid"
    pidfile.write_text(json.dumps({"pid": os.getpid(), "host": args.host, "port": args.port}))

    def _term(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    try:
        # header/body deadlines and a connection cap on every connection (http_guard)
        http_guard.raise_open_file_limit()
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                    **http_guard.uvicorn_options())
    except KeyboardInterrupt:
        pass
    finally:
        reviewer_thread.stop_background()
        control.stop_serving()
        try:
            worker.stop()
        except Exception:  # noqa: BLE001 - best effort on shutdown
            pass
        pidfile.unlink(missing_ok=True)
    return 0


def exit_now(code: int) -> None:
    """Leave at once once cleanup is done: the interpreter's own teardown with torch and
    syft loaded takes seconds, and `fedmtl datasite stop` waits for the process.

    Args:
        code: the process's exit status.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - nothing left to report to
            pass
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
