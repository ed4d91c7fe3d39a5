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

    _say(f"launching datasite at {args.home} ...")
    handle = launch(
        home=args.home,
        name=args.name,
        records=args.records,
        schema=args.schema,
        port=args.port,
        host=args.host,
        admin_email=args.admin_email,
        policy=args.policy,
        test_fraction=args.test_fraction,
        split_seed=args.split_seed,
        warn=lambda msg: _say(f"warning: {msg}", err=True),
        db_url=args.db,
    )
    _say(f"datasite {handle.name!r} running at {handle.url}")
    _say(f"  admin: {handle.admin_email}  (password in {handle.home / 'secrets' / 'admin_password'})")
    _say(f"  dataset: {handle.dataset}")
    _say(f"  database: {handle.database}")
    _say(f"  test split: {_split_line(handle.home)}")
    if args.detach:
        handle._process = None  # leave it running; `fedmtl datasite stop` stops it
        return 0
    _say("press Ctrl-C to stop")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while handle.is_running():
            time.sleep(1)
        _say("the datasite server exited; see logs/server.log in its home", err=True)
        return 1
    except KeyboardInterrupt:
        _say("\nstopping ...")
    finally:
        handle.stop()
    _say("stopped")
    return 0


def _split_line(home: Path) -> str:
    from fedmtl.datasites.launch import home_split, split_note

    return split_note(home_split(home))


def cmd_datasite_schema_infer(args: argparse.Namespace) -> int:
    from fedmtl.datasites.schema_infer import infer_file
    from fedmtl.fsutil import atomic_write_bytes

    if args.out is not None and args.out.exists() and not args.force:
        raise FedMTLError(f"{args.out} exists; choose another --out, or add --force to replace it")
    if args.out is not None and args.out.resolve() == args.records.resolve():
        raise FedMTLError("--out names the records file itself; choose another file for the schema")
    draft = infer_file(args.records, name=args.name)
    text = draft.toml()
    if args.out is None:
        sys.stdout.write(text)
    else:
        atomic_write_bytes(args.out, text.encode("utf-8"))
    err = sys.stderr
    where = args.out or "standard output"
    print(f"drafted a schema for {args.records} ({draft.n_rows} rows, {len(draft.columns)} columns) "
          f"to {where}", file=err)
    print(f"  id: {draft.id_column or '(none found)'}", file=err)
    print(f"  labels (suggested): {', '.join(draft.labels) or '(none)'}", file=err)
    print(f"  split: {draft.split_column or '(none: launch with --test-fraction 0.2 to hold out a test split)'}",
          file=err)
    if draft.problems:
        print("to fix in the schema (or the export) before launch:", file=err)
        for p in draft.problems:
            print(f"  - {p}", file=err)
    schema_arg = args.out or "schema.toml"
    split_arg = "" if draft.split_column else " --test-fraction 0.2"
    print(f"next: read every CHECK comment in {schema_arg} (reference: docs/schema.md), then\n"
          f"  fedmtl datasite launch --name {draft.name} --records {args.records} --schema {schema_arg} "
          f"--home ./{draft.name}{split_arg}", file=err)
    return 0


