"""Idle CPU of a real datasite: % of one core, with 0 and with 50 past requests.

Launches one demo-sized datasite (``fedmtl.datasites.server.launch.launch``, a server process of
its own, the automatic reviewer running inside it), then

1. lets it settle (``--settle`` seconds) and samples the server process's CPU time
   (utime + stime of every thread, from ``/proc/<pid>/task/*/stat``) over ``--window``
   seconds of idleness: nothing calls it;
2. as a researcher with the raw syft client, submits ``--requests`` code requests (a plain
   function bound to the records asset: the reviewer denies each, which writes the ledger
   and syft's database), waits until every one is decided;
3. settles again and samples another window of idleness.

Per window: % of one core (CPU seconds / wall seconds), and the CPU seconds of each thread
that used any (by thread id; Python threads all carry the process's kernel name).

Run: ``python benchmarks/idle_cpu.py [--quick]``; writes ``benchmarks/results/idle_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchkit import machine_info

RESULTS = Path(__file__).parent / "results" / "idle_cpu.json"
RESEARCHER, RESEARCHER_PW = "idle@uni.example", "idle-bench-password"
TICKS = os.sysconf("SC_CLK_TCK")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _thread_times(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (kernel thread name, CPU seconds) for every thread of ``pid``."""
    out: dict[int, tuple[str, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / TICKS)  # utime, stime
    return out


def _process_time(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text()
    fields = fields[fields.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def sample(pid: int, seconds: float) -> dict:
    """CPU use of process ``pid`` over ``seconds`` of wall time."""
    t0, c0, th0 = time.monotonic(), _process_time(pid), _thread_times(pid)
    time.sleep(seconds)
    t1, c1, th1 = time.monotonic(), _process_time(pid), _thread_times(pid)
    wall, cpu = t1 - t0, c1 - c0
    threads = []
    for tid, (name, t) in th1.items():
        used = t - th0.get(tid, (name, 0.0))[1]
        if used > 0:
            threads.append({"tid": tid, "name": name, "cpu_s": round(used, 3)})
    threads.sort(key=lambda r: -r["cpu_s"])
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 3),
        "pct_of_one_core": round(100.0 * cpu / wall, 3),
        "threads_total": len(th1),
        "busy_threads": threads,
    }


def submit_requests(url: str, n: int, folder: Path):
    """``n`` code requests as a researcher with the raw syft client (each a plain function
    bound to the records asset; the reviewer denies them). Returns the client."""
    import importlib.util

    from fedmtl.datasites.site import syftio

    # syft reads each function's source with inspect: write them to a module file
    path = folder / "idle_bench_functions.py"
    path.write_text("".join(f"def idle_bench_{i:03d}(data):\n    return len(data) + {i}\n\n\n" for i in range(n)))
    spec = importlib.util.spec_from_file_location("idle_bench_functions", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sy = syftio.import_syft()
    client = syftio.login(url, RESEARCHER, RESEARCHER_PW)
    with syftio.quiet():
        asset = client.datasets.get_all()[0].assets[0]
        for i in range(n):
            code = sy.syft_function_single_use(data=asset)(getattr(module, f"idle_bench_{i:03d}"))
            syftio.check(client.code.request_code_execution(code), f"submitting request {i}")
    return client


def wait_decided(client, n: int, timeout: float) -> dict:
    from fedmtl.datasites.site import syftio

    deadline = time.monotonic() + timeout
    while True:
        with syftio.quiet():
            reqs = client.requests.get_all()
        status = {}
        for r in reqs:
            status[r.status.name] = status.get(r.status.name, 0) + 1
        if (len(reqs) >= n and not status.get("PENDING")) or time.monotonic() > deadline:
            return {"requests_seen": len(reqs), **status}
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 s windows, 10 requests: a smoke run")
    ap.add_argument("--window", type=float, help="seconds of idleness sampled (default 60; quick 20)")
    ap.add_argument("--settle", type=float, default=15.0, help="seconds to wait before each window")
    ap.add_argument("--requests", type=int, help="requests submitted (default 50; quick 10)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    window = args.window or (20.0 if args.quick else 60.0)
    n_req = args.requests if args.requests is not None else (10 if args.quick else 50)

    from fedmtl.datasites.data import cohort
    from fedmtl.datasites.server import admin
    from fedmtl.datasites.server.launch import free_port, launch

    load0 = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="fedmtl-idle-cpu-"))
    handle = None
    try:
        site = cohort.prepare(tmp / "export", sites=3, seed=0)[-1]  # the smallest hospital
        t0 = time.perf_counter()
        handle = launch(home=tmp / "home", name=site.name, records=site.records, schema=site.schema,
                        port=free_port(), warn=lambda m: None)
        launch_s = time.perf_counter() - t0
        pid = handle._process.pid
        admin.add_researcher(home=handle.home, email=RESEARCHER, password=RESEARCHER_PW)
        _log(f"launched {site.name} ({site.n_patients} records) in {launch_s:.1f} s, server pid {pid}")
        time.sleep(args.settle)
        idle0 = sample(pid, window)
        _log(f"idle, 0 requests: {idle0['pct_of_one_core']:.2f}% of a core over {idle0['wall_s']:.0f} s")
        t0 = time.perf_counter()
        client = submit_requests(handle.url, n_req, tmp)
        submit_s = time.perf_counter() - t0
        status = wait_decided(client, n_req, timeout=600)
        decided_s = time.perf_counter() - t0
        del client
        _log(f"{n_req} requests submitted in {submit_s:.1f} s, all decided after {decided_s:.1f} s: {status}")
        time.sleep(args.settle)
        idle_n = sample(pid, window)
        _log(f"idle, {n_req} past requests: {idle_n['pct_of_one_core']:.2f}% of a core over {idle_n['wall_s']:.0f} s")
        print(f"\nidle CPU of the datasite server (% of one core, {window:.0f} s windows)")
        print(f"  0 requests      {idle0['pct_of_one_core']:6.2f}%")
        print(f"  {n_req:<3} requests    {idle_n['pct_of_one_core']:6.2f}%")
        for label, s in (("0", idle0), (str(n_req), idle_n)):
            top = ", ".join(f"{t['name']}[{t['tid']}] {t['cpu_s']:.2f}s" for t in s["busy_threads"][:6])
            print(f"  busiest threads ({label} requests): {top or 'none'}")
        report = {
            "benchmark": "idle_cpu",
            "command": " ".join(["python", "benchmarks/idle_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
            "site": {"name": site.name, "records": site.n_patients, "launch_s": round(launch_s, 2)},
            "window_s": window,
            "settle_s": args.settle,
            "requests": n_req,
            "submit_s": round(submit_s, 2),
            "decided_s": round(decided_s, 2),
            "request_status": status,
            "idle_0_requests": idle0,
            "idle_after_requests": idle_n,
            "target_pct_of_one_core": 1.0,
            "machine": machine_info(load0),
            "notes": [
                "CPU = utime + stime of the server process (all its threads) from /proc, over the window",
                "requests: plain functions bound to the records asset, submitted with the raw syft "
                "client as a researcher; the reviewer denies each (not the round template)",
            ],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
        print(f"wrote {args.out}")
    finally:
        if handle is not None:
            handle.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
