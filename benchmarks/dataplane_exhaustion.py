"""Strangers against a datasite's data plane, and what the defences cost a legit round.

    python benchmarks/dataplane_exhaustion.py [--quick] [--attempts 100] [--half-open 3000]

Two federations of 3 datasites run side by side, each driven by a worker process of its
own source tree: this checkout (``new``) and the commit before the data plane
authenticated its requests first (``base``, ``git worktree add`` of :data:`BASE_COMMIT`,
laid out as installed). Measured in one run:

* ``round``: the wall time of one data-plane pass of an approved job over the 3 sites,
  passes of the two trees interleaved (the order alternates), so the machine's load hits
  both alike; pass 1 (cold) is reported apart, the figure is the median of the others;
* ``memory``: the resident memory (VmRSS, sampled every 0.1 s) of one ``new`` datasite
  under ``--attempts`` concurrent unauthenticated requests that each declare 256 MiB and
  send as much as the server takes, while a legitimate pass runs (target: growth <= 100 MB,
  the pass completes);
* ``half_open``: ``--half-open`` connections to one datasite that send half a request
  header and wait; how many the server closed within 30 s (new, and base with a 35 s cap).

Writes benchmarks/results/dataplane_exhaustion.json.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).parent))
from benchkit import fedmtl_attr, layout_installed, machine_info  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "dataplane_exhaustion.json"
BASE_COMMIT = "9450518"
EMAIL = "bench@uni.example"
PASSWORD = "bench-password-1"
BIG = 256 << 20


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ the worker
def worker(rounds: int, tmp: Path) -> None:
    """Runs in a process of one source tree: 3 datasites, one approved job; then one
    data-plane pass per ``pass`` line on stdin, ``quit`` to stop. Uses only the API both
    trees share."""
    import numpy as np

    from fedmtl.models import model_to_vector
    from fedmtl.researcher.session import Session
    from fedmtl.schema import Schema

    # each thing at its place after issue 20's moves, and before them (the base tree)
    protocol = fedmtl_attr("fedmtl.contract.protocol", "fedmtl.protocol")
    JobSpec = fedmtl_attr("fedmtl.contract.jobspec:JobSpec", "fedmtl.jobspec:JobSpec")  # noqa: N806
    run_pass = fedmtl_attr("fedmtl.contract.passes:run_pass", "fedmtl.passes:run_pass")
    prepare = fedmtl_attr("fedmtl.datasites.data.cohort:prepare", "fedmtl.datasites.cohort:prepare")
    admin = fedmtl_attr("fedmtl.datasites.server.admin", "fedmtl.datasites.admin")
    launch_mod = fedmtl_attr("fedmtl.datasites.server.launch", "fedmtl.datasites.launch")
    free_port, launch = launch_mod.free_port, launch_mod.launch
    pin_federation = fedmtl_attr("fedmtl.datasites.server.peers:pin_federation",
                                 "fedmtl.datasites.peers:pin_federation")
    default_policy = fedmtl_attr("fedmtl.datasites.template:default_policy",
                                 "fedmtl.datasites.site_ledger:default_policy")

    os.environ["FEDMTL_TORCH_THREADS"] = "1"
    files = prepare(tmp / "cohort", sites=3, seed=0)
    schema = Schema.load(files[0].schema)
    policy = default_policy(schema, min_sites=2)
    handles = []
    try:
        for f in files:
            h = launch(home=tmp / "homes" / f.name, name=f.name, records=f.records, schema=f.schema,
                       port=free_port(), policy=policy)
            admin.add_researcher(home=h.home, email=EMAIL, password=PASSWORD)
            handles.append(h)
        pin_federation([h.home for h in handles], who="owner (benchmark)")
        session = Session.connect([{"url": h.url, "email": EMAIL, "password": PASSWORD} for h in handles])
        spec = JobSpec(name="bench-exhaustion", tasks=[{"label": "diabetes_5y"}, {"label": "dyslipidemia_5y"}],
                       rounds=rounds, local_steps=2, sample_rate=0.02, lr=0.5, noise_multiplier=1.0,
                       secagg={"threshold": 2, "clip": 1.0}, eval_every=0, scaling="range")
        job = session.job(spec, out=tmp / "job")
        job.submit()
        status = job.wait_for_review(timeout=180)
        if {v["status"] for v in status.values()} != {"approved"}:
            raise RuntimeError(f"not approved: {status}")
        transport = job.transport("dataplane")
        model, _ = protocol.build_model(next(iter(job.site_specs.values())))
        weights = model_to_vector(model).astype(np.float32)
        pids = {h.name: json.loads((h.home / "server.pid").read_text())["pid"] for h in handles}
        print(json.dumps({"ready": True, "sites": {h.name: {"url": h.url, "pid": pids[h.name]} for h in handles},
                          "parameters": int(weights.size)}), flush=True)
        p = 0
        for line in sys.stdin:
            if line.strip() != "pass":
                break
            p += 1
            t0 = time.perf_counter()
            out = run_pass(transport=transport, site_specs=job.site_specs, sites=job.sites, pass_no=p, attempt=0,
                           weights=weights, model=job.model)
            print(json.dumps({"pass": p, "wall": time.perf_counter() - t0, "dropped": out.dropped}), flush=True)
    finally:
        for h in handles:
            h.stop()


class Worker:
    """A worker process of one tree (``pythonpath``: its installed layout; None: this one)."""

    def __init__(self, name: str, pythonpath: Path | None, rounds: int, tmp: Path):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
        if pythonpath is not None:
            env["PYTHONPATH"] = str(pythonpath)
        self.name = name
        tmp.mkdir(parents=True, exist_ok=True)
        # cwd outside the checkout: `python -m` (the datasite servers) puts the cwd first on
        # sys.path, and the checkout's fedmtl/ would shadow the tree under test
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", "--rounds",
                                      str(rounds), "--tmp", str(tmp)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp)
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker ended (rc {self.proc.wait()})")
        return json.loads(line)

    def run_pass(self) -> dict[str, Any]:
        self.proc.stdin.write("pass\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(120)
        except Exception:  # noqa: BLE001 - kill it then
            self.proc.kill()


# ------------------------------------------------------------------------ attacks
def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def attempt(url: str, results: list, lock: threading.Lock) -> None:
    """One unauthenticated request declaring 256 MiB, sending as much as the server takes."""
    u = urlparse(url)
    closed = False
    try:
        with socket.create_connection((u.hostname, u.port), timeout=60) as s:
            s.sendall((f"POST /fedmtl/v1/round HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Length: {BIG}\r\n"
                       "Content-Type: application/x-fedmtl\r\n\r\n").encode())
            block, sent = b"\0" * (256 << 10), 0
            try:
                while sent < BIG:
                    s.sendall(block)
                    sent += len(block)
            except OSError:
                pass
            try:
                while s.recv(65536):
                    pass
                closed = True
            except OSError:
                closed = True
    except OSError:
        closed = True
    with lock:
        results.append({"closed": closed, "sent_mb": round(sent / 2**20, 1) if "sent" in locals() else 0})


def memory_attack(w: Worker, attempts: int) -> dict[str, Any]:
    site, info = next(iter(w.info["sites"].items()))
    pid = info["pid"]
    base = peak = rss_mb(pid)
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.wait(0.1):
            peak = max(peak, rss_mb(pid))

    results: list = []
    lock = threading.Lock()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    threads = [threading.Thread(target=attempt, args=(info["url"], results, lock), daemon=True) for _ in range(attempts)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    legit = w.run_pass()
    for t in threads:
        t.join(120)
    stop.set()
    watcher.join()
    peak = max(peak, rss_mb(pid))
    return {"site": site, "attempts": attempts, "rss_before_mb": round(base, 1), "rss_peak_mb": round(peak, 1),
            "rss_growth_mb": round(peak - base, 1), "rss_after_mb": round(rss_mb(pid), 1),
            "closed_by_server": sum(r["closed"] for r in results),
            "mb_sent_total": round(sum(r["sent_mb"] for r in results), 1),
            "legit_pass": {"wall": round(legit["wall"], 2), "dropped": legit["dropped"]},
            "seconds": round(time.perf_counter() - t0, 1)}


def half_open(url: str, n: int, cap_s: float) -> dict[str, Any]:
    u = urlparse(url)
    socks, refused = [], 0
    partial = f"POST /fedmtl/v1/round HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Le".encode()
    for _ in range(n):
        try:
            s = socket.create_connection((u.hostname, u.port), timeout=10)
            s.sendall(partial)
            s.setblocking(False)
            socks.append(s)
        except OSError:
            refused += 1
    t0 = time.monotonic()
    open_ = {s.fileno(): s for s in socks}
    closed_at: list[float] = []
    poller = select.poll()
    for fd in open_:
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while open_ and time.monotonic() - t0 < cap_s:
        for fd, _ev in poller.poll(500):
            s = open_.get(fd)
            if s is None:
                continue
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data or data.startswith(b"HTTP/1.1 408"):
                if data:
                    try:
                        while s.recv(4096):
                            pass
                    except OSError:
                        pass
                poller.unregister(fd)
                del open_[fd]
                closed_at.append(time.monotonic() - t0)
    for s in socks:
        s.close()
    within_30 = sum(1 for t in closed_at if t <= 30) + refused
    return {"connections": n, "refused_at_connect": refused, "closed_within_30s": within_30,
            "still_open_at_cap": len(open_), "cap_s": cap_s,
            "last_closed_s": round(max(closed_at), 1) if closed_at else None}


# ------------------------------------------------------------------------ main
def base_tree(tmp: Path) -> Path:
    wt = Path(tempfile.gettempdir()) / f"fedmtl-base-{BASE_COMMIT}"
    if not wt.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(wt), BASE_COMMIT], check=True,
                       capture_output=True)
    return layout_installed(wt, tmp / "base-layout")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 passes, 50 attempts, 1,000 half-open connections")
    ap.add_argument("--passes", type=int, default=6)
    ap.add_argument("--attempts", type=int, default=100)
    ap.add_argument("--half-open", type=int, default=3000)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=10, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.rounds, args.tmp)
        return 0
    if args.quick:
        args.passes, args.attempts, args.half_open = 3, 50, 1000
    from fedmtl.datasites.server.http_guard import raise_open_file_limit

    raise_open_file_limit()
    load = os.getloadavg()
    rounds = args.passes + 2
    with tempfile.TemporaryDirectory(prefix="fedmtl-exhaustion-") as d:
        tmp = Path(d)
        base_path = base_tree(tmp)
        workers: dict[str, Worker] = {}
        try:
            for name, path in (("base", base_path), ("new", None)):
                t0 = time.perf_counter()
                workers[name] = Worker(name, path, rounds, tmp / name)
                _log(f"{name}: 3 datasites up, job approved ({time.perf_counter() - t0:.0f} s)")
            walls: dict[str, list[float]] = {"base": [], "new": []}
            for p in range(1, args.passes + 1):
                order = ("base", "new") if p % 2 else ("new", "base")
                for name in order:
                    r = workers[name].run_pass()
                    if r["dropped"]:
                        raise RuntimeError(f"{name} pass {p}: {r['dropped']}")
                    walls[name].append(r["wall"])
                _log(f"pass {p}: base {walls['base'][-1]:.2f} s, new {walls['new'][-1]:.2f} s")
            warm = {k: v[1:] or v for k, v in walls.items()}
            med = {k: statistics.median(v) for k, v in warm.items()}
            _log("memory attack ...")
            memory = memory_attack(workers["new"], args.attempts)
            _log(f"  {memory}")
            _log("half-open connections ...")
            new_url = next(iter(workers["new"].info["sites"].values()))["url"]
            base_url = next(iter(workers["base"].info["sites"].values()))["url"]
            ho = {"new": half_open(new_url, args.half_open, 40.0), "base": half_open(base_url, args.half_open, 35.0)}
            _log(f"  {ho}")
        finally:
            for w in workers.values():
                w.close()
    out = {
        "benchmark": "dataplane_exhaustion",
        "quick": args.quick,
        "base_commit": BASE_COMMIT,
        "parameters": workers["new"].info.get("parameters") if "new" in workers else None,
        "round": {"passes": walls, "median_warm_s": {k: round(v, 3) for k, v in med.items()},
                  "new_over_base": round(med["new"] / med["base"], 3)},
        "memory": memory,
        "half_open": ho,
        "machine": machine_info(load),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"round": out["round"]["median_warm_s"], "ratio": out["round"]["new_over_base"],
                      "rss_growth_mb": memory["rss_growth_mb"], "half_open": {k: v["closed_within_30s"]
                                                                              for k, v in ho.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
