"""What running the approved round code in a separate worker process costs, side by side.

    python benchmarks/isolation.py [--quick] [--calls N] [--context spawn|forkserver]
                                   [--no-sandbox]

Defence in depth for PYSEC-2026-546: the round code would run in a worker process that
cannot read the datasite's HOME (identity key, ledger, per-job secrets) instead of inside
the datasite server. On the demo cohort's largest site (:func:`fedmtl.datasites.cohort.prepare`,
three sites, seed 0) and one round of a demo job (``diabetes_5y``, 20 DP-SGD steps at
q = 0.02, sigma = 1.0), it measures one training stage of the runtime's work -- what
``JobRuntime._compute_payload`` does when a pass trains: split, preprocess
(:class:`fedmtl.models.preprocessing.Preprocessor`), :func:`fedmtl.privacy.dp.train_local`
with the runtime's ``_train_kwargs``, the delta, the per-group counts and
``weight_by_group`` -- four ways, interleaved call by call so that the machine's load hits
all of them alike:

* ``inproc``     -- in this process, model and preprocessor built once (as the runtime
  caches them), in a worker thread (as the runtime runs in a syft request thread);
* ``fresh``      -- a fresh ``python -I -c ...`` per call (HOME pointed at an empty folder,
  FEDMTL_*/SYFT_* variables dropped, cwd empty); it imports the same modules, says
  ready, receives the records (pandas DataFrame), the site spec, the weights and the
  message as one pickle on stdin, builds the model and trains, and returns the update as
  a pickle on a private copy of stdout. Startup (interpreter + imports) is reported apart
  from setup and training;
* ``sandboxed``  -- the same fresh worker under ``unshare --user --map-root-user --mount
  --net`` with an empty tmpfs mounted over the real HOME and over a stand-in datasite
  home (holding a canary secret): the worker really cannot read them, and has no network
  (skipped with ``--no-sandbox`` or where unshare is refused);
* ``persistent`` -- one worker started once (``multiprocessing`` ``spawn`` or
  ``forkserver`` context, same scrubbed environment), the records and site spec sent once
  at start; per call only the weights and the message go in and the update comes out.

Each worker also reports whether it could read the canary (the env-only scrubbing of
``fresh`` and ``persistent`` does *not* hide files; only ``sandboxed`` does). The first
in-process and persistent calls are warm-ups (reported as ``cold``); every fresh call is
cold by construction.

Writes benchmarks/results/isolation.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results" / "isolation.json"
THIS = Path(__file__).resolve()
SCRUB_PREFIXES = ("FEDMTL_", "SYFT_", "PYTHON")
MESSAGE = {"stage": "advertise", "pass": 1}

# the fresh worker: load this file as a module (for the same stage code) and run fresh_main
FRESH_CODE = (
    "import time; t0 = time.perf_counter()\n"
    "import sys, importlib.util\n"
    "s = importlib.util.spec_from_file_location('fedmtl_isolation_worker', sys.argv[1])\n"
    "m = importlib.util.module_from_spec(s); s.loader.exec_module(m)\n"
    "m.fresh_main(t0, sys.argv[2])\n"
)


# ------------------------------------------------------------------------ the stage itself
def setup_state(site_spec: dict[str, Any], df) -> dict[str, Any]:
    """What the runtime builds once per job (JobRuntime._plan caches model + preprocessor)."""
    from fedmtl import protocol

    schema = protocol.schema_of(site_spec)
    job = protocol.job_of(site_spec)
    model, pre = protocol.build_model(site_spec)
    return {"spec": site_spec, "df": df, "schema": schema, "job": job, "model": model, "pre": pre,
            "tasks": job.task_specs(schema), "groups": protocol.groups_of(model)}


def train_stage(state: dict[str, Any], weights: np.ndarray, message: dict[str, Any]) -> dict[str, Any]:
    """The training half of ``JobRuntime._compute_payload`` (no ledger, no evaluation, no
    secure aggregation), with ``JobRuntime._train_kwargs``."""
    from fedmtl.models import model_to_vector, vector_to_model
    from fedmtl.privacy.dp import train_local
    from fedmtl.privacy.quantization import weight_by_group

    t0 = time.perf_counter()
    job, schema, model, pre, tasks = (state[k] for k in ("job", "schema", "model", "pre", "tasks"))
    df = state["df"]
    split = schema.split_column
    train_df = df[df[split] == "train"] if split else df
    n = int(len(train_df))
    start = np.asarray(weights).copy()
    X = pre.transform(train_df)
    Y, M = pre.labels(train_df, tasks)
    vector_to_model(model, start)
    kw: dict[str, Any] = dict(job.client_config())
    kw["seed"] = None
    kw["steps"] = int(job.steps_per_round(n))
    if job.dp:
        kw["noise_multiplier"] = float(job.noise_for_site(n))
    if kw.get("fedprox_mu", 0.0) > 0:
        kw["global_vector"] = weights
    res = train_local(model=model, X=X, Y=Y, mask=M, tasks=tasks, **kw)
    delta = (model_to_vector(model) - start).astype(np.float64)
    Mn = M.numpy().astype(bool)
    counts = {}
    for g in state["groups"]:
        if g == "trunk":
            counts[g] = int(Mn.any(axis=1).sum())
        else:
            counts[g] = int(Mn[:, [t.name for t in tasks].index(g)].sum())
    weighted, count_vec = weight_by_group(delta, groups=state["groups"], counts=counts,
                                          clip=float(job.secagg.clip))
    return {"update": weighted, "counts": count_vec,
            "report": {"pass": message.get("pass"), "epsilon_round": res.epsilon,
                       "noise_multiplier": res.noise_multiplier, "steps": res.steps},
            "train_s": time.perf_counter() - t0, "dp_steps_s": res.seconds}


def _probe(canary: str) -> dict[str, Any]:
    """What the worker can see of the secrets it must not read."""
    home = os.environ.get("HOME", "")
    try:
        Path(canary).read_bytes()
        canary_readable = True
    except OSError:
        canary_readable = False
    real_home = os.environ.get("FEDMTL_BENCH_REAL_HOME", "")
    try:
        real_home_entries = len(os.listdir(real_home)) if real_home else None
    except OSError:
        real_home_entries = None
    return {"HOME": home, "canary_readable": canary_readable, "real_home_entries": real_home_entries,
            "fedmtl_env": sorted(k for k in os.environ if k.startswith(("FEDMTL_HOME", "SYFT_")))}


def _import_heavy() -> float:
    t0 = time.perf_counter()
    import pandas  # noqa: F401
    import torch  # noqa: F401

    import fedmtl.models  # noqa: F401
    import fedmtl.privacy.dp  # noqa: F401
    import fedmtl.privacy.quantization  # noqa: F401
    import fedmtl.protocol  # noqa: F401

    return time.perf_counter() - t0


def fresh_main(t_start: float, canary: str) -> None:
    """Body of the fresh worker (``python -I -c FRESH_CODE THIS canary``)."""
    out = os.fdopen(os.dup(1), "wb")  # the protocol channel; stray prints go to stderr
    os.dup2(2, 1)
    import_s = _import_heavy()
    import torch

    out.write(b"R\n")
    out.flush()
    t0 = time.perf_counter()
    site_spec, df, weights, message = pickle.load(sys.stdin.buffer)
    t1 = time.perf_counter()
    state = setup_state(site_spec, df)
    t2 = time.perf_counter()
    res = train_stage(state, weights, message)
    res.update(import_s=import_s, python_start_to_ready_s=t0 - t_start, unpickle_s=t1 - t0,
               setup_s=t2 - t1, torch_threads=torch.get_num_threads(), probe=_probe(canary))
    pickle.dump(res, out, protocol=pickle.HIGHEST_PROTOCOL)
    out.flush()


def persistent_main(conn, site_spec: dict[str, Any], df, canary: str) -> None:
    """Body of the persistent worker: set up once, then one stage per message."""
    import_s = _import_heavy()
    import torch

    t0 = time.perf_counter()
    state = setup_state(site_spec, df)
    conn.send({"ready": True, "import_s": import_s, "setup_s": time.perf_counter() - t0,
               "torch_threads": torch.get_num_threads(), "probe": _probe(canary)})
    while True:
        msg = conn.recv()
        if msg is None:
            break
        weights, message = msg
        conn.send(train_stage(state, weights, message))
    conn.close()


# ------------------------------------------------------------------------ the four ways
def scrubbed_env(empty_home: Path, real_home: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUB_PREFIXES)}
    env["HOME"] = str(empty_home)
    env["FEDMTL_BENCH_REAL_HOME"] = real_home  # only so the probe can look at it
    return env


def sandbox_script(hide: list[str], stash: Path | None) -> str:
    """Shell commands (run as root of a fresh user+mount namespace) that mount an empty
    tmpfs over every folder of ``hide``, keeping the Python installation readable (read
    only) where it lives under one of them (pyenv puts it under ~/.pyenv)."""
    import shlex

    keep = [str(Path(p).resolve()) for p in {sys.base_prefix, sys.prefix}]
    keep = [k for k in keep if any(Path(k).is_relative_to(h) for h in hide)]
    if keep and stash is None:
        raise ValueError("the interpreter lives in a hidden folder; give a stash folder")
    steps = []
    for i, k in enumerate(keep):
        steps.append(f"mkdir -p {shlex.quote(f'{stash}/{i}')} && mount --bind {shlex.quote(k)} "
                     f"{shlex.quote(f'{stash}/{i}')}")
    steps += [f"mount -t tmpfs -o size=1m,mode=0700 none {shlex.quote(h)}" for h in hide]
    for i, k in enumerate(keep):
        steps.append(f"mkdir -p {shlex.quote(k)} && mount --bind {shlex.quote(f'{stash}/{i}')} {shlex.quote(k)}"
                     f" && mount -o remount,bind,ro {shlex.quote(k)}")
    return " && ".join(steps)


class Fresh:
    """A fresh worker process per call, optionally in a user+mount+net namespace."""

    def __init__(self, env: dict[str, str], cwd: Path, canary: Path, *, hide: list[str] | None = None,
                 stash: Path | None = None):
        self.env, self.cwd, self.canary, self.hide = env, cwd, canary, hide
        cmd = [sys.executable, "-I", "-c", FRESH_CODE, str(THIS), str(canary)]
        if hide is not None:
            cmd = ["unshare", "--user", "--map-root-user", "--mount", "--net", "--",
                   "sh", "-c", f'{sandbox_script(hide, stash)} && exec "$@"', "sh", *cmd]
        self.cmd = cmd

    def call(self, payload_obj: tuple) -> dict[str, Any]:
        err = tempfile.TemporaryFile()
        t0 = time.perf_counter()
        p = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                             env=self.env, cwd=self.cwd)
        try:
            ready = p.stdout.readline()
            t_ready = time.perf_counter()
            if ready != b"R\n":
                raise RuntimeError(f"worker did not start: {ready!r}")
            pickle.dump(payload_obj, p.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            p.stdin.close()
            t_sent = time.perf_counter()
            res = pickle.load(p.stdout)
            t_res = time.perf_counter()
            rc = p.wait(timeout=60)
            t_end = time.perf_counter()
        except Exception:
            p.kill()
            p.wait()
            err.seek(0)
            sys.stderr.write(err.read().decode(errors="replace")[-4000:])
            raise
        finally:
            err.close()
        if rc != 0:
            raise RuntimeError(f"worker exited {rc}")
        res["wall_s"] = t_end - t0
        res["startup_s"] = t_ready - t0  # spawn + interpreter + imports, as the parent sees it
        res["send_s"] = t_sent - t_ready
        res["call_s"] = t_res - t_ready  # ready -> update back: send, unpickle, setup, train, return
        res["exit_s"] = t_end - t_res
        return res


class Persistent:
    def __init__(self, context: str, env: dict[str, str], site_spec, df, canary: Path):
        import multiprocessing as mp

        ctx = mp.get_context(context)
        self.conn, child = ctx.Pipe()
        saved = dict(os.environ)
        t0 = time.perf_counter()
        try:  # the child inherits the environment at start: the scrubbed one
            os.environ.clear()
            os.environ.update(env)
            self.proc = ctx.Process(target=persistent_main, args=(child, site_spec, df, str(canary)),
                                    daemon=True)
            self.proc.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        child.close()
        self.ready = self.conn.recv()
        self.ready["start_to_ready_s"] = time.perf_counter() - t0

    def call(self, weights: np.ndarray, message: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.conn.send((weights, message))
        res = self.conn.recv()
        res["wall_s"] = time.perf_counter() - t0
        return res

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()


def inproc_call(state, weights, message) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    # in a worker thread, as the runtime runs in a syft request thread
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as ex:
        res = ex.submit(train_stage, state, weights, message).result()
    res["wall_s"] = time.perf_counter() - t0
    return res


# ------------------------------------------------------------------------ set-up and report
def machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def prepare_site(tmp: Path):
    from fedmtl.datasites import cohort
    from fedmtl.datasites.records import load_records
    from fedmtl.datasites.template import TEMPLATE_NAME
    from fedmtl.jobspec import JobSpec
    from fedmtl.privacy.keys import SigningKey
    from fedmtl.schema import Schema

    files = cohort.prepare(tmp / "cohort", sites=3, seed=0)
    big = max(files, key=lambda f: f.n_patients)
    schema = Schema.load(big.schema)
    df = load_records(big.records, schema)
    spec = JobSpec(name="bench", tasks=[{"label": "diabetes_5y"}], rounds=5, local_steps=20,
                   sample_rate=0.02, noise_multiplier=1.0)
    roster = {f.name: SigningKey.generate().verify_key.to_bytes().hex() for f in files}
    site_spec = {"job": spec.to_dict(), "job_id": "bench-0123abcd", "site": big.name, "roster": roster,
                 "schema": schema.to_dict(), "max_count": int(max(f.n_patients for f in files)),
                 "template": TEMPLATE_NAME}
    return big, df, site_spec


def stats(xs: list[float]) -> dict[str, float]:
    return {"median": float(np.median(xs)), "min": float(np.min(xs)), "max": float(np.max(xs)), "n": len(xs)}


def sandbox_works(tmp: Path) -> str | None:
    """None when unshare can mount a tmpfs in a user namespace here, else why not."""
    if shutil.which("unshare") is None:
        return "no unshare on PATH"
    d = tmp / "probe"
    d.mkdir()
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "--net", "--", "sh", "-c",
                        f'mount -t tmpfs none "{d}"'], capture_output=True, text=True, timeout=30)
    return None if r.returncode == 0 else f"unshare refused: {r.stderr.strip()[:200]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 timed calls per way")
    ap.add_argument("--calls", type=int, default=None, help="timed calls per way (default 5)")
    ap.add_argument("--context", choices=("spawn", "forkserver"), default="spawn")
    ap.add_argument("--no-sandbox", action="store_true", help="skip the unshare variant")
    args = ap.parse_args(argv)
    calls = args.calls or (3 if args.quick else 5)
    info = machine()
    t_all = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="fedmtl-isolation-bench-") as tmp_s:
        tmp = Path(tmp_s)
        big, df, site_spec = prepare_site(tmp)
        empty_home, cwd, site_home = tmp / "worker-home", tmp / "worker-cwd", tmp / "site-home"
        for d in (empty_home, cwd, site_home):
            d.mkdir()
        canary = site_home / "secrets" / "identity.key"  # a stand-in secret of a datasite HOME
        canary.parent.mkdir(mode=0o700)
        canary.write_bytes(os.urandom(32))
        os.chmod(canary, 0o600)
        real_home = os.path.expanduser("~")
        env = scrubbed_env(empty_home, real_home)

        state = setup_state(site_spec, df)
        from fedmtl.models import model_to_vector

        weights = model_to_vector(state["model"]).copy()
        n_train = int((df[state["schema"].split_column] == "train").sum())
        payload = (site_spec, df, weights, MESSAGE)
        payload_bytes = len(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
        print(f"site {big.name}: {len(df)} records ({n_train} train), {weights.size} parameters, "
              f"20 DP-SGD steps at q=0.02; pickle to a fresh worker {payload_bytes / 1e6:.2f} MB", flush=True)

        ways: dict[str, Fresh] = {"fresh": Fresh(env, cwd, canary)}
        why_no_sandbox = "--no-sandbox" if args.no_sandbox else sandbox_works(tmp)
        if why_no_sandbox is None:
            ways["sandboxed"] = Fresh(env, cwd, canary, hide=[real_home, str(site_home)], stash=tmp / "stash")
        else:
            print(f"(sandboxed variant skipped: {why_no_sandbox})")

        cold_inproc = inproc_call(state, weights, MESSAGE)
        pers = Persistent(args.context, env, site_spec, df, canary)
        cold_pers = pers.call(weights, MESSAGE)
        runs: dict[str, list[dict[str, Any]]] = {"inproc": [], **{k: [] for k in ways}, "persistent": []}
        try:
            for i in range(calls):
                runs["inproc"].append(inproc_call(state, weights, MESSAGE))
                for k, w in ways.items():
                    runs[k].append(w.call(payload))
                runs["persistent"].append(pers.call(weights, MESSAGE))
                print(f"  call {i + 1}/{calls}: " + ", ".join(
                    f"{k} {v[-1]['wall_s']:.2f}s" for k, v in runs.items()), flush=True)
        finally:
            pers.close()

    total_s = time.perf_counter() - t_all
    for k, v in runs.items():  # the same work everywhere: same update size, finite, same steps
        for r in v:
            assert r["update"].shape == weights.shape and np.all(np.isfinite(r["update"])), k
            assert r["report"]["steps"] == 20, (k, r["report"])

    a = stats([r["wall_s"] for r in runs["inproc"]])
    a_med = a["median"]
    out: dict[str, Any] = {"inproc": {"wall_s": a, "train_s": stats([r["train_s"] for r in runs["inproc"]]),
                                      "dp_steps_s": stats([r["dp_steps_s"] for r in runs["inproc"]]),
                                      "cold_first_call_s": cold_inproc["wall_s"]}}
    for k in ways:
        rs = runs[k]
        out[k] = {
            "wall_s": stats([r["wall_s"] for r in rs]),
            "startup_s": stats([r["startup_s"] for r in rs]),
            "import_s": stats([r["import_s"] for r in rs]),
            "interpreter_s": stats([r["startup_s"] - r["import_s"] for r in rs]),
            "send_s": stats([r["send_s"] for r in rs]),
            "unpickle_s": stats([r["unpickle_s"] for r in rs]),
            "setup_s": stats([r["setup_s"] for r in rs]),
            "train_s": stats([r["train_s"] for r in rs]),
            "dp_steps_s": stats([r["dp_steps_s"] for r in rs]),
            "return_and_exit_s": stats([r["call_s"] - r["unpickle_s"] - r["setup_s"] - r["train_s"]
                                        - r["send_s"] + r["exit_s"] for r in rs]),
            "overhead_s": float(np.median([r["wall_s"] for r in rs])) - a_med,
            "ratio": float(np.median([r["wall_s"] for r in rs])) / a_med,
            "probe": rs[-1]["probe"],
            "torch_threads": rs[-1]["torch_threads"],
        }
    pr = runs["persistent"]
    out["persistent"] = {
        "context": args.context,
        "start_to_ready_s": pers.ready["start_to_ready_s"],
        "import_s": pers.ready["import_s"],
        "setup_s": pers.ready["setup_s"],
        "cold_first_call_s": cold_pers["wall_s"],
        "wall_s": stats([r["wall_s"] for r in pr]),
        "train_s": stats([r["train_s"] for r in pr]),
        "dp_steps_s": stats([r["dp_steps_s"] for r in pr]),
        "ipc_s": stats([r["wall_s"] - r["train_s"] for r in pr]),
        "overhead_s": float(np.median([r["wall_s"] for r in pr])) - a_med,
        "ratio": float(np.median([r["wall_s"] for r in pr])) / a_med,
        "probe": pers.ready["probe"],
        "torch_threads": pers.ready["torch_threads"],
    }

    print(f"\none training stage per round, median of {calls} calls (s; first in-process / persistent "
          "call untimed as warm-up):")
    print(f"{'way':<12} {'wall':>7} {'startup':>8} {'(import)':>8} {'setup':>7} {'train':>7} "
          f"{'other':>7} {'overhead':>9} {'ratio':>6}  canary")
    print(f"{'inproc':<12} {a_med:>7.3f} {'-':>8} {'-':>8} {'-':>7} {out['inproc']['train_s']['median']:>7.3f} "
          f"{a_med - out['inproc']['train_s']['median']:>7.3f} {0.0:>9.3f} {1.0:>6.2f}  "
          "readable (same process)")
    for k in ways:
        o = out[k]
        other = o["wall_s"]["median"] - o["startup_s"]["median"] - o["setup_s"]["median"] - o["train_s"]["median"]
        print(f"{k:<12} {o['wall_s']['median']:>7.3f} {o['startup_s']['median']:>8.3f} "
              f"{o['import_s']['median']:>8.3f} {o['setup_s']['median']:>7.3f} {o['train_s']['median']:>7.3f} "
              f"{other:>7.3f} {o['overhead_s']:>9.3f} {o['ratio']:>6.2f}  "
              f"{'READABLE' if o['probe']['canary_readable'] else 'hidden'}")
    o = out["persistent"]
    print(f"{'persistent':<12} {o['wall_s']['median']:>7.3f} {'-':>8} {'-':>8} {'-':>7} "
          f"{o['train_s']['median']:>7.3f} {o['ipc_s']['median']:>7.3f} {o['overhead_s']:>9.3f} "
          f"{o['ratio']:>6.2f}  {'READABLE' if o['probe']['canary_readable'] else 'hidden'}")
    print(f"persistent worker ({args.context}): started once in {o['start_to_ready_s']:.2f} s "
          f"(imports {o['import_s']:.2f} s, setup {o['setup_s']:.3f} s); first call {o['cold_first_call_s']:.3f} s; "
          f"IPC per call {1e3 * o['ipc_s']['median']:.1f} ms")
    print(f"in-process first (cold) call {out['inproc']['cold_first_call_s']:.3f} s")
    print("overhead per round (s): " + ", ".join(
        f"{k} {out[k]['overhead_s']:+.3f} ({out[k]['ratio']:.2f}x)" for k in (*ways, "persistent")))
    print(f"total {total_s:.1f} s")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "isolation",
        "command": info["command"],
        "quick": args.quick,
        "machine": {**info, "loadavg_after": list(os.getloadavg())},
        "total_seconds": total_s,
        "calls": calls,
        "site": {"name": big.name, "n_records": len(df), "n_train": n_train, "parameters": int(weights.size),
                 "job": site_spec["job"], "fresh_payload_bytes": payload_bytes},
        "sandbox": {"used": "sandboxed" in ways, "why_not": why_no_sandbox,
                    "command": ways["sandboxed"].cmd[:12] if "sandboxed" in ways else None},
        "results": out,
        "notes": [
            "stage = the training half of JobRuntime._compute_payload: split, Preprocessor.transform/labels, "
            "train_local with _train_kwargs (20 DP-SGD steps), delta, counts, weight_by_group",
            "inproc: model and preprocessor built once, stage run in a worker thread, first call untimed",
            "fresh: python -I -c per call, scrubbed env (HOME empty, FEDMTL_/SYFT_/PYTHON* dropped); "
            "startup_s = Popen to 'ready' (interpreter + imports, import_s measured in the worker); "
            "setup_s = build model + preprocessor from the spec; records pickled to it per call",
            "sandboxed: the fresh worker under unshare --user --map-root-user --mount --net with tmpfs "
            "over HOME and a stand-in datasite home; probe.canary_readable says if it could read the secret",
            "persistent: multiprocessing worker started once with the records; per call weights + "
            "message in, update out; ipc_s = wall - train_s measured in the worker",
            "overhead_s = median wall of the way - median wall of inproc; ratio = the same as a quotient",
            "env scrubbing alone does not hide files: fresh/persistent can still read the canary",
        ],
    }, indent=2, default=str))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
