"""Where a datasite keeps syft's state: SQLite in HOME/db (the default) or a PostgreSQL
database the hospital runs (``fedmtl datasite launch --db postgresql://...``).

:class:`PostgresDB` parses and prints the URL without its password;
:func:`resolve_database` picks the database of a launch (and where its password comes
from: the URL, ``FEDMTL_DB_PASSWORD`` or the home's owner-only secret);
:func:`check_database` checks it suits the launch before anything is written;
:func:`store_database` records it in the home; :func:`drop_new_tables` undoes a failed
first launch. Every refusal says what to fix (:func:`explain_db_error`).

Imports psycopg2 only when it connects; never syft.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from fedmtl.datasites.site import home as home_mod
from fedmtl.errors import DatasiteError

#: the PostgreSQL password, when the --db URL carries none (keeps it off the command line)
DB_PASSWORD_ENV = "FEDMTL_DB_PASSWORD"
DB_URL_FORM = "postgresql://USER:PASSWORD@HOST:PORT/DBNAME"
DB_CONNECT_TIMEOUT = 10
_PG_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg2")
#: the table in which syft keeps its server settings; its row's id is the server id
_SYFT_SETTINGS_TABLE = "ServerSettings"


@dataclass(frozen=True)
class PostgresDB:
    """The PostgreSQL database a datasite keeps syft's state in (datasets, users,
    requests). The password is never shown: not in ``repr``, not in :attr:`url`."""

    host: str
    port: int
    user: str
    database: str
    password: str | None = field(default=None, repr=False, compare=False)

    @property
    def url(self) -> str:
        """``postgresql://USER@HOST:PORT/DBNAME``: no password, safe to print and store."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"postgresql://{quote(self.user, safe='')}@{host}:{self.port}/{quote(self.database, safe='')}"

    @classmethod
    def parse(cls, url: str, password: str | None = None) -> "PostgresDB":
        """Parse ``postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME`` (percent-encoded
        parts are decoded); ``password`` is used when the URL has none."""
        text = (url or "").strip()
        shown = redact_db_url(text)
        form = f"write it as {DB_URL_FORM}"
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as e:
            raise DatasiteError(f"--db {shown} is not a valid database URL ({e}); {form}") from None
        if parts.scheme.startswith("sqlite"):
            raise DatasiteError(
                f"--db {shown}: SQLite is the default (the database lives in HOME/db); "
                f"--db is for PostgreSQL: {form}"
            )
        if parts.scheme not in _PG_SCHEMES:
            raise DatasiteError(f"--db {shown} is not a PostgreSQL URL; {form}")
        name = unquote(parts.path.lstrip("/"))
        missing = [what for what, v in (("user", parts.username), ("host", parts.hostname), ("database name", name))
                   if not v]
        if missing:
            raise DatasiteError(f"--db {shown} has no {' and no '.join(missing)}; {form}")
        if "/" in name:
            raise DatasiteError(f"--db {shown}: {name!r} is not a database name; {form}")
        if parts.query or parts.fragment:
            raise DatasiteError(
                f"--db {shown}: URL options ({parts.query or parts.fragment}) are not supported; "
                "libpq's environment variables (PGSSLMODE, PGSSLROOTCERT, ...) apply to the "
                "datasite's connection instead"
            )
        return cls(
            host=parts.hostname,
            port=port or 5432,
            user=unquote(parts.username),
            database=name,
            password=unquote(parts.password) if parts.password is not None else password,
        )

    def to_config(self, password_secret: str | None) -> dict[str, Any]:
        """The ``"database"`` entry of datasite.json: where, never the password itself."""
        return {
            "backend": "postgresql",
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "database": self.database,
            "url": self.url,
            "password_secret": password_secret,
        }

    @classmethod
    def from_config(cls, db: dict[str, Any], password: str | None) -> "PostgresDB":
        return cls(host=db["host"], port=int(db["port"]), user=db["user"], database=db["database"], password=password)


def redact_db_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``: everything between the
    user's ``:`` and the last ``@`` (a password may hold unencoded ``@`` or ``/``)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hostpart}"


