"""Background work inside the datasite server process (automatic review of requests).

The reviewer is pluggable: :func:`start_background` starts a thread that polls the
datasite's pending requests with syft's root client and hands each one to
:func:`fedmtl.datasites.autoreview.review_pending`, if that module is configured for the
home. Kept apart from :mod:`fedmtl.datasites.server` so the seam for the policy issue is
one function.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

log = logging.getLogger("fedmtl.datasite")
_stop = threading.Event()
_thread: threading.Thread | None = None
POLL_SECONDS = 1.0


def start_background(home: Path, worker) -> None:
    global _thread
    _stop.clear()

    def loop() -> None:
        from fedmtl.datasites import autoreview

        client = None
        while not _stop.wait(POLL_SECONDS):
            try:
                if client is None:
                    client = worker.root_client
                autoreview.review_pending(home, client)
            except Exception:  # noqa: BLE001 - keep the reviewer alive, log the cause
                log.exception("automatic review failed; will retry")
                client = None

    _thread = threading.Thread(target=loop, name="fedmtl-autoreview", daemon=True)
    _thread.start()


def stop_background() -> None:
    _stop.set()
    if _thread is not None:
        _thread.join(timeout=5)
