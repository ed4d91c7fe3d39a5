"""Crash-safe file writes and canonical JSON, shared by the datasite home, keys, the
ledger, checkpoints and results.

The only module that writes a file atomically (:func:`atomic_write_bytes`,
:func:`write_json_atomic`) or serialises JSON for hashing and signing
(:func:`canonical_json`). Both formats are on disk (ledger entries, spec hashes in the
ledger, policy hashes, the home's JSON files): their bytes never change.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def canonical_json(obj: Any, *, ensure_ascii: bool = False) -> bytes:
    """Deterministic JSON bytes for hashing and signing: sorted keys, no spaces, no NaN
    or infinity, UTF-8.

    Args:
        obj: JSON-serialisable data (dicts, lists, strings, numbers, bools, None).
        ensure_ascii: escape non-ASCII characters as ``\\uXXXX`` (the job spec's hash
            uses this form); by default they stay UTF-8 (the ledger, the policy hash and
            the site spec hash).

    Returns:
        The UTF-8 encoded JSON text.

    Raises:
        ValueError: ``obj`` holds NaN or infinity.
        TypeError: ``obj`` holds something JSON cannot represent.
    """
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=ensure_ascii, allow_nan=False
    ).encode("utf-8")


def write_json_atomic(path: str | Path, data: Any, mode: int = 0o644) -> None:
    """Write ``data`` as indented JSON (2 spaces, sorted keys, no trailing newline) to
    ``path`` whole or not at all (:func:`atomic_write_bytes`).

    Args:
        path: the file to replace.
        data: JSON-serialisable data.
        mode: the file's permission bits (``0o600`` for anything owner-only).

    Raises:
        TypeError: ``data`` holds something JSON cannot represent.
        OSError: the folder cannot be written.
    """
    atomic_write_bytes(path, json.dumps(data, indent=2, sort_keys=True).encode("utf-8"), mode=mode)


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temp file in the same folder
    (created with ``mode``), fsync, :func:`os.replace`, fsync of the folder.

    Args:
        path: the file to replace.
        data: its new contents.
        mode: the file's permission bits (set exactly, whatever the umask).

    Raises:
        OSError: the folder cannot be written (the temp file is removed).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(d: str | Path) -> None:
    """Make a rename in ``d`` durable (best effort where folders cannot be opened)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
