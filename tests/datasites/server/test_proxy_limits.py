"""The nginx block of `fedmtl datasite proxy-config` bounds bodies and slow clients by what
a job needs (fedmtl.datasites.server.proxy), not by 10 GB and an hour."""

from __future__ import annotations

import re

from fedmtl.datasites.rules.policy import Policy
from fedmtl.datasites.server import http_guard
from fedmtl.datasites.server.proxy import max_body_bytes, nginx_server_block


def _directive(block: str, name: str) -> str:
    m = re.search(rf"^\s*{name}\s+([^;]+);", block, re.M)
    assert m, f"{name} missing from the block"
    return m.group(1).strip()


def _bytes(size: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    return int(size[:-1]) * units[size[-1].lower()] if size[-1].isalpha() else int(size)


def test_the_body_bound_follows_the_policys_parameter_cap():
    # Execute
    default = nginx_server_block(domain="a.example")
    big = nginx_server_block(domain="a.example", max_model_params=10_000_000)
    # Assert: enough for a round call at the cap (4 bytes a weight, syft's framing), far below 10 GB
    need = 4 * Policy.max_model_params
    assert need < _bytes(_directive(default, "client_max_body_size")) <= 256 << 20
    assert _bytes(_directive(default, "client_max_body_size")) >= max_body_bytes()
    assert _bytes(_directive(big, "client_max_body_size")) >= 4 * 10_000_000
    # an owner's explicit size still wins
    assert _directive(nginx_server_block(domain="a.example", max_body="1g"), "client_max_body_size") == "1g"


def test_slow_clients_and_many_connections_are_cut_off():
    block = nginx_server_block(domain="a.example")
    assert _directive(block, "client_header_timeout") == f"{int(http_guard.HEADER_TIMEOUT_S)}s"
    assert _directive(block, "client_body_timeout") == f"{int(http_guard.BODY_GRACE_S)}s"
    assert int(_directive(block, "send_timeout").rstrip("s")) <= 60
    zone = re.search(r"limit_conn_zone \$binary_remote_addr zone=(\w+):", block)
    assert zone and _directive(block, "limit_conn").startswith(zone.group(1) + " ")
    # the datasite's answer to a training round may still take long
    assert _directive(block, "proxy_read_timeout") == "3600s"
