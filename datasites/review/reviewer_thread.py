"""Background work inside the datasite server process: automatic review of requests, and
closing idle jobs.

The reviewer is pluggable: :func:`start_background` starts a thread that polls the
datasite's pending requests with syft's root client and hands each one to
:func:`fedmtl.datasites.review.autoreview.review_pending`, if that module is configured for the
home. Kept apart from :mod:`fedmtl.datasites.server` so the seam for the policy issue is
one function.

The same thread closes idle jobs: at each poll (every 1-3 s) it aborts, in the ledger,
every approved job with no pass for the policy's ``limits.job_idle_close_s``
(:func:`fedmtl.datasites.ledger.site_ledger.close_idle_jobs`), so a job its researcher
walked away from stops reserving budget. The check reads the ledger already held in memory
(a stat and the appended bytes): cheap at this rate.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from fedmtl.datasites.ledger import site_ledger
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
            close_idle(home)

    _thread = threading.Thread(target=loop, name="fedmtl-autoreview", daemon=True)
    _thread.start()


def close_idle(home: Path) -> int:
    """Abort the approved jobs idle past the policy's ``limits.job_idle_close_s`` (each a
    ``job_aborted`` ledger entry, logged); never raises.

    Args:
        home: the datasite home.

    Returns:
        How many jobs were closed.
    """
    if not (Path(home) / "dataset_meta.json").exists():
        return 0  # first launch still uploading: no job yet
    try:
        closed = site_ledger.close_idle_jobs(home)
    except Exception:  # noqa: BLE001 - keep the thread alive, log the cause
        log.exception("closing idle jobs failed; will retry")
        return 0
    for e in closed:
        log.info("job %s closed by the datasite: %s", e["body"]["request_id"], e["body"]["reason"])
    return len(closed)


def stop_background() -> None:
    _stop.set()
    if _thread is not None:
        _thread.join(timeout=5)
