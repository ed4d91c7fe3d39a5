"""Launching real syft 0.9.5 datasites on loopback ports, in temporary homes."""

from __future__ import annotations

import io
import json
import os
import socket
import stat
from urllib.parse import urlsplit

import pandas as pd
import pytest

from fedmtl.cli import main as cli_main
from fedmtl.datasites.server import admin
from fedmtl.datasites.server.launch import free_port, launch, parse_meta
from fedmtl.datasites.site import home as home_mod
from fedmtl.datasites.site import identity, syftio
from fedmtl.errors import CredentialsError, DatasiteError, RecordsValidationError, SchemaError
from fedmtl.schema import Schema

RESEARCHER = "ada@uni.example"
RESEARCHER_PW = "correct-horse-battery"


@pytest.fixture(scope="module")
def site_files(tmp_path_factory):
    from fedmtl.datasites.data.cohort import prepare

    out = tmp_path_factory.mktemp("cohort")
    return {f.name: f for f in prepare(out, sites=3, seed=0)}


@pytest.fixture(scope="module")
def running_site(site_files, tmp_path_factory):
    # Prepare: the smallest demo hospital, launched as a real server on a free port
    f = site_files["riverside"]
    home = tmp_path_factory.mktemp("homes") / "riverside"
    handle = launch(home=home, name=f.name, records=f.records, schema=f.schema, port=free_port())
    admin.add_researcher(home=home, email=RESEARCHER, password=RESEARCHER_PW)
    yield handle
    handle.stop()


@pytest.mark.integration
def test_home_secrets_are_owner_only_and_default_admin_is_gone(running_site):
    home = running_site.home
    # Assert: secrets are owner-only
    assert stat.S_IMODE(os.stat(home / "secrets").st_mode) == 0o700
    for p in (home / "secrets").iterdir():
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    # the generated admin password works, syft's default admin does not exist
    assert running_site.login_admin() is not None
    with pytest.raises(CredentialsError):
        syftio.login(running_site.url, "info@openmined.org", "changethis")
    with pytest.raises(CredentialsError):
        syftio.login(running_site.url, running_site.admin_email, "wrong-password")


@pytest.mark.integration
def test_researcher_reads_mock_schema_and_keys_but_not_private(running_site, site_files):
    # Prepare
    f = site_files["riverside"]
    schema = Schema.load(f.schema)
    real = pd.read_csv(f.records)
    client = syftio.login(running_site.url, RESEARCHER, RESEARCHER_PW)
    # Execute
    with syftio.quiet():
        ds = client.datasets.get_all()[0]
        meta = parse_meta(ds.description.text)
        asset = ds.assets[0]
        mock = asset.mock
        private = asset.data
    # Assert: schema, label counts and public keys are published
    assert Schema.from_dict(meta["schema"]) == schema
    assert meta["label_counts"]["dyslipidemia_5y"]["labelled"] == 0  # this site lacks the task
    assert meta["identity"] == identity.load_public(running_site.home).to_dict()
    assert "secrets" not in json.dumps(meta)
    # the mock has the real columns and no real row
    assert list(mock.columns) == schema.names
    cols = [c.name for c in schema.columns if c.role not in ("id", "split")]
    real_rows = set(map(tuple, real[cols].astype(str).to_numpy()))
    assert not any(tuple(r) in real_rows for r in mock[cols].astype(str).to_numpy())
    # the private asset is refused to a researcher
    assert private is None or syftio.is_error(private)


@pytest.mark.integration
def test_status_and_cli_add_researcher(running_site, monkeypatch, capsys):
    # Execute: register a second researcher through the CLI, password from stdin
    monkeypatch.setattr("sys.stdin", io.StringIO("another-long-password\n"))
    rc = cli_main(["datasite", "add-researcher", "--home", str(running_site.home),
                   "--email", "bob@uni.example", "--password-stdin"])
    out = capsys.readouterr().out
    # Assert: registered, the password is not echoed
    assert rc == 0 and "another-long-password" not in out
    st = admin.status(running_site.home)
    assert st.running and st.url == running_site.url
    assert st.datasets == ["riverside-records"]
    assert {"ada@uni.example", "bob@uni.example"} <= set(st.researchers)
    # a duplicate or a short password gets a clear error
    with pytest.raises(DatasiteError, match="already exists"):
        admin.add_researcher(home=running_site.home, email=RESEARCHER, password=RESEARCHER_PW)
    with pytest.raises(DatasiteError, match="at least"):
        admin.add_researcher(home=running_site.home, email="c@uni.example", password="short")


