"""The user at the terminal, as every ``fedmtl`` command sees them: where to print, and who
they are for the ledger."""

from __future__ import annotations

import getpass
import socket
from typing import IO

from fedmtl.datasites.site import syftio


def console(err: bool = False) -> IO[str]:
    """The user's terminal, never the sink that syft's quieting swaps in for ``sys.stdout``.

    Args:
        err: the error stream instead of the output stream.

    Returns:
        The stream to print to (:func:`fedmtl.datasites.site.syftio.console`).
    """
    return syftio.console(err)


def say(*values: object, err: bool = False) -> None:
    """``print`` for messages to the user of commands that call syft (they may run while
    another thread is inside a quiet syft call, or after a Ctrl-C cut one short).

    Args:
        *values: what to print, as :func:`print` takes it.
        err: print to the error stream.
    """
    print(*values, file=console(err), flush=True)


def restore_streams() -> None:
    """Give the user's stdout and stderr back now, whatever an interrupted syft call left
    (:func:`fedmtl.datasites.site.syftio.restore_streams`)."""
    syftio.restore_streams()


def login_at_host() -> str:
    """``login@host`` of the user running the command: the default name a reviewer or a
    peer change is recorded under in the ledger.

    Returns:
        ``login@host``, or ``""`` where there is no login name (some containers).
    """
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # noqa: BLE001 - no login name (containers)
        return ""
