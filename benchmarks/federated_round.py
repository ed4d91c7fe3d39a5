"""One federated round through real datasites against the same work done in-process.

    python benchmarks/federated_round.py [--quick] [--sites 3 5] [--rounds N]

For each site count ``n`` (default 3 and 10; with ``--big N`` also 3 sites of which one
holds N records) it prepares the demo cohort split over ``n``
hospitals (:func:`fedmtl.datasites.data.cohort.prepare`), and measures, pass by pass and
interleaved so that the machine's load hits all three alike:

* ``train``  -- DP-SGD alone, in this process, no syft, no secure aggregation: for every
  site, the same preprocessing and :func:`fedmtl.privacy.dp.train_local` call the datasite
  runtime makes (same model from :func:`fedmtl.contract.protocol.build_model`, same
  ``JobSpec.client_config()``, steps and noise), run one site after another in a worker
  thread (the runtime runs in threads on the other two paths too). ``train_sum``
  is the sum over sites (one process doing all the work), ``train_max`` the slowest site
  (perfectly parallel sites);
* ``local``  -- the whole round pipeline in this process without syft: the datasite runtime
  (training, evaluation, clipping, quantising, masking) behind
  :class:`~fedmtl.researcher.job.LocalTransport`, through the four secure-aggregation stages
  of :func:`~fedmtl.researcher.job.run_pass`, on the *real* records, with throw-away homes
  as in ``Job.dry_run`` (so no ledger);
* ``dataplane`` -- the same pass through the same datasites, for a second approved job of
  the same spec, over the datasites' round data plane
  (:class:`~fedmtl.researcher.dataplane_client.DataPlaneTransport`); each datasite process
  trains with ``cores // n`` torch threads (``FEDMTL_TORCH_THREADS``);
* ``syft``   -- the same pass through ``n`` real datasites on loopback
  (:func:`fedmtl.datasites.server.launch.launch`, one server process each, launched one after
  another), a job submitted with ``Session.job(...).submit()`` and approved by the sites'
  automatic review, called through :class:`~fedmtl.researcher.job.SyftTransport`.

The platform overhead of a round is ``syft - local`` (same code, only the transport and the
datasite around it differ); ``syft - train_sum`` is everything a federated round costs on
top of the training itself. Per stage, the seconds are the wall time of the concurrent
requests of that stage (``PassOutcome.seconds``): ``advertise`` includes the training (and
the evaluation), ``share_keys``/``masked_input``/``consistency``/``unmask`` are the other four requests,
``unmask_server`` the researcher's own unmasking. Pass 1 is reported apart (cold: first
calls, imports, first evaluation of the datasite); the round figures are the median of
passes 2..N (warm). Every pass trains and evaluates (``eval_every = 1``).

Writes benchmarks/results/federated_round.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results" / "federated_round.json"
EMAIL = "bench@uni.example"
PASSWORD = "bench-researcher-pw-1"
STAGES = ("advertise", "share_keys", "masked_input", "consistency", "unmask", "unmask_server")
_STREAMS = (sys.stdout, sys.stderr)


def _restore_streams() -> None:
    """Put our stdout/stderr back. ``syftio.quiet()`` (contextlib.redirect_stdout) is not
    thread-safe: run_pass calls SyftTransport.call from several threads at once, and the
    interleaved save/restore can leave sys.stdout/sys.stderr pointing at a dead buffer."""
    sys.stdout, sys.stderr = _STREAMS


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_spec(schema, *, n_sites: int, rounds: int, seed: int, sample_rate: float = 0.02):
    from fedmtl.contract.jobspec import JobSpec

    return JobSpec(
        name="bench-round",
        tasks=[{"label": c.name} for c in schema.labels],
        rounds=rounds,
        local_steps=10,
        sample_rate=sample_rate,  # 0.02; lower for a site so large that its batch would pass the policy's cap
        lr=0.5,
        noise_multiplier=1.0,
        secagg={"threshold": n_sites // 2 + 1, "clip": 1.0},  # t > n/2: what the datasites approve
        scaling="range",
        seed=seed,
    )


def site_specs_for(spec, schema, records: dict[str, Any], roster: dict[str, str], job_id: str) -> dict[str, dict]:
    """The per-site ``Constant`` specs, as :meth:`Job.create` builds them."""
    from fedmtl.datasites.template import TEMPLATE_NAME

    max_count = max(len(df) for df in records.values())
    return {
        s: {"job": spec.to_dict(), "job_id": job_id, "site": s, "roster": roster, "schema": schema.to_dict(),
            "max_count": int(max_count), "template": TEMPLATE_NAME}
        for s in records
    }


# ------------------------------------------------------------------------ in-process training only
class TrainOnly:
    """What the runtime's advertise stage spends on DP-SGD, per site, without anything else."""

    def __init__(self, site_specs: dict[str, dict], records: dict[str, Any]):
        from fedmtl.contract import protocol

        self.sites = {}
        for s, spec in site_specs.items():
            job = protocol.job_of(spec)
            schema = protocol.schema_of(spec)
            model, pre = protocol.build_model(spec)
            df = records[s]
            train_df = df[df[schema.split_column] == "train"] if schema.split_column else df
            self.sites[s] = (job, schema, model, pre, train_df, job.task_specs(schema))

    def round(self, weights: np.ndarray) -> dict[str, Any]:
        # in a worker thread, as the runtime runs in the other two paths (run_pass's thread
        # pool; the datasite's request threads): torch's OpenMP pool of the main thread is
        # far slower on an oversubscribed machine (10x seen with load 8 on 2 cores)
        with ThreadPoolExecutor(max_workers=1) as ex:
            return ex.submit(self._round, weights).result()

    def _round(self, weights: np.ndarray) -> dict[str, Any]:
        from fedmtl.models import vector_to_model
        from fedmtl.privacy.dp import train_local

        wall, steps_s = {}, {}
        for s, (job, schema, model, pre, train_df, tasks) in self.sites.items():
            t0 = time.perf_counter()
            X = pre.transform(train_df)
            Y, M = pre.labels(train_df, tasks)
            n = int(len(train_df))
            kw = dict(job.client_config())
            kw.update(seed=None, steps=int(job.steps_per_round(n)), noise_multiplier=float(job.noise_for_site(n)))
            vector_to_model(model, weights)
            res = train_local(model=model, X=X, Y=Y, mask=M, tasks=tasks, **kw)
            wall[s] = time.perf_counter() - t0
            steps_s[s] = res.seconds
        return {"train_sum": sum(wall.values()), "train_max": max(wall.values()),
                "train_steps_sum": sum(steps_s.values()), "per_site": wall}


