"""A budget query's latency while another researcher's largest job trains, before and after.

    python benchmarks/fair_sharing.py [--quick] [--repeats N] [--before-ref REF]

Issue 19 (3): one process-wide lock in the round runtime serialised every job's round
calls, so another researcher's budget query waited for the whole training of the largest
job the DEFAULT policy approves. This measures that query, for two versions of the code,
each run from its own copy of the source laid out as installed (``PYTHONPATH``; the same
venv, so the same syft, torch, pandas):

* ``before``  ``--before-ref`` (default 9450518, the commit before the fix), by ``git archive``
* ``after``   this working tree

For each version, a worker process launches three datasites from the demo cohort
(:func:`fedmtl.datasites.data.cohort.prepare`, seed 0) with the default policy, the owners
pinning each other, as ``fedmtl datasite launch`` does. Researcher B gets a small approved
job; per repeat, a fresh researcher A gets the largest job the default policy approves
(two hidden layers of 1024, five heads: 1,082,373 parameters; sample rate 0.5, an
expected batch of about 3,600 records at st-mary; three local epochs, noise 6).

Then, per version: B's ``spend`` query at st-mary idle (over the data plane and over syft,
``--idle`` times each); and per repeat, A's first pass at st-mary (training) is started in a
thread (over syft in odd repeats, the data plane in even ones), and once the ledger holds
its charge (the runtime charges right before it trains), B asks for their budget in a
loop, alternating the data plane and syft, until A's call returns. Each query records
its latency and whether A's site was still training when it came back (A's job state
names no current pass). The figure of merit is the latency of the queries sent while A
trains (target: at most 1 s); before the fix the first one waits for the rest of the
training.

Writes benchmarks/results/fair_sharing.json. Every copy and home is in a temporary
folder, removed at the end; every server started is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchkit import fedmtl_attr, layout_installed, machine_info

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "fair_sharing.json"
BASE_REF = "9450518"
SITE = "st-mary"
PASSWORD = "bench-researcher-pw-1"
LABELS = ("diabetes_5y", "htn_5y", "dyslipidemia_5y", "cvd_5y", "death_5y")


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


# ------------------------------------------------------------------------ the worker
def big_spec(name: str):
    JobSpec = fedmtl_attr("fedmtl.contract.jobspec:JobSpec", "fedmtl.jobspec:JobSpec")  # noqa: N806

    return JobSpec(name=name, tasks=[{"label": c} for c in LABELS], model={"widths": [1024, 1024]}, rounds=1,
                   local_epochs=3.0, sample_rate=0.5, noise_multiplier=6.0, secagg={"threshold": 2, "clip": 1.0},
                   scaling="range", eval_every=0)


def small_spec(name: str):
    JobSpec = fedmtl_attr("fedmtl.contract.jobspec:JobSpec", "fedmtl.jobspec:JobSpec")  # noqa: N806

    return JobSpec(name=name, tasks=[{"label": "diabetes_5y"}], rounds=1, local_steps=2, sample_rate=0.02,
                   noise_multiplier=1.0, secagg={"threshold": 2, "clip": 1.0}, scaling="range", eval_every=0)


def _timed(fn) -> tuple[float, dict]:
    t0 = time.perf_counter()
    reply = fn()
    return time.perf_counter() - t0, reply


def _advertised(home: Path, job_id: str) -> bool:
    path = home / "jobs" / job_id / "state.json"
    return path.exists() and json.loads(path.read_text()).get("current") is not None


def _charged(home: Path, job_id: str) -> bool:
    site_ledger = fedmtl_attr("fedmtl.datasites.ledger.site_ledger", "fedmtl.datasites.site_ledger")

    st = site_ledger.open_ledger(home).request(job_id)
    return st is not None and 1 in st.rounds


def worker(repeats: int, idle: int, work: Path) -> dict[str, Any]:
    """Launch three datasites, measure, stop them; the measurements as a dict."""
    import numpy as np

    import fedmtl
    from fedmtl.models import model_to_vector

    # each thing at its place after issue 20's moves, and before them (the base tree)
    prepare = fedmtl_attr("fedmtl.datasites.data.cohort:prepare", "fedmtl.datasites.cohort:prepare")
    admin = fedmtl_attr("fedmtl.datasites.server.admin", "fedmtl.datasites.admin")
    launch_mod = fedmtl_attr("fedmtl.datasites.server.launch", "fedmtl.datasites.launch")
    free_port, launch = launch_mod.free_port, launch_mod.launch
    pin_federation = fedmtl_attr("fedmtl.datasites.server.peers:pin_federation",
                                 "fedmtl.datasites.peers:pin_federation")
    from fedmtl.researcher.session import Session

    files = prepare(work / "cohort", sites=3, seed=0)
    handles = []
    try:
        for f in files:
            t0 = time.perf_counter()
            handles.append(launch(home=work / "homes" / f.name, name=f.name, records=f.records, schema=f.schema,
                                  port=free_port()))
            _log(f"  launched {f.name} in {time.perf_counter() - t0:.0f} s")
        pin_federation([h.home for h in handles])
        by_name = {h.name: h for h in handles}
        home = by_name[SITE].home
        emails = ["b@uni.example", *[f"a{i}@uni.example" for i in range(repeats)]]
        for h in handles:
            for e in emails:
                admin.add_researcher(home=h.home, email=e, password=PASSWORD)

        def session(email):
            return Session.connect([{"url": h.url, "email": email, "password": PASSWORD} for h in handles])

        job_b = session(emails[0]).job(small_spec("fair-bench-b"), out=work / "job-b")
        jobs_a = [session(e).job(big_spec(f"fair-bench-a{i}"), out=work / f"job-a{i}") for i, e in enumerate(emails[1:])]
        for job in (job_b, *jobs_a):
            job.submit()
        for job in (job_b, *jobs_a):
            status = job.wait_for_review(timeout=300, poll=0.5)
            bad = {s: v for s, v in status.items() if v["status"] != "approved"}
            if bad:
                raise RuntimeError(f"job {job.job_id} was not approved everywhere: {bad}")
        _log("  jobs approved")
        planes = {"dataplane": job_b.transport("dataplane"), "syft": job_b.transport("syft")}
        spend = {"stage": "spend"}
        for t in planes.values():  # warm both paths once
            t.call(SITE, spend)
        idle_s = {p: [_timed(lambda t=t: t.call(SITE, spend))[0] for _ in range(idle)] for p, t in planes.items()}
        runs = []
        for i, job_a in enumerate(jobs_a):
            plane_a = "syft" if i % 2 == 0 else "dataplane"
            w = np.zeros(model_to_vector(job_a.model).size, dtype=np.float32)
            box: dict[str, Any] = {}
            done = threading.Event()

            def train(job_a=job_a, plane_a=plane_a, w=w, box=box, done=done):
                t0 = time.perf_counter()
                box["reply"] = job_a.transport(plane_a).call(
                    SITE, {"stage": "advertise", "pass": 1, "attempt": 0, "weights": w})
                box["seconds"] = time.perf_counter() - t0
                done.set()

            th = threading.Thread(target=train, daemon=True)
            t_start = time.perf_counter()
            th.start()
            while not _charged(home, job_a.job_id) and not done.is_set():
                time.sleep(0.02)
            t_charged = time.perf_counter() - t_start
            queries = []
            k = 0
            while not done.is_set():
                if k:
                    done.wait(0.2)  # a researcher's pace, not a flood
                plane = ("dataplane", "syft")[k % 2]
                k += 1
                sent = time.perf_counter() - t_start
                took, reply = _timed(lambda plane=plane: planes[plane].call(SITE, spend))
                queries.append({"plane": plane, "sent_s": round(sent, 3), "latency_s": round(took, 3),
                                "ok": bool(reply.get("ok")), "a_returned": done.is_set(),
                                "a_still_training": not done.is_set() and not _advertised(home, job_a.job_id)})
            th.join()
            reply = box.get("reply", {})
            runs.append({"repeat": i + 1, "a_plane": plane_a, "a_ok": bool(reply.get("ok")),
                         "a_error": None if reply.get("ok") else reply.get("error"),
                         "a_call_s": round(box.get("seconds", float("nan")), 3),
                         "a_charged_after_s": round(t_charged, 3), "queries": queries})
            first = queries[0] if queries else None
            _log(f"  repeat {i + 1} (A over {plane_a}): A's call {box.get('seconds', 0):.1f} s; "
                 f"{len(queries)} queries while it ran; first "
                 + (f"{first['latency_s']:.3f} s over {first['plane']}" if first else "none"))
        return {"fedmtl": str(Path(fedmtl.__file__).parent), "idle_spend_s": idle_s, "runs": runs,
                "torch_threads_env": os.environ.get("FEDMTL_TORCH_THREADS")}
    finally:
        for h in handles:
            try:
                h.stop()
            except Exception as e:  # noqa: BLE001 - stop the others anyway
                _log(f"  could not stop {h.name}: {e}")


# ------------------------------------------------------------------------ the driver
def _summary(res: dict[str, Any]) -> dict[str, Any]:
    queries = [q for r in res["runs"] for q in r["queries"]]
    firsts = [r["queries"][0]["latency_s"] for r in res["runs"] if r["queries"]]
    out: dict[str, Any] = {
        "a_call_s": [r["a_call_s"] for r in res["runs"]],
        "idle_spend_median_s": {p: round(statistics.median(v), 3) for p, v in res["idle_spend_s"].items()},
        "first_query_after_charge_s": firsts,
        "queries": len(queries),
        "answered_while_a_site_trained": sum(q["a_still_training"] for q in queries),
    }
    for plane in ("dataplane", "syft"):
        lat = [q["latency_s"] for q in queries if q["plane"] == plane and q["a_still_training"]]
        out[f"{plane}_while_training_s"] = {"n": len(lat), "median": round(statistics.median(lat), 3) if lat else None,
                                            "max": round(max(lat), 3) if lat else None}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repeat per version, fewer idle queries")
    ap.add_argument("--repeats", type=int, default=2, help="trainings of A per version (A alternates syft, data plane)")
    ap.add_argument("--idle", type=int, default=5, help="idle spend queries per plane")
    ap.add_argument("--before-ref", default=BASE_REF, help=f"the git ref of the 'before' version (default {BASE_REF})")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="FEDMTL_TORCH_THREADS of the datasites (default 0: torch's default, every core)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    repeats, idle = (1, 3) if args.quick else (args.repeats, args.idle)
    if args.worker:
        res = worker(repeats, idle, args.worker)
        (args.worker / "result.json").write_text(json.dumps(res))
        return 0
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedmtl-fair-") as tmp:
        tmp = Path(tmp)
        sha = _git_archive(args.before_ref, tmp / "before-src")
        trees = {"before": layout_installed(tmp / "before-src", tmp / "before-tree"),
                 "after": layout_installed(REPO, tmp / "after-tree")}
        for name, tree in trees.items():
            _log(f"{name}: {tree}")
            work = tmp / f"{name}-work"
            work.mkdir()
            env = {**os.environ, "PYTHONPATH": str(tree), "TQDM_DISABLE": "1"}
            for k in ("FEDMTL_SYFT_VERBOSE", "FEDMTL_HEAVY_SLOTS", "FEDMTL_TORCH_THREADS"):
                env.pop(k, None)
            if args.torch_threads > 0:
                env["FEDMTL_TORCH_THREADS"] = str(args.torch_threads)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(work),
                   "--repeats", str(repeats), "--idle", str(idle)]
            proc = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=None, text=True,
                                  timeout=3600)
            if proc.returncode != 0:
                raise RuntimeError(f"the {name} worker exited {proc.returncode}")
            res = json.loads((work / "result.json").read_text())
            if not Path(res["fedmtl"]).resolve().is_relative_to(tree.resolve()):
                raise RuntimeError(f"the {name} worker imported {res['fedmtl']}, not its copy in {tree}")
            results[name] = res
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.split("\n")
    total = time.perf_counter() - t_start
    summary = {name: _summary(res) for name, res in results.items()}
    print(f"\n{'version':<8} {'A call s':>12} {'idle spend s (dp/syft)':>24} {'1st query after charge s':>26} "
          f"{'answered while A trained':>26} {'while training s (dp/syft median, max)':>40}")
    for name, s in summary.items():
        idle_txt = " / ".join(f"{v:.2f}" for v in s["idle_spend_median_s"].values())
        dp, sy = s["dataplane_while_training_s"], s["syft_while_training_s"]
        during = (f"{dp['median'] or 0:.2f}/{sy['median'] or 0:.2f}, {dp['max'] or 0:.2f}/{sy['max'] or 0:.2f}"
                  if dp["n"] or sy["n"] else "none")
        print(f"{name:<8} {', '.join(f'{x:.1f}' for x in s['a_call_s']):>12} {idle_txt:>24} "
              f"{', '.join(f'{x:.2f}' for x in s['first_query_after_charge_s']):>26} "
              f"{s['answered_while_a_site_trained']:>19} of {s['queries']:<4} {during:>40}")
    report = {
        "benchmark": "fair_sharing",
        "command": " ".join(["python", "benchmarks/fair_sharing.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "repeats": repeats,
        "torch_threads": args.torch_threads or "torch's default (every core)",
        "site": SITE,
        "job_a": {"spec": big_spec("fair-bench-a").to_dict(), "parameters": 1_082_373},
        "before": {"ref": args.before_ref, "commit": sha, "source": "git archive of the commit, laid out as installed"},
        "after": {"source": "the working tree, laid out as installed",
                  "modified_tracked_files": [line[3:] for line in dirty if line.strip()]},
        "machine": machine_info(load0),
        "total_seconds": round(total, 1),
        "notes": [
            "latency = wall time of one spend query of researcher B at st-mary, from the call to the reply",
            "while training = sent after the ledger held A's charge and answered before A's call returned; "
            "a_still_training: A's site had not stored its advertisement yet when the answer came",
            "before and after run one after the other in one run, each in its own worker process and federation",
        ],
        "summary": summary,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\ntotal {total:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
