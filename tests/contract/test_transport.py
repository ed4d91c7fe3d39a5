"""The Transport protocol: the three transports keep its contract (a reply, never an
exception, for a site that refuses or cannot be reached)."""

from __future__ import annotations

import inspect
import socket

import pytest

from fedmtl.contract.transport import Transport
from fedmtl.datasites.runtime import LocalTransport
from fedmtl.privacy.keys import SigningKey
from fedmtl.researcher.dataplane_client import DataPlaneTransport
from fedmtl.researcher.job import SyftTransport

IMPLEMENTATIONS = (LocalTransport, SyftTransport, DataPlaneTransport)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_each_transport_has_the_protocols_call(cls):
    # Assert: the same parameters, so run_pass can call any of them by keyword too
    want = list(inspect.signature(Transport.call).parameters)
    assert list(inspect.signature(cls.call).parameters) == want == ["self", "site", "message"]


def test_isinstance_checks_the_method():
    # Prepare
    class NoCall:
        pass

    # Execute / Assert
    assert isinstance(LocalTransport({}, {}), Transport)
    assert isinstance(SyftTransport(session=None, func_name="f"), Transport)
    assert not isinstance(NoCall(), Transport)


def test_local_transport_replies_with_the_runtimes_refusal():
    # Prepare: a spec for a site no datasite in this process serves
    t: Transport = LocalTransport({"a": None}, {"a": {"site": "a", "job_id": "j"}})
    # Execute
    reply = t.call("a", {"stage": "advertise"})
    # Assert
    assert reply["ok"] is False and reply["kind"] in ("RoundError", "ConfigError") and reply["error"]
    with pytest.raises(KeyError):
        t.call("b", {"stage": "advertise"})  # not a site of this job: the caller's mistake


def test_dataplane_transport_turns_an_unreachable_site_into_a_dropout():
    # Prepare: nothing listens on the port
    url = f"http://127.0.0.1:{_closed_port()}"
    t: Transport = DataPlaneTransport({"a": url}, {"a": {"job_id": "j"}}, SigningKey.generate(), timeout=5.0)
    try:
        # Execute
        reply = t.call("a", {"stage": "advertise"})
    finally:
        t.close()
    # Assert
    assert reply["ok"] is False and reply["kind"] == "Unreachable"
