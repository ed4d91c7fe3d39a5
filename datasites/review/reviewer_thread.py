"""Background work inside the datasite server process (automatic review of requests).

The reviewer is pluggable: :func:`start_background` starts a thread that polls the
datasite's pending requests with syft's root client and hands each one to
:func:`fedmtl.datasites.review.autoreview.review_pending`, if that module is configured for the
home. Kept apart from :mod:`fedmtl.datasites.server` so the seam for the policy issue is
one function.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from fedmtl.datasites.review.autoreview import Reviewer

log = logging.getLogger("fedmtl.datasite")
_stop = threading.Event()
_thread: threading.Thread | None = None
POLL_SECONDS = 1.0
MAX_POLL_SECONDS = 3.0


def start_background(home: Path, worker) -> None:
    global _thread
    _stop.clear()

    def loop() -> None:
        reviewer = None
        wait = POLL_SECONDS
        while not _stop.wait(wait):
            try:
                if reviewer is None:
                    reviewer = Reviewer(home, worker.root_client)
                decided = reviewer.poll()
                # back off while nothing arrives; answer at once again after a request
                wait = POLL_SECONDS if decided else min(MAX_POLL_SECONDS, wait * 1.5)
            except Exception:  # noqa: BLE001 - keep the reviewer alive, log the cause
                log.exception("automatic review failed; will retry")
                reviewer = None
                wait = MAX_POLL_SECONDS

    _thread = threading.Thread(target=loop, name="fedmtl-autoreview", daemon=True)
    _thread.start()


def stop_background() -> None:
    _stop.set()
    if _thread is not None:
        _thread.join(timeout=5)
