"""Soak: several researchers run concurrent jobs for many rounds; the datasites stay flat.

    python benchmarks/soak.py [--quick] [--rounds 20] [--researchers 3] [--jobs 3] [--out JSON]

Issue 21. Three real datasites (the demo cohort, seed 0, launched in a temporary folder as
``fedmtl datasite launch`` does, the owners pinning each other) serve ``--researchers``
researchers, each running ``--jobs`` jobs at once (one thread per job) of ``--rounds``
training rounds plus the final evaluation pass, every pass over the data plane. The job is
small on purpose (two tasks, one hidden layer of 16, two local steps at sample rate 0.01)
so that a soak is many passes, not long ones. Each site's policy admits that load: the
default policy with ``limits.max_concurrent_jobs_per_researcher = --jobs`` and budgets of
``--jobs`` (researcher) and ``--jobs x --researchers`` (dataset) jobs at the largest epsilon
a job may cost (``privacy.max_epsilon_per_job``), so no job can be refused for budget.

Measured while it runs, per datasite:

* ``rss``: the resident memory of the datasite's process tree (the server and any child,
  psutil), sampled every ``--sample-every`` seconds with the share of all passes done;
* ``pass time``: per job and pass, the wall seconds of that job's five stage calls to the
  site (queueing for a training slot included), from a timing wrapper around the job's
  data-plane transport.

Criteria (the exit status is 1 when one fails, and it is named):

1. ``rss_growth``: per site, the median RSS of the samples taken while the last 10% of all
   passes ran, over the median RSS while passes 20% to 30% ran (after warm-up): <= 1.10;
2. ``pass_time_flat``: per site, the median pass time of the last quarter of the training
   rounds (all jobs) over the median of the second quarter: <= 1.10 (the first quarter is
   warm-up: pass 1 reads and caches the records). One-sided: contention only falls as the
   first jobs end, so a faster tail is no fault; the ratio and a Theil-Sen slope (drift
   over the run, relative to the median) are reported either way;
3. ``ledgers_verify``: every site's ledger verifies against the site's key
   (:func:`fedmtl.datasites.ledger.ledger.verify`, what ``fedmtl audit`` runs);
4. ``epsilon_charged_equals_priced``: per job and site, the epsilon the site's ledger
   charged (:meth:`Job.charged`, read back over the data plane) equals what
   :meth:`Job.cost` priced before the job ran (relative tolerance 1e-9), every pass charged;
5. ``jobs_completed``: every job ran every pass with no site dropping out.

Writes ``--out`` (default benchmarks/results/soak.json; ``--quick``: soak_quick.json) and a
plot beside it (``.png``: RSS and pass time over time, per site). Everything else lives in
a temporary folder, removed at the end; every server started is stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import psutil
from benchkit import machine_info

from fedmtl.contract.jobspec import JobSpec
from fedmtl.datasites.data.cohort import prepare
from fedmtl.datasites.ledger.ledger import verify
from fedmtl.datasites.server import admin
from fedmtl.datasites.server.launch import free_port, launch
from fedmtl.datasites.server.peers import pin_federation
from fedmtl.datasites.site import identity
from fedmtl.datasites.template import default_policy
from fedmtl.researcher.job import Job
from fedmtl.researcher.session import Session
from fedmtl.schema import Schema

RESULTS = Path(__file__).parent / "results" / "soak.json"
QUICK_RESULTS = Path(__file__).parent / "results" / "soak_quick.json"
PASSWORD = "soak-researcher-pw-1"
#: (start, end) of the warm-up window and of the end window, as shares of all passes done
WARM_WINDOW = (0.20, 0.30)
END_WINDOW = (0.90, 1.00)
MAX_GROWTH = 0.10
MAX_SLOWDOWN = 0.10
EPS_REL_TOL = 1e-9


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def soak_spec(name: str, rounds: int) -> JobSpec:
    """The small job every thread runs: 2 tasks, one hidden layer of 16, 2 local steps."""
    return JobSpec(name=name, tasks=[{"label": "diabetes_5y"}, {"label": "dyslipidemia_5y"}],
                   model={"widths": [16]}, rounds=rounds, local_steps=2, sample_rate=0.01, lr=0.5,
                   noise_multiplier=1.0, secagg={"threshold": 2, "clip": 1.0}, scaling="range", eval_every=0)


# ------------------------------------------------------------------------ measuring
class TimingTransport:
    """A transport that passes every call on and records ``(site, pass, stage, start, seconds, ok)``.

    Args:
        inner: the job's transport (the data plane).
        job: the job's id, kept with each record.
        sink: where records go (shared by every job; appended under ``lock``).
        lock: guards ``sink``.
        t0: the run's start (``time.perf_counter``), records' times are relative to it.
    """

    def __init__(self, inner: Any, job: str, sink: list[dict[str, Any]], lock: threading.Lock, t0: float):
        self.inner = inner
        self.name = getattr(inner, "name", type(inner).__name__)
        self.job = job
        self.sink = sink
        self.lock = lock
        self.t0 = t0

    def call(self, site: str, message: Mapping[str, Any]) -> dict[str, Any]:
        """Call ``site`` through the inner transport; the reply, unchanged."""
        start = time.perf_counter()
        reply = self.inner.call(site, message)
        end = time.perf_counter()
        with self.lock:
            self.sink.append({"job": self.job, "site": site, "pass": int(message.get("pass", 0)),
                              "stage": str(message.get("stage")), "start": start - self.t0,
                              "seconds": end - start, "ok": bool(reply.get("ok"))})
        return reply

    def close(self) -> None:
        """Close the inner transport's connections."""
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


