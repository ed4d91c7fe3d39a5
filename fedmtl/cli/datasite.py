"""``fedmtl datasite ...``: the data owner's commands (launch, stop, status, add-researcher,
schema infer, peers, proxy-config). ``datasite review`` is in :mod:`fedmtl.cli.review`."""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import os
import signal
import sys
import time
from pathlib import Path

from fedmtl.cli.terminal import login_at_host, say
from fedmtl.errors import ConfigError, FedMTLError
from fedmtl.fsutil import atomic_write_bytes
from fedmtl.schema import Schema, merge_schemas, schema_differences

RESEARCHER_PASSWORD_ENV = "FEDMTL_RESEARCHER_PASSWORD"
ADMIN_PASSWORD_ENV = "FEDMTL_ADMIN_PASSWORD"  # fedmtl.datasites.server.launch reads it; here the parser needs no import
#: how to pass the researcher's password: the same words in --help, the README and the notebooks
PASSWORD_HOWTO = (
    f"The researcher's password (at least 10 characters): set {RESEARCHER_PASSWORD_ENV}, or pipe it "
    "with --password-stdin; on a terminal without either, it is asked for twice."
)


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
    from fedmtl.datasites.server.launch import launch

    say(f"launching datasite at {args.home} ...")
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
        warn=lambda msg: say(f"warning: {msg}", err=True),
        db_url=args.db,
    )
    say(f"datasite {handle.name!r} running at {handle.url}")
    say(f"  admin: {handle.admin_email}  (password in {handle.home / 'secrets' / 'admin_password'})")
    say(f"  dataset: {handle.dataset}")
    say(f"  database: {handle.database}")
    say(f"  test split: {_split_line(handle.home)}")
    if args.detach:
        handle._process = None  # leave it running; `fedmtl datasite stop` stops it
        return 0
    say("press Ctrl-C to stop")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while handle.is_running():
            time.sleep(1)
        say("the datasite server exited; see logs/server.log in its home", err=True)
        return 1
    except KeyboardInterrupt:
        say("\nstopping ...")
    finally:
        handle.stop()
    say("stopped")
    return 0


def _split_line(home: Path) -> str:
    from fedmtl.datasites.server.launch import home_split, split_note

    return split_note(home_split(home))


def cmd_datasite_schema_infer(args: argparse.Namespace) -> int:
    from fedmtl.datasites.data.schema_infer import infer_file

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
        "schema", help="draft a records schema from an export (infer); make the sites' drafts one (merge, diff)",
        description="Write the schema a datasite needs (docs/schema.md) without writing it by hand, and "
        "agree on one schema across the federation's sites.",
    )
    ssub = sc.add_subparsers(dest="schema_action", required=True, metavar="{infer,merge,diff}",
                             help="infer: draft a schema from a CSV/Parquet export; merge: one shared "
                             "schema from the sites' drafts; diff: what differs between schemas")
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
    _add_schema_merge_diff_parsers(ssub)


def cmd_datasite_schema_merge(args: argparse.Namespace) -> int:
    if args.out is not None and args.out.exists() and not args.force:
        raise FedMTLError(f"{args.out} exists; choose another --out, or add --force to replace it")
    if args.out is not None and any(args.out.resolve() == p.resolve() for p in args.schemas):
        raise FedMTLError("--out names one of the drafts; write the shared schema to another file")
    labels = [str(p) for p in args.schemas]
    schemas = [Schema.load(p) for p in args.schemas]
    merged = merge_schemas(schemas, labels, name=args.name, description=args.description)
    text = (f"# The federation's shared records schema, merged by `fedmtl datasite schema merge` from\n"
            f"# {', '.join(labels)}: ranges and categories are the union of the drafts. Every site\n"
            "# launches with this file (reference: docs/schema.md, 'One schema for the federation').\n\n"
            + merged.dumps())
    if args.out is None:
        sys.stdout.write(text)
    else:
        atomic_write_bytes(args.out, text.encode("utf-8"))
    err = sys.stderr
    print(f"merged {len(schemas)} schemas into {args.out or 'standard output'} ({len(merged.columns)} columns)",
          file=err)
    for d in schema_differences(schemas):
        print(f"  {d.describe(labels)}", file=err)
    if args.name is None and len({s.name for s in schemas}) > 1:
        print("  the drafts name different datasets: the shared schema names none, so each site publishes "
              "SITE-records (give --name to name the dataset)", file=err)
    print(f"next: give {args.out or 'the shared schema'} to every site's owner; each launches with "
          f"`fedmtl datasite launch ... --schema {args.out or 'shared.toml'}` (launch validates the export "
          "against it)", file=err)
    return 0