# ------------------------------------------------------------------------ in-process pipeline
class LocalPipeline:
    """The round runtime + secure aggregation in this process (``Job.dry_run``'s set-up on
    the real records)."""

    def __init__(self, spec, schema, records: dict[str, Any], tmp: Path):
        from fedmtl.datasites import runtime as rt
        from fedmtl.datasites.site import identity
        from fedmtl.researcher.job import LocalTransport

        roster = {}
        for s in records:
            home = tmp / "local-homes" / s
            home.mkdir(parents=True)
            (home / rt.DRY_RUN_MARKER).write_text("benchmark: no ledger\n")
            roster[s] = identity.create(home, s).public.verify_key.to_bytes().hex()
            rt.register_home(s, home)
        self.names = list(records)
        self.site_specs = site_specs_for(spec, schema, records, roster, job_id=f"bench-local-{len(records)}")
        self.transport = LocalTransport(records, self.site_specs)

    def close(self) -> None:
        from fedmtl.datasites import runtime as rt

        for s in self.names:
            rt.unregister_home(s)


# ------------------------------------------------------------------------ through syft
class Federation:
    """``n`` real datasites on loopback with an approved job."""

    def __init__(self, files, schema, spec, tmp: Path):
        self.files, self.schema, self.spec, self.tmp = files, schema, spec, tmp
        self.handles: list[Any] = []
        self.launch_seconds: list[float] = []
        self.submit_seconds = self.approve_seconds = 0.0

    def start(self) -> None:
        from fedmtl.datasites.server import admin
        from fedmtl.datasites.server.launch import free_port, launch
        from fedmtl.datasites.server.peers import pin_federation
        from fedmtl.datasites.template import default_policy
        from fedmtl.researcher.session import Session

        policy = default_policy(self.schema, min_sites=2)
        # the sites share this machine: each datasite process trains with its share of the
        # cores (datasites/server/process.py apply_thread_limit), as the in-process path uses them all
        os.environ["FEDMTL_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(self.files)))
        for f in self.files:  # one after another: the machine is shared
            t0 = time.perf_counter()
            h = launch(home=self.tmp / "homes" / f.name, name=f.name, records=f.records, schema=f.schema,
                       port=free_port(), policy=policy)
            self.handles.append(h)
            admin.add_researcher(home=h.home, email=EMAIL, password=PASSWORD)
            self.launch_seconds.append(time.perf_counter() - t0)
            _log(f"  launched {f.name} at {h.url} in {self.launch_seconds[-1]:.1f} s")
        pin_federation([h.home for h in self.handles], who="owner (benchmark)")  # the owners pin each other
        t0 = time.perf_counter()
        self.session = Session.connect([{"url": h.url, "email": EMAIL, "password": PASSWORD} for h in self.handles])
        # two approved jobs of the same spec: one driven through syft code calls, one over
        # the datasites' data plane (a pass runs once per job)
        self.job = self.session.job(self.spec, out=self.tmp / "job")
        self.job.submit()
        self.job_dp = self.session.job(type(self.spec).from_dict({**self.spec.to_dict(), "name": "bench-round-dp"}), out=self.tmp / "job-dp")
        self.job_dp.submit()
        self.submit_seconds = (time.perf_counter() - t0) / 2
        t0 = time.perf_counter()
        for job in (self.job, self.job_dp):
            status = job.wait_for_review(timeout=120, poll=0.5)
            bad = {s: v for s, v in status.items() if v["status"] != "approved"}
            if bad:
                raise RuntimeError(f"the benchmark job was not approved everywhere: {bad}")
        self.approve_seconds = time.perf_counter() - t0

    def transport(self):
        return self.job.transport("syft")

    def dataplane_transport(self):
        return self.job_dp.transport("dataplane")

    def stop(self) -> None:
        for h in self.handles:
            try:
                h.stop()
            except Exception as e:  # noqa: BLE001 - stop the others anyway
                _log(f"  could not stop {h.name}: {e}")


# ------------------------------------------------------------------------ one site count
def timed_pass(transport, site_specs, sites, p, weights, model) -> dict[str, Any]:
    from fedmtl.researcher.job import run_pass

    t0 = time.perf_counter()
    out = run_pass(transport=transport, site_specs=site_specs, sites=sites, pass_no=p, attempt=0,
                   weights=weights, model=model)
    wall = time.perf_counter() - t0
    if out.dropped:
        raise RuntimeError(f"pass {p}: sites dropped: {out.dropped}")
    return {"wall": wall, **{k: out.seconds.get(k, 0.0) for k in STAGES}}


def enlarge(f, schema, n_rows: int, folder: Path, *, seed: int):
    """``f``'s hospital resampled to ``n_rows`` records (fresh ids; the split kept per row)."""
    import dataclasses

    from fedmtl.datasites.data.records import load_records

    df = load_records(f.records, schema)
    big = df.sample(n=n_rows, replace=True, random_state=seed).reset_index(drop=True)
    big[schema.id_column] = np.arange(1, n_rows + 1)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{f.name}.csv"
    big.to_csv(path, index=False)
    return dataclasses.replace(f, records=path, n_patients=n_rows)


def bench_sites(n: int, *, rounds: int, seed: int, tmp: Path, no_syft: bool = False, big: int = 0) -> dict[str, Any]:
    from fedmtl.contract import protocol
    from fedmtl.datasites.data.cohort import prepare
    from fedmtl.datasites.data.records import load_records
    from fedmtl.models import model_to_vector
    from fedmtl.schema import Schema

    files = prepare(tmp / "cohort", sites=n, seed=seed)
    schema = Schema.load(files[0].schema)
    if big:
        files = [enlarge(files[0], schema, big, tmp / "big", seed=seed), *files[1:]]
    records = {f.name: load_records(f.records, schema) for f in files}
    spec = make_spec(schema, n_sites=len(files), rounds=rounds, seed=seed,
                     sample_rate=min(0.02, 2048 / max(len(df) for df in records.values())))
    local = LocalPipeline(spec, schema, records, tmp)
    model, _ = protocol.build_model(next(iter(local.site_specs.values())))
    weights = model_to_vector(model)
    train = TrainOnly(local.site_specs, records)
    fed = Federation(files, schema, spec, tmp)
    passes: list[dict[str, Any]] = []
    try:
        t0 = time.perf_counter()
        fed.start()
        _restore_streams()
        _log(f"  {n} sites up, job approved ({time.perf_counter() - t0:.1f} s)")
        syft_t = fed.transport()
        plane_t = fed.dataplane_transport()
        for p in range(1, rounds + 1):
            row: dict[str, Any] = {"pass": p}
            # interleaved, so that the machine's load hits all of them alike
            if not no_syft:
                row["syft"] = timed_pass(syft_t, fed.job.site_specs, fed.job.sites, p, weights, fed.job.model)
                _restore_streams()
            row["dataplane"] = timed_pass(plane_t, fed.job_dp.site_specs, fed.job_dp.sites, p, weights,
                                          fed.job_dp.model)
            row["local"] = timed_pass(local.transport, local.site_specs, local.names, p, weights, model)
            row["train"] = train.round(weights)
            passes.append(row)
            _log(f"  pass {p}: syft {row.get('syft', {}).get('wall', float('nan')):.2f} s, "
                 f"data plane {row['dataplane']['wall']:.2f} s, local {row['local']['wall']:.2f} s, "
                 f"train (sum over sites) {row['train']['train_sum']:.2f} s")
    finally:
        _restore_streams()
        fed.stop()
        local.close()
    n_train = {s: int((df[schema.split_column] == "train").sum()) for s, df in records.items()}
    return {
        "sites": n,
        "big_site_records": big or None,
        "site_names": list(records),
        "n_train": n_train,
        "parameters": int(weights.size),
        "steps_per_round": {s: spec.steps_per_round(k) for s, k in n_train.items()},
        "launch_seconds": [round(x, 2) for x in fed.launch_seconds],
        "submit_seconds": round(fed.submit_seconds, 2),
        "approve_seconds": round(fed.approve_seconds, 2),
        "passes": passes,
        "summary": summarise(passes),
    }


PATHS = ("syft", "dataplane", "local")


def summarise(passes: list[dict[str, Any]]) -> dict[str, Any]:
    warm = passes[1:] or passes  # pass 1 is cold
    paths = [w for w in PATHS if w in passes[0]]

    def med(path: tuple[str, str]) -> float:
        return statistics.median(r[path[0]][path[1]] for r in warm)

    s: dict[str, Any] = {"warm_passes": [r["pass"] for r in warm], "paths": paths}
    for k in ("wall", *STAGES):
        for w in paths:
            s[f"{w}_{k}"] = med((w, k))
    for k in ("train_sum", "train_max", "train_steps_sum"):
        s[k] = med(("train", k))
    s["ratio_local_over_train"] = s["local_wall"] / s["train_sum"]
    s["stage_overhead_s"] = {}
    for w in paths:
        if w == "local":
            continue
        s[f"overhead_{w}_s"] = s[f"{w}_wall"] - s["local_wall"]
        s[f"ratio_{w}_over_local"] = s[f"{w}_wall"] / s["local_wall"]
        s[f"ratio_{w}_over_train"] = s[f"{w}_wall"] / s["train_sum"]
        s["stage_overhead_s"][w] = {k: round(s[f"{w}_{k}"] - s[f"local_{k}"], 4) for k in STAGES}
    if "syft" in paths:  # the names earlier runs used
        s["overhead_platform_s"] = s["overhead_syft_s"]
        s["ratio_syft_over_local"] = s["ratio_syft_over_local"]
    s["cold_pass1"] = {f"{w}_wall": round(passes[0][w]["wall"], 4) for w in paths}
    s["cold_pass1"]["train_sum"] = round(passes[0]["train"]["train_sum"], 4)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}


