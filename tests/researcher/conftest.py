"""One federation of three real datasites (demo cohort, default policy, pinned to each other
after launch) shared by the researcher-side fault tests: planning against the sites' review
(test_cost_checks), closing jobs (test_job_lifecycle) and rejoining (test_job_rejoin, whose
last test stops a site for good: it runs last, by file name). Each test uses a researcher of
its own, so their budgets and concurrency caps do not meet. Launching three datasites is most
of these files' time: once for all of them keeps CI short."""

from __future__ import annotations

import pytest

from fedmtl.datasites.server.launch import free_port, launch
from fedmtl.datasites.server.peers import pin_federation


@pytest.fixture(scope="session")
def federation(tmp_path_factory):
    """The datasites' handles (a list: a test that relaunches a site puts its new handle
    in its place)."""
    from fedmtl.datasites.data.cohort import prepare

    files = prepare(tmp_path_factory.mktemp("cohort"), sites=3, seed=0)
    homes = tmp_path_factory.mktemp("homes")
    handles = []
    try:
        for f in files:
            handles.append(launch(home=homes / f.name, name=f.name, records=f.records, schema=f.schema,
                                  port=free_port()))
        pin_federation([h.home for h in handles])
        yield handles
    finally:
        for h in handles:
            h.stop()