@pytest.mark.integration
def test_home_of_another_datasite_and_port_in_use(running_site, site_files, tmp_path):
    f = site_files["general"]
    # a home that belongs to another datasite
    with pytest.raises(DatasiteError, match="belongs to datasite 'riverside'"):
        launch(home=running_site.home, name="general", port=free_port())
    # already running
    with pytest.raises(DatasiteError, match="already running"):
        launch(home=running_site.home, port=free_port())
    # a port in use: nothing is created
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(DatasiteError, match=f"port {port}.*in use"):
            launch(home=tmp_path / "g", name="general", records=f.records, schema=f.schema, port=port)
    assert not (tmp_path / "g").exists()
    # a non-empty folder that is not a home
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(DatasiteError, match="not empty"):
        launch(home=tmp_path / "busy", name="general", records=f.records, schema=f.schema, port=free_port())
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request) -> str | None:
    """The database backend under test: None for SQLite in HOME/db (the default), else the
    URL (password included) of an empty PostgreSQL database of the session's server."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_db")


@pytest.fixture
def postgres_server_if(db_url, request):
    """The PostgreSQL server when the test runs on it, else None."""
    return None if db_url is None else request.getfixturevalue("postgres_server")


def _submit_request(client, asset):
    """A researcher's code request (not a template: the reviewer denies it, it stays listed)."""
    sy = syftio.import_syft()

    @sy.syft_function_single_use(data=asset)
    def count_rows(data):
        return len(data)

    with syftio.quiet():
        return client.code.request_code_execution(count_rows)


def _pg_rows(url: str, table: str) -> int:
    import psycopg2

    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(f'SELECT count(*) FROM "{table}"')
            return int(cur.fetchone()[0])
    finally:
        conn.close()


