"""The data owner's control commands, before and after, side by side: wall time of each.

Times, as a data owner runs them from a shell (one fresh ``python -m fedmtl.cli`` process
each), on one demo-sized datasite made from the prepared cohort
(``fedmtl demo prepare --sites 3``; ``--site`` picks the hospital, default st-mary):

* ``launch``          ``datasite launch --detach``, first launch (validate, create the home,
                      start the server, publish the dataset)
* ``add-researcher``  ``datasite add-researcher`` (password from FEDMTL_RESEARCHER_PASSWORD)
* ``status``          ``datasite status`` of the running site
* ``review-list``     ``datasite review --list`` of the running site (no request waiting)
* ``stop``            ``datasite stop``
* ``status-stopped``  ``datasite status`` of the stopped site
* ``audit``           ``audit`` of the stopped site's ledger (policy install + pinned peers: a
                      few entries; the peers are pinned untimed before the stop)
* ``relaunch``        ``datasite launch --detach`` of the existing home, then an untimed stop
* ``help``            ``fedmtl --help`` (the cost of the command line itself)

for two versions of the code, each run from its own copy of the source laid out as installed
(``PYTHONPATH``; the same venv, so the same syft, torch, pandas):

* ``before``  the committed version (``git archive --ref``, default HEAD): every file as committed
* ``after``   this working tree

The two alternate repeat by repeat (every command once, before then after, then after then
before, ...), so the machine's load hits both alike. Then, for the after version, where the time goes: python's start, ``import syft``, one
admin login (syft's login fetches the whole API), how long a server takes to exit after
SIGTERM and until its parent reaps it, and the phases of a first launch (cProfile).

Run: ``python benchmarks/control_commands.py [--quick] [--repeats N] [--site NAME] [--only CMD,...]``
(``--only review-list``: launch, that command and stop only, no breakdown); writes
``benchmarks/results/control_commands.json``. Every copy and home is in a temporary folder,
removed at the end; every server started is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from benchkit import layout_installed, machine_info

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "control_commands.json"
COMMANDS = ("launch", "add-researcher", "status", "review-list", "stop", "status-stopped", "audit", "relaunch", "help")
#: what every round runs, selected or not: a running site needs a launch and a stop
ALWAYS = ("launch", "stop")
RESEARCHER_PW = "bench-researcher-password"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _git_archive(ref: str, dst: Path) -> str:
    sha = subprocess.run(["git", "rev-parse", ref], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    tar = dst.with_suffix(".tar")
    with open(tar, "wb") as f:
        subprocess.run(["git", "archive", sha], cwd=REPO, stdout=f, check=True)
    dst.mkdir()
    with tarfile.open(tar) as t:
        t.extractall(dst, filter="data")
    tar.unlink()
    return sha


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Variant:
    def __init__(self, name: str, tree: Path, work: Path):
        self.name, self.tree, self.work = name, tree, work
        self.env = {**os.environ, "PYTHONPATH": str(tree), "TQDM_DISABLE": "1",
                    "FEDMTL_RESEARCHER_PASSWORD": RESEARCHER_PW}
        for k in ("FEDMTL_ADMIN_PASSWORD", "FEDMTL_SYFT_VERBOSE"):
            self.env.pop(k, None)

    def run(self, *argv: str, timeout: float = 600) -> tuple[float, subprocess.CompletedProcess]:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "fedmtl.cli", *argv], cwd=self.work, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        took = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{self.name}: fedmtl {' '.join(argv)} exited {proc.returncode}:\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        return took, proc

    def python(self, code: str, timeout: float = 600) -> str:
        proc = subprocess.run([sys.executable, "-c", code], cwd=self.work, env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{self.name}: python -c failed:\n{proc.stderr[-3000:]}")
        return proc.stdout

    def check_source(self) -> None:
        """The CLI and the datasite modules this variant runs are its own copy's."""
        # names that exist in both layouts (before and after issue 20 moved the modules)
        out = self.python("import fedmtl.cli, fedmtl.datasites as d, fedmtl.datasites.runtime as r; "
                          "print(fedmtl.cli.__file__); print(d.__file__); print(r.__file__)")
        for line in out.split():
            if not Path(line).resolve().is_relative_to(self.tree.resolve()):
                raise RuntimeError(f"{self.name} imports {line}, not its own copy in {self.tree}")


def _kill_home(home: Path) -> None:
    """Stop a server left running (after an error), without the CLI."""
    pid_file = home / "server.pid"
    try:
        pid = int(json.loads(pid_file.read_text())["pid"])
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError, KeyError):
        pass


