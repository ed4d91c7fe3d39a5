"""What running the approved round code in a separate worker process costs, side by side.

    python benchmarks/isolation.py [--quick] [--calls N] [--context spawn|forkserver]
                                   [--no-sandbox]

Defence in depth for PYSEC-2026-546: the round code would run in a worker process that
cannot read the datasite's HOME (identity key, ledger, per-job secrets) instead of inside
the datasite server. On the demo cohort's largest site (:func:`fedmtl.datasites.data.cohort.prepare`,
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
``--warmup`` in-process and persistent calls are untimed warm-ups (their times are kept);
every fresh call is cold by construction. Every way runs the stage in a worker thread, as
the runtime does; ``inproc_main_thread`` shows what the main thread would cost instead.
The fresh ways run fewer calls (``--fresh-calls``): each is a whole interpreter start.

Every process runs torch with ``--torch-threads`` intra-op threads (default 1). With
torch's default (one per core) this small model's DP-SGD steps swing by 10x and more on a
loaded 2-core machine depending on which thread first ran torch (the OpenMP team contends
with the machine's other load): that would swamp the process cost being measured, and is a
finding of its own (``--torch-threads 0`` shows it).

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
    "m.fresh_main(t0, sys.argv[2], int(sys.argv[3]))\n"
)


# ------------------------------------------------------------------------ the stage itself
def setup_state(site_spec: dict[str, Any], df) -> dict[str, Any]:
    """What the runtime builds once per job (JobRuntime._plan caches model + preprocessor)."""
    from fedmtl.contract import protocol

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
    # what train_local imports lazily on its first call: Opacus, and torch._dynamo (which
    # torch.optim.SGD's constructor pulls in), about 4 s of the first call otherwise
    import opacus  # noqa: F401
    import pandas  # noqa: F401
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401

    import fedmtl.contract.protocol  # noqa: F401
    import fedmtl.models  # noqa: F401
    import fedmtl.privacy.dp  # noqa: F401
    import fedmtl.privacy.quantization  # noqa: F401

    return time.perf_counter() - t0


def run_stage(state: dict[str, Any], weights: np.ndarray, message: dict[str, Any], *,
              main_thread: bool = False) -> dict[str, Any]:
    """The stage in a worker thread, as the runtime runs it in a syft request thread (every
    way runs it so; ``main_thread`` only for the in-process comparison row)."""
    from concurrent.futures import ThreadPoolExecutor

    if main_thread:
        return train_stage(state, weights, message)
    with ThreadPoolExecutor(max_workers=1) as ex:
        return ex.submit(train_stage, state, weights, message).result()


def set_threads(n: int) -> None:
    """torch intra-op threads (0: torch's default, one per core)."""
    import torch

    if n > 0:
        torch.set_num_threads(n)


def fresh_main(t_start: float, canary: str, threads: int) -> None:
    """Body of the fresh worker (``python -I -c FRESH_CODE THIS canary threads``)."""
    out = os.fdopen(os.dup(1), "wb")  # the protocol channel; stray prints go to stderr
    os.dup2(2, 1)
    import_s = _import_heavy()
    import torch

    set_threads(threads)

    out.write(b"R\n")
    out.flush()
    t0 = time.perf_counter()
    site_spec, df, weights, message = pickle.load(sys.stdin.buffer)
    t1 = time.perf_counter()
    state = setup_state(site_spec, df)
    t2 = time.perf_counter()
    res = run_stage(state, weights, message)
    res.update(import_s=import_s, python_start_to_ready_s=t0 - t_start, unpickle_s=t1 - t0,
               setup_s=t2 - t1, torch_threads=torch.get_num_threads(), probe=_probe(canary))
    pickle.dump(res, out, protocol=pickle.HIGHEST_PROTOCOL)
    out.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: with torch loaded it takes seconds (3-5 s seen under load)


def persistent_main(conn, site_spec: dict[str, Any], df, canary: str, threads: int) -> None:
    """Body of the persistent worker: set up once, then one stage per message."""
    import_s = _import_heavy()
    import torch

    set_threads(threads)

    t0 = time.perf_counter()
    state = setup_state(site_spec, df)
    conn.send({"ready": True, "import_s": import_s, "setup_s": time.perf_counter() - t0,
               "torch_threads": torch.get_num_threads(), "probe": _probe(canary)})
    while True:
        msg = conn.recv()
        if msg is None:
            break
        weights, message = msg
        conn.send(run_stage(state, weights, message))
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

    def __init__(self, env: dict[str, str], cwd: Path, canary: Path, threads: int, *,
                 hide: list[str] | None = None, stash: Path | None = None):
        self.env, self.cwd, self.canary, self.hide = env, cwd, canary, hide
        cmd = [sys.executable, "-I", "-c", FRESH_CODE, str(THIS), str(canary), str(threads)]
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
    def __init__(self, context: str, env: dict[str, str], site_spec, df, canary: Path, threads: int):
        import multiprocessing as mp

        ctx = mp.get_context(context)
        self.conn, child = ctx.Pipe()
        saved = dict(os.environ)
        t0 = time.perf_counter()
        try:  # the child inherits the environment at start: the scrubbed one
            os.environ.clear()
            os.environ.update(env)
            self.proc = ctx.Process(target=persistent_main, args=(child, site_spec, df, str(canary), threads),
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


def inproc_call(state, weights, message, *, main_thread: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = run_stage(state, weights, message, main_thread=main_thread)
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
    from fedmtl.contract.jobspec import JobSpec
    from fedmtl.datasites.data import cohort
    from fedmtl.datasites.data.records import load_records
    from fedmtl.datasites.template import TEMPLATE_NAME
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


def start_floor(fresh: dict[str, "Fresh"], reps: int) -> dict[str, dict[str, float]]:
    """Start + exit of the bare interpreter (``python -I -c pass``), plain and sandboxed:
    what the namespace and the mounts cost, without the imports' noise."""
    times: dict[str, list[float]] = {k: [] for k in fresh}
    for _ in range(reps):
        for k, w in fresh.items():
            cmd = w.cmd[: w.cmd.index(sys.executable) + 1] + ["-I", "-c", "pass"]
            t0 = time.perf_counter()
            subprocess.run(cmd, env=w.env, cwd=w.cwd, check=True)
            times[k].append(time.perf_counter() - t0)
    return {k: stats(v) for k, v in times.items()}


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
    ap.add_argument("--quick", action="store_true", help="3 timed calls per way, 2 of the fresh ones")
    ap.add_argument("--calls", type=int, default=None, help="timed calls in process / persistent (default 5)")
    ap.add_argument("--fresh-calls", type=int, default=None,
                    help="timed calls of each fresh-worker way (default 3; each costs a whole start)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first calls in process / persistent")
    ap.add_argument("--context", choices=("spawn", "forkserver"), default="spawn")
    ap.add_argument("--no-sandbox", action="store_true", help="skip the unshare variant")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads in every process (default 1; 0 = torch's default, one "
                    "per core, whose timings swing by 10x on a loaded 2-core machine)")
    args = ap.parse_args(argv)
    calls = args.calls or (3 if args.quick else 5)
    fresh_calls = min(calls, args.fresh_calls or (2 if args.quick else 3))
    set_threads(args.torch_threads)  # before any torch work in this process
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
              f"20 DP-SGD steps at q=0.02; pickle to a fresh worker {payload_bytes / 1e6:.2f} MB; "
              f"torch threads {args.torch_threads or 'default'}", flush=True)

        ways: dict[str, Fresh] = {"fresh": Fresh(env, cwd, canary, args.torch_threads)}
        why_no_sandbox = "--no-sandbox" if args.no_sandbox else sandbox_works(tmp)
        if why_no_sandbox is None:
            ways["sandboxed"] = Fresh(env, cwd, canary, args.torch_threads, hide=[real_home, str(site_home)],
                                    stash=tmp / "stash")
        else:
            print(f"(sandboxed variant skipped: {why_no_sandbox})")

        floor = start_floor(ways, 7)
        warm_inproc = [inproc_call(state, weights, MESSAGE)["wall_s"] for _ in range(max(1, args.warmup))]
        pers = Persistent(args.context, env, site_spec, df, canary, args.torch_threads)
        warm_pers = [pers.call(weights, MESSAGE)["wall_s"] for _ in range(max(1, args.warmup))]
        runs: dict[str, list[dict[str, Any]]] = {"inproc": [], "inproc_main_thread": [],
                                                 **{k: [] for k in ways}, "persistent": []}
        try:
            for i in range(calls):
                runs["inproc"].append(inproc_call(state, weights, MESSAGE))
                runs["inproc_main_thread"].append(inproc_call(state, weights, MESSAGE, main_thread=True))
                for k, w in ways.items():
                    if i < fresh_calls:
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

    def med(rs, key):
        return float(np.median([key(r) if callable(key) else r[key] for r in rs]))

    a_med = med(runs["inproc"], "wall_s")
    out: dict[str, Any] = {}
    for k in ("inproc", "inproc_main_thread"):
        rs = runs[k]
        out[k] = {"wall_s": stats([r["wall_s"] for r in rs]), "train_s": stats([r["train_s"] for r in rs]),
                  "dp_steps_s": stats([r["dp_steps_s"] for r in rs]),
                  "overhead_s": med(rs, "wall_s") - a_med, "ratio": med(rs, "wall_s") / a_med}
    out["inproc"]["warmup_calls_s"] = warm_inproc
    for k in ways:
        rs = runs[k]
        out[k] = {
            "wall_s": stats([r["wall_s"] for r in rs]),
            "startup_s": stats([r["startup_s"] for r in rs]),
            "import_s": stats([r["import_s"] for r in rs]),
            "interpreter_s": stats([r["startup_s"] - r["import_s"] for r in rs]),
            "send_unpickle_s": stats([r["send_s"] + r["unpickle_s"] for r in rs]),
            "setup_s": stats([r["setup_s"] for r in rs]),
            "train_s": stats([r["train_s"] for r in rs]),
            "dp_steps_s": stats([r["dp_steps_s"] for r in rs]),
            "return_exit_s": stats([r["wall_s"] - r["startup_s"] - r["send_s"] - r["unpickle_s"]
                                    - r["setup_s"] - r["train_s"] for r in rs]),
            "exit_s": stats([r["exit_s"] for r in rs]),
            "overhead_s": med(rs, "wall_s") - a_med,
            "ratio": med(rs, "wall_s") / a_med,
            "probe": rs[-1]["probe"],
            "torch_threads": rs[-1]["torch_threads"],
        }
    pr = runs["persistent"]
    out["persistent"] = {
        "context": args.context,
        "start_to_ready_s": pers.ready["start_to_ready_s"],
        "import_s": pers.ready["import_s"],
        "setup_s": pers.ready["setup_s"],
        "warmup_calls_s": warm_pers,
        "wall_s": stats([r["wall_s"] for r in pr]),
        "train_s": stats([r["train_s"] for r in pr]),
        "dp_steps_s": stats([r["dp_steps_s"] for r in pr]),
        "ipc_s": stats([r["wall_s"] - r["train_s"] for r in pr]),
        "overhead_s": med(pr, "wall_s") - a_med,
        "ratio": med(pr, "wall_s") / a_med,
        "probe": pers.ready["probe"],
        "torch_threads": pers.ready["torch_threads"],
    }

    def canary(o):
        return "READABLE" if o["probe"]["canary_readable"] else "hidden"

    def f(x):
        return f"{x:>8.3f}" if isinstance(x, float) else f"{x:>8}"

    print(f"\none training stage per round (s), median of {calls} interleaved calls ({fresh_calls} for the "
          f"fresh workers); the first {max(1, args.warmup)} in-process / persistent calls untimed (warm-up):")
    cols = ("wall", "startup", "(import)", "send", "setup", "train", "ret+exit", "ipc", "overhead", "ratio")
    print(f"{'way':<19}" + "".join(f"{c:>9}" for c in cols) + "  secrets")
    rows = []
    for k in ("inproc", "inproc_main_thread"):
        o = out[k]
        rows.append((k, o["wall_s"]["median"], "-", "-", "-", "-", o["train_s"]["median"], "-", "-",
                     o["overhead_s"], o["ratio"], "readable (same process)"))
    for k in ways:
        o = out[k]
        rows.append((k, o["wall_s"]["median"], o["startup_s"]["median"], o["import_s"]["median"],
                     o["send_unpickle_s"]["median"], o["setup_s"]["median"], o["train_s"]["median"],
                     o["return_exit_s"]["median"], "-", o["overhead_s"], o["ratio"], canary(o)))
    o = out["persistent"]
    rows.append(("persistent", o["wall_s"]["median"], "-", "-", "-", "-", o["train_s"]["median"], "-",
                 o["ipc_s"]["median"], o["overhead_s"], o["ratio"], canary(o)))
    for r in rows:
        print(f"{r[0]:<19}" + "".join(" " + f(x) for x in r[1:-1]) + f"  {r[-1]}")
    print("  (train = the stage as the worker times it; a fresh worker's is a first call in its process)")
    print(f"persistent worker ({args.context}): started once in {o['start_to_ready_s']:.2f} s "
          f"(imports {o['import_s']:.2f} s, setup {o['setup_s']:.3f} s); warm-up calls "
          f"{', '.join(f'{x:.2f}' for x in o['warmup_calls_s'])} s; IPC per call {1e3 * o['ipc_s']['median']:.1f} ms")
    print(f"in-process warm-up calls {', '.join(f'{x:.2f}' for x in out['inproc']['warmup_calls_s'])} s; "
          + "; ".join(f"{k}: process exit {out[k]['exit_s']['median']:.2f} s" for k in ways))
    print("overhead per round vs inproc (s): " + ", ".join(
        f"{k} {out[k]['overhead_s']:+.3f} ({out[k]['ratio']:.2f}x)" for k in (*ways, "persistent"))
        + f"; persistent IPC alone {out['persistent']['ipc_s']['median']:+.3f} "
        f"({1 + out['persistent']['ipc_s']['median'] / a_med:.3f}x)")
    print("bare interpreter start + exit (python -I -c pass), median of 7: " + ", ".join(
        f"{k} {1e3 * v['median']:.0f} ms" for k, v in floor.items()))
    print(f"total {total_s:.1f} s")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "isolation",
        "command": info["command"],
        "quick": args.quick,
        "machine": {**info, "loadavg_after": list(os.getloadavg())},
        "total_seconds": total_s,
        "calls": calls,
        "torch_threads": args.torch_threads,
        "fresh_calls": fresh_calls,
        "site": {"name": big.name, "n_records": len(df), "n_train": n_train, "parameters": int(weights.size),
                 "job": site_spec["job"], "fresh_payload_bytes": payload_bytes},
        "sandbox": {"used": "sandboxed" in ways, "why_not": why_no_sandbox,
                    "script": ways["sandboxed"].cmd[8] if "sandboxed" in ways else None},
        "results": out,
        "bare_interpreter_start_s": floor,
        "notes": [
            "stage = the training half of JobRuntime._compute_payload: split, Preprocessor.transform/labels, "
            "train_local with _train_kwargs (20 DP-SGD steps), delta, counts, weight_by_group; every way "
            "runs it in a worker thread (as the runtime does in a syft request thread)",
            "inproc: model and preprocessor built once, first --warmup calls untimed; inproc_main_thread: "
            "the same in the main thread",
            "torch_threads: intra-op threads set in every process before any torch work (0 = torch default)",
            "fresh: python -I -c per call, scrubbed env (HOME empty, FEDMTL_/SYFT_/PYTHON* dropped); "
            "startup_s = Popen to 'ready' (interpreter + imports incl. opacus and torch._dynamo, import_s "
            "measured in the worker); send = pickle of records + spec + weights to the worker and its "
            "unpickling; setup_s = build model + preprocessor from the spec; ret+exit = the update back "
            "and the process exit",
            "sandboxed: the fresh worker under unshare --user --map-root-user --mount --net with tmpfs "
            "over the user's HOME and a stand-in datasite HOME (the interpreter's prefix re-bound read-only); "
            "probe.canary_readable says whether the worker could read the stand-in secret",
            "persistent: multiprocessing worker started once with the records and spec; per call weights + "
            "message in, update out; ipc_s = wall - train_s as measured in the worker",
            "overhead_s = median wall of the way - median wall of inproc; ratio = the same as a quotient",
            "env scrubbing alone hides no file: fresh and persistent can still read the canary",
            "the fresh worker ends with os._exit after sending the update (interpreter teardown with torch "
            "loaded took 3-5 s under load in a first run); ret+exit = result back + exit",
            "bare_interpreter_start_s: python -I -c pass, plain and under the sandbox (namespace + mounts)",
        ],
    }, indent=2, default=str))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