def cmd_datasite_schema_diff(args: argparse.Namespace) -> int:
    if len(args.schemas) < 2:
        raise FedMTLError("give two or more schema files to compare")
    labels = [str(p) for p in args.schemas]
    diffs = schema_differences([Schema.load(p) for p in args.schemas], columns_only=args.columns_only)
    if not diffs:
        print(f"{' and '.join(labels)} declare the same "
              + ("columns" if args.columns_only else "columns and [dataset] table"))
        return 0
    for d in diffs:
        print(d.describe(labels))
    return 1


def _add_schema_merge_diff_parsers(ssub) -> None:
    files_help = "the schemas (TOML), e.g. each site's draft from `schema infer`"
    me = ssub.add_parser(
        "merge", help="one shared schema from the sites' drafts (union of ranges and categories)",
        description="Merges two or more schemas column by column: numeric ranges become their union "
        "(the least min, the greatest max), categories their union, missing is true if any draft "
        "allows it. Every column must be in every draft, and role, type, transform and a label's "
        "categories must agree: each conflict is named (column, key, which file says what) and "
        "nothing is written. Reference: docs/schema.md, 'One schema for the federation'.",
    )
    me.add_argument("schemas", nargs="+", type=Path, metavar="SCHEMA", help=files_help)
    me.add_argument("--out", type=Path, metavar="FILE",
                    help="write the shared schema here (e.g. shared.toml); default: standard output")
    me.add_argument("--name", metavar="DATASET",
                    help="the shared [dataset] name: every site publishes its dataset under it (default: the "
                    "drafts' name if they agree, else none: each site publishes SITE-records)")
    me.add_argument("--description", metavar="TEXT", help="the shared [dataset] description")
    me.add_argument("--force", action="store_true", help="replace --out if it exists")
    me.set_defaults(func=cmd_datasite_schema_merge)
    di = ssub.add_parser(
        "diff", help="what differs between schemas, column by column and key by key",
        description="Prints one line per difference (a column some schemas lack, or one key of a column "
        "or of [dataset], with each file's value). Exit status 0: the same; 1: they differ; 2: a file "
        "could not be read.",
    )
    di.add_argument("schemas", nargs="+", type=Path, metavar="SCHEMA", help=files_help)
    di.add_argument("--columns-only", action="store_true",
                    help="compare the columns only, not [dataset] (what a job needs the sites to share)")
    di.set_defaults(func=cmd_datasite_schema_diff)


def cmd_datasite_stop(args: argparse.Namespace) -> int:
    from fedmtl.datasites.server.admin import stop

    print("stopped" if stop(args.home) else "not running")
    return 0


def cmd_datasite_status(args: argparse.Namespace) -> int:
    from fedmtl.datasites.server.admin import status

    st = status(args.home)
    print(json.dumps(st.to_dict(), indent=2) if args.json else st.render())
    return 0


def cmd_datasite_add_researcher(args: argparse.Namespace) -> int:
    from fedmtl.datasites.server.admin import add_researcher

    password = _read_password(args, RESEARCHER_PASSWORD_ENV, f"password for {args.email}: ")
    add_researcher(home=args.home, email=args.email, password=password, name=args.full_name)
    print(f"researcher {args.email} registered")
    return 0


# -- data owner and compliance officer: the review console ----------------------------


def cmd_datasite_console(args: argparse.Namespace) -> int:
    from fedmtl.datasites.console.app import open_console, serve

    reviewer = args.reviewer or login_at_host()
    app, guard, sock = open_console(args.home, reviewer=reviewer, host=args.host, port=args.port,
                                    allow_remote=args.allow_remote)
    say(f"review console of {args.home} (decisions recorded as {reviewer})")
    say(f"open: {guard.launch_url()}")
    say("the link holds this launch's secret: do not share it; press Ctrl-C to stop")
    try:
        serve(app, sock)
    except KeyboardInterrupt:
        pass
    say("console stopped")
    return 0


def _add_console_parser(dsub) -> None:
    co = dsub.add_parser(
        "console", help="a local web page to review requests, read the ledger and download the audit",
        description="Serves the review console of a running datasite on 127.0.0.1: pending requests with the "
        "job in plain words and each policy check, approve or deny with a reason (the same signed ledger "
        "entries as `datasite review`), the ledger's timeline and verification, epsilon spent per "
        "researcher and per dataset, the audit report. Prints the URL to open once: it holds a secret "
        "made for this launch.",
    )
    co.add_argument("--home", required=True, type=Path, help="the datasite's home folder (the datasite must be running)")
    co.add_argument("--port", type=int, default=0, help="the port to listen on (default: a free one, printed)")
    co.add_argument("--host", default="127.0.0.1",
                    help="the address to listen on (default 127.0.0.1; reach it from elsewhere with `ssh -L`)")
    co.add_argument("--allow-remote", action="store_true",
                    help="accept a --host that is not loopback (plain HTTP: whoever reaches it with the secret "
                    "can approve requests)")
    co.add_argument("--reviewer", help="your name or email for the ledger (default: login@host)")
    co.set_defaults(func=cmd_datasite_console)


