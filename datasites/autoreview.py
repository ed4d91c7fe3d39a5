"""Automatic review of pending code requests (filled in by the job/policy work)."""

from __future__ import annotations

from pathlib import Path


def review_pending(home: Path, client) -> None:  # noqa: ARG001
    return None
