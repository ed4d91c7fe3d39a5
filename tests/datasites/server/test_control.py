"""The owner's control socket (fedmtl.datasites.server.control), without a server: one request per
connection, owner-only permissions, errors as answers, and homes whose path is too long
for a Unix socket. (With a real server it answers `fedmtl datasite status` and
`add-researcher` in tests/datasites/server/test_launch.py.)"""

from __future__ import annotations

import os
import stat
from types import SimpleNamespace

import pytest

from fedmtl.datasites.server import control


@pytest.fixture
def serving(monkeypatch):
    served = []

    def start(home):
        monkeypatch.setattr(control, "_operations", lambda worker, admin_email, **_: {
            "status": lambda: {"datasets": ["records"], "researchers": ["ada@uni.example"], "pending_requests": []},
            "fail": lambda: (_ for _ in ()).throw(ValueError("no such thing")),
        })
        control.serve(home, worker=None, admin_email="admin@site")
        served.append(home)
        return home

    yield start
    control.stop_serving()


@pytest.mark.parametrize("long_home", [False, True], ids=["home", "home-path-too-long-for-a-socket"])
def test_answers_one_request_per_connection_owner_only(tmp_path, serving, long_home):
    # Prepare
    home = tmp_path / ("h" * 120 if long_home else "h")
    home.mkdir()
    serving(home)
    # Execute
    reply = control.call(home, "status")
    # Assert
    assert reply == {"ok": True, "datasets": ["records"], "researchers": ["ada@uni.example"], "pending_requests": []}
    path = control.socket_path(home)
    assert len(str(path)) <= control.MAX_SOCKET_PATH
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    if long_home:
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700


def test_errors_come_back_as_answers_and_unknown_operations_are_named(tmp_path, serving):
    serving(tmp_path)
    with pytest.raises(RuntimeError, match="no such thing"):
        control.call(tmp_path, "fail")
    with pytest.raises(RuntimeError, match=r"unknown operation; known: \['fail', 'status'\]"):
        control.call(tmp_path, "drop_tables")
    assert control.call(tmp_path, "status")["ok"]  # still serving


def test_no_socket_means_fall_back(tmp_path):
    assert control.call(tmp_path, "status") is None


def test_review_list_answers_what_the_listing_function_lists_and_nothing_else(tmp_path):
    # Prepare: the server's root client and a listing function standing in for manual_review's
    root = object()
    calls = []

    def list_requests(home, *, client, include_decided):
        calls.append((home, client, include_decided))
        return [SimpleNamespace(to_dict=lambda: {"request_id": "mtl-1", "ledger_status": "pending_manual"})]

    control.serve(tmp_path, SimpleNamespace(root_client=root), admin_email="admin@site", list_requests=list_requests)
    try:
        # Execute
        reply = control.call(tmp_path, "review_list", include_decided=True)
        # Assert: the rows as dicts, listed with the root client; arguments are checked
        assert reply == {"ok": True, "requests": [{"request_id": "mtl-1", "ledger_status": "pending_manual"}]}
        assert calls == [(tmp_path, root, True)]
        with pytest.raises(RuntimeError, match="include_decided must be true or false"):
            control.call(tmp_path, "review_list", include_decided="yes")
        with pytest.raises(RuntimeError, match="unexpected keyword"):
            control.call(tmp_path, "review_list", approve="mtl-1")
        assert len(calls) == 1
    finally:
        control.stop_serving()