def _add_schema_parser(dsub) -> None:
    sc = dsub.add_parser(
        "schema", help="draft a records schema from an export (schema infer)",
        description="Write the schema a datasite needs (docs/schema.md) without writing it by hand.",
    )
    ssub = sc.add_subparsers(dest="schema_action", required=True, metavar="{infer}",
                             help="infer: draft a schema from a CSV/Parquet export")
    inf = ssub.add_parser(
        "infer", help="draft a schema (TOML) from a CSV/Parquet export",
        description="Reads the export and drafts a schema: column types (numeric, categorical, "
        "binary), categories, observed ranges rounded outward, missing values, the likely patient "
        "id, suggested label columns and a train/test split column if present. Every guess is "
        "marked CHECK in a comment: read them, edit the file, then launch with it. Nothing but "
        "--out is written. Reference: docs/schema.md.",
    )
    inf.add_argument("--records", required=True, type=Path,
                     help="the export: a CSV (.csv, UTF-8, header row) or Parquet (.parquet, .pq) file")
    inf.add_argument("--out", type=Path, metavar="FILE",
                     help="write the draft here (e.g. schema.toml); default: print it to standard output")
    inf.add_argument("--name", metavar="DATASET",
                     help="the dataset name in the draft's [dataset] table (default: from the file name)")
    inf.add_argument("--force", action="store_true", help="replace --out if it exists")
    inf.set_defaults(func=cmd_datasite_schema_infer)


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
    from fedmtl.jobspec import JobSpec
    from fedmtl.researcher.job import Job
    from fedmtl.researcher.session import Session

    session = Session.connect(args.sites)
    _say(f"connected to {', '.join(sorted(session.sites))}")
    if (Path(args.out) / "job.json").exists():
        job = Job.resume(session, args.out)
        _say(f"resuming job {job.job_id} in {args.out}")
    else:
        if args.job is None:
            raise FedMTLError(f"{args.out} holds no job yet: give the job spec with --job FILE")
        spec = JobSpec.load(args.job)
        job = session.job(spec, out=args.out)
        if not args.no_dry_run:
            _say("dry run on the sites' mock data ...")
            job.dry_run()
        job.submit()
        _say(f"submitted job {job.job_id}; waiting for the sites' review ...")
    for site, st in job.wait_for_review(args.review_timeout).items():
        _say(f"  {site}: {st['status']}{' - ' + st['reason'] if st['reason'] else ''}")
    result = job.run(progress=not args.quiet, review_timeout=args.review_timeout)
    result.save(Path(args.out) / "result")
    table = result.metrics_table()
    last = table[table["round"] == table["round"].max()]
    _say(last.to_string(index=False))
    _say("epsilon spent per site: " + ", ".join(f"{s}={e:.2f}" for s, e in sorted(result.epsilon.items())))
    _say(f"result saved to {Path(args.out) / 'result'}")
    return 0


def cmd_job_price(args: argparse.Namespace) -> int:
    from fedmtl.jobspec import JobSpec
    from fedmtl.researcher.job import price, price_table
    from fedmtl.researcher.session import Session

    spec = JobSpec.load(args.job)
    session = Session.connect(args.sites)
    rows = price(session, spec, budget=not args.no_budget)
    if args.json:
        import math

        plain = {s: {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()}
                 for s, r in rows.items()}  # JSON has no infinity (a job without DP)
        print(json.dumps(plain, indent=2))
        return 0
    _say(f"job {spec.name!r}: epsilon per site at delta={spec.delta:g} ({spec.accountant}), "
         "training rounds and evaluation releases together")
    _say(price_table(rows))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fedmtl.researcher.demo import markdown_table, run_demo

    sweep = tuple(float(x) for x in args.sweep.split(",")) if args.sweep else (1.0, args.epsilon, 8.0)
    report = run_demo(out=args.out, sites=args.sites, rounds=args.rounds, epsilon=args.epsilon,
                      sweep=tuple(sorted(set(sweep))), quick=args.quick, seed=args.seed)
    _say()
    _say(markdown_table(report))
    return 0


# -- compliance: audit ----------------------------------------------------------------