def database_url(home: str | Path) -> str:
    """Where the datasite of ``home`` keeps its datasets, users and requests, for people:
    ``sqlite:///HOME/db/datasite.sqlite`` or its PostgreSQL URL without the password."""
    home = Path(home)
    db = home_mod.database(home_mod.read_config(home))
    if db["backend"] == "postgresql":
        return db["url"]
    return f"sqlite:///{home / 'db' / 'datasite.sqlite'}"


def _stored_db_password(home: Path, db: dict[str, Any]) -> str | None:
    name = db.get("password_secret")
    if not name or not (home / "secrets" / name).is_file():
        return None
    return home_mod.read_secret(home, name)


def resolve_database(home: Path, cfg: dict[str, Any] | None, db_url: str | None) -> tuple[PostgresDB | None, str]:
    """The PostgreSQL database of this launch (None: SQLite in HOME/db), and where its
    password came from ("url", "env", "home" or "none"). The password is the URL's, else
    ``FEDMTL_DB_PASSWORD``, else (relaunch) the one stored in the home."""
    env_pw = os.environ.get(DB_PASSWORD_ENV) or None
    stored = home_mod.database(cfg) if cfg is not None else None
    if db_url is None:
        if stored is None or stored["backend"] == "sqlite":
            return None, "none"
        if env_pw is not None:
            return PostgresDB.from_config(stored, env_pw), "env"
        pw = _stored_db_password(home, stored)
        return PostgresDB.from_config(stored, pw), "home" if pw is not None else "none"
    db = PostgresDB.parse(db_url)
    if stored is not None and stored["backend"] == "sqlite":
        raise DatasiteError(
            f"{home} keeps its datasets, users and requests in SQLite ({home / 'db'}); a datasite "
            "cannot move to another database. Relaunch without --db, or launch a new datasite "
            "(a new --home) with --db"
        )
    if db.password is not None:
        return db, "url"
    if env_pw is not None:
        return replace(db, password=env_pw), "env"
    pw = _stored_db_password(home, stored) if stored is not None else None
    return replace(db, password=pw), "home" if pw is not None else "none"


def _pg_connect(db: PostgresDB, *, password_from: str):
    """A psycopg2 connection, or a DatasiteError that says what to fix."""
    import psycopg2

    try:
        return psycopg2.connect(
            host=db.host,
            port=db.port,
            user=db.user,
            password=db.password,
            dbname=db.database,
            connect_timeout=DB_CONNECT_TIMEOUT,
            application_name="fedmtl-launch",
        )
    except psycopg2.Error as e:
        raise DatasiteError(explain_db_error(db, str(e), password_from=password_from)) from None


def explain_db_error(db: PostgresDB, message: str, *, password_from: str = "url") -> str:
    """A connection error of PostgreSQL as a message that says what to fix."""
    text = " ".join(message.split())
    low = text.lower()
    where = f"PostgreSQL at {db.host}:{db.port}"
    fix_url = f"--db postgresql://{db.user}:PASSWORD@{db.host}:{db.port}/{db.database}"
    if "password authentication failed" in low or "no password supplied" in low:
        if password_from == "home":
            how = (f"the password stored in HOME/secrets/db_password is no longer accepted: relaunch with "
                   f"{fix_url} (or {DB_PASSWORD_ENV}) to store the new one")
        elif password_from == "env":
            how = f"fix the password in {DB_PASSWORD_ENV}"
        elif password_from == "none":
            how = f"give the password: {fix_url} (or set {DB_PASSWORD_ENV})"
        else:
            how = f"fix the password in {fix_url} (or leave it out and set {DB_PASSWORD_ENV})"
        return f"{where} refused user {db.user!r}: wrong password (or no such user). To fix it, {how}"
    if "does not exist" in low and 'database "' in low:
        return (f"database {db.database!r} does not exist on {where}: create it "
                f"(`createdb -h {db.host} -p {db.port} -U {db.user} {db.database}`) or fix the name in --db")
    if "does not exist" in low and 'role "' in low:
        return f"{where} has no user {db.user!r}: create it (`createuser`) or fix the user in --db"
    if "no pg_hba.conf entry" in low:
        return (f"{where} does not let this machine connect as {db.user!r} to {db.database!r} "
                "(no pg_hba.conf entry): ask its administrator to allow it, or fix the --db URL")
    if "could not translate host name" in low:
        return f"cannot find the database host {db.host!r} ({text}); fix the host in --db"
    return (f"cannot reach {where} ({text}); is the database server running, are the host and port "
            "in --db right, and do its firewall and listen_addresses let this machine in?")


