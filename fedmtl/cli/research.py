"""The researcher's commands: ``fedmtl train``, ``fedmtl job price``, ``fedmtl job finish``,
``fedmtl job abort``, and the demo
(``fedmtl demo``, ``fedmtl demo prepare``)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from fedmtl.cli.terminal import say
from fedmtl.errors import FedMTLError

# -- demo ---------------------------------------------------------------------------


def cmd_demo_prepare(args: argparse.Namespace) -> int:
    from fedmtl.datasites.data.cohort import prepare, summary_table

    files = prepare(args.out, sites=args.sites, seed=args.seed)
    print(summary_table(files))
    for f in files:
        print(f"{f.name}: {f.records}  {f.schema}")
    return 0


# -- researcher ---------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from fedmtl.contract.jobspec import SMALL_SITE_N_TRAIN, JobSpec
    from fedmtl.researcher.job import Job
    from fedmtl.researcher.session import Session

    session = Session.connect(args.sites, log=say)
    say(f"connected to {', '.join(sorted(session.sites))}")
    if (Path(args.out) / "job.json").exists():
        job = Job.resume(session, args.out, log=say)
        say(f"resuming job {job.job_id} in {args.out}")
    else:
        if args.job is None:
            raise FedMTLError(f"{args.out} holds no job yet: give the job spec with --job FILE")
        spec = JobSpec.load(args.job)
        job = session.job(spec, out=args.out)
        small = spec.recipe_for(list(job.state["n_train"].values()))
        if small:
            shown = {k: (v.widths if k == "model" else v) for k, v in small.items()}
            say(f"the smallest site has {min(job.state['n_train'].values())} training records (under "
                f"{SMALL_SITE_N_TRAIN}): the fields the spec left out take the small-site recipe "
                + ", ".join(f"{k} = {v}" for k, v in sorted(shown.items())) + " (docs/models.md, 'Small hospitals')")
        if not args.no_dry_run:
            say("dry run on the sites' mock data ...")
            job.dry_run()
        job.submit()
        say(f"submitted job {job.job_id}; waiting for the sites' review ...")
    for site, st in job.wait_for_review(args.review_timeout).items():
        say(f"  {site}: {st['status']}{' - ' + st['reason'] if st['reason'] else ''}")
    wait = {} if args.rejoin_wait is None else {"rejoin_wait": args.rejoin_wait}
    result = job.run(progress=not args.quiet, review_timeout=args.review_timeout, log=say, **wait)
    result.save(Path(args.out) / "result")
    table = result.metrics_table()
    if table.empty:
        say("no final metrics: the job's evaluation release is not in this result")
    else:
        say(table[table["round"] == table["round"].max()].to_string(index=False))
    say("epsilon spent per site: " + ", ".join(f"{s}={e:.2f}" for s, e in sorted(result.epsilon.items())))
    for line in hospital_lines(result):
        say(line)
    say(f"result saved to {Path(args.out) / 'result'}")
    return 0


def _seconds(text: str) -> float:
    """A number of seconds >= 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def hospital_lines(result) -> list[str]:
    """What `fedmtl train` can say about each hospital: the federated model's AUROC on that
    hospital's own test split where the sites released it (noised), and why the local-only
    comparison is not here."""
    per_site = result.site_final_metrics("auroc")
    lines = ["per hospital (the federated model on each hospital's own test split):"]
    if per_site:
        for site, vals in sorted(per_site.items()):
            cells = ", ".join(f"{t}={v:.3f}" for t, v in vals.items())
            mean = sum(vals.values()) / len(vals) if vals else float("nan")
            lines.append(f"  {site}: mean {mean:.3f} ({cells}) [released by the site: noised, approximate]")
    else:
        lines.append("  not released: the sites release per-site metrics only when the job sets "
                     "per_site_metrics = true and each site's policy allows it")
    lines.append("  local-only AUROC (each hospital training alone) is not known here: it needs a model trained "
                 "on each hospital's records alone, which only the hospital can run; `fedmtl demo` measures "
                 "both on the demo cohort")
    return lines