@pytest.mark.integration
def test_stop_and_relaunch_keeps_dataset_users_requests_and_keys(db_url, site_files, tmp_path, postgres_server_if):
    # Prepare / Execute: first launch on the backend (SQLite or PostgreSQL), a researcher
    # logs in, sees the uploaded records and asks for something
    f = site_files["riverside"]
    home = tmp_path / "h"
    h = launch(home=home, name=f.name, records=f.records, schema=f.schema, port=free_port(), db_url=db_url)
    try:
        admin.add_researcher(home=home, email=RESEARCHER, password=RESEARCHER_PW)
        client = syftio.login(h.url, RESEARCHER, RESEARCHER_PW)
        with syftio.quiet():
            datasets = client.datasets.get_all()
            assert [d.name for d in datasets] == ["riverside-records"]
            assert list(datasets[0].assets[0].mock.columns) == Schema.load(f.schema).names
        request = _submit_request(client, datasets[0].assets[0])
        assert not syftio.is_error(request), request
        request_id = str(request.id)
        keys_before = identity.load_public(home).to_dict()
        password_before = h.admin_password
    finally:
        h.stop()
    assert home_mod.running(home) is None
    assert not admin.status(home).running
    # Assert: the home says which database, never its password
    cfg = json.loads((home / "datasite.json").read_text())
    if db_url is None:
        assert cfg["database"]["backend"] == "sqlite" and (home / "db" / "datasite.sqlite").is_file()
        assert h.database.startswith("sqlite:///")
    else:
        parts = urlsplit(db_url)
        assert cfg["database"]["backend"] == "postgresql" and not (home / "db").exists()
        assert h.database == cfg["database"]["url"] == db_url.replace(f":{parts.password}@", "@")
        for p in home.rglob("*"):
            if p.is_file() and p.name != "db_password":
                assert parts.password.encode() not in p.read_bytes(), p  # not in the config, not in the log
        secret = home / "secrets" / "db_password"
        assert secret.read_text().strip() == parts.password
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
        assert _pg_rows(db_url, "Dataset") == 1 and _pg_rows(db_url, "Request") == 1  # syft's state is there
    # Execute: relaunch without records and without --db: the same database
    h2 = launch(home=home, port=free_port())
    try:
        client = syftio.login(h2.url, RESEARCHER, RESEARCHER_PW)
        with syftio.quiet():
            names = [d.name for d in client.datasets.get_all()]
            requests = {str(r.id): r.status.name for r in h2.login_admin().requests.get_all()}
        # Assert: datasets, users, requests, keys and the admin password are all still there
        assert names == ["riverside-records"]
        assert request_id in requests and len(requests) == 1
        assert identity.load_public(home).to_dict() == keys_before
        assert h2.admin_password == password_before
        assert h2.database == h.database
        g = site_files["general"]
    finally:
        h2.stop()
    # other records for the same home are refused
    with pytest.raises(DatasiteError, match="other records"):
        launch(home=home, records=g.records, schema=g.schema, port=free_port())
    if db_url is None:
        with pytest.raises(DatasiteError, match="keeps its datasets, users and requests in SQLite"):
            launch(home=home, port=free_port(), db_url="postgresql://u:p@127.0.0.1:5432/x")
        return
    # PostgreSQL: a datasite's database is its own; a changed password says what to fix
    pg = postgres_server_if
    with pytest.raises(DatasiteError, match="already holds a datasite"):
        launch(home=tmp_path / "second", name="general", records=g.records, schema=g.schema,
               port=free_port(), db_url=db_url)
    assert not (tmp_path / "second").exists()
    with pytest.raises(DatasiteError, match="holds no datasite, not this one"):
        launch(home=home, port=free_port(), db_url=pg.new_database())
    pg.execute(f"ALTER ROLE {parts.username} PASSWORD 'rotated-password-1'")
    with pytest.raises(DatasiteError, match=r"wrong password.*stored in HOME/secrets/db_password.*relaunch with"):
        launch(home=home, port=free_port())
    assert json.loads((home / "datasite.json").read_text()) == cfg  # nothing changed
    # relaunching once with the new password stores it; the datasite is the same
    h3 = launch(home=home, port=free_port(), db_url=db_url.replace(parts.password, "rotated-password-1"))
    try:
        assert (home / "secrets" / "db_password").read_text().strip() == "rotated-password-1"
        with syftio.quiet():
            assert [d.name for d in syftio.login(h3.url, RESEARCHER, RESEARCHER_PW).datasets.get_all()] == names
    finally:
        h3.stop()


@pytest.mark.integration
def test_database_errors_say_what_to_fix_and_create_nothing(
    postgres_server, postgres_db, site_files, tmp_path, monkeypatch
):
    monkeypatch.delenv("FEDMTL_DB_PASSWORD", raising=False)
    f = site_files["riverside"]
    parts = urlsplit(postgres_db)
    home = tmp_path / "h"

    def first_launch(url):
        with pytest.raises(DatasiteError) as err:
            launch(home=home, name=f.name, records=f.records, schema=f.schema, port=free_port(), db_url=url)
        assert not home.exists()
        assert parts.password not in str(err.value)
        return str(err.value)

    # a wrong password
    msg = first_launch(postgres_db.replace(f":{parts.password}@", ":not-the-password@"))
    assert f"refused user {parts.username!r}: wrong password" in msg and "fix the password in --db" in msg
    # no password at all
    assert "give the password" in first_launch(postgres_db.replace(f":{parts.password}@", "@"))
    # nothing listens there
    dead = free_port()
    msg = first_launch(f"postgresql://{parts.username}:{parts.password}@127.0.0.1:{dead}/{parts.path[1:]}")
    assert f"cannot reach PostgreSQL at 127.0.0.1:{dead}" in msg and "is the database server running" in msg
    # no such database
    assert "createdb" in first_launch(postgres_db.rsplit("/", 1)[0] + "/no_such_db")
    # a database the user may not create tables in
    postgres_server.execute(f"CREATE DATABASE not_yours_{os.getpid()}")
    assert "may not create tables" in first_launch(postgres_db.rsplit("/", 1)[0] + f"/not_yours_{os.getpid()}")
    # URLs that are not PostgreSQL databases
    assert "SQLite is the default" in first_launch("sqlite:///tmp/x.sqlite")
    assert "no database name" in first_launch(f"postgresql://u:p@127.0.0.1:{postgres_server.port}")
    assert "not supported" in first_launch(postgres_db + "?sslmode=require")