def one_round(v: Variant, i: int, files: dict[str, str], peers: list[tuple[str, str]],
              only: frozenset[str] = frozenset(COMMANDS)) -> dict[str, float]:
    """Every control command in ``only`` (and a launch and a stop) once, on a fresh home."""
    home = v.work / f"home-{i}"
    t: dict[str, float] = {}
    try:
        t["launch"], _ = v.run("datasite", "launch", "--detach", "--home", str(home), "--name", files["name"],
                               "--records", files["records"], "--schema", files["schema"],
                               "--port", str(_free_port()))
        if "add-researcher" in only or "status" in only:
            t["add-researcher"], _ = v.run("datasite", "add-researcher", "--home", str(home),
                                           "--email", f"ada{i}@uni.example")
        if "status" in only:
            t["status"], st = v.run("datasite", "status", "--home", str(home))
            assert f"ada{i}@uni.example" in st.stdout, st.stdout
        if "review-list" in only:
            t["review-list"], rl = v.run("datasite", "review", "--home", str(home), "--list")
            assert "no requests waiting for review" in rl.stdout, rl.stdout
        if "audit" in only:
            for name, fp in peers:  # a few more ledger entries for the audit (untimed)
                v.run("datasite", "peers", "add", "--home", str(home), "--name", name, "--fingerprint", fp,
                      "--who", "bench@example")
        t["stop"], _ = v.run("datasite", "stop", "--home", str(home))
        if "status-stopped" in only:
            t["status-stopped"], st = v.run("datasite", "status", "--home", str(home))
            assert "status: stopped" in st.stdout, st.stdout
        if "audit" in only:
            t["audit"], au = v.run("audit", "--home", str(home), "--out", str(v.work / f"audit-{i}"))
            assert "verification: OK" in au.stdout, au.stdout
        if "relaunch" in only:
            t["relaunch"], _ = v.run("datasite", "launch", "--detach", "--home", str(home),
                                     "--port", str(_free_port()))
            v.run("datasite", "stop", "--home", str(home))
        if "help" in only:
            t["help"], _ = v.run("--help")
    finally:
        _kill_home(home)
    return {k: s for k, s in t.items() if k in only}


