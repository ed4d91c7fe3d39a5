"""The ``fedmtl`` command line. Thin: parse, call a library function, print."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import signal
import sys
import time
from pathlib import Path

from fedmtl.errors import FedMTLError

RESEARCHER_PASSWORD_ENV = "FEDMTL_RESEARCHER_PASSWORD"


def _read_password(args: argparse.Namespace, env: str, prompt: str) -> str:
    if getattr(args, "password_stdin", False):
        return sys.stdin.readline().rstrip("\n")
    if os.environ.get(env):
        return os.environ[env]
    if not sys.stdin.isatty():
        raise FedMTLError(f"no password: pipe it with --password-stdin or set {env}")
    first = getpass.getpass(prompt)
    if getpass.getpass("again: ") != first:
        raise FedMTLError("the two passwords differ")
    return first


# -- datasite ---------------------------------------------------------------------


def cmd_datasite_launch(args: argparse.Namespace) -> int:
    from fedmtl.datasites.launch import launch

    print(f"launching datasite at {args.home} ...", flush=True)
    handle = launch(
        home=args.home,
        name=args.name,
        records=args.records,
        schema=args.schema,
        port=args.port,
        host=args.host,
        admin_email=args.admin_email,
        policy=args.policy,
    )
    print(f"datasite {handle.name!r} running at {handle.url}")
    print(f"  admin: {handle.admin_email}  (password in {handle.home / 'secrets' / 'admin_password'})")
    print(f"  dataset: {handle.dataset}")
    if args.detach:
        handle._process = None  # leave it running; `fedmtl datasite stop` stops it
        return 0
    print("press Ctrl-C to stop", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while handle.is_running():
            time.sleep(1)
        print("the datasite server exited; see logs/server.log in its home", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    finally:
        handle.stop()
    print("stopped")
    return 0


def cmd_datasite_stop(args: argparse.Namespace) -> int:
    from fedmtl.datasites import home as home_mod
    from fedmtl.datasites.launch import _terminate_pid

    info = home_mod.running(Path(args.home))
    if info is None:
        print("not running")
        return 0
    _terminate_pid(info.pid, 15)
    (Path(args.home) / "server.pid").unlink(missing_ok=True)
    print("stopped")
    return 0


def cmd_datasite_status(args: argparse.Namespace) -> int:
    from fedmtl.datasites.admin import status

    st = status(args.home)
    print(json.dumps(st.to_dict(), indent=2) if args.json else st.render())
    return 0


def cmd_datasite_add_researcher(args: argparse.Namespace) -> int:
    from fedmtl.datasites.admin import add_researcher

    password = _read_password(args, RESEARCHER_PASSWORD_ENV, f"password for {args.email}: ")
    add_researcher(home=args.home, email=args.email, password=password, name=args.full_name)
    print(f"researcher {args.email} registered")
    return 0


# -- demo ---------------------------------------------------------------------------


def cmd_demo_prepare(args: argparse.Namespace) -> int:
    from fedmtl.datasites.cohort import prepare, summary_table

    files = prepare(args.out, sites=args.sites, seed=args.seed)
    print(summary_table(files))
    for f in files:
        print(f"{f.name}: {f.records}  {f.schema}")
    return 0


# -- researcher ---------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from fedmtl.researcher.job import Job
    from fedmtl.researcher.session import Session
    from fedmtl.researcher.spec import JobSpec

    session = Session.connect(args.sites)
    print(f"connected to {', '.join(sorted(session.sites))}", flush=True)
    if (Path(args.out) / "job.json").exists():
        job = Job.resume(session, args.out)
        print(f"resuming job {job.job_id} in {args.out}", flush=True)
    else:
        if args.job is None:
            raise FedMTLError(f"{args.out} holds no job yet: give the job spec with --job FILE")
        spec = JobSpec.load(args.job)
        job = session.job(spec, out=args.out)
        if not args.no_dry_run:
            print("dry run on the sites' mock data ...", flush=True)
            job.dry_run()
        job.submit()
        print(f"submitted job {job.job_id}; waiting for the sites' review ...", flush=True)
    for site, st in job.wait_for_review(args.review_timeout).items():
        print(f"  {site}: {st['status']}{' - ' + st['reason'] if st['reason'] else ''}")
    result = job.run(progress=not args.quiet, review_timeout=args.review_timeout)
    result.save(Path(args.out) / "result")
    table = result.metrics_table()
    last = table[table["round"] == table["round"].max()]
    print(last.to_string(index=False))
    print("epsilon spent per site: " + ", ".join(f"{s}={e:.2f}" for s, e in sorted(result.epsilon.items())))
    print(f"result saved to {Path(args.out) / 'result'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedmtl", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    ds = sub.add_parser("datasite", help="data owner: run a hospital's datasite")
    dsub = ds.add_subparsers(dest="action", required=True)
    la = dsub.add_parser("launch", help="launch (first time: create) a datasite")
    la.add_argument("--home", required=True, type=Path)
    la.add_argument("--name")
    la.add_argument("--records", type=Path)
    la.add_argument("--schema", type=Path)
    la.add_argument("--port", type=int, default=8080)
    la.add_argument("--host", default="127.0.0.1")
    la.add_argument("--admin-email")
    la.add_argument("--policy", type=Path, help="policy file (TOML/YAML); default: templates only, auto-approve")
    la.add_argument("--detach", action="store_true", help="return once running; stop with `datasite stop`")
    la.set_defaults(func=cmd_datasite_launch)
    st = dsub.add_parser("stop", help="stop a datasite")
    st.add_argument("--home", required=True, type=Path)
    st.set_defaults(func=cmd_datasite_stop)
    ss = dsub.add_parser("status", help="is it running, datasets, researchers, pending requests")
    ss.add_argument("--home", required=True, type=Path)
    ss.add_argument("--json", action="store_true")
    ss.set_defaults(func=cmd_datasite_status)
    ar = dsub.add_parser("add-researcher", help="register a researcher")
    ar.add_argument("--home", required=True, type=Path)
    ar.add_argument("--email", required=True)
    ar.add_argument("--full-name")
    ar.add_argument("--password-stdin", action="store_true")
    ar.set_defaults(func=cmd_datasite_add_researcher)

    tr = sub.add_parser("train", help="researcher: run a federated job over datasites")
    tr.add_argument("--sites", required=True, type=Path, help="sites file (TOML)")
    tr.add_argument("--job", type=Path, help="job spec (TOML/YAML/JSON); not needed to resume")
    tr.add_argument("--out", required=True, type=Path, help="job folder (checkpoints, result)")
    tr.add_argument("--review-timeout", type=float, default=300.0)
    tr.add_argument("--no-dry-run", action="store_true")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train)

    de = sub.add_parser("demo", help="the demo: NAFLD cohort, three hospitals, one job")
    desub = de.add_subparsers(dest="action")
    pr = desub.add_parser("prepare", help="write the demo cohort: records + schema per hospital")
    pr.add_argument("--out", required=True, type=Path)
    pr.add_argument("--sites", type=int, default=3)
    pr.add_argument("--seed", type=int, default=0)
    pr.set_defaults(func=cmd_demo_prepare)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.parse_args([*(argv or sys.argv[1:]), "--help"])
        return 2
    try:
        return int(func(args) or 0)
    except FedMTLError as e:
        print(f"fedmtl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
