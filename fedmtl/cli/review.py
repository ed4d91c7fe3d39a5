"""``fedmtl audit`` (verify a datasite's ledger, write the report) and ``fedmtl datasite
review`` (a person lists, shows, approves or denies pending code requests)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from fedmtl.cli.terminal import login_at_host
from fedmtl.errors import FedMTLError, KeyMismatch

# -- compliance: audit ----------------------------------------------------------------


_SEPARATORS = str.maketrans("", "", ": -_\t\n")


def _audit_verify_key(home: Path, pinned: str | None):
    """(VerifyKey, where it came from): the pinned ``--verify-key`` or HOME/public_keys.json.

    ``--verify-key`` is the datasite's fingerprint (what every owner command prints) or its
    raw Ed25519 public key, 64 hex characters either way, any case, with or without
    separators. A fingerprint names the key in HOME/public_keys.json, which must hash to it
    (SHA-256: nobody can make another key with that fingerprint); a value that is neither
    that key nor its fingerprint is refused, naming both fingerprints."""
    from fedmtl.privacy.keys import VerifyKey

    path = home / "public_keys.json"
    home_key, why = None, ""
    try:
        home_key = VerifyKey.from_bytes(bytes.fromhex(json.loads(path.read_text(encoding="utf-8"))["ed25519"]))
    except FileNotFoundError:
        why = f"{path} does not exist"
    except (ValueError, KeyError, TypeError) as e:
        why = f"{path} holds no valid \"ed25519\" key ({e})"
    if pinned is None:
        if home_key is None:
            hint = "is it a datasite home? " if "does not exist" in why else ""
            raise FedMTLError(f"{why}: {hint}give the datasite's fingerprint with --verify-key HEX")
        return home_key, f"read from {path} (not pinned)"
    value = pinned.translate(_SEPARATORS).lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        got = f"{len(value) // 2} bytes" if all(c in "0123456789abcdef" for c in value) else "not hex"
        raise FedMTLError(
            f"--verify-key must be the datasite's fingerprint (or its Ed25519 public key) as 64 hex characters "
            f"({got}); the fingerprint is what `fedmtl datasite status` prints, obtained from its owner out of band"
        )
    if home_key is not None and home_key.fingerprint() == value:
        return home_key, "pinned with --verify-key (fingerprint)"
    if home_key is not None and home_key.to_bytes().hex() == value:
        return home_key, "pinned with --verify-key (public key)"
    if home_key is not None:
        raise KeyMismatch(
            f"the pinned --verify-key is not this datasite's key: {path} holds the key with fingerprint "
            f"{home_key.fingerprint()}; you pinned {value} (read as a public key, its fingerprint is "
            f"{hashlib.sha256(bytes.fromhex(value)).hexdigest()}). Check the value with the datasite's owner; "
            "if it is right, the home's keys were replaced and its ledger cannot be trusted"
        )
    try:  # no key in the home (a ledger copied alone): only the public key itself can verify
        return VerifyKey.from_bytes(bytes.fromhex(value)), "pinned with --verify-key (public key)"
    except ValueError:
        raise FedMTLError(
            f"{why}, so a fingerprint cannot be checked here, and {value[:16]}... is no Ed25519 public key; "
            "give the datasite's public key (the \"ed25519\" field of its public_keys.json) with --verify-key"
        ) from None


def _eps(x) -> str:
    if x is None:
        return "-"
    try:
        return f"{float(x):.4g}"
    except (TypeError, ValueError):
        return str(x)


def _rounds_cell(r) -> str:
    """"5 of 5 (7 of 7 passes)": training rounds run of those approved, then the passes
    the ledger charged (statistics, rounds, final evaluation), so that 7 never reads as 7 rounds."""
    if r.get("rounds_run") is None:  # an unreadable request: what the ledger charged
        return f"? ({len(r.get('rounds_executed') or [])} passes)"
    return f"{r['rounds_run']} of {r['rounds_approved']} ({r['passes_run']} of {r['passes_approved']} passes)"


def _request_table(rows) -> str:
    head = ("request", "researcher", "status", "decided by", "eps approved", "eps charged", "rounds run (passes)",
            "warning shown")
    body = [
        (
            str(r["request_id"]),
            str(r["researcher"]),
            str(r["status"]),
            f"{r['decided_by']} ({r['mode']})" if r.get("decided_by") else "-",
            _eps(r.get("epsilon_approved")),
            _eps(r.get("epsilon_charged")),
            _rounds_cell(r),
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
    lines.append("  rounds train the model; passes are what the ledger charges: a statistics pass (standard "
                 "scaling), the rounds and a final evaluation (docs/compliance.md, section 5)")
    return "\n".join(lines)


def _verification_lines(v, key_source: str) -> list[str]:
    lines = [f"ledger: {v.path}", f"verify key: fingerprint {v.fingerprint} {key_source}"]
    if v.ok:
        lines.append(f"verification: OK ({v.entries} entries, chain and signatures intact)")
    else:
        lines.append(f"verification: FAILED ({len(v.problems)} problem(s))")
        lines += [f"  - {p}" for p in v.problems]
    lines += [f"  warning: {w}" for w in v.warnings]
    return lines


def cmd_audit(args: argparse.Namespace) -> int:
    from fedmtl.datasites.ledger.audit import audit, researcher_view
    from fedmtl.datasites.ledger.ledger import LEDGER_FILE, verify

    home = Path(args.home)
    if not home.is_dir():
        raise FedMTLError(f"--home {home} is not a folder; give the datasite's home folder")
    if not (home / LEDGER_FILE).is_file():
        raise FedMTLError(f"{home} holds no ledger ({LEDGER_FILE}); is it a datasite home?")
    if args.expected_count is not None and args.expected_count < 0:
        raise FedMTLError("--expected-count must be >= 0 (the entry count of your last audit)")
    try:
        key, source = _audit_verify_key(home, args.verify_key)
    except KeyMismatch as e:  # a verification that failed before it began: exit 1, not a usage error
        if args.json:
            print(json.dumps({"verification": {"ok": False, "problems": [str(e)]}}, indent=2))
        else:
            print(f"ledger: {home / LEDGER_FILE}\nverification: FAILED (1 problem(s))\n  - {e}")
        return 1
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


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise FedMTLError("cannot ask for confirmation (stdin is not a terminal); add --yes")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def _printable(x) -> str:
    """``x`` for the owner's terminal: a researcher chooses job ids and code names, so control
    characters (terminal escape sequences) are shown escaped, never sent."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(x))