def _label(r: dict[str, Any]) -> str:
    big = r.get("big_site_records")
    return f"{r['sites']}" + (f" (1x{big // 1000}k)" if big else "")


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\nseconds per round (median of warm passes; pass 1 = cold, apart)")
    head = (f"{'sites':>9} {'what':<10} {'round':>7} {'advert.':>8} {'share':>7} {'masked':>7} {'consist':>7} "
            f"{'unmask':>7} {'srv unm':>8} {'pass 1':>7}")
    print(head)
    for r in rows:
        s = r["summary"]
        for who in s["paths"]:
            print(f"{_label(r):>9} {who:<10} {s[who + '_wall']:>7.3f} " + " ".join(
                f"{s[f'{who}_{k}']:>{w}.3f}" for k, w in zip(STAGES, (8, 7, 7, 7, 7, 8))
            ) + f" {s['cold_pass1'][who + '_wall']:>7.3f}")
        for who, o in s["stage_overhead_s"].items():
            print(f"{_label(r):>9} {'ovh ' + who:<10} {s[f'overhead_{who}_s']:>7.3f} " + " ".join(
                f"{o[k]:>{w}.3f}" for k, w in zip(STAGES, (8, 7, 7, 7, 7, 8))) + f" {'':>7}")
        print(f"{_label(r):>9} {'train':<10} {s['train_sum']:>7.3f}   (sum over sites; slowest site "
              f"{s['train_max']:.3f}, DP-SGD steps alone {s['train_steps_sum']:.3f})"
              f"{'':>1} pass 1: {s['cold_pass1']['train_sum']:.3f}")
    print("\nratios (same run): X/local = platform cost of the same pipeline over transport X; X/train = whole round over DP training alone")
    for r in rows:
        s = r["summary"]
        parts = [f"{w}/local x{s[f'ratio_{w}_over_local']:.2f} ({s[f'overhead_{w}_s']:+.3f} s/round)"
                 for w in s["paths"] if w != "local"]
        print(f"{_label(r):>9} sites: " + "  ".join(parts) + f"  local/train x{s['ratio_local_over_train']:.2f}  "
              f"(launch {statistics.mean(r['launch_seconds']):.1f} s/site, submit {r['submit_seconds']:.1f} s, "
              f"approval {r['approve_seconds']:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 sites, 2 passes: a smoke run")
    ap.add_argument("--sites", type=int, nargs="+", help="site counts (default 3 10; quick 3); above 5 sites the syft-code-call path is skipped")
    ap.add_argument("--rounds", type=int, help="passes measured per site count (default 3; quick 2); pass 1 is cold")
    ap.add_argument("--seed", type=int, default=0, help="cohort and job seed")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--big", type=int, default=0,
                    help="also run 3 sites of which one holds this many records (resampled), e.g. 1000000")
    ap.add_argument("--no-syft", action="store_true",
                    help="skip the syft-code-call path (data plane and in-process only)")
    args = ap.parse_args(argv)
    sites = args.sites or ([3] if args.quick else [3, 10])
    rounds = args.rounds or (2 if args.quick else 3)
    if rounds < 1 or any(n < 2 for n in sites):
        ap.error("--rounds must be >= 1 and every --sites >= 2")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    load0 = os.getloadavg()
    t_start = time.perf_counter()
    rows = []
    configs = [(n, 0) for n in sites] + ([(3, args.big)] if args.big else [])
    for n, big in configs:
        _log(f"{n} sites{f' (one with {big} records)' if big else ''}, {rounds} passes")
        with tempfile.TemporaryDirectory(prefix=f"fedmtl-bench-{n}-") as tmp:
            rows.append(bench_sites(n, rounds=rounds, seed=args.seed, tmp=Path(tmp), big=big,
                                    no_syft=args.no_syft or n > 5 or bool(big)))
    total = time.perf_counter() - t_start
    print_table(rows)
    report = {
        "benchmark": "federated_round",
        "command": " ".join(["python", "benchmarks/federated_round.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "seed": args.seed,
        "rounds_measured": rounds,
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "loadavg_before": [round(x, 2) for x in load0],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "total_seconds": round(total, 1),
        "spec": {"local_steps": 10, "sample_rate": 0.02, "noise_multiplier": 1.0, "lr": 0.5,
                 "tasks": "every label column of the cohort schema", "secagg": {"threshold": "floor(n/2) + 1", "clip": 1.0},
                 "eval_every": 1},
        "notes": [
            "syft = one pass (all five secure-aggregation stages) through real datasites on loopback, one server process per site",
            "local = the same pass with the datasite runtime in this process (LocalTransport, throw-away homes, no ledger)",
            "train_sum = preprocessing + train_local for every site, one after another, in this process (in a worker thread, as the runtime runs in the other paths); train_max = the slowest site",
            "round figures = median of passes 2..N; pass 1 (cold) under cold_pass1",
            "stage seconds = wall time of the concurrent requests of that stage; advertise includes training and evaluation",
            "overhead_platform_s = syft wall - local wall; overhead_vs_train_s = syft wall - train_sum",
        ],
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"\ntotal {total:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
