"""What the security review of one code request costs, the old path and the new checks
side by side, in one run.

    python benchmarks/review_cost.py [--quick] [--repeat N]

On one realistic request -- the demo cohort (:func:`fedmtl.datasites.data.cohort.prepare`, three
sites, seed 0) reviewed by its largest site, a five-round DP job on ``diabetes_5y``, the
site spec exactly as :meth:`fedmtl.researcher.job.Job.create` builds it (job, job_id,
site, a three-site roster of fresh Ed25519 keys, schema, max_count, template) and the
site's default policy with the two other sites pinned as peers -- it times, per request:

* ``old``     -- :func:`fedmtl.datasites.rules.review.decide` on ready-made
  :class:`~fedmtl.datasites.rules.review.RequestFacts` (built once, outside the timing, as
  ``autoreview.facts_of`` builds them), once with nothing spent yet and once with one
  earlier job of the same size already spent on the dataset and by the researcher;
* ``new``     -- the checks added in front of it:
  :func:`fedmtl.datasites.template.source_problems` and
  :func:`~fedmtl.datasites.template.is_template` on the template source the request carries,
  :func:`fedmtl.datasites.rules.limits.spec_problems` on the site spec, and syft's
  ``parse_user_code`` on the same source (what ``autoreview.binding_problems`` re-derives
  to compare against the ``parsed_code`` syft would execute);
* ``pricing`` -- ``JobSpec.job_records(n_train)`` + ``epsilon_of`` (the privacy price of
  the job at the policy's delta and accountant).

Each figure is the median (and min) of single calls, the stages interleaved so that the
machine's background load hits all of them alike; ``request`` times the whole sequence in
one call (what one request costs). The review runs once per job, not per round: the
totals are compared against the last measured syft round (the 3-site warm median of
``benchmarks/results/federated_round.json``) and against the whole job (rounds + the
final evaluation pass).

Writes benchmarks/results/review_cost.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

RESULTS = Path(__file__).parent / "results" / "review_cost.json"
ROUND_RESULTS = Path(__file__).parent / "results" / "federated_round.json"


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


def build_request(tmp: Path) -> dict[str, Any]:
    """The demo cohort's largest site, its policy, a site spec as Job.create builds it, and
    the facts the old review path consumes."""
    from fedmtl.contract.jobspec import JobSpec
    from fedmtl.contract.site_spec import SiteSpec
    from fedmtl.datasites.data import cohort
    from fedmtl.datasites.data.records import load_records
    from fedmtl.datasites.review.autoreview import job_facts
    from fedmtl.datasites.rules.review import SpendSummary
    from fedmtl.datasites.template import TEMPLATE_NAME, code_sha256, default_policy, template_source
    from fedmtl.privacy.keys import SigningKey
    from fedmtl.schema import Schema

    files = cohort.prepare(tmp, sites=3, seed=0)
    big = max(files, key=lambda f: f.n_patients)
    schema = Schema.load(big.schema)
    df = load_records(big.records, schema)
    split = schema.split_column
    n_train = int((df[split] == "train").sum()) if split else len(df)

    spec = JobSpec(name="bench", tasks=[{"label": "diabetes_5y"}], rounds=5, local_steps=20,
                   sample_rate=0.02, noise_multiplier=1.0)
    keys = {f.name: SigningKey.generate() for f in files}
    roster = {s: k.verify_key.to_bytes().hex() for s, k in keys.items()}
    job_id = "bench-0123abcd"  # f"{_slug(spec.name)}-{secrets.token_hex(4)}" as Job.create
    func_name = f"{TEMPLATE_NAME}_{job_id.replace('-', '_')}"
    site_spec = {
        "job": spec.to_dict(),
        "job_id": job_id,
        "site": big.name,
        "roster": roster,
        "schema": schema.to_dict(),
        "max_count": int(max(f.n_patients for f in files)),
        "template": TEMPLATE_NAME,
    }
    policy = default_policy(
        schema, peers={s: k.verify_key.fingerprint() for s, k in keys.items() if s != big.name}
    )
    raw = template_source(func_name)  # what syft stores as raw_code (the function's source)
    # syft's unique_func_name: user_func_<name>_<verify key>_<code hash>
    unique = f"user_func_{func_name}_{'ab' * 32}_{'cd' * 32}"

    parsed = SiteSpec.parse(site_spec)
    job = parsed.job
    facts = job_facts(parsed, n_train=n_train, request_id=job_id, roster=tuple(sorted(roster.items())),
                      site=big.name, researcher="bench@uni.example", dataset=big.name, code_name=func_name,
                      code_hash=code_sha256(raw))
    return {
        "site": big.name,
        "n_train": n_train,
        "n_records": len(df),
        "schema": schema,
        "job": job,
        "site_spec": site_spec,
        "policy": policy,
        "own_key": roster[big.name],
        "raw": raw,
        "func_name": func_name,
        "unique": unique,
        "facts": facts,
        "spent_none": SpendSummary(),
        "spent_one_job": SpendSummary(dataset_records=facts.records, researcher_records=facts.records),
    }


def checks(req: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    from syft.service.code.user_code import parse_user_code

    from fedmtl.datasites.review.autoreview import TEMPLATE_KWARGS
    from fedmtl.datasites.rules.limits import spec_problems
    from fedmtl.datasites.rules.review import decide
    from fedmtl.datasites.template import is_template, source_problems
    from fedmtl.privacy.accounting import epsilon_of

    raw, name, policy = req["raw"], req["func_name"], req["policy"]
    job, n_train = req["job"], req["n_train"]

    def old():
        return decide(policy=policy, request=req["facts"], spent=req["spent_none"])

    def old_spent():
        return decide(policy=policy, request=req["facts"], spent=req["spent_one_job"])

    def source():
        return source_problems(raw, name)

    def template():
        return is_template(raw, name)

    def spec():
        return spec_problems(req["site_spec"], policy=policy, schema=req["schema"], site=req["site"],
                             own_key=req["own_key"], n_train=n_train)

    def parse():
        return parse_user_code(raw_code=raw, func_name=req["unique"], original_func_name=name,
                               function_input_kwargs=list(TEMPLATE_KWARGS))

    def pricing():
        return epsilon_of(job.job_records(n_train), delta=policy.delta, accountant=policy.accountant)

    def request():  # one request, everything above in the order the reviewer runs it
        source(), parse(), template(), spec(), pricing()
        return old()

    return {
        "old_decide": old,
        "old_decide_spent": old_spent,
        "new_source_problems": source,
        "new_is_template": template,
        "new_spec_problems": spec,
        "new_parse_user_code": parse,
        "pricing": pricing,
        "request": request,
    }


def sanity(req: dict[str, Any], fns: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """The request must be the clean, approved case (otherwise we time early exits)."""
    d = fns["old_decide"]()
    d2 = fns["old_decide_spent"]()
    problems, roster = fns["new_spec_problems"]()
    out = {
        "decision": d.status,
        "decision_reasons": list(d.reasons),
        "decision_spent": d2.status,
        "epsilon_job": d.epsilon_job,
        "epsilon_after_one_earlier_job": d2.epsilon_after_dataset,
        "source_problems": fns["new_source_problems"](),
        "is_template": fns["new_is_template"](),
        "spec_problems": problems,
        "roster_sites": [s for s, _ in roster],
        "parsed_code_chars": len(fns["new_parse_user_code"]()),
        "epsilon_pricing": fns["pricing"](),
        "privacy_records": len(req["job"].job_records(req["n_train"])),
    }
    if d.status != "approved" or problems or out["source_problems"] or not out["is_template"]:
        raise SystemExit(f"the benchmark request is not the clean case: {json.dumps(out, default=str)}")
    return out


def measure(fns: dict[str, Callable[[], Any]], *, rounds: int, repeat: int) -> dict[str, dict[str, float]]:
    for fn in fns.values():  # warm up (imports, caches)
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):  # interleaved: the same background load for every stage
        for k, fn in fns.items():
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                samples[k].append(time.perf_counter() - t0)
    return {
        k: {"median_ms": 1e3 * float(np.median(v)), "min_ms": 1e3 * float(np.min(v)),
            "p90_ms": 1e3 * float(np.percentile(v, 90)), "calls": len(v)}
        for k, v in samples.items()
    }


def last_round() -> dict[str, Any] | None:
    if not ROUND_RESULTS.exists():
        return None
    d = json.loads(ROUND_RESULTS.read_text())
    rows = [r for r in d.get("results", []) if r.get("sites") == 3] or d.get("results", [])
    if not rows:
        return None
    s = rows[0]["summary"]
    return {
        "source": str(ROUND_RESULTS.relative_to(Path(__file__).parent.parent)),
        "sites": rows[0]["sites"],
        "syft_round_s": s["syft_wall"],
        "syft_round_cold_s": s.get("cold_pass1", {}).get("syft_wall"),
        "train_sum_s": s.get("train_sum"),
        "local_steps_then": d.get("spec", {}).get("local_steps"),
        "measured_on": d.get("machine", {}),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls (3 x 20 per stage)")
    ap.add_argument("--repeat", type=int, default=None, help="calls per stage per interleaved round")
    args = ap.parse_args(argv)
    rounds = 3 if args.quick else 5
    repeat = args.repeat or (20 if args.quick else 60)
    warnings.simplefilter("ignore")
    info = machine()

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedmtl-review-bench-") as tmp:
        req = build_request(Path(tmp))
    setup_s = time.perf_counter() - t0
    fns = checks(req)
    ok = sanity(req, fns)
    res = measure(fns, rounds=rounds, repeat=repeat)

    old = res["old_decide"]["median_ms"]
    new_keys = ("new_source_problems", "new_is_template", "new_spec_problems", "new_parse_user_code")
    new = sum(res[k]["median_ms"] for k in new_keys)
    pricing = res["pricing"]["median_ms"]
    total_sum = old + new + pricing
    total = res["request"]["median_ms"]
    rnd = last_round()
    passes = int(req["job"].rounds) + 1

    print(f"site {req['site']} ({req['n_train']} train records); job: 5 rounds x 20 steps, q=0.02, "
          f"sigma=1.0, 1 task; {ok['privacy_records']} privacy records; decision {ok['decision']}, "
          f"epsilon {ok['epsilon_job']:.3f}")
    print(f"\n{'per request (ms)':<44} {'median':>8} {'min':>8} {'p90':>8}")
    labels = [
        ("old_decide", "(a) old: review.decide (nothing spent)"),
        ("old_decide_spent", "    review.decide (one earlier job spent)"),
        ("new_source_problems", "(b) new: template.source_problems"),
        ("new_is_template", "         template.is_template"),
        ("new_spec_problems", "         limits.spec_problems"),
        ("new_parse_user_code", "         syft parse_user_code"),
        ("pricing", "(c) pricing: job_records + epsilon_of"),
    ]
    for k, label in labels:
        r = res[k]
        print(f"{label:<44} {r['median_ms']:>8.3f} {r['min_ms']:>8.3f} {r['p90_ms']:>8.3f}")
    print(f"{'    (b) new checks, sum of medians':<44} {new:>8.3f}")
    print(f"{'    (a)+(b)+(c), sum of medians':<44} {total_sum:>8.3f}")
    r = res["request"]
    print(f"{'one request, all of it in one call':<44} {r['median_ms']:>8.3f} {r['min_ms']:>8.3f} {r['p90_ms']:>8.3f}")
    print(f"new checks add {new / old:.2f}x the old decide ({new:.3f} ms on top of {old:.3f} ms)")

    compare: dict[str, Any] = {}
    if rnd:
        round_ms = 1e3 * rnd["syft_round_s"]
        compare = {
            **rnd,
            "review_over_round_pct": 100 * total / round_ms,
            "new_checks_over_round_pct": 100 * new / round_ms,
            "job_passes": passes,
            "review_over_job_pct": 100 * total / (passes * round_ms),
        }
        print(f"\nagainst one syft round ({rnd['sites']} sites, warm median {rnd['syft_round_s']:.2f} s, "
              f"from {rnd['source']}):")
        print(f"  whole review {total:.3f} ms = {compare['review_over_round_pct']:.4f}% of one round; "
              f"the new checks alone {compare['new_checks_over_round_pct']:.4f}%")
        print(f"  the review runs once per job, not per round: {compare['review_over_job_pct']:.5f}% of this "
              f"job's {passes} passes ({passes * rnd['syft_round_s']:.1f} s)")
    else:
        print(f"\n(no {ROUND_RESULTS} to compare against)")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "review_cost",
        "command": info["command"],
        "quick": args.quick,
        "machine": info,
        "setup_seconds": setup_s,
        "calls_per_stage": rounds * repeat,
        "request": {
            "site": req["site"], "n_train": req["n_train"], "n_records": req["n_records"],
            "job": req["job"].to_dict(), "roster_sites": ok["roster_sites"],
            "func_name": req["func_name"],
        },
        "sanity": ok,
        "results_ms": res,
        "summary_ms": {"old_decide": old, "new_checks": new, "pricing": pricing,
                       "sum_of_medians": total_sum, "request": total,
                       "new_over_old": new / old},
        "against_round": compare,
        "notes": [
            "old = fedmtl.datasites.rules.review.decide on RequestFacts built once outside the timing",
            "new = source_problems + is_template on the template source, limits.spec_problems on the "
            "site spec (as Job.create builds it), syft parse_user_code on the template source",
            "pricing = JobSpec.job_records(n_train) + epsilon_of at the policy's delta and accountant",
            "request = all of the above in one call; medians over single calls, stages interleaved",
            "the review runs once per job (at approval), not once per round",
        ],
    }, indent=2, default=str))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
