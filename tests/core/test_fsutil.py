"""fedmtl.fsutil: the bytes of canonical JSON and of the home's JSON files are pinned.

Spec hashes and policy hashes are in signed ledgers, ledger entries are hashed from their
canonical JSON, and homes on disk hold the indented files: a change of settings (key
order, separators, escaping) would orphan every ledger already written. The expected
bytes below were produced by the implementations before they moved here
(``fedmtl.datasites.policy.canonical_json``, ``fedmtl.datasites.home.write_json_atomic``)
and must never change.
"""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from fedmtl.datasites.ledger.ledger_format import entry_hash
from fedmtl.datasites.review.autoreview import site_spec_hash
from fedmtl.datasites.rules import policy as policy_mod
from fedmtl.datasites.site import home as home_mod
from fedmtl.fsutil import atomic_write_bytes, canonical_json, write_json_atomic

SAMPLE = {"z": [1, 2.5, -0.0, 1e-05, True, None], "a": {"é": "Zürich ✓", "b": 3}, "job_id": "j-1", "n": 10**20}
CANONICAL = (b'{"a":{"b":3,"\xc3\xa9":"Z\xc3\xbcrich \xe2\x9c\x93"},"job_id":"j-1","n":100000000000000000000,'
             b'"z":[1,2.5,-0.0,1e-05,true,null]}')
INDENTED = (b'{\n  "a": {\n    "b": 3,\n    "\\u00e9": "Z\\u00fcrich \\u2713"\n  },\n  "job_id": "j-1",\n'
            b'  "n": 100000000000000000000,\n  "z": [\n    1,\n    2.5,\n    -0.0,\n    1e-05,\n    true,\n'
            b'    null\n  ]\n}')


def test_canonical_json_bytes_are_pinned():
    # Execute / Assert: UTF-8 kept, sorted keys, no spaces; the site spec hash over it
    assert canonical_json(SAMPLE) == CANONICAL
    assert site_spec_hash(SAMPLE) == "f4b4b794723716ad2070295cf17663d106249bd9d42c5bba8832e79187463c6e"
    assert site_spec_hash(SAMPLE) == hashlib.sha256(CANONICAL).hexdigest()
    assert policy_mod.canonical_json is canonical_json  # one implementation


def test_ledger_entry_hash_is_pinned():
    # Prepare: an entry's signed fields, with a non-ASCII dataset name
    e = {"seq": 3, "ts": "2026-01-05T09:00:00.000000Z", "kind": "round_executed",
         "body": {"request_id": "req-1", "round": 2, "epsilon_round": 1.0244, "researcher": "alice@uni.example",
                  "dataset": "näfld"},
         "prev_hash": "0" * 64}
    # Execute / Assert
    assert entry_hash(e) == "13d61b666aefc63c3db8d031c46968b95cd13c55cd6de72d7d02ceaccb4d8c8b"


def test_canonical_json_ascii_form_and_refusals():
    # Execute / Assert: the escaped form (the job spec's) differs only in escaping
    assert canonical_json({"é": 1}, ensure_ascii=True) == b'{"\\u00e9":1}'
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_write_json_atomic_bytes_and_mode_are_pinned(tmp_path):
    # Execute
    write_json_atomic(tmp_path / "a.json", SAMPLE)
    write_json_atomic(tmp_path / "b.json", {"seq": 1}, mode=0o600)
    # Assert: the indented form, exact modes, no temp file left
    assert (tmp_path / "a.json").read_bytes() == INDENTED
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "b.json").st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]
    assert home_mod.write_json_atomic is write_json_atomic  # one implementation


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path):
    # Prepare
    target = tmp_path / "x.bin"
    atomic_write_bytes(target, b"old")
    # Execute: data that cannot be written (not bytes)
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    # Assert: the old content stays, no temp file is left behind
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]
