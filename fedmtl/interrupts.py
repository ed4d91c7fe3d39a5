"""A Ctrl-C that some library swallowed still stops a command, at its next step.

Python turns SIGINT into ``KeyboardInterrupt`` wherever the main thread happens to be; a
library that catches ``BaseException`` there (to clean up a connection, say) and does not
re-raise it loses the interrupt, and a long command (``fedmtl demo``, ``fedmtl train``)
goes on as if nothing happened. :func:`install` (the CLI calls it) records every SIGINT
before raising; :func:`check` (called between the steps of a long command) raises
``KeyboardInterrupt`` again when one was recorded. Without :func:`install`, :func:`check`
never raises.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_seen = threading.Event()


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    _seen.set()
    raise KeyboardInterrupt


def install() -> None:
    """Record every SIGINT (then raise ``KeyboardInterrupt`` as Python does); main thread only
    (elsewhere: nothing)."""
    if threading.current_thread() is threading.main_thread():
        _seen.clear()
        signal.signal(signal.SIGINT, _on_sigint)


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a SIGINT was recorded since :func:`install`.

    Raises:
        KeyboardInterrupt: one was (and is forgotten here, so it is raised once).
    """
    if _seen.is_set():
        _seen.clear()
        raise KeyboardInterrupt


__all__ = ["check", "install"]