def tree_usage(pid: int) -> tuple[float, float, int, float]:
    """(RSS of ``pid`` and all its descendants in MB, RSS of ``pid`` alone in MB, processes,
    CPU seconds (user + system) of the tree); NaN when the process is gone."""
    try:
        proc = psutil.Process(pid)
        own = proc.memory_info().rss
        cpu = sum(proc.cpu_times()[:4])  # user, system, children_user, children_system
        total, n = own, 1
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
                cpu += sum(child.cpu_times()[:2])
                n += 1
            except psutil.Error:
                continue
    except psutil.Error:
        return float("nan"), float("nan"), 0, float("nan")
    return total / 2**20, own / 2**20, n, cpu


class Sampler(threading.Thread):
    """Samples each site's process-tree RSS every ``every`` seconds, with the share of
    passes done, and prints a progress line every ``report_every`` seconds."""

    def __init__(self, pids: Mapping[str, int], total_passes: int, every: float, t0: float,
                 report_every: float = 15.0):
        super().__init__(daemon=True)
        self.pids = dict(pids)
        self.total = total_passes
        self.every = every
        self.t0 = t0
        self.report_every = report_every
        self.done = 0
        self.samples: list[dict[str, Any]] = []
        self.loadavg: list[list[float]] = []
        self.recent: list[float] = []  # job pass walls since the last progress line
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def pass_done(self, wall: float) -> None:
        with self.lock:
            self.done += 1
            self.recent.append(wall)

    def sample(self) -> dict[str, Any]:
        with self.lock:
            done = self.done
        row: dict[str, Any] = {"t": round(time.perf_counter() - self.t0, 2), "passes_done": done,
                               "frac": done / self.total, "rss_mb": {}, "server_rss_mb": {}, "processes": {}, "cpu_s": {}}
        for site, pid in self.pids.items():
            tree, own, n, cpu = tree_usage(pid)
            row["rss_mb"][site], row["server_rss_mb"][site], row["processes"][site] = round(tree, 1), round(own, 1), n
            row["cpu_s"][site] = round(cpu, 2)
        self.samples.append(row)
        return row

    def run(self) -> None:
        last_report = time.perf_counter()
        while not self.stop.wait(self.every):
            row = self.sample()
            now = time.perf_counter()
            if now - last_report >= self.report_every:
                last_report = now
                load = os.getloadavg()
                self.loadavg.append([row["t"], *[round(x, 2) for x in load]])
                with self.lock:
                    recent, self.recent = self.recent, []
                med = f"{statistics.median(recent):.2f} s" if recent else "-"
                rss = ", ".join(f"{s} {v:.0f}" for s, v in row["rss_mb"].items())
                _log(f"[{row['t']:6.0f} s] passes {row['passes_done']}/{self.total} "
                     f"({100 * row['frac']:.0f}%) | RSS MB: {rss} | job pass median {med} "
                     f"({len(recent)} passes) | load {load[0]:.1f}")