def breakdown(v: Variant, files: dict[str, str]) -> dict[str, object]:
    """Where the time goes (after version): the parts of the slow commands, measured apart."""
    out: dict[str, object] = {}
    t0 = time.perf_counter()
    v.python("pass")
    out["python_start_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    v.python("import fedmtl.cli; fedmtl.cli.build_parser()")
    out["cli_import_and_parser_s"] = round(time.perf_counter() - t0, 3)
    code = (
        "import time; t0 = time.perf_counter()\n"
        "from fedmtl.datasites.site import syftio\n"
        "syftio.import_syft(); t1 = time.perf_counter()\n"
        "from fedmtl.datasites.server.admin import admin_client\n"
        "c = admin_client({home!r}); t2 = time.perf_counter()\n"
        "with syftio.quiet():\n"
        "    c.users.get_all(); c.datasets.get_all(); c.requests.get_all()\n"
        "t3 = time.perf_counter()\n"
        "print(t1 - t0, t2 - t1, t3 - t2)\n"
    )
    home = v.work / "home-breakdown"
    prof = v.work / "launch.prof"
    try:
        # a first launch under cProfile: its phases
        env = dict(v.env)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "fedmtl.cli", "datasite", "launch",
                        "--detach", "--home", str(home), "--name", files["name"], "--records", files["records"],
                        "--schema", files["schema"], "--port", str(_free_port())],
                       cwd=v.work, env=env, capture_output=True, text=True, check=True, timeout=600)
        out["launch_profiled_s"] = round(time.perf_counter() - t0, 2)
        stats = pstats.Stats(str(prof)).stats  # (file, line, func) -> (cc, nc, tt, ct, callers)
        want = {
            "launch (whole)": ("datasites/server/launch.py", "launch"),
            "validate + create home (syft import for the server key)": ("datasites/server/launch.py", "_create_home"),
            "import syft in the CLI process": ("syft/__init__.py", "<module>"),
            "start the server and wait until it answers": ("datasites/server/launch.py", "_start"),
            "first setup: admin login, upload dataset + mock": ("datasites/server/launch.py", "_first_setup"),
            "admin login (in first setup)": ("syft/client/client.py", "login"),
        }
        phases = {}
        for label, (suffix, func) in want.items():
            cts = [ct for (f, _, fn), (_, _, _, ct, _) in stats.items() if f.endswith(suffix) and fn == func]
            phases[label] = round(max(cts), 2) if cts else None
        out["launch_phases_s"] = phases
        # import syft, one admin login, the three calls of `status`
        imp, login, calls = map(float, v.python(code.format(home=str(home))).split())
        out["import_syft_s"], out["admin_login_s"], out["status_calls_s"] = round(imp, 2), round(login, 2), round(calls, 3)
        # the server's exit: SIGTERM -> pid file gone -> exited (zombie) -> reaped by its parent (init)
        pid = int(json.loads((home / "server.pid").read_text())["pid"])
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGTERM)
        marks: dict[str, float] = {}
        while True:
            now = time.perf_counter() - t0
            if "pid_file_removed_s" not in marks and not (home / "server.pid").exists():
                marks["pid_file_removed_s"] = round(now, 2)
            try:
                state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[-1].split()[0]
            except (FileNotFoundError, IndexError):
                marks["reaped_s"] = round(now, 2)
                break
            if state == b"Z" and "exited_s" not in marks:
                marks["exited_s"] = round(now, 2)
            if now > 60:
                break
            time.sleep(0.005)
        out["server_stop_s"] = marks
    finally:
        _kill_home(home)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repeat, no breakdown: a smoke run")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every command per version (default 3)")
    ap.add_argument("--site", default="st-mary", help="the demo hospital whose records the datasite serves")
    ap.add_argument("--before-ref", default="HEAD", help="the git ref of the 'before' version (default HEAD)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    ap.add_argument("--only", default="", metavar="CMD,...",
                    help=f"time only these commands (of {', '.join(COMMANDS)}); a launch and a stop always run; "
                    "no breakdown")
    args = ap.parse_args(argv)
    only = frozenset(c.strip() for c in args.only.split(",") if c.strip()) or frozenset(COMMANDS)
    unknown = sorted(only - set(COMMANDS))
    if unknown:
        ap.error(f"--only: unknown command(s) {unknown}; choose from {', '.join(COMMANDS)}")
    only |= frozenset(ALWAYS)
    repeats = 1 if args.quick else args.repeats
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedmtl-control-") as tmp:
        tmp = Path(tmp)
        sha = _git_archive(args.before_ref, tmp / "before-src")
        variants = [Variant("before", layout_installed(tmp / "before-src", tmp / "before-tree"), tmp / "before-work"),
                    Variant("after", layout_installed(REPO, tmp / "after-tree"), tmp / "after-work")]
        for v in variants:
            v.work.mkdir()
            v.check_source()
        after = variants[1]
        _log("preparing the demo cohort ...")
        after.run("demo", "prepare", "--out", str(tmp / "cohort"), "--sites", "3")
        site_dir = tmp / "cohort" / args.site
        files = {"name": args.site, "records": str(site_dir / "records.csv"), "schema": str(site_dir / "schema.toml")}
        patients = sum(1 for _ in open(files["records"], encoding="utf-8")) - 1
        peers = [(n, os.urandom(32).hex()) for n in ("general", "riverside", "mercy")]
        runs = []
        for i in range(repeats):
            for v in variants if i % 2 == 0 else variants[::-1]:
                _log(f"repeat {i + 1}/{repeats}: {v.name} ...")
                for cmd, s in one_round(v, i, files, peers, only).items():
                    runs.append({"version": v.name, "repeat": i + 1, "command": cmd, "seconds": round(s, 3)})
        parts = None if args.quick or args.only else breakdown(after, files)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.split("\n")
    total = time.perf_counter() - t_start
    summary = {}
    for cmd in (c for c in COMMANDS if c in only):
        med = {v: statistics.median(r["seconds"] for r in runs if r["command"] == cmd and r["version"] == v)
               for v in ("before", "after")}
        summary[cmd] = {"before_s": round(med["before"], 2), "after_s": round(med["after"], 2),
                        "after_over_before": round(med["after"] / med["before"], 2)}
    print(f"\n{'command':<16} {'before s':>9} {'after s':>9} {'after/before':>13}")
    for cmd, s in summary.items():
        print(f"{cmd:<16} {s['before_s']:>9.2f} {s['after_s']:>9.2f} {s['after_over_before']:>13.2f}")
    if parts:
        print(json.dumps(parts, indent=2))
    report = {
        "benchmark": "control_commands",
        "command": " ".join(["python", "benchmarks/control_commands.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "only": sorted(only),
        "repeats": repeats,
        "site": {"name": args.site, "patients": patients, "cohort": "fedmtl demo prepare --sites 3 (seed 0)"},
        "before": {"ref": args.before_ref, "commit": sha, "source": "git archive of the commit, laid out as installed"},
        "after": {"source": "the working tree, laid out as installed",
                  "modified_tracked_files": [line[3:] for line in dirty if line.strip()]},
        "machine": machine_info(load0),
        "total_seconds": round(total, 1),
        "notes": [
            "seconds = wall time of one `python -m fedmtl.cli ...` process, from spawn to exit (as a shell runs it)",
            "summary = median over the repeats; before and after alternate repeat by repeat, the order flipped each time",
            "breakdown (after version) = the slow commands' parts, measured apart: see docs/benchmarks.md",
        ],
        "summary": summary,
        "breakdown": parts,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\ntotal {total:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
