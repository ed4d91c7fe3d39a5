"""The ``fedmtl`` command line. Thin: parse, call a library function, print."""

from __future__ import annotations

import argparse
import sys

from fedmtl import __version__
from fedmtl.errors import FedMTLError


def build_parser() -> argparse.ArgumentParser:
    # the command modules import syft, torch, pandas only inside their commands: building the
    # parser stays cheap, and `fedmtl --help` or a command that needs none of them is fast
    from fedmtl.cli import datasite, research, review

    p = argparse.ArgumentParser(prog="fedmtl", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                   help="print fedmtl's version and exit")
    sub = p.add_subparsers(dest="command", required=True, help="`fedmtl COMMAND --help` explains each")

    ds = sub.add_parser("datasite", help="data owner: run a hospital's datasite")
    dsub = ds.add_subparsers(dest="action", required=True, help="`fedmtl datasite ACTION --help` explains each")
    datasite._add_control_parsers(dsub)
    review._add_review_parser(dsub)
    datasite._add_peers_parser(dsub)
    datasite._add_proxy_parser(dsub)
    datasite._add_schema_parser(dsub)
    datasite._add_personalise_parser(dsub)

    review._add_audit_parser(sub)

    research._add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.parse_args([*(argv or sys.argv[1:]), "--help"])
        return 2
    try:
        return int(func(args) or 0)
    except FedMTLError as e:
        print(f"fedmtl: error: {e}", file=_console(err=True))
        return 2
    except KeyboardInterrupt:
        _restore_streams()  # a Ctrl-C inside a syft call may have left its output sink in
        _say("interrupted", err=True)
        return 130


def _console(err: bool = False):
    """The user's terminal, never the sink that syft's quieting swaps in for sys.stdout."""
    from fedmtl.datasites.syftio import console

    return console(err)


def _say(*values, err: bool = False) -> None:
    """``print`` for messages to the user of commands that call syft (they may run while
    another thread is inside a quiet syft call, or after a Ctrl-C cut one short)."""
    print(*values, file=_console(err), flush=True)


def _restore_streams() -> None:
    from fedmtl.datasites.syftio import restore_streams

    restore_streams()


def _reviewer_default() -> str:
    import getpass as _gp
    import socket

    try:
        return f"{_gp.getuser()}@{socket.gethostname()}"
    except Exception:  # noqa: BLE001 - no login name (containers)
        return ""


#: names that lived in the single module ``fedmtl/cli.py`` before it became this package
_MOVED = {
    "datasite": ("RESEARCHER_PASSWORD_ENV", "_read_password", "cmd_datasite_launch", "cmd_datasite_schema_infer",
                 "cmd_datasite_stop", "cmd_datasite_status", "cmd_datasite_add_researcher",
                 "cmd_datasite_peers", "cmd_datasite_proxy_config"),
    "review": ("cmd_audit", "cmd_datasite_review"),
    "research": ("cmd_train", "cmd_job_price", "cmd_demo", "cmd_demo_prepare"),
}


def __getattr__(name: str):
    """``from fedmtl.cli import cmd_audit`` etc. keep working (imported on first use)."""
    import importlib

    for module, names in _MOVED.items():
        if name in names:
            return getattr(importlib.import_module(f"fedmtl.cli.{module}"), name)
    raise AttributeError(f"module 'fedmtl.cli' has no attribute {name!r}")