# ------------------------------------------------------------------------ the run
def run_job(job: Job, transport: TimingTransport, sampler: Sampler, start: threading.Event,
            log: list[dict[str, Any]], errors: dict[str, str]) -> None:
    """Run every pass of ``job``, one ``job.run(passes=1)`` at a time, recording each."""
    start.wait()
    last = int(job.spec.schedule.last_pass)
    try:
        for p in range(1, last + 1):
            t = time.perf_counter()
            result = job.run(progress=False, transport=transport, passes=1)
            wall = time.perf_counter() - t
            dropped = {s: v for s, v in result.site_status.items() if v != "ok"}
            log.append({"job": job.job_id, "pass": p, "wall": wall, "end": t + wall - transport.t0,
                        "dropped": dropped})
            sampler.pass_done(wall)
            if dropped:
                _log(f"  {job.job_id} pass {p}: {dropped}")
        _log(f"  {job.job_id}: all {last} passes done")
    except Exception as e:  # noqa: BLE001 - reported as the jobs_completed criterion
        errors[job.job_id] = f"{type(e).__name__}: {e}"
        _log(f"  {job.job_id} FAILED: {errors[job.job_id]}")


def _window(samples: list[dict[str, Any]], lo: float, hi: float) -> list[dict[str, Any]]:
    """Samples whose share of passes done is in [lo, hi) (hi = 1: up to, not after, the
    last pass); the nearest sample after ``lo`` when none is."""
    inside = [s for s in samples if lo <= s["frac"] < hi]
    if inside:
        return inside
    after = [s for s in samples if s["frac"] >= lo]
    return after[:1] or samples[-1:]


def theil_sen(xs: list[float], ys: list[float]) -> float:
    """The median of the pairwise slopes (robust to outliers); 0 with fewer than 2 x values."""
    slopes = [(ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs))
              if xs[j] != xs[i]]
    return statistics.median(slopes) if slopes else 0.0


def pass_times(calls: list[dict[str, Any]], rounds: int) -> dict[str, dict[tuple[str, int], float]]:
    """site -> (job, pass) -> the seconds of that job's calls to that site in that training pass."""
    out: dict[str, dict[tuple[str, int], float]] = {}
    for c in calls:
        if 1 <= c["pass"] <= rounds:
            key = (c["job"], c["pass"])
            site = out.setdefault(c["site"], {})
            site[key] = site.get(key, 0.0) + c["seconds"]
    return out


def flatness(times: Mapping[tuple[str, int], float], rounds: int) -> dict[str, Any]:
    """Median of the last quarter of the rounds over the second quarter; Theil-Sen drift."""
    q2 = [v for (_, p), v in times.items() if rounds / 4 < p <= rounds / 2]
    q4 = [v for (_, p), v in times.items() if p > 3 * rounds / 4]
    by_pass: dict[int, list[float]] = {}
    for (_, p), v in times.items():
        by_pass.setdefault(p, []).append(v)
    xs = sorted(p for p in by_pass if p > rounds / 4)
    ys = [statistics.median(by_pass[p]) for p in xs]
    slope = theil_sen([float(x) for x in xs], ys)
    med = statistics.median(ys) if ys else float("nan")
    m2, m4 = statistics.median(q2), statistics.median(q4)
    return {"q2_passes": [p for p in sorted(by_pass) if rounds / 4 < p <= rounds / 2],
            "q4_passes": [p for p in sorted(by_pass) if p > 3 * rounds / 4],
            "q2_median_s": round(m2, 4), "q4_median_s": round(m4, 4), "ratio": round(m4 / m2, 4),
            "theil_sen_s_per_pass": round(slope, 5),
            "drift_over_run": round(slope * (xs[-1] - xs[0]) / med, 4) if len(xs) > 1 and med else 0.0,
            "median_per_pass_s": {p: round(statistics.median(v), 4) for p, v in sorted(by_pass.items())}}


