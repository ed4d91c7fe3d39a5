"""The ``fedmtl`` command line. Thin: parse, call a library function, print."""

from __future__ import annotations

import argparse
import os
import sys

from fedmtl import __version__, interrupts

# The command modules import at their top only what loads no third-party package (the core's
# errors, fsutil and schema; fedmtl.cli.terminal); each command imports the owner's or the
# researcher's side (syft, torch, pandas, cryptography behind them) when it runs. Building the
# parser stays cheap, and `fedmtl --help` or a command that needs none of them is fast
# (tests/cli/test_cli_help.py checks that `datasite stop` and `status` import no syft, torch, pandas).
from fedmtl.cli import datasite, research, review
from fedmtl.cli.terminal import console, restore_streams, say
from fedmtl.errors import FedMTLError


def build_parser() -> argparse.ArgumentParser:
    """The ``fedmtl`` argument parser: every command, each with its ``func`` to call.

    Returns:
        The parser; ``parse_args`` gives a namespace whose ``func(args)`` runs the command.
    """
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
    """Run one ``fedmtl`` command.

    Args:
        argv: the arguments after ``fedmtl``; default ``sys.argv[1:]``.

    Returns:
        The exit status: the command's, 2 for a user error (its message printed), 130 on
        Ctrl-C, 141 (a shell's status for SIGPIPE) when whoever read the output stopped
        reading (``fedmtl ... | head``), without a traceback.
    """
    try:
        return _run(argv)
    except BrokenPipeError:
        # the reader went away; stdout's last flush at exit would fail again: point it at
        # /dev/null (Python's documented recipe for SIGPIPE)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.parse_args([*(argv or sys.argv[1:]), "--help"])
        return 2
    interrupts.install()  # a Ctrl-C a library swallows is raised again at the next step
    try:
        rc = int(func(args) or 0)
        interrupts.check()  # one that was swallowed in the last step
        return rc
    except FedMTLError as e:
        print(f"fedmtl: error: {e}", file=console(err=True))
        return 2
    except KeyboardInterrupt:
        restore_streams()  # a Ctrl-C inside a syft call may have left its output sink in
        say("interrupted", err=True)
        return 130


#: names that lived in the single module ``fedmtl/cli.py`` before it became this package
_MOVED = {
    "datasite": ("RESEARCHER_PASSWORD_ENV", "_read_password", "cmd_datasite_launch", "cmd_datasite_schema_infer",
                 "cmd_datasite_stop", "cmd_datasite_status", "cmd_datasite_add_researcher",
                 "cmd_datasite_peers", "cmd_datasite_proxy_config"),
    "review": ("cmd_audit", "cmd_datasite_review"),
    "research": ("cmd_train", "cmd_job_price", "cmd_demo", "cmd_demo_prepare"),
}


def __getattr__(name: str):
    """``from fedmtl.cli import cmd_audit`` etc. keep working."""
    modules = {"datasite": datasite, "review": review, "research": research}
    for module, names in _MOVED.items():
        if name in names:
            return getattr(modules[module], name)
    raise AttributeError(f"module 'fedmtl.cli' has no attribute {name!r}")