def cmd_job_price(args: argparse.Namespace) -> int:
    from fedmtl.contract.jobspec import JobSpec
    from fedmtl.researcher.job import price, price_table
    from fedmtl.researcher.session import Session

    spec = JobSpec.load(args.job)
    session = Session.connect(args.sites)
    rows = price(session, spec, budget=not args.no_budget)
    if args.json:
        plain = {s: {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()}
                 for s, r in rows.items()}  # JSON has no infinity (a job without DP)
        print(json.dumps(plain, indent=2))
        return 0
    say(f"job {spec.name!r}: epsilon per site at delta={spec.delta:g} ({spec.accountant}), "
         "training rounds and evaluation releases together")
    say(price_table(rows))
    return 0


def cmd_job_close(args: argparse.Namespace) -> int:
    """``fedmtl job finish`` / ``fedmtl job abort``: close the job in ``--job DIR`` at every
    site; exit status 1 when a site did not close it (run the command again)."""
    from fedmtl.researcher.job import Job
    from fedmtl.researcher.session import Session

    if not (Path(args.job) / "job.json").exists():
        raise FedMTLError(f"{args.job} holds no job (no job.json): give the folder `fedmtl train --out` wrote")
    session = Session.connect(args.sites)
    job = Job.resume(session, args.job, need_threshold=False)  # closing needs no threshold
    rows = job.close(args.action, reason=args.reason or "finished by its researcher")
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        say(f"job {job.job_id}: {args.action}")
        say(close_table(rows))
    return 0 if all(r.get("status") in ("finished", "aborted") for r in rows.values()) else 1


def close_table(rows) -> str:
    """Per site: the job's status, passes charged, epsilon charged and passes still reserved
    after a close request (or why the site did not close it)."""
    lines = [f"{'site':<12} {'status':<10} {'passes charged':<16} {'epsilon charged':<16} passes reserved"]
    for site, r in sorted(rows.items()):
        if r.get("status") not in ("finished", "aborted"):
            lines.append(f"{site:<12} not closed: {r.get('error')} (run the command again)")
            continue
        passes = ",".join(str(p) for p in r.get("passes_charged", [])) or "none"
        again = "" if r.get("closed_now") else "  (already closed: " + str((r.get("closed") or {}).get("reason", "")) + ")"
        lines.append(f"{site:<12} {r['status']:<10} {passes:<16} {float(r.get('epsilon_charged') or 0):<16.4g} "
                     f"{r.get('passes_reserved', 0)}{again}")
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    from fedmtl.researcher.demo import hospital_table, markdown_table, run_demo, targets_table

    sweep = tuple(float(x) for x in args.sweep.split(",")) if args.sweep else (1.5, args.epsilon, 8.0)
    report = run_demo(out=args.out, sites=args.sites, rounds=args.rounds, epsilon=args.epsilon,
                      sweep=tuple(sorted(set(sweep))), quick=args.quick, seed=args.seed, workers=args.workers,
                      n_seeds=args.seeds)
    say()
    say("Mean AUROC (± sd over seeds) on all hospitals' test splits:")
    say(markdown_table(report))
    say()
    say("Each hospital on its own test split (mean AUROC over tasks):")
    say(hospital_table(report))
    say()
    say(targets_table(report))
    return 0


