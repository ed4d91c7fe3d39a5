"""fedmtl.contract.messages: typed stage messages and replies, the wire format unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from fedmtl.contract.messages import (
    PASS_STAGES,
    Advertise,
    Consistency,
    MaskedInput,
    Reply,
    ShareKeys,
    Spend,
    Unmask,
    parse_message,
)
from fedmtl.errors import RoundError

W = np.arange(4, dtype=np.float32)
SCALING = {"mean": {"age": 50.0}, "std": {"age": 10.0}}

#: (typed message, the wire dict passes.run_pass sent before the types, key order included)
WIRE = [
    (Advertise(3, 1, W), {"stage": "advertise", "pass": 3, "attempt": 1, "weights": W}),
    (Advertise(3, 0, W, scaling=SCALING),
     {"stage": "advertise", "pass": 3, "attempt": 0, "weights": W, "scaling": SCALING}),
    (ShareKeys(2, 0, {"s0": "k"}), {"stage": "share_keys", "pass": 2, "attempt": 0, "keys": {"s0": "k"}}),
    (MaskedInput(2, 0, {"d": 1}), {"stage": "masked_input", "pass": 2, "attempt": 0, "delivery": {"d": 1}}),
    (Consistency(2, 0, {"c": 1}), {"stage": "consistency", "pass": 2, "attempt": 0, "request": {"c": 1}}),
    (Unmask(2, 5, {"u": 1}), {"stage": "unmask", "pass": 2, "attempt": 5, "request": {"u": 1}}),
    (Spend(), {"stage": "spend"}),
]


@pytest.mark.parametrize("typed,wire", WIRE, ids=[w["stage"] + str(i) for i, (_, w) in enumerate(WIRE)])
def test_a_message_writes_and_reads_the_same_wire_dict(typed, wire):
    # Execute
    out = typed.to_dict()
    back = parse_message(wire)
    # Assert
    assert list(out) == list(wire)
    assert {k: v for k, v in out.items() if k != "weights"} == {k: v for k, v in wire.items() if k != "weights"}
    if "weights" in wire:
        assert out["weights"] is wire["weights"] and back.weights is wire["weights"]
    assert type(back) is type(typed) and back.stage == wire["stage"]
    assert {k: v for k, v in back.to_dict().items() if k != "weights"} == \
        {k: v for k, v in wire.items() if k != "weights"}


def test_the_stages_are_the_pass_order():
    assert PASS_STAGES == tuple(c.stage for c in (Advertise, ShareKeys, MaskedInput, Consistency, Unmask))


def test_keys_a_stage_does_not_use_are_ignored_and_attempt_defaults_to_zero():
    msg = parse_message({"stage": "share_keys", "pass": 1, "keys": {}, "weights": W, "note": "x"})
    assert msg == ShareKeys(1, 0, {})


@pytest.mark.parametrize("raw,match", [
    ("advertise", "must be a table"),
    ({"stage": "train"}, r"unknown stage 'train'; expected one of \['advertise'"),
    ({"stage": None}, "unknown stage None"),
    ({"stage": "advertise", "pass": True, "weights": W}, "'pass' must be an int, got True"),
    ({"stage": "advertise", "pass": "1", "weights": W}, "'pass' must be an int"),
    ({"stage": "advertise", "pass": 1, "attempt": -1}, "'attempt' must be an int >= 0, got -1"),
    ({"stage": "unmask", "pass": 1, "attempt": 1.0, "request": {}}, "'attempt' must be an int >= 0"),
    ({"stage": "share_keys", "pass": 1}, "a 'share_keys' message must carry 'keys'"),
    ({"stage": "masked_input", "pass": 1}, "must carry 'delivery'"),
    ({"stage": "consistency", "pass": 1}, "must carry 'request'"),
])
def test_a_malformed_message_is_refused_as_a_round_error(raw, match):
    with pytest.raises(RoundError, match=match):
        parse_message(raw)


@pytest.mark.parametrize("reply,wire", [
    (Reply.stage_reply({"m": 1}, report={"pass": 1}), {"ok": True, "message": {"m": 1}, "report": {"pass": 1}}),
    (Reply.stage_reply({"m": 1}, report={}), {"ok": True, "message": {"m": 1}, "report": {}}),
    (Reply.stage_reply({"m": 1}), {"ok": True, "message": {"m": 1}}),
    (Reply.query_reply({"spent": 0.5}), {"ok": True, "view": {"spent": 0.5}}),
    (Reply.refusal("pass 9 is beyond", "RoundError"), {"ok": False, "error": "pass 9 is beyond", "kind": "RoundError"}),
])
def test_a_reply_writes_and_reads_the_same_wire_dict(reply, wire):
    assert reply.to_dict() == wire and list(reply.to_dict()) == list(wire)
    assert Reply.from_dict(wire) == reply


def test_a_reply_that_is_not_a_table_reads_as_a_refusal():
    r = Reply.from_dict(["not", "a", "reply"])
    assert not r.ok and r.kind == "BadReply" and "list" in r.error
    assert Reply.from_dict({"error": "no ok"}) == Reply(ok=False, error="no ok", kind="")
