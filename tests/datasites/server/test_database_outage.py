"""A datasite whose PostgreSQL database goes away: the researcher is told the database is
unavailable (not to log in again), and the datasite serves again once the database is back,
without a relaunch (issue 21)."""

from __future__ import annotations

import pytest

from fedmtl.datasites.server import admin
from fedmtl.datasites.server.launch import free_port, launch
from fedmtl.datasites.site import syftio

RESEARCHER = "ada@uni.example"
RESEARCHER_PW = "correct-horse-battery"


@pytest.fixture(scope="module")
def site_files(tmp_path_factory):
    from fedmtl.datasites.data.cohort import prepare

    out = tmp_path_factory.mktemp("cohort")
    return {f.name: f for f in prepare(out, sites=3, seed=0)}


def _datasets(client) -> str:
    """The researcher's dataset listing, or the error text syft gives back."""
    try:
        with syftio.quiet():
            got = client.api.services.dataset.get_all()
    except Exception as e:  # noqa: BLE001 - the error text is what the test reads
        return f"error: {e}"
    return f"error: {got.message}" if type(got).__name__ == "SyftError" else f"ok: {[d.name for d in got]}"


@pytest.mark.integration
def test_a_database_outage_says_so_and_recovers_without_a_relaunch(site_files, tmp_path, postgres_server):
    f = site_files["riverside"]
    home = tmp_path / "riverside"
    handle = launch(home=home, name=f.name, records=f.records, schema=f.schema, port=free_port(),
                    db_url=postgres_server.new_database())
    try:
        admin.add_researcher(home=home, email=RESEARCHER, password=RESEARCHER_PW)
        client = syftio.login(handle.url, RESEARCHER, RESEARCHER_PW)
        before = _datasets(client)
        postgres_server.stop()
        try:
            during = _datasets(client)
        finally:
            started = postgres_server.start()
        assert started.returncode == 0, started.stderr
        after = _datasets(client)
        # Assert: before and after the outage the same listing; during it, the cause (not a
        # login problem) to the researcher, and the same cause in the owner's log
        assert before.startswith("ok") and f.name in before
        assert "database is unavailable" in during and "retry" in during and "log in" not in during
        assert after == before
        owner_log = (home / "logs" / "server.log").read_text(errors="replace")
        assert "the database is unavailable: " in owner_log and "OperationalError" in owner_log
    finally:
        handle.stop()
