"""fedmtl.contract.wire: the data plane's codec and its signed auth header (pure, no server)."""

from __future__ import annotations

import base64
import hashlib
import json
import struct

import numpy as np
import pytest

from fedmtl.contract import wire
from fedmtl.privacy.keys import SigningKey


def _env(**message) -> wire.Envelope:
    return wire.Envelope(job_id="job-1", site="st-mary", seq=7, spec={"site": "st-mary", "job_id": "job-1"},
                         message={"stage": "advertise", **message})


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_a_signed_request_round_trips_and_its_claims_describe_the_body():
    # Prepare
    key = SigningKey.generate()
    env = _env(weights=np.arange(5, dtype=np.float32), blob=b"\x00\x01")
    # Execute
    req = wire.sign_request(env, key)
    claims, signed, sig = wire.read_auth(req.headers()[wire.AUTH_HEADER])
    wire.verify_auth(signed, sig, key.verify_key)
    back = wire.open_request(req.body, claims, max_bytes=1 << 20)
    # Assert
    assert (claims.job_id, claims.site, claims.seq, claims.stage) == ("job-1", "st-mary", 7, "advertise")
    assert claims.length == len(req.body) and claims.sha256 == hashlib.sha256(req.body).hexdigest()
    assert len(req.auth) <= wire.MAX_AUTH_HEADER
    np.testing.assert_array_equal(back.message["weights"], np.arange(5, dtype=np.float32))
    assert back.message["blob"] == b"\x00\x01"


def test_another_key_or_altered_claims_do_not_verify():
    # Prepare
    key, other = SigningKey.generate(), SigningKey.generate()
    req = wire.sign_request(_env(), key)
    claims, signed, sig = wire.read_auth(req.auth)
    # Execute / Assert: another key
    with pytest.raises(wire.WireError, match="does not verify"):
        wire.verify_auth(signed, sig, other.verify_key)
    # a longer length under the same signature
    forged = json.loads(signed)
    forged["length"] += 1
    forged_raw = json.dumps(forged, sort_keys=True, separators=(",", ":")).encode()
    c2, s2, sig2 = wire.read_auth(f"{_b64(forged_raw)}.{_b64(sig)}")
    with pytest.raises(wire.WireError, match="does not verify"):
        wire.verify_auth(s2, sig2, key.verify_key)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "x" * (wire.MAX_AUTH_HEADER + 1),
        "not-base64!.also-not",
        _b64(b"[]") + "." + _b64(b"s" * 64),
        _b64(b'{"job_id":"j"}') + "." + _b64(b"s" * 64),
        _b64(b"[" * 5000 + b"]" * 5000) + "." + _b64(b"s" * 64),
    ],
    ids=["absent", "empty", "too long", "not base64", "not a table", "missing claims", "deep JSON"],
)
def test_a_malformed_auth_header_is_a_wire_error(value):
    with pytest.raises(wire.WireError):
        wire.read_auth(value)


def test_claims_out_of_canonical_form_or_range_are_refused():
    # Prepare: valid claims written with spaces, and with a negative length
    good = dict(job_id="job-1", site="st-mary", seq=1, stage="spend", length=10, sha256="0" * 64)
    spaced = json.dumps(good, sort_keys=True).encode()
    negative = json.dumps({**good, "length": -1}, sort_keys=True, separators=(",", ":")).encode()
    # Execute / Assert
    with pytest.raises(wire.WireError, match="canonical"):
        wire.read_auth(f"{_b64(spaced)}.{_b64(b's' * 64)}")
    with pytest.raises(wire.WireError, match="positive"):
        wire.read_auth(f"{_b64(negative)}.{_b64(b's' * 64)}")


def test_a_body_that_says_something_else_than_its_claims_is_refused():
    # Prepare: a body for seq 7 under claims for seq 8
    key = SigningKey.generate()
    req = wire.sign_request(_env(), key)
    claims, _, _ = wire.read_auth(req.auth)
    other = wire.Claims(**{**claims.__dict__, "seq": 8})
    # Execute / Assert
    with pytest.raises(wire.WireError, match="signed header"):
        wire.open_request(req.body, other, max_bytes=1 << 20)


def test_deeply_nested_json_in_a_message_header_is_a_wire_error_not_a_recursion_error():
    # Prepare: 200,000 nested lists, inside the header size cap
    depth = 100_000
    header = b"[" * depth + b"]" * depth
    assert len(header) <= wire.MAX_HEADER
    body = wire.MAGIC + struct.pack(">I", len(header)) + header
    # Execute / Assert
    with pytest.raises(wire.WireError, match="nested"):
        wire.decode(body)


def test_a_message_header_above_the_cap_is_refused_unparsed():
    header = b'{"v":"' + b"a" * wire.MAX_HEADER + b'","buffers":[]}'
    body = wire.MAGIC + struct.pack(">I", len(header)) + header
    with pytest.raises(wire.WireError, match="out of bounds"):
        wire.decode(body)
