"""Verifying a ledger from its files alone: chain, signatures, head, torn tail
(:func:`verify`, used by ``fedmtl audit``)."""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fedmtl.datasites.ledger.ledger_format import (
    ENTRY_DOMAIN,
    GENESIS_HASH,
    HEAD_FILE,
    LOCK_FILE,
    _head_payload,
    _resolve,
    entry_hash,
    split_lines,
)
from fedmtl.errors import LedgerCorruptError
from fedmtl.privacy.keys import (
    SignatureError,
    VerifyKey,
)


@dataclass
class VerifyReport:
    """Result of :func:`verify`. ``ok`` is True when ``problems`` is empty."""

    path: str
    entries: int
    problems: list[str]
    warnings: list[str]
    head: dict[str, Any] | None
    fingerprint: str

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "entries": self.entries,
            "problems": list(self.problems),
            "warnings": list(self.warnings),
            "head": self.head,
            "fingerprint": self.fingerprint,
        }


# ----------------------------------------------------------------------------- verify


def _read_head(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LedgerCorruptError(f"{path} is not valid JSON ({e})") from None


def _check_entry(e: Any, prev: Mapping[str, Any] | None, vk: VerifyKey) -> str | None:
    """The first problem with entry ``e`` following ``prev``, or None."""
    if not isinstance(e, dict) or not {"seq", "ts", "kind", "body", "prev_hash", "hash", "sig"} <= set(e):
        return "an entry lacks the fields seq, ts, kind, body, prev_hash, hash, sig"
    want_seq = prev["seq"] + 1 if prev else 0
    if e["seq"] != want_seq:
        return f"entry seq {e['seq']} found where seq {want_seq} was expected: an entry was deleted, inserted or reordered"
    want_prev = prev["hash"] if prev else GENESIS_HASH
    if e["prev_hash"] != want_prev:
        return f"entry seq {e['seq']} does not chain to the previous entry: an entry was deleted, inserted or reordered"
    if entry_hash(e) != e["hash"]:
        return f"entry seq {e['seq']} ({e['kind']}) does not match its hash: it was edited"
    try:
        vk.verify(bytes.fromhex(e["sig"]), ENTRY_DOMAIN + e["hash"].encode())
    except (SignatureError, ValueError, TypeError):
        return f"entry seq {e['seq']} has no valid signature by key {vk.fingerprint()[:16]}...: re-signed with another key or forged"
    return None


def read_entries(home_or_path: str | Path) -> tuple[list[dict[str, Any]], bytes]:
    """Parsed entries (unverified; unparsable lines as ``{"_raw": ...}``) and the torn tail."""
    path = _resolve(home_or_path)
    raw = path.read_bytes() if path.exists() else b""
    lines, tail = split_lines(raw)
    out: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        try:
            e = json.loads(line)
            out.append(e if isinstance(e, dict) else {"_raw": line.decode("utf-8", "replace"), "_line": i + 1})
        except (json.JSONDecodeError, UnicodeDecodeError):
            out.append({"_raw": line.decode("utf-8", "replace"), "_line": i + 1})
    return out, tail


def verify(home_or_path: str | Path, verify_key: VerifyKey, *, expected_count: int | None = None) -> VerifyReport:
    """Check a ledger against the datasite's pinned ``verify_key``. Read-only.

    Reports (as problems) edited, deleted, inserted, reordered, unsigned or re-signed
    entries, a ledger created for another key, a head that is missing, forged or ahead of
    the ledger (truncation), and fewer entries than ``expected_count``. A torn last line
    (crash mid-append, never acknowledged) is a warning.
    """
    if not isinstance(verify_key, VerifyKey):
        raise TypeError(f"verify_key must be a fedmtl.privacy.keys.VerifyKey, got {type(verify_key).__name__}")
    path = _resolve(home_or_path)
    fp = verify_key.fingerprint()
    problems: list[str] = []
    warnings: list[str] = []
    if not path.exists():
        return VerifyReport(str(path), 0, [f"no ledger at {path}"], [], None, fp)
    lock_fd = None
    lock_path = path.with_name(LOCK_FILE)
    if lock_path.exists():  # a consistent snapshot while a datasite appends
        try:
            lock_fd = os.open(lock_path, os.O_RDONLY)
            fcntl.flock(lock_fd, fcntl.LOCK_SH)
        except OSError:
            lock_fd = None
    try:
        entries, tail = read_entries(path)
        head_path = path.with_name(HEAD_FILE)
        head_error = False
        try:
            head = _read_head(head_path)
        except LedgerCorruptError as e:
            head, head_error = None, True
            problems.append(str(e))
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    if tail:
        warnings.append(
            f"the last {len(tail)} byte(s) are a torn append (a crash mid-write, never acknowledged); "
            "they are moved aside the next time the datasite opens the ledger"
        )
    bad_sigs = 0
    prev: dict[str, Any] | None = None
    for i, e in enumerate(entries):
        if "_raw" in e:
            problems.append(f"line {e['_line']} is not a JSON entry: it was edited")
            prev = None
            continue
        if prev is None and i > 0:
            # resynchronise after a broken line
            prev = {"seq": e.get("seq", i) - 1, "hash": e.get("prev_hash")}
        p = _check_entry(e, prev, verify_key)
        if p:
            if "signature" in p:
                bad_sigs += 1
            else:
                problems.append(p)
        if i == 0 and isinstance(e.get("body"), dict) and e.get("kind") == "ledger_created":
            if e["body"].get("fingerprint") != fp:
                problems.append(
                    f"the ledger was created for key {str(e['body'].get('fingerprint'))[:16]}..., not the pinned key {fp[:16]}..."
                )
        elif i == 0:
            problems.append("the first entry is not ledger_created: the start of the ledger was deleted")
        prev = e if isinstance(e.get("seq"), int) else None
    if bad_sigs:
        if bad_sigs == len(entries):
            problems.append(
                f"none of the {bad_sigs} entries is signed by the pinned key {fp[:16]}...: the ledger was "
                "re-signed with another key (or you pinned the wrong key)"
            )
        else:
            problems.append(f"{bad_sigs} of {len(entries)} entries have no valid signature by the pinned key {fp[:16]}...")
    last_seq = entries[-1].get("seq", -1) if entries and "_raw" not in entries[-1] else len(entries) - 1
    if head is None:
        if not head_error:
            problems.append(f"{HEAD_FILE} is missing: the tail of the ledger cannot be checked for truncation")
    else:
        try:
            verify_key.verify(bytes.fromhex(head["sig"]), _head_payload(head["seq"], head["hash"], fp))
        except (SignatureError, ValueError, KeyError, TypeError):
            problems.append(f"{HEAD_FILE} is not signed by the pinned key {fp[:16]}...")
        else:
            hs = head["seq"]
            if hs > last_seq:
                problems.append(
                    f"the ledger was truncated: it ends at seq {last_seq} but the signed head says "
                    f"seq {hs} ({hs - last_seq} acknowledged entr(y/ies) missing)"
                )
            elif hs >= 0 and (hs >= len(entries) or entries[hs].get("hash") != head["hash"]):
                problems.append(f"entry seq {hs} does not match the signed head: the ledger was rewritten")
            elif hs < last_seq:
                warnings.append(
                    f"{last_seq - hs} entr(y/ies) after the signed head (seq {hs}): a crash between an "
                    "append and the head update; they verify and the head catches up on the next open"
                )
    if expected_count is not None and len(entries) < expected_count:
        problems.append(
            f"the ledger has {len(entries)} entries, fewer than the {expected_count} expected: it was truncated or rolled back"
        )
    return VerifyReport(str(path), len(entries), problems, warnings, head, fp)