# -- data owner: pinned peers -------------------------------------------------------


def cmd_datasite_peers(args: argparse.Namespace) -> int:
    from fedmtl.datasites.server import peers

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
    who = args.who or login_at_host()
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
    from fedmtl.datasites.server.proxy import nginx_server_block

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
    px.add_argument("--max-body", default=None,
                    help="largest request body nginx lets through (default: what a round call of a model at "
                    "the default policy's parameter cap needs)")
    px.add_argument("--out", type=Path, help="write the block to this file instead of printing it")
    px.set_defaults(func=cmd_datasite_proxy_config)


def cmd_datasite_personalise(args: argparse.Namespace) -> int:
    from fedmtl.models.flat import model_to_vector
    from fedmtl.researcher.personalise import FINETUNE, compare_at_site, comparison_table, site_from_export
    from fedmtl.researcher.result import JobResult

    result = JobResult.load(args.result)
    trained_on = result.schema
    schema = trained_on
    schema_path = args.schema
    if schema_path is None and args.home is not None and (Path(args.home) / "schema.toml").is_file():
        schema_path = Path(args.home) / "schema.toml"  # the datasite's own schema, with its split column
    if schema_path is not None:
        schema = Schema.load(schema_path)
        ours = {c.name: c for c in schema.features}
        theirs = {c.name: c for c in trained_on.features}
        if ours != theirs:
            diff = sorted(set(ours) ^ set(theirs)) or sorted(n for n in ours if ours[n] != theirs.get(n))
            raise ConfigError(f"{schema_path}: its feature columns differ from those the federated model was trained "
                              f"on ({', '.join(diff)}); use the schema your datasite was launched with")
    if args.bootstrap < 100:
        raise ConfigError(f"--bootstrap {args.bootstrap}: a 95% interval needs at least 100 resamples (default 1000)")
    try:
        site, split = site_from_export(args.records, schema, home=args.home, name=args.site)
        kw = {"epochs": args.epochs, "lr": args.lr}
        cmp, tuned = compare_at_site(result, site, seed=args.seed, local=not args.no_local, n_boot=args.bootstrap,
                                     finetune_kw={k: v for k, v in kw.items() if v is not None})
    except FedMTLError:
        raise
    except ValueError as e:
        raise ConfigError(f"{args.records}: {e}") from e
    cmp["split"] = split
    how = ("rebuilt from the datasite's launch record" if split.get("source") == "launch"
           else "the export's split column")
    ft = cmp["finetune"]
    say(f"{args.site}: {cmp['n_train']} training records ({cmp['n_validation']} of them held out for validation) "
        f"and {cmp['n_test']} test records (split {split.get('column')!r}: {how})")
    say(f"fine-tuned without DP at lr {ft['lr']:g}, at most {ft['epochs']:g} epochs (defaults {FINETUNE}): kept "
        f"epoch {ft['best_epoch']} of {ft['epochs_run']} run, the best on the validation split"
        + (" (the federated model itself: no epoch improved on it)" if ft["best_epoch"] == 0 else ""))
    if cmp["local_only"] is not None:
        lo = cmp["local_only"]
        cands = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in lo["validation"].items())
        say(f"local-only, no DP: {lo['chosen']} (the better on the validation split: {cands}; mean AUROC)"
            + (f"; {lo['note']}" if lo.get("note") else ""))
    say(f"AUROC on your own test split, differences with {cmp['bootstrap']['resamples']} paired-bootstrap "
        "resamples of its patients:")
    say(comparison_table(cmp))
    g = (cmp["differences"].get("fine-tuned - local-only") or {}).get("mean") or {}
    if g.get("diff") is not None:
        say(f"federated and fine-tuned here vs training alone: {g['diff']:+.3f} mean AUROC "
            f"(95% interval {g['low']:+.3f} to {g['high']:+.3f})")
    if args.out is not None:
        out = Path(args.out)
        # the federated job's metrics and epsilon do not describe this model (trained on these
        # records without DP): the copy carries neither
        dataclasses.replace(result, global_vector=model_to_vector(tuned), site_heads={}, metrics=[],
                            epsilon={}).save(out / "model")
        atomic_write_bytes(out / "comparison.json", (json.dumps(cmp, indent=2) + "\n").encode("utf-8"))
        say(f"wrote {out / 'comparison.json'} and the fine-tuned model to {out / 'model'} "
             "(JobResult.load(...).predict(records)); it was trained on your records without DP: keep it here")
    return 0


