"""Shared fixtures for the datasite tests: a small valid schema and records, and the
demo NAFLD cohort prepared once per session.

Used by test_records, test_mock, test_cohort and test_launch (whose bad-records cases edit
``small_csv`` by text replacement: keep rows ``1,34,F`` and ``2,51,M`` as they are).

``postgres_server`` (session) runs a throw-away PostgreSQL 15 server on a free loopback
port for the datasite tests that run on PostgreSQL; ``postgres_db`` gives each test an
empty database of its own (owned by its own role, as a hospital's DBA would set it up).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import pytest

from fedmtl.schema import Schema

SMALL_SCHEMA = {
    "dataset": {"name": "tiny", "description": "a small test hospital"},
    "columns": [
        {"name": "pid", "role": "id", "type": "numeric"},
        {"name": "age", "role": "feature", "type": "numeric", "min": 0, "max": 120},
        {"name": "sex", "role": "feature", "type": "categorical", "categories": ["F", "M"]},
        {"name": "bmi", "role": "feature", "type": "numeric", "min": 10, "max": 80, "missing": True},
        {"name": "smoker", "role": "feature", "type": "binary", "missing": True},
        {"name": "diabetes", "role": "label", "type": "binary", "missing": True},
        {"name": "stage", "role": "label", "type": "categorical", "categories": ["a", "b", "c"], "missing": True},
        {"name": "los", "role": "label", "type": "numeric", "min": 0, "max": 365, "missing": True},
        {"name": "split", "role": "split", "type": "categorical", "categories": ["train", "test"]},
    ],
}

# header is row 1, so the patients are rows 2..7
SMALL_CSV = (
    "pid,age,sex,bmi,smoker,diabetes,stage,los,split\n"
    "1,34,F,22.5,0,0,a,3,train\n"
    "2,51,M,31.4159,1,1,b,12.5,train\n"
    "3,47,F,,0,,a,,test\n"
    "4,62,M,27,1,1,c,0,train\n"
    "5,29,F,19.8,,0,,7,train\n"
    "6,70,M,NaN,0,NA,,,test\n"
)


@pytest.fixture
def small_schema() -> Schema:
    return Schema.from_dict(SMALL_SCHEMA)


@pytest.fixture
def small_csv() -> str:
    return SMALL_CSV


@pytest.fixture
def write_file(tmp_path: Path) -> Callable[[str, str | bytes], Path]:
    """``write_file(name, text_or_bytes) -> Path`` inside the test's tmp dir."""

    def _write(name: str, content: str | bytes) -> Path:
        p = tmp_path / name
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")
        return p

    return _write


@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory):
    """``(out_dir, [SiteFiles])``: the demo cohort (3 sites, seed 0), prepared once per session."""
    from fedmtl.datasites.data.cohort import prepare

    out = tmp_path_factory.mktemp("demo-cohort")
    return out, prepare(out, sites=3, seed=0)


@pytest.fixture(scope="session")
def demo_records(demo_cohort):
    """``{site name: (schema, records DataFrame)}`` for the demo cohort."""
    from fedmtl.datasites.data.records import load_records

    _, files = demo_cohort
    out = {}
    for sf in files:
        schema = Schema.load(sf.schema)
        out[sf.name] = (schema, load_records(sf.records, schema))
    return out


# -- a throw-away PostgreSQL 15 server ------------------------------------------------

PG_MAJOR = "15"
PG_SUPERUSER = "fedmtl_test"
PG_MISSING = (
    "PostgreSQL {major} server binaries (initdb, pg_ctl, postgres) not found on PATH or in "
    "/usr/lib/postgresql/*/bin: install them (Debian: `apt-get install postgresql-{major}`) to run "
    "the datasite tests on PostgreSQL"
)