BAD_CASES = {
    "missing column": lambda csv: csv.replace(",smoker", "").replace(",0,0,a", ",0,a"),
    "nan not allowed": lambda csv: csv.replace("1,34,F", "1,,F"),
    "duplicate id": lambda csv: csv.replace("2,51,M", "1,51,M"),
    "out of range": lambda csv: csv.replace("1,34,F", "1,340,F"),
    "wrong type": lambda csv: csv.replace("1,34,F", "1,old,F"),
    "empty file": lambda csv: "",
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_records_create_nothing(case, small_schema, small_csv, tmp_path):
    # Prepare
    schema = tmp_path / "schema.toml"
    small_schema.save(schema)
    records = tmp_path / "records.csv"
    records.write_text(BAD_CASES[case](small_csv))
    home = tmp_path / "home"
    # Execute / Assert: a clear error, no home, no port taken
    with pytest.raises(RecordsValidationError) as err:
        launch(home=home, name="tiny", records=records, schema=schema, port=free_port())
    assert "nothing was written" in str(err.value)
    assert not home.exists()


def test_non_utf8_records_and_bad_schema_create_nothing(small_schema, small_csv, tmp_path):
    schema = tmp_path / "schema.toml"
    small_schema.save(schema)
    records = tmp_path / "records.csv"
    records.write_bytes(small_csv.replace("F", "\xe9").encode("latin-1"))
    with pytest.raises(RecordsValidationError, match="UTF-8"):
        launch(home=tmp_path / "h", name="tiny", records=records, schema=schema, port=free_port())
    twice = tmp_path / "twice.toml"
    twice.write_text(schema.read_text() + '\n[[columns]]\nname = "age"\nrole = "feature"\ntype = "numeric"\n')
    records.write_text(small_csv)
    with pytest.raises(SchemaError, match="named twice"):
        launch(home=tmp_path / "h", name="tiny", records=records, schema=twice, port=free_port())
    assert not (tmp_path / "h").exists()


def test_first_launch_needs_records_and_a_valid_name(tmp_path, small_schema, small_csv):
    with pytest.raises(DatasiteError, match="first launch needs"):
        launch(home=tmp_path / "h", name="x", port=free_port())
    schema = tmp_path / "schema.toml"
    small_schema.save(schema)
    records = tmp_path / "r.csv"
    records.write_text(small_csv)
    with pytest.raises(DatasiteError, match="name 'St Mary' is invalid"):
        launch(home=tmp_path / "h", name="St Mary", records=records, schema=schema, port=free_port())
    assert not (tmp_path / "h").exists()


@pytest.mark.integration
def test_in_process_mode_serves_and_stops(site_files, tmp_path):
    # Prepare / Execute: the same datasite, served from a thread of this process
    f = site_files["riverside"]
    port = free_port()
    h = launch(home=tmp_path / "h", name=f.name, records=f.records, schema=f.schema, port=port, in_process=True)
    try:
        assert h.is_running()
        with syftio.quiet():
            names = [d.name for d in h.login_admin().datasets.get_all()]
        assert names == ["riverside-records"]
    finally:
        h.stop()
    # Assert: stopped, port released, relaunch (as a process) finds the same dataset
    from fedmtl.datasites.server.launch import port_free

    assert not h.is_running() and port_free("127.0.0.1", port)
    h2 = launch(home=tmp_path / "h", port=free_port())
    try:
        with syftio.quiet():
            assert [d.name for d in h2.login_admin().datasets.get_all()] == ["riverside-records"]
    finally:
        h2.stop()