def _pg_tables(cur) -> frozenset[str]:
    cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
    return frozenset(r[0] for r in cur.fetchall())


def check_database(db: PostgresDB, *, server_id: str | None, password_from: str = "url") -> frozenset[str]:
    """Connect once and check the database suits this launch; returns its tables now.

    First launch (``server_id`` None): the database holds no datasite yet (each datasite
    needs its own) and the user may create tables in it. Relaunch: the database holds
    this datasite (syft's settings row carries the server id), so its datasets, users and
    requests are there. Every refusal says what to fix; nothing is written."""
    conn = _pg_connect(db, password_from=password_from)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_schema()")
            (schema,) = cur.fetchone()
            tables = _pg_tables(cur) if schema is not None else frozenset()
            ids: list[str] = []
            if _SYFT_SETTINGS_TABLE in tables:
                cur.execute(f'SELECT id FROM "{_SYFT_SETTINGS_TABLE}"')
                ids = [str(r[0]).replace("-", "").lower() for r in cur.fetchall()]
            may_create = False
            if schema is not None:
                cur.execute("SELECT has_schema_privilege(current_schema(), 'CREATE')")
                may_create = bool(cur.fetchone()[0])
    finally:
        conn.close()
    if server_id is None:
        if ids:
            raise DatasiteError(
                f"database {db.url} already holds a datasite (server id {ids[0]}); each datasite needs "
                f"its own database: create an empty one (`createdb -h {db.host} -p {db.port} -U {db.user} "
                "NAME`) and give it in --db"
            )
        if schema is None or not may_create:
            raise DatasiteError(
                f"user {db.user!r} may not create tables in database {db.database!r}"
                f"{f' (schema {schema!r})' if schema else ' (no schema on its search_path)'}: make the "
                f"user the database's owner (`ALTER DATABASE \"{db.database}\" OWNER TO \"{db.user}\"`) or "
                f"grant it (`GRANT CREATE ON SCHEMA public TO \"{db.user}\"`)"
            )
        return tables
    if server_id.replace("-", "").lower() not in ids:
        held = f"another datasite (server id {ids[0]})" if ids else "no datasite"
        raise DatasiteError(
            f"database {db.url} holds {held}, not this one (server id {server_id}): this home's "
            "datasets, users and requests are in the database it was created on. Relaunch with "
            "that database in --db (or without --db), or restore it from a backup"
        )
    return tables


def store_database(home: Path, db: PostgresDB | None) -> None:
    """Record the database in datasite.json (no password) and its password, if any, in
    the owner-only HOME/secrets/db_password."""
    cfg = home_mod.read_config(home)
    if db is None:
        entry: dict[str, Any] = {"backend": "sqlite", "path": "db/datasite.sqlite"}
    else:
        secret = None
        if db.password:
            secret = home_mod.DB_PASSWORD_SECRET
            if _stored_db_password(home, {"password_secret": secret}) != db.password:
                home_mod.write_secret(home, secret, db.password)
        else:
            (home / "secrets" / home_mod.DB_PASSWORD_SECRET).unlink(missing_ok=True)
        entry = db.to_config(secret)
    if cfg.get("database") != entry:
        home_mod.write_config(home, {**cfg, "database": entry})


def drop_new_tables(db: PostgresDB, before: frozenset[str]) -> None:
    """Undo a failed first launch in its database: drop the tables it created (the
    database held no datasite before; tables it already held are left alone)."""
    import psycopg2
    from psycopg2 import sql

    try:
        conn = _pg_connect(db, password_from="url")
    except DatasiteError:
        return
    try:
        with conn.cursor() as cur:
            for table in sorted(_pg_tables(cur) - before):
                cur.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(table)))
        conn.commit()
    except psycopg2.Error:
        conn.rollback()
    finally:
        conn.close()


__all__ = [
    "DB_CONNECT_TIMEOUT",
    "DB_PASSWORD_ENV",
    "DB_URL_FORM",
    "PostgresDB",
    "check_database",
    "database_url",
    "drop_new_tables",
    "explain_db_error",
    "redact_db_url",
    "resolve_database",
    "store_database",
]
