"""Datasite launch at scale, before and after, side by side: 1M records and a demo-sized site.

The export: the demo cohort's first hospital (``fedmtl.datasites.data.cohort.prepare``, the demo
schema) scaled up to ``--rows`` records by resampling its rows with replacement and adding
Gaussian noise (5% of the column's standard deviation) to every numeric feature and label,
clipped to the schema's range and rounded as the cohort rounds it; fresh ids 1..N. Written
once as CSV and read by both versions.

For two versions of the code, each from its own copy of the source laid out as installed
(``PYTHONPATH``; the same venv, so the same syft, pandas, numpy):

* ``before``  this working tree with the three files of the launch path
              (``datasites/data/records.py``, ``mock.py``, ``launch.py``) as they were at
              ``--before-ref`` (default: the commit before the vectorised validation and mock)
* ``after``   this working tree

each in a fresh process, measures on the same export:

* ``validate``  ``load_records`` (read the CSV, type and check every column)
* ``mock``      ``make_mock(df, schema, seed=0)``
* ``launch``    a first ``launch(...)`` (validate, create the home, start the syft server,
                build and upload the private asset and the mock) until it returns, and
                until the datasite answers ``/api/v2/metadata``; then the server is stopped

and checks that both versions produce the same typed records and the same mock (a
SHA-256 of each frame's pandas hash). Then the same launch for a demo-sized site (the
hospital's own export, ``--demo-repeats`` times, before and after alternating).

Run: ``python benchmarks/launch_scale.py [--rows N] [--quick]``; writes
``benchmarks/results/launch_scale.json``. Every copy, export and home is in a temporary
folder, removed at the end; every server started is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit import layout_installed, machine_info

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "launch_scale.json"
BEFORE_REF = "6f4ae82"  # the last commit with the per-cell validation and the tuple-set mock check
BEFORE_FILES = ("datasites/data/records.py", "datasites/data/mock.py", "datasites/server/launch.py")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the export ------------------------------------------------------------------------


def make_export(out: Path, n: int, seed: int = 0) -> tuple[Path, Path, Path, Path]:
    """``(records.csv, schema.toml)`` of ``n`` records in the demo schema, and the demo
    hospital's own ``(records.csv, schema.toml)``."""
    import numpy as np
    import pandas as pd

    from fedmtl.datasites.data import cohort
    from fedmtl.schema import Schema

    site = cohort.prepare(out / "demo", sites=1, seed=seed)[0]
    schema = Schema.load(site.schema)
    real = pd.read_csv(site.records)
    rng = np.random.default_rng(seed)
    df = real.iloc[rng.integers(0, len(real), n)].reset_index(drop=True)
    for c in schema.columns:
        if c.type != "numeric" or c.role == "id":
            continue
        x = df[c.name].to_numpy(dtype=float)
        x = x + rng.normal(0.0, 0.05 * float(np.nanstd(real[c.name])), n)
        x = np.clip(x, c.min, c.max)
        df[c.name] = np.round(x) if cohort._whole(real[c.name]) else np.round(x, 4)
    df["id"] = np.arange(1, n + 1)
    records = out / "scaled" / "records.csv"
    records.parent.mkdir(parents=True)
    records.write_text(cohort._to_csv(df, schema), encoding="utf-8")
    schema_path = out / "scaled" / "schema.toml"
    Schema(columns=schema.columns, name="scaled", description=f"demo schema, {n} resampled records").save(
        schema_path
    )
    return records, schema_path, site.records, site.schema


# -- one variant, in its own process ---------------------------------------------------


def _frame_digest(df) -> str:
    import hashlib

    import pandas as pd

    h = pd.util.hash_pandas_object(df, index=True).to_numpy()
    return hashlib.sha256(h.tobytes() + ",".join(map(str, df.columns)).encode() + str(list(df.dtypes)).encode()).hexdigest()


def worker(spec: dict) -> dict:
    """Run in the variant's process: the phases for one export."""
    import urllib.request

    import fedmtl.datasites.server.launch as launch_mod
    from fedmtl.datasites.data.mock import make_mock
    from fedmtl.datasites.data.records import load_records
    from fedmtl.schema import Schema

    out: dict = {"source": str(Path(launch_mod.__file__).resolve().parent)}
    records, schema_path, home = Path(spec["records"]), Path(spec["schema"]), Path(spec["home"])
    schema = Schema.load(schema_path)
    if spec["phases"]:
        t0 = time.perf_counter()
        df = load_records(records, schema)
        out["validate_s"] = time.perf_counter() - t0
        out["records_digest"] = _frame_digest(df)
        t0 = time.perf_counter()
        mock = make_mock(df, schema, seed=0)
        out["mock_s"] = time.perf_counter() - t0
        out["mock_digest"] = _frame_digest(mock)
        del df, mock
    t0 = time.perf_counter()
    handle = launch_mod.launch(
        home=home, name=spec["name"], records=records, schema=schema_path,
        port=launch_mod.free_port(), warn=lambda msg: None,
    )
    try:
        out["launch_s"] = time.perf_counter() - t0
        with urllib.request.urlopen(f"{handle.url}/api/v2/metadata", timeout=60) as r:
            r.read()
        out["answers_s"] = time.perf_counter() - t0
    finally:
        handle.stop()
    return out