def _review_list(args: argparse.Namespace) -> int:
    """``review --list``: from the running server's control socket (no syft import, no
    login), else through a syft login as the owner."""
    from fedmtl.datasites.server import admin

    rows = admin.review_list(args.home, include_decided=args.all)
    if rows is None:
        client = admin.admin_client(args.home)  # raises "not running" with what to do
        from fedmtl.datasites.review import manual_review as mr

        rows = [r.to_dict() for r in mr.list_requests(args.home, client=client, include_decided=args.all)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no requests waiting for review" if not args.all else "no requests")
        return 0
    head = ("request", "syft id", "researcher", "code", "syft", "ledger")
    body = [tuple(_printable(x) for x in (r["request_id"], str(r["syft_id"] or "-")[:12], r["researcher"],
                                          r["code_name"], r["syft_status"], r["ledger_status"])) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*head))
    for b in body:
        print(fmt.format(*b))
    print("\nshow one with --show ID; decide with --approve ID or --deny ID --reason TEXT")
    return 0


def cmd_datasite_review(args: argparse.Namespace) -> int:
    target = args.approve or args.deny
    if (args.reason or args.acknowledge) and not target:
        raise FedMTLError("--reason and --acknowledge go with --approve ID or --deny ID")
    if target and args.show:
        raise FedMTLError("give either --show ID or --approve/--deny ID, not both")
    if not target and not args.show:
        return _review_list(args)
    from fedmtl.datasites.review import manual_review as mr
    from fedmtl.datasites.rules.policy import ADVISORY_ID
    from fedmtl.datasites.server.admin import admin_client

    client = admin_client(args.home)  # raises "not running" with what to do
    if args.show:
        details = mr.show_request(args.home, args.show, client=client, dry_run=not args.no_dry_run)
        print(json.dumps(details.to_dict(), indent=2, default=str) if args.json else details.render())
        return 0

    approve = bool(args.approve)
    reviewer = args.reviewer or login_at_host()
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
    rv.add_argument("--home", required=True, type=Path, help="the datasite's home folder")
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


def _add_audit_parser(sub) -> None:
    au = sub.add_parser("audit", help="compliance: verify a datasite's privacy ledger and write a report")
    au.add_argument("--home", required=True, type=Path, help="the datasite's home folder")
    au.add_argument("--out", type=Path, help="where report.html and report.json go (default HOME/audit)")
    au.add_argument("--verify-key", metavar="FINGERPRINT",
                    help="pin the datasite's key: the fingerprint its owner reads from `fedmtl datasite status` "
                    "(or `datasite peers list`) and gives you out of band, 64 hex characters, any case, colons or "
                    "spaces allowed; the raw public key (\"ed25519\" in HOME/public_keys.json) works too "
                    "(default: trust HOME/public_keys.json, not pinned)")
    au.add_argument("--expected-count", type=int, metavar="N",
                    help="entries the last audit saw: detects a rollback of ledger and head together")
    au.add_argument("--researcher", metavar="EMAIL", help="only this researcher's own requests and spend")
    au.add_argument("--json", action="store_true", help="print the report as JSON")
    au.set_defaults(func=cmd_audit)

