"""The ``fedmtl`` command explains itself: every flag of every command has help text, ``--version``
prints the package version, each password has one documented way in (the same words in the
command's --help, the README and the notebooks), and commands that need no server stay fast."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fedmtl
from fedmtl.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]


def _walk(parser: argparse.ArgumentParser, path: str):
    """(command path, action) for every action of ``parser`` and of its subcommands, recursively."""
    for action in parser._actions:
        yield path, action
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:  # the subcommands' one-line help in the listing
                yield f"{path} {choice.dest}", choice
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{path} {name}")


def test_every_flag_of_every_command_has_help():
    # Execute
    actions = list(_walk(build_parser(), "fedmtl"))
    missing = [
        f"{path}: {'/'.join(a.option_strings) or a.dest}"
        for path, a in actions
        if not isinstance(a, argparse._HelpAction) and (not a.help or not str(a.help).strip()
                                                        or a.help == argparse.SUPPRESS)
    ]
    # Assert: every command is there, and nothing lacks help
    paths = {p for p, _ in actions}
    for cmd in ("datasite launch", "datasite stop", "datasite status", "datasite add-researcher",
                "datasite review", "datasite peers add", "datasite proxy-config", "datasite schema infer",
                "audit", "train", "job price", "demo", "demo prepare"):
        assert f"fedmtl {cmd}" in paths, cmd
    assert len(actions) > 80
    assert missing == [], "\n".join(missing)


def test_version(capsys):
    # Execute
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    # Assert
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedmtl {fedmtl.__version__}"


def test_python_dash_m_runs_the_same_command():
    # Execute
    run = subprocess.run([sys.executable, "-m", "fedmtl.cli", "--version"], capture_output=True, text=True,
                         timeout=60)
    # Assert
    assert run.returncode == 0 and run.stdout.strip() == f"fedmtl {fedmtl.__version__}", run.stderr


def _help(*argv: str) -> str:
    run = subprocess.run([sys.executable, "-m", "fedmtl.cli", *argv, "--help"], capture_output=True,
                         text=True, timeout=60, env={"COLUMNS": "2000", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    return " ".join(run.stdout.split())


def test_each_password_has_one_way_in_named_alike_everywhere():
    from fedmtl.cli import datasite
    from fedmtl.datasites.server import launch

    # Prepare: the README and the notebooks, as their readers see them
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    notebooks = {p.name: "".join("".join(c["source"]) for c in json.loads(p.read_text(encoding="utf-8"))["cells"])
                 for p in (REPO / "notebooks").glob("*.ipynb")}
    # Execute
    add_help = _help("datasite", "add-researcher")
    launch_help = _help("datasite", "launch")
    # Assert: add-researcher names the variable and the flag, in its --help, the README and the
    # data owner's notebook (the one that shows the shell command), with the same words
    howto = " ".join(datasite.PASSWORD_HOWTO.split())
    assert howto in add_help
    for where, text in {"README.md": readme, "data_owner.ipynb": notebooks["data_owner.ipynb"]}.items():
        flat = " ".join(text.replace("`", "").split())
        assert howto in flat, f"{where} does not say: {howto}"
        assert "FEDMTL_RESEARCHER_PASSWORD=... fedmtl datasite add-researcher" in flat, where
    # launch's admin password and database password: the variables launch reads
    assert datasite.ADMIN_PASSWORD_ENV == launch.ADMIN_PASSWORD_ENV and launch.ADMIN_PASSWORD_ENV in launch_help
    assert launch.DB_PASSWORD_ENV in launch_help
    assert "password_env" in _help("train")


def test_commands_that_need_no_server_import_no_syft(tmp_path):
    """`fedmtl --help`, `datasite stop` and `datasite status` of a stopped site must not pay for
    importing syft (seconds): the command modules import it only inside the commands that call it."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "datasite.json").write_text(json.dumps({"kind": "fedmtl-datasite", "name": "north"}))
    code = (
        "import sys\n"
        "from fedmtl.cli import main\n"
        f"assert main(['datasite', 'stop', '--home', {str(home)!r}]) == 0\n"
        f"assert main(['datasite', 'status', '--home', {str(home)!r}]) == 0\n"
        "heavy = sorted(m for m in ('syft', 'torch', 'pandas') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    # Execute
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    # Assert
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == "not running" and "status: stopped" in run.stdout


def test_stop_returns_once_the_server_has_exited(tmp_path, capsys):
    """A detached server's parent is init, which may reap it seconds after it exits: stop
    counts the zombie as exited. Here the test is the parent and never reaps it before stop
    returns (the worst case)."""
    home = tmp_path / "home"
    home.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (home / "server.pid").write_text(json.dumps({"pid": proc.pid, "host": "127.0.0.1", "port": 1}))
        # Execute
        t0 = time.monotonic()
        rc = main(["datasite", "stop", "--home", str(home)])
        took = time.monotonic() - t0
        # Assert: stopped (SIGTERM) at once, not after the 15 s SIGKILL timeout; the pid file is
        # gone, the process is dead (a zombie until reaped)
        assert rc == 0 and capsys.readouterr().out.strip() == "stopped"
        assert took < 5, took
        assert not (home / "server.pid").exists()
        assert proc.wait(5) == -15
    finally:
        proc.kill()
        proc.wait()


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    # Prepare: an export to draft a schema for (the draft goes to stdout), and a pipe whose
    # reader is gone before the command writes (`fedmtl ... | head`)
    records = tmp_path / "export.csv"
    records.write_text("id,age,sex,label\n1,50,m,0\n2,60,f,1\n3,70,m,0\n4,40,f,1\n", encoding="utf-8")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        # Execute
        done = subprocess.run([sys.executable, "-m", "fedmtl.cli", "datasite", "schema", "infer",
                               "--records", str(records)], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=120, cwd=REPO)
    finally:
        os.close(write_end)
    # Assert: SIGPIPE's status, and no traceback on stderr
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