# -- the two versions ------------------------------------------------------------------


def _before_tree(ref: str, dst: Path) -> str:
    """This working tree laid out as installed, with BEFORE_FILES as committed at ``ref``."""
    sha = subprocess.run(["git", "rev-parse", ref], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    layout_installed(REPO, dst)
    for rel in BEFORE_FILES:
        old = subprocess.run(["git", "show", f"{sha}:{rel}"], cwd=REPO, capture_output=True, check=True).stdout
        (dst / "fedmtl" / rel).write_bytes(old)
    return sha


def _run(tree: Path, spec: dict, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("FEDMTL_ADMIN_PASSWORD", None)
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    if not Path(row["source"]).is_relative_to(tree.resolve()):
        raise RuntimeError(f"the worker imported {row['source']}, not its own copy in {tree}")
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, help="records in the scaled export (default 1,000,000; quick 100,000)")
    ap.add_argument("--quick", action="store_true", help="100k records, one demo repeat: a smoke run")
    ap.add_argument("--demo-repeats", type=int, help="demo-sized launches per version (default 2; quick 1)")
    ap.add_argument("--before-ref", default=BEFORE_REF, help=f"git ref of the 'before' version (default {BEFORE_REF})")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    demo_repeats = args.demo_repeats or (1 if args.quick else 2)
    load0 = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="fedmtl-launch-scale-"))
    try:
        sha = _before_tree(args.before_ref, tmp / "before")
        trees = {"before": tmp / "before", "after": layout_installed(REPO, tmp / "after")}
        t0 = time.perf_counter()
        records, schema, demo_records, demo_schema = make_export(tmp / "export", rows)
        _log(f"export: {rows:,} records, {records.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
        scale: dict[str, dict] = {}
        for variant, tree in trees.items():
            spec = {"records": str(records), "schema": str(schema), "home": str(tmp / f"home-{variant}"),
                    "name": f"scaled-{variant}", "phases": True}
            scale[variant] = _run(tree, spec, timeout=1800)
            r = scale[variant]
            _log(f"{rows:,} records, {variant:<6}: validate {r['validate_s']:6.1f} s  mock {r['mock_s']:6.1f} s  "
                 f"launch {r['launch_s']:6.1f} s  answers {r['answers_s']:6.1f} s")
        same_records = scale["before"]["records_digest"] == scale["after"]["records_digest"]
        same_mock = scale["before"]["mock_digest"] == scale["after"]["mock_digest"]
        if not (same_records and same_mock):
            raise RuntimeError(f"the versions disagree: records same {same_records}, mock same {same_mock}")
        demo: dict[str, list[dict]] = {"before": [], "after": []}
        for i in range(demo_repeats):
            order = ("before", "after") if i % 2 == 0 else ("after", "before")
            for variant in order:
                spec = {"records": str(demo_records), "schema": str(demo_schema),
                        "home": str(tmp / f"demo-{variant}-{i}"), "name": f"demo-{variant}", "phases": False}
                demo[variant].append(_run(trees[variant], spec, timeout=600))
        b, a = scale["before"], scale["after"]
        ratios = {k: round(b[k] / a[k], 2) for k in ("validate_s", "mock_s", "launch_s", "answers_s")}
        demo_best = {v: min(r["launch_s"] for r in rs) for v, rs in demo.items()}
        print(f"\n{rows:,} records (demo schema), seconds; ratio = before / after")
        print(f"{'phase':<10} {'before':>8} {'after':>8} {'ratio':>6}")
        for k in ("validate_s", "mock_s", "launch_s", "answers_s"):
            print(f"{k[:-2]:<10} {b[k]:8.1f} {a[k]:8.1f} {ratios[k]:6.2f}")
        print(f"demo-sized launch ({len(open(demo_records).readlines()) - 1:,} records), best of {demo_repeats}: "
              f"before {demo_best['before']:.1f} s, after {demo_best['after']:.1f} s")
        report = {
            "benchmark": "launch_scale",
            "command": " ".join(["python", "benchmarks/launch_scale.py", *(argv if argv is not None else sys.argv[1:])]),
            "rows": rows,
            "export_mb": round(records.stat().st_size / 1e6, 1),
            "before": {"ref": args.before_ref, "commit": sha,
                       "source": f"this working tree with {list(BEFORE_FILES)} as committed at the ref"},
            "after": {"source": "this working tree"},
            "scaled": {"before": b, "after": a, "before_over_after": ratios,
                       "same_records": same_records, "same_mock": same_mock},
            "demo": {"records": len(open(demo_records).readlines()) - 1, "runs": demo,
                     "best_launch_s": demo_best},
            "machine": machine_info(load0),
            "notes": [
                "each version runs in its own fresh process per export, from its own copy of the source",
                "launch_s: launch() until it returns (validate, create the home, start the server, upload); "
                "answers_s: until /api/v2/metadata answered after that",
                "validate_s and mock_s are measured apart, before the launch, in the same process",
                "records/mock digests: SHA-256 of pandas' row hashes, column names and dtypes",
            ],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