def _audit_verify_key(home: Path, pinned: str | None):
    """(VerifyKey, where it came from): the pinned ``--verify-key`` or HOME/public_keys.json."""
    from fedmtl.privacy.keys import VerifyKey

    if pinned is not None:
        try:
            raw = bytes.fromhex(pinned.strip())
            if len(raw) != 32:
                raise ValueError(f"{len(raw)} bytes")
            return VerifyKey.from_bytes(raw), "pinned with --verify-key"
        except ValueError as e:
            raise FedMTLError(
                f"--verify-key must be the datasite's Ed25519 public key as 64 hex characters ({e}); "
                "it is the \"ed25519\" field of HOME/public_keys.json, obtained out of band"
            ) from None
    path = home / "public_keys.json"
    try:
        hex_key = json.loads(path.read_text(encoding="utf-8"))["ed25519"]
        return VerifyKey.from_bytes(bytes.fromhex(hex_key)), f"read from {path} (not pinned)"
    except FileNotFoundError:
        raise FedMTLError(
            f"{path} does not exist: is {home} a datasite home? Give the key with --verify-key HEX"
        ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise FedMTLError(f"{path} holds no valid \"ed25519\" key ({e}); give the key with --verify-key HEX") from None


def _eps(x) -> str:
    if x is None:
        return "-"
    try:
        return f"{float(x):.4g}"
    except (TypeError, ValueError):
        return str(x)


def _request_table(rows) -> str:
    head = ("request", "researcher", "status", "decided by", "eps approved", "eps charged", "rounds", "warning shown")
    body = [
        (
            str(r["request_id"]),
            str(r["researcher"]),
            str(r["status"]),
            f"{r['decided_by']} ({r['mode']})" if r.get("decided_by") else "-",
            _eps(r.get("epsilon_approved")),
            _eps(r.get("epsilon_charged")),
            f"{len(r.get('rounds_executed') or [])}/{r.get('rounds_approved')}",
            "yes" if r.get("warning_shown") else "",
        )
        for r in rows
    ]
    if not body:
        return "  (no requests)"
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = "  " + "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head)] + [fmt.format(*b) for b in body]
    for r in rows:
        for reason in r.get("reasons") or []:
            lines.append(f"    {r['request_id']}: {reason}")
    return "\n".join(lines)


def _verification_lines(v, key_source: str) -> list[str]:
    lines = [f"ledger: {v.path}", f"verify key: {v.fingerprint[:16]}... {key_source}"]
    if v.ok:
        lines.append(f"verification: OK ({v.entries} entries, chain and signatures intact)")
    else:
        lines.append(f"verification: FAILED ({len(v.problems)} problem(s))")
        lines += [f"  - {p}" for p in v.problems]
    lines += [f"  warning: {w}" for w in v.warnings]
    return lines


def cmd_audit(args: argparse.Namespace) -> int:
    from fedmtl.datasites.audit import audit, researcher_view
    from fedmtl.datasites.ledger import LEDGER_FILE, verify

    home = Path(args.home)
    if not home.is_dir():
        raise FedMTLError(f"--home {home} is not a folder; give the datasite's home folder")
    if not (home / LEDGER_FILE).is_file():
        raise FedMTLError(f"{home} holds no ledger ({LEDGER_FILE}); is it a datasite home?")
    if args.expected_count is not None and args.expected_count < 0:
        raise FedMTLError("--expected-count must be >= 0 (the entry count of your last audit)")
    key, source = _audit_verify_key(home, args.verify_key)
    if args.researcher:
        v = verify(home, key, expected_count=args.expected_count)
        view = researcher_view(home / LEDGER_FILE, args.researcher)
        if args.json:
            print(json.dumps({"verification": {"ok": v.ok, "problems": list(v.problems)}, **view.to_dict()},
                             indent=2, default=str))
        else:
            print(f"ledger verification: {'OK' if v.ok else 'FAILED'}")
            print(f"researcher {view.email}")
            print(_request_table(view.requests))
            for ds in sorted(set(view.epsilon_spent) | set(view.budget_left)):
                print(f"  {ds}: epsilon spent {_eps(view.epsilon_spent.get(ds))}, "
                      f"budget left {_eps(view.budget_left.get(ds))}")
        return 0 if v.ok else 1
    rep = audit(home, key, out_dir=args.out, expected_count=args.expected_count)
    v = rep.verification
    if args.json:
        print(json.dumps({**rep.to_dict(), "html": str(rep.html_path), "json": str(rep.json_path)},
                         indent=2, sort_keys=True, default=str))
        return 0 if rep.ok else 1
    for line in _verification_lines(v, source):
        print(line)
    print("requests:")
    print(_request_table(rep.requests))
    for label, spent in (("dataset", rep.dataset_spent), ("researcher", rep.researcher_spent)):
        if spent:
            print(f"epsilon spent per {label}: " + ", ".join(f"{k}={_eps(e)}" for k, e in sorted(spent.items())))
    print(f"report: {rep.html_path}")
    print(f"data:   {rep.json_path}")
    if rep.ok:
        print(f"keep the entry count {v.entries} and pass it as --expected-count to the next audit")
    return 0 if rep.ok else 1


# -- data owner: manual review ------------------------------------------------------


def _reviewer_default() -> str:
    import getpass as _gp
    import socket

    try:
        return f"{_gp.getuser()}@{socket.gethostname()}"
    except Exception:  # noqa: BLE001 - no login name (containers)
        return ""


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise FedMTLError("cannot ask for confirmation (stdin is not a terminal); add --yes")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def cmd_datasite_review(args: argparse.Namespace) -> int:
    from fedmtl.datasites import manual_review as mr
    from fedmtl.datasites.admin import admin_client
    from fedmtl.datasites.policy import ADVISORY_ID

    target = args.approve or args.deny
    if (args.reason or args.acknowledge) and not target:
        raise FedMTLError("--reason and --acknowledge go with --approve ID or --deny ID")
    if target and args.show:
        raise FedMTLError("give either --show ID or --approve/--deny ID, not both")
    client = admin_client(args.home)  # raises "not running" with what to do
    if args.show:
        details = mr.show_request(args.home, args.show, client=client, dry_run=not args.no_dry_run)
        print(json.dumps(details.to_dict(), indent=2, default=str) if args.json else details.render())
        return 0
    if not target:
        rows = mr.list_requests(args.home, client=client, include_decided=args.all)
        if args.json:
            print(json.dumps([r.to_dict() for r in rows], indent=2))
            return 0
        if not rows:
            print("no requests waiting for review" if not args.all else "no requests")
            return 0
        head = ("request", "syft id", "researcher", "code", "syft", "ledger")
        body = [(r.request_id, (r.syft_id or "-")[:12], r.researcher, r.code_name, r.syft_status,
                 r.ledger_status) for r in rows]
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        print(fmt.format(*head))
        for b in body:
            print(fmt.format(*b))
        print("\nshow one with --show ID; decide with --approve ID or --deny ID --reason TEXT")
        return 0

    approve = bool(args.approve)
    reviewer = args.reviewer or _reviewer_default()
    if not reviewer:
        raise FedMTLError("give your name with --reviewer NAME; it goes to the ledger")
    details = mr.show_request(args.home, target, client=client, dry_run=False)
    d = details.decision
    if details.summary.ledger_status not in ("unknown", "pending", "pending_manual") and \
            details.summary.syft_status != "pending":
        raise FedMTLError(f"request {details.summary.request_id} was already decided "
                          f"({details.summary.ledger_status}); decisions are final")
    print(f"request {details.summary.request_id} from {details.summary.researcher}: code "
          f"{details.summary.code_name} ({'template ' + repr(details.template) if details.template else 'NOT a template'}), "
          f"epsilon {_eps(d.epsilon_job)}; policy: {d.status}")
    for r in (*details.problems, *d.reasons):
        print(f"  - {r}")
    acknowledged = False
    if approve and d.warnings:
        for w in d.warnings:
            print(f"\nWARNING ({ADVISORY_ID}): {w}\n", file=sys.stderr)
        if args.yes:
            if (args.acknowledge or "").strip().upper() != ADVISORY_ID:
                raise FedMTLError(
                    f"approving code that is not an allowed template needs --acknowledge {ADVISORY_ID} "
                    "with --yes (after reading the warning above); it is recorded in the ledger"
                )
            acknowledged = True
    reason = args.reason
    if not reason:
        if args.yes or not sys.stdin.isatty():
            raise FedMTLError("give the reason with --reason TEXT; it goes to the ledger and the researcher")
        reason = input("reason (goes to the ledger and the researcher): ").strip()
    if not args.yes:
        q = f"{'approve' if approve else 'deny'} request {details.summary.request_id} as {reviewer}?"
        if approve and d.warnings:
            q = f"I have read the {ADVISORY_ID} warning and the code; " + q
        if not _confirm(q):
            print("nothing changed")
            return 1
        acknowledged = acknowledged or (approve and bool(d.warnings))
    out = mr.decide_request(
        args.home, target, approve=approve, reviewer=reviewer, reason=reason,
        warnings_acknowledged=acknowledged, client=client,
    )
    print(out.render())
    return 0


def _add_review_parser(dsub) -> None:
    rv = dsub.add_parser(
        "review", help="list, show, approve or deny pending code requests (the datasite must be running)"
    )
    rv.add_argument("--home", required=True, type=Path)
    act = rv.add_mutually_exclusive_group()
    act.add_argument("--list", action="store_true", help="list requests waiting for a person (the default)")
    act.add_argument("--show", metavar="ID", help="code, diff against the template, parameters, epsilon, dry run")
    act.add_argument("--approve", metavar="ID", help="approve a request (job id or syft request id)")
    act.add_argument("--deny", metavar="ID", help="deny a request")
    rv.add_argument("--reason", help="why (required to approve or deny; the researcher sees it)")
    rv.add_argument("--reviewer", help="your name or email for the ledger (default: login@host)")
    rv.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    rv.add_argument("--acknowledge", metavar="ADVISORY",
                    help="with --yes: approve non-template code having read the advisory warning "
                    "(give its id, PYSEC-2026-546)")
    rv.add_argument("--all", action="store_true", help="with --list: also decided requests")
    rv.add_argument("--no-dry-run", action="store_true", help="with --show: skip the mock-data dry run")
    rv.add_argument("--json", action="store_true", help="machine-readable --list / --show")
    rv.set_defaults(func=cmd_datasite_review)


# -- data owner: pinned peers -------------------------------------------------------


def cmd_datasite_peers(args: argparse.Namespace) -> int:
    from fedmtl.datasites import peers

    if args.peers_action == "list":
        own = peers.own_fingerprint(args.home)
        pinned = peers.list_peers(args.home)
        if args.json:
            print(json.dumps({"self": {"name": own.name, "fingerprint": own.fingerprint},
                              "peers": [p.to_dict() for p in pinned]}, indent=2))
            return 0
        print(f"this datasite: {own.name}  {own.fingerprint}")
        if not pinned:
            print("no peers pinned: every job naming another site is denied; pin them with "
                  "`fedmtl datasite peers add --home HOME --name NAME --fingerprint HEX`")
        for p in pinned:
            print(f"peer: {p.name}  {p.fingerprint}")
        return 0
    who = args.who or _reviewer_default()
    if not who:
        raise FedMTLError("give your name with --who EMAIL; it goes to the ledger")
    if args.peers_action == "add":
        pinned = peers.add_peer(args.home, name=args.name, fingerprint=args.fingerprint, who=who).peer_by_name(args.name)
        print(f"pinned peer {pinned.name} {pinned.fingerprint}; recorded in the ledger by {who}")
    else:
        peers.remove_peer(args.home, name=args.name, who=who)
        print(f"removed peer {args.name}; jobs naming it are now denied; recorded in the ledger by {who}")
    return 0


def _add_peers_parser(dsub) -> None:
    pe = dsub.add_parser(
        "peers", help="pin the other datasites of the federation (name + identity fingerprint)",
        description="A job's roster may only name this datasite and pinned peers. Exchange fingerprints "
        "with the other owners out of band (`fedmtl datasite status` prints this site's own). Every "
        "change is recorded in the ledger and applies to the next request, also on a running datasite.",
    )
    psub = pe.add_subparsers(dest="peers_action", required=True, metavar="{add,remove,list}",
                             help="add or remove a pinned peer, or list them")
    home_help = "the datasite's home folder"
    who_help = "your name or email for the ledger (default: login@host)"
    add = psub.add_parser("add", help="pin a peer datasite (replaces an earlier pin of the same name)")
    add.add_argument("--home", required=True, type=Path, help=home_help)
    add.add_argument("--name", required=True, help="the peer's datasite name, as its owner launched it")
    add.add_argument("--fingerprint", required=True, metavar="HEX",
                     help="the peer's identity fingerprint: 64 hex characters its owner gave you "
                     "(from `fedmtl datasite status`)")
    add.add_argument("--who", metavar="EMAIL", help=who_help)
    rm = psub.add_parser("remove", help="unpin a peer: jobs naming it are denied from now on")
    rm.add_argument("--home", required=True, type=Path, help=home_help)
    rm.add_argument("--name", required=True, help="the pinned peer's datasite name")
    rm.add_argument("--who", metavar="EMAIL", help=who_help)
    ls = psub.add_parser("list", help="this datasite's own fingerprint and the pinned peers")
    ls.add_argument("--home", required=True, type=Path, help=home_help)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    pe.set_defaults(func=cmd_datasite_peers)


def cmd_datasite_proxy_config(args: argparse.Namespace) -> int:
    from fedmtl.datasites.proxy import nginx_server_block
    from fedmtl.fsutil import atomic_write_bytes

    text = nginx_server_block(
        domain=args.domain,
        port=args.port,
        cert=args.cert,
        key=args.key,
        upstream_port=args.upstream_port,
        listen=args.listen,
        max_body=args.max_body,
    )
    if args.out is None:
        sys.stdout.write(text)
    else:
        atomic_write_bytes(args.out, text.encode("utf-8"))
        print(f"wrote {args.out}", file=sys.stderr)
    url = f"https://{args.domain}:{args.port}"
    if args.port != 443:
        print(f"warning: researchers on syft 0.9.5 cannot reach {url}: its client connects to https "
              "datasites on port 443 only; serve --port 443 unless every client has a fix", file=sys.stderr)
    print(f"next: put it in nginx's http context (e.g. /etc/nginx/conf.d/), `nginx -t`, reload nginx; "
          f"researchers then connect to {url}", file=sys.stderr)
    return 0


def _add_proxy_parser(dsub) -> None:
    px = dsub.add_parser(
        "proxy-config", help="print an nginx server block that serves a datasite over HTTPS",
        description="TLS ends at nginx on --port; nginx proxies to the datasite on loopback "
        "(--upstream-port, the datasite's --port). The block allows syft's large uploads and long "
        "training calls. Printed on standard output, or written to --out.",
    )
    px.add_argument("--domain", required=True, help="the host name researchers connect to (and the certificate's)")
    px.add_argument("--port", type=int, default=443,
                    help="the HTTPS port nginx listens on (default 443: syft 0.9.5 clients reach https on 443 only)")
    px.add_argument("--cert", type=Path, help="certificate chain, PEM (default: certbot's for --domain)")
    px.add_argument("--key", type=Path, help="the certificate's private key, PEM")
    px.add_argument("--upstream-port", type=int, default=8080,
                    help="the port the datasite listens on at 127.0.0.1 (its launch --port; default 8080)")
    px.add_argument("--listen", metavar="ADDRESS", help="listen on this address only (default: all)")
    px.add_argument("--max-body", default="10g", help="largest upload nginx lets through (default 10g)")
    px.add_argument("--out", type=Path, help="write the block to this file instead of printing it")
    px.set_defaults(func=cmd_datasite_proxy_config)


def _add_audit_parser(sub) -> None:
    au = sub.add_parser("audit", help="compliance: verify a datasite's privacy ledger and write a report")
    au.add_argument("--home", required=True, type=Path, help="the datasite's home folder")
    au.add_argument("--out", type=Path, help="where report.html and report.json go (default HOME/audit)")
    au.add_argument("--verify-key", metavar="HEX",
                    help="the datasite's Ed25519 public key, pinned out of band (default: HOME/public_keys.json)")
    au.add_argument("--expected-count", type=int, metavar="N",
                    help="entries the last audit saw: detects a rollback of ledger and head together")
    au.add_argument("--researcher", metavar="EMAIL", help="only this researcher's own requests and spend")
    au.add_argument("--json", action="store_true", help="print the report as JSON")
    au.set_defaults(func=cmd_audit)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedmtl", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    ds = sub.add_parser("datasite", help="data owner: run a hospital's datasite")
    dsub = ds.add_subparsers(dest="action", required=True)
    la = dsub.add_parser("launch", help="launch (first time: create) a datasite")
    la.add_argument("--home", required=True, type=Path,
                    help="the datasite's home folder: created on first launch, reused on relaunch")
    la.add_argument("--name", help="first launch: the datasite's name (lower case, digits, '-'; e.g. st-mary)")
    la.add_argument("--records", type=Path,
                    help="first launch: the export to publish (CSV or Parquet, one row per patient)")
    la.add_argument("--schema", type=Path,
                    help="first launch: the records schema (TOML; draft one with `fedmtl datasite schema "
                    "infer --records FILE --out schema.toml`; reference docs/schema.md)")
    la.add_argument("--port", type=int, default=8080)
    la.add_argument("--host", default="127.0.0.1")
    la.add_argument("--admin-email")
    la.add_argument("--policy", type=Path, help="policy file (TOML/YAML); default: templates only, auto-approve")
    la.add_argument("--detach", action="store_true", help="return once running; stop with `datasite stop`")
    la.add_argument(
        "--db", metavar="URL",
        help="run on PostgreSQL: postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME, an empty database of "
        "its own (password also from FEDMTL_DB_PASSWORD); remembered in the home without the password. "
        "Default: SQLite in HOME/db",
    )
    la.add_argument("--test-fraction", type=float, metavar="F",
                    help="first launch, records without a split column: hold out this share of the "
                    "patients (e.g. 0.2) as the test split, stratified by the first label column; "
                    "recorded in the dataset's metadata. Without a split, evaluation runs on the "
                    "training records")
    la.add_argument("--split-seed", type=int, default=0, metavar="N",
                    help="seed of the --test-fraction draw (default 0; the same seed gives the same split)")
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
    _add_review_parser(dsub)
    _add_peers_parser(dsub)
    _add_proxy_parser(dsub)
    _add_schema_parser(dsub)

    _add_audit_parser(sub)

    tr = sub.add_parser("train", help="researcher: run a federated job over datasites")
    tr.add_argument("--sites", required=True, type=Path, help="sites file (TOML)")
    tr.add_argument("--job", type=Path, help="job spec (TOML/YAML/JSON); not needed to resume")
    tr.add_argument("--out", required=True, type=Path, help="job folder (checkpoints, result)")
    tr.add_argument("--review-timeout", type=float, default=300.0)
    tr.add_argument("--no-dry-run", action="store_true")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train)
    jb = sub.add_parser("job", help="researcher: plan a job before running it")
    jsub = jb.add_subparsers(dest="action", required=True)
    jp = jsub.add_parser("price", help="epsilon of a job at each site, and your budget left there",
                         description="Connects to the sites, checks the job spec against their schemas and "
                         "prints, per site, the epsilon of the whole job (training rounds and evaluation "
                         "releases) and your researcher budget left there. Submits nothing and charges "
                         "nothing. A site publishes no budgets: yours is read through an approved job of "
                         "yours at that site, so it is unknown before your first one.")
    jp.add_argument("--job", required=True, type=Path, help="job spec (TOML/YAML/JSON)")
    jp.add_argument("--sites", required=True, type=Path, help="sites file (TOML), as for `fedmtl train`")
    jp.add_argument("--no-budget", action="store_true", help="epsilon only: do not look up budgets left")
    jp.add_argument("--json", action="store_true", help="machine-readable output")
    jp.set_defaults(func=cmd_job_price)

    de = sub.add_parser("demo", help="the demo: NAFLD cohort, three hospitals, one job")
    de.add_argument("--out", type=Path, default=Path("demo-out"))
    de.add_argument("--sites", type=int, default=3)
    de.add_argument("--rounds", type=int, default=5)
    de.add_argument("--epsilon", type=float, default=3.0, help="epsilon per site of the main job")
    de.add_argument("--sweep", default="", help="epsilons compared, e.g. 1,3,8")
    de.add_argument("--quick", action="store_true", help="a fast run (2 rounds, short baselines)")
    de.add_argument("--seed", type=int, default=0)
    de.set_defaults(func=cmd_demo)
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
        print(f"fedmtl: error: {e}", file=_console(err=True))
        return 2
    except KeyboardInterrupt:
        _restore_streams()  # a Ctrl-C inside a syft call may have left its output sink in
        _say("interrupted", err=True)
        return 130


def _console(err: bool = False):
    """The user's terminal, never the sink that syft's quieting swaps in for sys.stdout."""
    from fedmtl.datasites.syftio import console

    return console(err)


def _say(*values, err: bool = False) -> None:
    """``print`` for messages to the user of commands that call syft (they may run while
    another thread is inside a quiet syft call, or after a Ctrl-C cut one short)."""
    print(*values, file=_console(err), flush=True)


def _restore_streams() -> None:
    from fedmtl.datasites.syftio import restore_streams

    restore_streams()


if __name__ == "__main__":
    sys.exit(main())