def _pg_bindir() -> Path | None:
    """The folder with initdb, pg_ctl and postgres: PATH first, then Debian's layout
    (/usr/lib/postgresql/VERSION/bin, which is not on PATH), version 15 preferred."""
    tools = ("initdb", "pg_ctl", "postgres")
    found = shutil.which("pg_ctl")
    dirs = [Path(os.path.realpath(found)).parent] if found else []
    base = Path("/usr/lib/postgresql")
    dirs.append(base / PG_MAJOR / "bin")
    if base.is_dir():
        dirs += sorted((d / "bin" for d in base.iterdir()), reverse=True)
    for d in dirs:
        if all(os.access(d / t, os.X_OK) for t in tools):
            return d
    return None


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@dataclass
class PostgresServer:
    """A running PostgreSQL server on ``127.0.0.1:port``: password (scram) logins only."""

    bindir: Path
    base: Path
    port: int
    password: str
    run_as: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    opts: str = ""
    _n: count = field(default_factory=lambda: count(1))

    def url(self, database: str, user: str | None = None, password: str | None = None) -> str:
        user = user or PG_SUPERUSER
        pw = self.password if password is None and user == PG_SUPERUSER else password
        auth = f"{user}:{pw}" if pw else user
        return f"postgresql://{auth}@{self.host}:{self.port}/{database}"

    def execute(self, *statements: str, database: str = "postgres") -> None:
        import psycopg2

        conn = psycopg2.connect(host=self.host, port=self.port, user=PG_SUPERUSER,
                                password=self.password, dbname=database)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                for sql in statements:
                    cur.execute(sql)
        finally:
            conn.close()

    def new_database(self) -> str:
        """An empty database owned by a role of its own; its URL, password included."""
        i = next(self._n)
        name, role, pw = f"site_{os.getpid()}_{i}", f"site_role_{os.getpid()}_{i}", f"pw-{i}-{os.urandom(6).hex()}"
        self.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{pw}'", f"CREATE DATABASE {name} OWNER {role}")
        return self.url(name, user=role, password=pw)

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.base / "data"), *args],
                              capture_output=True, text=True, check=check, timeout=120)

    def stop(self) -> None:
        """Stop the server at once (an outage: clients' connections are cut)."""
        self.pg_ctl("-m", "immediate", "-w", "stop")

    def start(self) -> subprocess.CompletedProcess:
        """Start it again on the same port, with the same options."""
        return self.pg_ctl("-l", str(self.base / "server.log"), "-w", "-t", "60", "-o", self.opts, "start",
                           check=False)


def _start_postgres(bindir: Path) -> PostgresServer:
    import pwd
    import secrets as _secrets

    from fedmtl.datasites.server.launch import free_port

    run_as: list[str] = []
    owner = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as the postgres user
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root, and there is no `postgres` user to run PostgreSQL as "
                        "(the postgresql package creates it)")
        if shutil.which("runuser"):
            run_as = ["runuser", "-u", "postgres", "--"]
        else:
            run_as = ["su", "postgres", "-s", "/bin/sh", "-c", '"$0" "$@"']
    # not under pytest's tmp folder: that one is root-only, and the postgres user must reach it
    base = Path(tempfile.mkdtemp(prefix="fedmtl-pg-"))
    password = _secrets.token_hex(12)
    pwfile = base / "superuser-password"
    pwfile.write_text(password + "\n")
    if owner is not None:
        for p in (base, pwfile):
            os.chown(p, owner.pw_uid, owner.pw_gid)
    os.chmod(pwfile, 0o600)
    server = PostgresServer(bindir=bindir, base=base, port=free_port(), password=password, run_as=run_as)
    init = subprocess.run(
        [*run_as, str(bindir / "initdb"), "-D", str(base / "data"), "-U", PG_SUPERUSER, f"--pwfile={pwfile}",
         "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
        capture_output=True, text=True, timeout=180,
    )
    if init.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"initdb failed:\n{init.stdout}\n{init.stderr}")
    opts = (f"-p {server.port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
    server.opts = opts
    start = server.start()
    if start.returncode != 0:
        log = (base / "server.log").read_text(errors="replace") if (base / "server.log").exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"pg_ctl start failed:\n{start.stdout}\n{start.stderr}\n{log}")
    return server


@pytest.fixture(scope="session")
def postgres_server() -> PostgresServer:
    """A PostgreSQL 15 server of its own for the session (initdb in a temporary folder,
    pg_ctl start on a free loopback port), stopped and removed at the end. Skips when the
    binaries are missing, except in CI (CI=true), where that is a failure."""
    bindir = _pg_bindir()
    if bindir is None:
        msg = PG_MISSING.format(major=PG_MAJOR)
        if _in_ci():
            pytest.fail(f"{msg} (CI must run them: .ci/run installs postgresql-{PG_MAJOR})")
        pytest.skip(msg)
    server = _start_postgres(bindir)
    try:
        yield server
    finally:
        server.pg_ctl("-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(server.base, ignore_errors=True)


@pytest.fixture
def postgres_db(postgres_server) -> str:
    """An empty PostgreSQL database for one test: its URL, with its owner's password."""
    return postgres_server.new_database()


def _register_compliance_helpers() -> None:
    """Make ``import compliance_helpers`` work in the policy/review/ledger/audit tests
    (pytest runs with --import-mode=importlib, so sibling modules are not importable)."""
    import importlib.util
    import sys

    name = "compliance_helpers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)


_register_compliance_helpers()