def _add_parsers(sub) -> None:
    """train, job price, demo, demo prepare."""
    sites_help = ("sites file (TOML): one [[sites]] table per datasite with url, email and password_env, the "
                  "environment variable that holds your password there (optional: fingerprint)")
    tr = sub.add_parser("train", help="researcher: run a federated job over datasites")
    tr.add_argument("--sites", required=True, type=Path, help=sites_help)
    tr.add_argument("--job", type=Path, help="job spec (TOML/YAML/JSON); not needed to resume")
    tr.add_argument("--out", required=True, type=Path, help="job folder (checkpoints, result)")
    tr.add_argument("--review-timeout", type=float, default=300.0, metavar="SECONDS",
                    help="how long to wait for the sites to review the job (default 300)")
    tr.add_argument("--rejoin-wait", type=_seconds, default=None, metavar="S",
                    help="before each pass, wait at most S seconds for sites that are down to answer again "
                    "(with back-off; default 30, fedmtl.researcher.job.REJOIN_WAIT; 0: never wait)")
    tr.add_argument("--no-dry-run", action="store_true",
                    help="submit without first running the job on the sites' mock data")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train)
    jb = sub.add_parser("job", help="researcher: plan a job before running it, close it after")
    jsub = jb.add_subparsers(dest="action", required=True,
                             help="price: epsilon and budget per site; finish, abort: close a job")
    jp = jsub.add_parser("price", help="epsilon of a job at each site, your budget left there, and which of "
                         "the site's review rules would deny it",
                         description="Connects to the sites, checks the job spec against their schemas and "
                         "prints, per site, the epsilon of the whole job (training rounds and evaluation "
                         "releases) and your researcher budget left there. Submits nothing and charges "
                         "nothing. A site publishes no budgets: yours is read through an approved job of "
                         "yours at that site, so it is unknown before your first one. It also runs each "
                         "site's own review on the policy the site publishes and prints every rule that "
                         "would deny the job, in the review's words ('would deny (training.max_rounds): ...').")
    jp.add_argument("--job", required=True, type=Path, help="job spec (TOML/YAML/JSON)")
    jp.add_argument("--sites", required=True, type=Path, help="sites file (TOML), as for `fedmtl train`")
    jp.add_argument("--no-budget", action="store_true", help="epsilon only: do not look up budgets left")
    jp.add_argument("--json", action="store_true", help="machine-readable output")
    jp.set_defaults(func=cmd_job_price)
    for action, text in (("finish", "finish a job at every site: it runs no more passes and its unspent passes "
                          "stop being reserved against your budget"),
                         ("abort", "abort a job at every site (as finish, recorded as aborted with your reason)")):
        jc = jsub.add_parser(action, help=text, description=text.capitalize() + ". Each site records the closing in "
                             "its ledger; a job a site already closed (its last pass, its idle time) is shown as it "
                             "is. A site that does not answer is reported: run the command again.")
        jc.add_argument("--job", required=True, type=Path, metavar="DIR",
                        help="the job's folder (what `fedmtl train --out` wrote)")
        jc.add_argument("--sites", required=True, type=Path, help="sites file (TOML), as for `fedmtl train`")
        jc.add_argument("--reason", required=action == "abort", default=None,
                        help="why (written to each site's ledger; at most 500 characters)"
                        + ("" if action == "abort" else "; default 'finished by its researcher'"))
        jc.add_argument("--json", action="store_true", help="machine-readable output")
        jc.set_defaults(func=cmd_job_close, action=action)

    de = sub.add_parser("demo", help="the demo: NAFLD cohort, three hospitals, one job")
    de.add_argument("--out", type=Path, default=Path("demo-out"),
                    help="folder for the cohort, the datasite homes and the report (default demo-out; replaced)")
    de.add_argument("--sites", type=int, default=3, help="number of hospitals (default 3)")
    de.add_argument("--rounds", type=int, default=5, help="federated rounds of each job (default 5)")
    de.add_argument("--seeds", type=int, default=5,  # fedmtl.researcher.demo.N_SEEDS
                    help="seeds of every comparison row, from --seed on (default 5; --quick: 1)")
    de.add_argument("--workers", type=int, default=2,
                    help="worker processes for the comparison runs (default 2)")
    de.add_argument("--epsilon", type=float, default=3.0, help="epsilon per site of the main job")
    de.add_argument("--sweep", default="", help="epsilons compared (default 1.5,E,8; below about 1.2 "
                    "the job's two releases alone spend the budget)")
    de.add_argument("--quick", action="store_true", help="a fast run (2 rounds, one seed)")
    de.add_argument("--seed", type=int, default=0, help="seed of the cohort and the training (default 0)")
    de.set_defaults(func=cmd_demo)
    desub = de.add_subparsers(dest="action", help="prepare: only write the demo cohort")
    pr = desub.add_parser("prepare", help="write the demo cohort: records + schema per hospital")
    pr.add_argument("--out", required=True, type=Path, help="folder for OUT/SITE/records.csv and schema.toml")
    pr.add_argument("--sites", type=int, default=3, help="number of hospitals (default 3)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the cohort (default 0; same seed, same files)")
    pr.set_defaults(func=cmd_demo_prepare)