def _add_personalise_parser(dsub) -> None:
    pe = dsub.add_parser(
        "personalise", help="fine-tune the federated model on your own records; compare with training alone",
        description="Run by a hospital on its own export, no datasite needed: fine-tunes the federated model "
        "(a job result folder the researcher shares) on the export's training split without DP, stopping early "
        "on a validation split carved from it; picks the better local-only model (logistic regression or the "
        "job's recipe) on that validation split; and measures the federated, fine-tuned and local-only models on "
        "the export's test split, each difference with a paired-bootstrap 95% interval. The test split is the "
        "export's split column, or with --home the split your datasite made at launch. The fine-tuned model is "
        "trained on your records without DP: it stays with you. See docs/models.md, 'Personalisation at the "
        "hospital'.",
    )
    pe.add_argument("--result", required=True, type=Path, help="the federated job's result folder (result.json, "
                    "weights.npz)")
    pe.add_argument("--records", required=True, type=Path, help="your export (CSV or Parquet) with labels: the "
                    "file your datasite was launched with")
    pe.add_argument("--home", type=Path, help="your datasite's home folder: its schema, and the train/test split "
                    "it made at launch (--test-fraction), rebuilt from its launch record when the export has no "
                    "split column")
    pe.add_argument("--schema", type=Path, help="your records schema (default: your datasite's with --home, else "
                    "the one the model was trained on)")
    pe.add_argument("--site", default="this-hospital", help="your site's name, for the report")
    pe.add_argument("--out", type=Path, help="write comparison.json and the fine-tuned model (model/) here")
    pe.add_argument("--epochs", type=float, help="most fine-tuning passes over the training split; it stops "
                    "earlier when the validation split stops improving (default 5)")
    pe.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                    help="paired-bootstrap resamples of the test split for the intervals (default 1000)")
    pe.add_argument("--lr", type=float, help="fine-tuning learning rate (default 0.05)")
    pe.add_argument("--seed", type=int, default=0, help="seed of the validation split, the fine-tuning, the "
                    "local-only model and the bootstrap")
    pe.add_argument("--no-local", action="store_true", help="skip training the local-only comparison model")
    pe.set_defaults(func=cmd_datasite_personalise)


def _add_control_parsers(dsub) -> None:
    """launch, stop, status, add-researcher, console."""
    home_help = "the datasite's home folder"
    la = dsub.add_parser(
        "launch", help="launch (first time: create) a datasite",
        description="First launch: validates the records against the schema, creates the home folder and "
        "publishes the records as one dataset. Relaunch: --home is enough (--port, --host, --policy "
        "and --db may change). The admin password is generated (HOME/secrets/admin_password), or set "
        f"{ADMIN_PASSWORD_ENV} before the first launch.",
    )
    la.add_argument("--home", required=True, type=Path,
                    help="the datasite's home folder: created on first launch, reused on relaunch")
    la.add_argument("--name", help="first launch: the datasite's name (lower case, digits, '-'; e.g. st-mary)")
    la.add_argument("--records", type=Path,
                    help="first launch: the export to publish (CSV or Parquet, one row per patient)")
    la.add_argument("--schema", type=Path,
                    help="first launch: the records schema (TOML; draft one with `fedmtl datasite schema "
                    "infer --records FILE --out schema.toml`; reference docs/schema.md)")
    la.add_argument("--port", type=int, default=8080, help="the port the datasite listens on (default 8080)")
    la.add_argument("--host", default="127.0.0.1",
                    help="the address it listens on (default 127.0.0.1: loopback only; put a TLS proxy in "
                    "front, see `datasite proxy-config`)")
    la.add_argument("--admin-email", metavar="EMAIL",
                    help="first launch: the admin account's email (default admin@NAME.datasite)")
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
    st = dsub.add_parser("stop", help="stop a datasite", description="Stops the datasite's server and "
                         "waits until its process has exited; the home can then be backed up.")
    st.add_argument("--home", required=True, type=Path, help=home_help)
    st.set_defaults(func=cmd_datasite_stop)
    ss = dsub.add_parser("status", help="is it running, datasets, researchers, pending requests")
    ss.add_argument("--home", required=True, type=Path, help=home_help)
    ss.add_argument("--json", action="store_true", help="machine-readable output")
    ss.set_defaults(func=cmd_datasite_status)
    ar = dsub.add_parser(
        "add-researcher", help="register a researcher (the datasite must be running)",
        description=f"Registers a researcher account. {PASSWORD_HOWTO}",
    )
    ar.add_argument("--home", required=True, type=Path, help=home_help)
    ar.add_argument("--email", required=True, help="the researcher's email: their login")
    ar.add_argument("--full-name", metavar="NAME", help="the researcher's name (default: the email's local part)")
    ar.add_argument("--password-stdin", action="store_true",
                    help="read the password from the first line of standard input "
                    f"(instead of {RESEARCHER_PASSWORD_ENV})")
    ar.set_defaults(func=cmd_datasite_add_researcher)
    _add_console_parser(dsub)
