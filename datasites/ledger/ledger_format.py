"""The ledger's file format: constants, errors, entry hashing and signing helpers,
crash-safe writes and the ledger key files (see :mod:`fedmtl.datasites.ledger.ledger`)."""

from __future__ import annotations

import hashlib
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from fedmtl.datasites.rules.policy import Policy
from fedmtl.fsutil import canonical_json
from fedmtl.privacy.accounting import PrivacyRecord, epsilon_of
from fedmtl.privacy.keys import (
    SigningKey,
    VerifyKey,
    load_private_key,
    save_private_key,
)

LEDGER_FILE = "ledger.jsonl"
HEAD_FILE = "ledger.head.json"
LOCK_FILE = "ledger.lock"
TORN_SUFFIX = ".torn"
KEY_FILE = "ledger_ed25519"  # in HOME/secrets/, raw 32 bytes, mode 0600
PUBLIC_KEY_FILE = "ledger_ed25519.pub"  # in HOME, hex; pin its fingerprint out of band
GENESIS_HASH = "0" * 64
ENTRY_DOMAIN = b"fedmtl-ledger-entry\n"
HEAD_DOMAIN = b"fedmtl-ledger-head\n"
KINDS: tuple[str, ...] = (
    "ledger_created",
    "policy_changed",
    "request_received",
    "decision",
    "round_executed",
    "job_finished",
    "job_aborted",
)


# ----------------------------------------------------------------------------- helpers


def _now_iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON of the entry's signed fields."""
    core = {k: entry[k] for k in ("seq", "ts", "kind", "body", "prev_hash")}
    return hashlib.sha256(canonical_json(core)).hexdigest()


def _head_payload(seq: int, h: str, fingerprint: str) -> bytes:
    return HEAD_DOMAIN + canonical_json({"seq": seq, "hash": h, "fingerprint": fingerprint})


def _resolve(home_or_path: str | Path) -> Path:
    p = Path(home_or_path)
    return p / LEDGER_FILE if p.is_dir() or p.suffix != ".jsonl" else p


def _eps(records: Sequence[PrivacyRecord], policy: Policy) -> float:
    return epsilon_of(list(records), delta=policy.delta, accountant=policy.accountant)


def _write_all(fd: int, data: bytes) -> None:
    """Write ``data`` fully (one ``write`` in the normal case). Tests patch this to
    inject a crash mid-append."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def split_lines(raw: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines of a ledger file and its torn tail (bytes after the last newline,
    or trailing NUL/blank garbage a crash can leave)."""
    cut = raw.rfind(b"\n") + 1
    body, tail = raw[:cut], raw[cut:]
    lines = body.split(b"\n")[:-1] if body else []
    # trailing lines that are only NULs/whitespace are crash garbage, not entries
    while lines and not lines[-1].strip(b"\x00 \t\r"):
        tail = lines.pop() + b"\n" + tail
    return lines, tail


def load_or_create_key(home: str | Path) -> SigningKey:
    """The datasite's ledger signing key from ``HOME/secrets/ledger_ed25519`` (created,
    mode 0600, on first use); also writes ``HOME/ledger_ed25519.pub`` (hex)."""
    home = Path(home)
    secrets = home / "secrets"
    secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = secrets / KEY_FILE
    if path.exists():
        key = SigningKey.from_bytes(load_private_key(path))
    else:
        key = SigningKey.generate()
        save_private_key(path, key.to_bytes())
    pub = home / PUBLIC_KEY_FILE
    hex_pub = key.verify_key.to_bytes().hex()
    if not pub.exists() or pub.read_text().strip() != hex_pub:
        pub.write_text(hex_pub + "\n")
    return key


def read_public_key(home: str | Path) -> VerifyKey:
    """The verify key published in ``HOME/ledger_ed25519.pub``. An auditor should compare
    its fingerprint with one obtained out of band (or pass their own pinned key)."""
    return VerifyKey.from_bytes(bytes.fromhex((Path(home) / PUBLIC_KEY_FILE).read_text().strip()))


