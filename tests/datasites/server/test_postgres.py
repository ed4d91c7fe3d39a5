"""fedmtl.datasites.server.postgres: the --db URL, the checks before a launch writes
anything, and the undo of a failed first launch, against a real PostgreSQL server.

(The whole launch on PostgreSQL, relaunch included, is in test_launch.py.)"""

from __future__ import annotations

import json

import pytest

from fedmtl.datasites.server.postgres import (
    DB_PASSWORD_ENV,
    PostgresDB,
    check_database,
    database_url,
    drop_new_tables,
    explain_db_error,
    redact_db_url,
    resolve_database,
    store_database,
)
from fedmtl.datasites.site import home as home_mod
from fedmtl.errors import DatasiteError


def test_db_url_parsing_keeps_the_password_out_of_sight():
    # percent-encoded parts are decoded; the URL a person sees has no password
    db = PostgresDB.parse("postgresql://us%40er:p%40ss%2Fw@[::1]:6543/my%20db")
    assert (db.host, db.port, db.user, db.database, db.password) == ("::1", 6543, "us@er", "my db", "p@ss/w")
    assert db.url == "postgresql://us%40er@[::1]:6543/my%20db" and "p@ss" not in repr(db)
    assert PostgresDB.parse("postgres://u@db.example/d").port == 5432
    assert redact_db_url("postgresql://u:p@s/s@h:1/d") == "postgresql://u:***@h:1/d"
    # the errors name the problem and never echo the password
    for url, reason in [("postgresql://u:hunter22@h:99999/d", "not a valid database URL"),
                        ("mysql://u:hunter22@h/d", "not a PostgreSQL URL"),
                        ("postgresql://u:hunter22@/d", "no host"),
                        ("sqlite:///x.db", "SQLite is the default")]:
        with pytest.raises(DatasiteError, match=reason) as err:
            PostgresDB.parse(url)
        assert "hunter22" not in str(err.value)


def test_connection_errors_say_where_the_password_came_from():
    # Prepare
    db = PostgresDB.parse("postgresql://site@db.example:5433/records")
    refused = 'FATAL:  password authentication failed for user "site"'
    # Execute / Assert: each source of the password gets its own fix
    assert "HOME/secrets/db_password" in explain_db_error(db, refused, password_from="home")
    assert f"fix the password in {DB_PASSWORD_ENV}" in explain_db_error(db, refused, password_from="env")
    assert "give the password" in explain_db_error(db, refused, password_from="none")
    assert "createdb" in explain_db_error(db, 'FATAL:  database "records" does not exist')


def _home(tmp_path, cfg=None):
    home = tmp_path / "home"
    home.mkdir()
    (home / "secrets").mkdir(mode=0o700)
    home_mod.write_config(home, cfg or {"name": "riverside"})
    return home


def test_a_sqlite_home_cannot_move_to_postgresql_and_passwords_resolve_in_order(tmp_path, monkeypatch):
    # Prepare
    monkeypatch.delenv(DB_PASSWORD_ENV, raising=False)
    home = _home(tmp_path)
    store_database(home, None)
    cfg = home_mod.read_config(home)
    # Execute / Assert: SQLite stays; the URL for people names the file
    assert resolve_database(home, cfg, None) == (None, "none")
    assert database_url(home) == f"sqlite:///{home / 'db' / 'datasite.sqlite'}"
    with pytest.raises(DatasiteError, match="cannot move to another database"):
        resolve_database(home, cfg, "postgresql://u:p@h/d")
    # a first launch: the URL's password first, then the environment's
    assert resolve_database(home, None, "postgresql://u:p@h/d")[1] == "url"
    monkeypatch.setenv(DB_PASSWORD_ENV, "from-env")
    db, source = resolve_database(home, None, "postgresql://u@h/d")
    assert (db.password, source) == ("from-env", "env")


@pytest.mark.integration
def test_check_store_and_undo_on_a_real_server(postgres_server, postgres_db, tmp_path, monkeypatch):
    # Prepare: an empty database owned by its own role, and a home
    monkeypatch.delenv(DB_PASSWORD_ENV, raising=False)
    db = PostgresDB.parse(postgres_db)
    home = _home(tmp_path)
    # Execute: a first launch's check, then syft's tables appear (one carries the server id)
    before = check_database(db, server_id=None)
    server_id = "0123456789abcdef0123456789abcdef"
    postgres_server.execute(
        'CREATE TABLE "ServerSettings" (id text)', f"INSERT INTO \"ServerSettings\" VALUES ('{server_id}')",
        f'ALTER TABLE "ServerSettings" OWNER TO "{db.user}"', database=db.database)
    store_database(home, db)
    # Assert: the home holds the URL without the password, the password owner-only
    cfg = home_mod.read_config(home)
    assert cfg["database"]["url"] == db.url and db.password not in json.dumps(cfg)
    secret = home / "secrets" / home_mod.DB_PASSWORD_SECRET
    assert secret.read_text().strip() == db.password and (secret.stat().st_mode & 0o077) == 0
    assert resolve_database(home, cfg, None) == (db, "home")
    # a relaunch finds its own datasite; another launch may not take this database
    assert "ServerSettings" in check_database(db, server_id=server_id, password_from="home")
    with pytest.raises(DatasiteError, match="already holds a datasite"):
        check_database(db, server_id=None)
    with pytest.raises(DatasiteError, match="not this one"):
        check_database(db, server_id="f" * 32)
    # a failed first launch drops only the tables it created
    drop_new_tables(db, before)
    assert check_database(db, server_id=None) == before