def rss_growth(samples: list[dict[str, Any]], sites: list[str]) -> dict[str, dict[str, Any]]:
    """Per site, the median RSS while the last 10% of the passes ran over the median while
    passes 20% to 30% ran (:data:`END_WINDOW`, :data:`WARM_WINDOW`).

    Args:
        samples: the sampler's rows (``frac``: share of passes done; ``rss_mb``: site -> MB).
        sites: the sites to report.

    Returns:
        Per site: ``warm_median_mb``, ``end_median_mb``, ``growth`` (end / warm - 1),
        ``start_mb``, ``peak_mb``, how many samples each window held, and
        ``slope_mb_per_100_passes`` (Theil-Sen, RSS against passes done, after warm-up:
        not a criterion; what a longer soak would add).
    """
    warm, end = _window(samples, *WARM_WINDOW), _window(samples, *END_WINDOW)
    after = [s for s in samples if WARM_WINDOW[0] <= s["frac"] < 1.0 and "passes_done" in s]
    after = after[:: max(1, len(after) // 300)]  # Theil-Sen is quadratic: at most ~300 points
    out: dict[str, dict[str, Any]] = {}
    for site in sites:
        w = statistics.median(s["rss_mb"][site] for s in warm)
        e = statistics.median(s["rss_mb"][site] for s in end)
        slope = theil_sen([float(s["passes_done"]) for s in after], [s["rss_mb"][site] for s in after])
        out[site] = {"warm_median_mb": round(w, 1), "end_median_mb": round(e, 1), "growth": round(e / w - 1, 4),
                     "start_mb": samples[0]["rss_mb"][site], "peak_mb": max(s["rss_mb"][site] for s in samples),
                     "warm_samples": len(warm), "end_samples": len(end),
                     "slope_mb_per_100_passes": round(100 * slope, 2)}
    return out


def evaluate(*, rss: Mapping[str, Mapping[str, Any]], flat: Mapping[str, Mapping[str, Any]],
             ledgers: Mapping[str, Mapping[str, Any]], eps_rows: list[dict[str, Any]], errors: Mapping[str, str],
             dropped: int, passes_run: int, total: int) -> dict[str, dict[str, Any]]:
    """The five criteria of the module docstring, each ``{"ok", "value"[, "limit"]}``.

    Args:
        rss: :func:`rss_growth`'s answer.
        flat: site -> :func:`flatness` of its pass times.
        ledgers: site -> ``{"ok": the ledger verified}``.
        eps_rows: one row per (job, site) with ``equal`` (charged equals priced).
        errors: job -> the error that stopped it.
        dropped: passes in which a site dropped out.
        passes_run: passes completed, over all jobs.
        total: passes the jobs hold, over all jobs.

    Returns:
        Criterion name -> its verdict; an empty input fails its criterion.
    """
    return {
        "rss_growth": {"ok": bool(rss) and all(v["growth"] <= MAX_GROWTH for v in rss.values()),
                       "limit": f"<= {MAX_GROWTH:.0%}", "value": {s: v["growth"] for s, v in rss.items()}},
        "pass_time_flat": {"ok": bool(flat) and all(v["ratio"] <= 1 + MAX_SLOWDOWN for v in flat.values()),
                           "limit": f"last/second quarter median <= {1 + MAX_SLOWDOWN:.2f}",
                           "value": {s: v["ratio"] for s, v in flat.items()}},
        "ledgers_verify": {"ok": bool(ledgers) and all(v["ok"] for v in ledgers.values()),
                           "value": {s: v["ok"] for s, v in ledgers.items()}},
        "epsilon_charged_equals_priced": {"ok": bool(eps_rows) and all(r["equal"] for r in eps_rows),
                                          "value": f"{sum(r['equal'] for r in eps_rows)} of {len(eps_rows)} "
                                                   "(job, site) pairs"},
        "jobs_completed": {"ok": not errors and not dropped and total > 0 and passes_run == total,
                           "value": {"passes": f"{passes_run} of {total}", "errors": dict(errors),
                                     "passes_with_dropouts": dropped}},
    }


def plot(path: Path, samples: list[dict[str, Any]], calls: list[dict[str, Any]], rounds: int,
         windows: Mapping[str, tuple[float, float]], title: str) -> None:
    """RSS and per-site pass time over the run, one colour per site."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = sorted(samples[0]["rss_mb"]) if samples else []
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for name, (a, b) in windows.items():
        ax1.axvspan(a, b, alpha=0.12, color="grey")
        ax1.text(a, 1.0, name, transform=ax1.get_xaxis_transform(), va="bottom", fontsize=8)
    ends: dict[tuple[str, str, int], float] = {}
    secs: dict[tuple[str, str, int], float] = {}
    for c in calls:
        if 1 <= c["pass"] <= rounds:
            k = (c["site"], c["job"], c["pass"])
            ends[k] = max(ends.get(k, 0.0), c["start"] + c["seconds"])
            secs[k] = secs.get(k, 0.0) + c["seconds"]
    for i, site in enumerate(sites):
        col = colours[i % len(colours)]
        ax1.plot([s["t"] for s in samples], [s["rss_mb"][site] for s in samples], color=col, label=site)
        pts = sorted((ends[k], secs[k]) for k in ends if k[0] == site)
        ax2.scatter([p[0] for p in pts], [p[1] for p in pts], s=6, alpha=0.35, color=col)
        win = max(5, len(pts) // 20)
        roll = [statistics.median(v for _, v in pts[max(0, j - win + 1): j + 1]) for j in range(len(pts))]
        ax2.plot([p[0] for p in pts], roll, color=col, label=f"{site} (rolling median of {win})")
    ax1.set_ylabel("datasite RSS (MB, process tree)")
    ax1.legend(loc="lower right", fontsize=8)
    ax2.set_ylabel("pass time at the site (s)")
    ax2.set_xlabel("seconds since the first pass")
    ax2.legend(loc="upper right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _t_at(samples: list[dict[str, Any]], frac: float) -> float:
    hit = [s["t"] for s in samples if s["frac"] >= frac]
    return hit[0] if hit else (samples[-1]["t"] if samples else 0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 researchers x 2 jobs x 5 rounds "
                    "(explicit --rounds/--researchers/--jobs win)")
    ap.add_argument("--rounds", type=int, help="training rounds per job (default 20; quick 5; at least 4)")
    ap.add_argument("--researchers", type=int, help="researchers (default 3; quick 2)")
    ap.add_argument("--jobs", type=int, help="concurrent jobs per researcher (default 3; quick 2)")
    ap.add_argument("--sample-every", type=float, default=0.5, help="seconds between RSS samples")
    ap.add_argument("--out", type=Path, help="the JSON (default benchmarks/results/soak.json; quick soak_quick.json);"
                    " the plot goes beside it (.png)")
    args = ap.parse_args(argv)
    rounds = args.rounds if args.rounds is not None else (5 if args.quick else 20)
    n_res = args.researchers if args.researchers is not None else (2 if args.quick else 3)
    n_jobs = args.jobs if args.jobs is not None else (2 if args.quick else 3)
    out = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    if rounds < 4 or n_res < 1 or n_jobs < 1 or args.sample_every <= 0:
        ap.error("--rounds must be >= 4 (quarters of the rounds are compared), --researchers and --jobs >= 1, "
                 "--sample-every > 0")
    cores = os.cpu_count() or 1
    os.environ.setdefault("FEDMTL_TORCH_THREADS", str(max(1, cores // 3)))  # the 3 sites share the machine
    os.environ.setdefault("TQDM_DISABLE", "1")
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    _log(f"soak: {n_res} researchers x {n_jobs} concurrent jobs x {rounds} rounds, 3 datasites; "
         f"load average {load0[0]:.2f}")
    handles: list[Any] = []
    transports: list[TimingTransport] = []
    with tempfile.TemporaryDirectory(prefix="fedmtl-soak-") as d:
        tmp = Path(d)
        try:
            files = prepare(tmp / "cohort", sites=3, seed=0)
            schema = Schema.load(files[0].schema)
            base = default_policy(schema)
            per_job = float(base.max_epsilon_per_job)
            policy = default_policy(schema, max_concurrent_jobs_per_researcher=n_jobs,
                                    researcher_epsilon_budget=max(base.researcher_epsilon_budget, n_jobs * per_job),
                                    dataset_epsilon_budget=max(base.dataset_epsilon_budget, n_res * n_jobs * per_job))
            for f in files:
                t0 = time.perf_counter()
                handles.append(launch(home=tmp / "homes" / f.name, name=f.name, records=f.records, schema=f.schema,
                                      port=free_port(), policy=policy, warn=lambda m: None))
                _log(f"launched {f.name} ({f.n_patients} records) in {time.perf_counter() - t0:.0f} s")
            pin_federation([h.home for h in handles], who="owner (soak benchmark)")
            emails = [f"soak{i}@uni.example" for i in range(n_res)]
            for h in handles:
                for e in emails:
                    admin.add_researcher(home=h.home, email=e, password=PASSWORD)
            t0 = time.perf_counter()
            jobs: list[Job] = []
            for i, e in enumerate(emails):
                session = Session.connect([{"url": h.url, "email": e, "password": PASSWORD} for h in handles])
                for j in range(n_jobs):
                    jobs.append(session.submit(soak_spec(f"soak-r{i}-j{j}", rounds), out=tmp / "jobs" / f"r{i}-j{j}"))
            for job in jobs:
                status = job.wait_for_review(timeout=300, poll=0.5)
                bad = {s: v for s, v in status.items() if v["status"] != "approved"}
                if bad:
                    raise RuntimeError(f"job {job.job_id} was not approved everywhere: {bad}")
            _log(f"{len(jobs)} jobs submitted and approved in {time.perf_counter() - t0:.0f} s")
            priced = {job.job_id: {s: float(r["epsilon"]) for s, r in job.cost(budget=False).items()} for job in jobs}
            pids = {h.name: int(json.loads((h.home / "server.pid").read_text())["pid"]) for h in handles}
            last = int(jobs[0].spec.schedule.last_pass)
            total = len(jobs) * last
            # the run
            calls: list[dict[str, Any]] = []
            lock = threading.Lock()
            t_run = time.perf_counter()
            sampler = Sampler(pids, total, args.sample_every, t_run)
            sampler.sample()
            pass_log: list[dict[str, Any]] = []
            errors: dict[str, str] = {}
            go = threading.Event()
            threads = []
            for job in jobs:
                tt = TimingTransport(job.transport("dataplane"), job.job_id, calls, lock, t_run)
                transports.append(tt)
                threads.append(threading.Thread(target=run_job, args=(job, tt, sampler, go, pass_log, errors),
                                                name=job.job_id, daemon=True))
            for th in threads:
                th.start()
            sampler.start()
            _log(f"running {total} passes ({len(jobs)} jobs x {last}: {rounds} rounds + the final evaluation)")
            go.set()
            for th in threads:
                th.join()
            run_s = time.perf_counter() - t_run
            sampler.stop.set()
            sampler.join()
            time.sleep(3.0)  # idle after the run
            idle_after = sampler.sample()
            _log(f"all jobs ended in {run_s:.0f} s; checking ledgers and epsilon")
            # epsilon charged (each site's ledger, the researcher's spend view) vs priced
            eps_rows = []
            for job in jobs:
                charged = job.charged()
                for s, price in priced[job.job_id].items():
                    row = charged.get(s, {})
                    got = row.get("epsilon")
                    eps_rows.append({
                        "job": job.job_id, "site": s, "priced": price, "charged": got,
                        "passes_charged": len(row.get("passes", [])), "passes": last, "status": row.get("status"),
                        "error": row.get("error"),
                        "equal": got is not None and math.isclose(got, price, rel_tol=EPS_REL_TOL)
                        and sorted(row.get("passes", [])) == list(range(1, last + 1)),
                    })
            ledgers = {}
            for h in handles:
                rep = verify(h.home, identity.load_public(h.home).verify_key)
                ledgers[h.name] = {"ok": rep.ok, "entries": rep.entries, "problems": rep.problems[:5],
                                   "warnings": rep.warnings[:5],
                                   "bytes": (h.home / "ledger.jsonl").stat().st_size
                                   if (h.home / "ledger.jsonl").exists() else None}
        finally:
            for tt in transports:
                tt.close()
            for h in handles:
                try:
                    h.stop()
                except Exception as e:  # noqa: BLE001 - stop the others anyway
                    _log(f"could not stop {h.name}: {e}")
    # ------------------------------------------------------------ the figures
    samples = sampler.samples
    rss = rss_growth(samples, sorted(pids))
    for site in rss:
        rss[site]["idle_after_mb"] = idle_after["rss_mb"][site]
    # datasite CPU seconds per pass done (every job's passes), second quarter vs last quarter
    # of the run (before the final evaluations): what a wall-time slowdown under the other
    # users' load would not explain
    cpu_per_pass: dict[str, Any] = {}
    for site in pids:
        row: dict[str, Any] = {}
        for name, (lo, hi) in (("q2", (0.25, 0.50)), ("q4", (0.75, 0.95))):
            win = _window(samples, lo, hi)
            a, b = win[0], win[-1]
            n = b["passes_done"] - a["passes_done"]
            row[f"{name}_cpu_s_per_pass"] = round((b["cpu_s"][site] - a["cpu_s"][site]) / n, 4) if n else None
        if row["q2_cpu_s_per_pass"] and row["q4_cpu_s_per_pass"]:
            row["ratio"] = round(row["q4_cpu_s_per_pass"] / row["q2_cpu_s_per_pass"], 4)
        cpu_per_pass[site] = row
    stages: dict[str, dict[str, list[float]]] = {}
    for c in calls:
        if 1 < c["pass"] <= rounds:
            stages.setdefault(c["site"], {}).setdefault(c["stage"], []).append(c["seconds"])
    stage_median = {site: {st: round(statistics.median(v), 4) for st, v in d.items()}
                    for site, d in sorted(stages.items())}
    per_site = pass_times(calls, rounds)
    flat = {site: flatness(times, rounds) for site, times in sorted(per_site.items())}
    job_walls = {(r["job"], r["pass"]): r["wall"] for r in pass_log if r["pass"] <= rounds}
    flat_job = flatness(job_walls, rounds) if job_walls else None
    dropped = [r for r in pass_log if r["dropped"]]
    criteria = evaluate(rss=rss, flat=flat, ledgers=ledgers, eps_rows=eps_rows, errors=errors,
                        dropped=len(dropped), passes_run=len(pass_log), total=total)
    failed = [k for k, v in criteria.items() if not v["ok"]]
    png = out.with_suffix(".png")
    command = " ".join(["python", "benchmarks/soak.py", *(argv if argv is not None else sys.argv[1:])])
    windows = {"warm-up window": (_t_at(samples, WARM_WINDOW[0]), _t_at(samples, WARM_WINDOW[1])),
               "end window": (_t_at(samples, END_WINDOW[0]), run_s)}
    report = {
        "benchmark": "soak",
        "command": command,
        "quick": args.quick,
        "researchers": n_res, "jobs_per_researcher": n_jobs, "rounds": rounds, "passes_per_job": last,
        "sites": sorted(pids),
        "spec": soak_spec("soak", rounds).to_dict(),
        "policy": {"max_concurrent_jobs_per_researcher": n_jobs,
                   "researcher_epsilon_budget": policy.researcher_epsilon_budget,
                   "dataset_epsilon_budget": policy.dataset_epsilon_budget,
                   "max_epsilon_per_job": policy.max_epsilon_per_job},
        "torch_threads_env": os.environ.get("FEDMTL_TORCH_THREADS"),
        "machine": {**machine_info(load0), "loadavg_during": sampler.loadavg},
        "run_seconds": round(run_s, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "criteria": criteria,
        "failed": failed,
        "rss": rss,
        "pass_time_per_site": flat,
        "job_pass_wall": flat_job,
        "cpu_per_pass": cpu_per_pass,
        "stage_median_s": stage_median,
        "epsilon": eps_rows,
        "ledgers": ledgers,
        "dropouts": dropped,
        "notes": [
            "rss: resident memory of each datasite's process tree (psutil), sampled every "
            f"{args.sample_every} s; growth = median over the samples taken while the last 10% of all passes "
            "ran / median while passes 20%..30% ran, minus 1",
            "pass time at a site: the wall seconds of one job's five stage calls to that site in one training "
            "pass (queueing for a training slot included); flat = median of the last quarter of the rounds "
            "(all jobs) / median of the second quarter; drift_over_run = Theil-Sen slope of the per-pass "
            "medians after the first quarter x the passes it spans / their median",
            "epsilon: priced = Job.cost() before the run; charged = Job.charged() after it, read back from each "
            "site's ledger over the data plane",
            "ledgers: fedmtl.datasites.ledger.ledger.verify against each site's public key, after the run",
            "cpu_per_pass (not a criterion): CPU seconds of each datasite's process tree per pass done (all "
            "jobs), while 25%..50% and 75%..95% of all passes ran; stage_median_s: per site and stage, the "
            "median call seconds over the training passes after pass 1",
        ],
        "samples": samples,
        "passes": pass_log,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    plot(png, samples, calls, rounds, windows,
         f"soak: {n_res} researchers x {n_jobs} jobs x {rounds} rounds, 3 datasites ({command})")
    # ------------------------------------------------------------ summary
    print(f"\n{'site':<10} {'RSS warm MB':>11} {'end MB':>8} {'growth':>8} {'peak MB':>8} "
          f"{'pass s Q2':>10} {'Q4':>8} {'Q4/Q2':>7} {'drift':>7} {'ledger':>7}")
    for site in sorted(pids):
        r, f = rss[site], flat.get(site, {})
        print(f"{site:<10} {r['warm_median_mb']:>11.1f} {r['end_median_mb']:>8.1f} {r['growth']:>+8.1%} "
              f"{r['peak_mb']:>8.1f} {f.get('q2_median_s', float('nan')):>10.3f} "
              f"{f.get('q4_median_s', float('nan')):>8.3f} {f.get('ratio', float('nan')):>7.3f} "
              f"{f.get('drift_over_run', float('nan')):>+7.1%} {'ok' if ledgers[site]['ok'] else 'FAILED':>7}")
    cpu_txt = ", ".join(f"{site} {v.get('q2_cpu_s_per_pass')} -> {v.get('q4_cpu_s_per_pass')}"
                        for site, v in sorted(cpu_per_pass.items()))
    print(f"datasite CPU s per pass done (25-50% -> 75-95% of the run; not a criterion): {cpu_txt}")
    eq = criteria["epsilon_charged_equals_priced"]["value"]
    print(f"epsilon charged = priced: {eq}; passes {len(pass_log)} of {total}, with dropouts {len(dropped)}; "
          f"run {run_s:.0f} s; load average {load0[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(f"wrote {out} and {png}")
    for k in failed:
        print(f"FAILED: {k}: {criteria[k]['value']} (limit {criteria[k].get('limit', 'all ok')})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
