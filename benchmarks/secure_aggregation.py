"""Secure aggregation vs a plain float sum of the same vectors, measured side by side.

    python benchmarks/secure_aggregation.py [--quick]

For n sites and d parameters, with and without one dropout (a site that shared keys and
then vanished, so its masks are recovered), reports the mean per-site client time, the
server time and the bytes each site sends, next to the plain alternative (each site sends
its float32 vector, the server sums them). Writes benchmarks/results/secure_aggregation.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import numpy as np

from fedmtl.privacy.keys import SigningKey
from fedmtl.privacy.quantization import QuantizationConfig
from fedmtl.privacy.secagg import RoundStats, SecAggParams, Stage, run_local_round

RESULTS = Path(__file__).parent / "results" / "secure_aggregation.json"


def plain_sum(vectors: list[np.ndarray]) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    total = np.zeros_like(vectors[0], dtype=np.float64)
    for v in vectors:
        total += v
    return time.perf_counter() - t0, total


def bench(n: int, d: int, dropout: bool, seed: int = 0) -> dict:
    identities = {f"site{i:02d}": SigningKey.generate() for i in range(n)}
    t = n // 2 + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = SecAggParams(
            job_id="bench",
            round=0,
            roster={s: k.verify_key for s, k in identities.items()},
            threshold=t,
            shapes=((d,),),
            quantization=QuantizationConfig(bound=1.0, num_sites=n, frac_bits=16),
        )
    rng = np.random.default_rng(seed)
    inputs = {s: [rng.uniform(-1, 1, d).astype(np.float32)] for s in identities}
    dropouts = {params.sites[-1]: Stage.MASKED_INPUT} if dropout else {}
    survivors = [s for s in params.sites if s not in dropouts]

    stats = RoundStats()
    result = run_local_round(params, identities=identities, inputs=inputs, dropouts=dropouts, stats=stats)
    plain_seconds, plain_total = plain_sum([inputs[s][0] for s in survivors])
    max_err = float(np.abs(result.arrays[0] - plain_total).max())

    site_mean = float(np.mean([stats.site_seconds[s] for s in survivors]))
    site_bytes = float(np.mean([stats.site_bytes_sent[s] for s in survivors]))
    plain_bytes = d * 4  # one float32 vector
    return {
        "n": n,
        "d": d,
        "t": t,
        "dropout": dropout,
        "ring_bits": params.quantization.bits,
        "secagg_site_seconds_mean": site_mean,
        "secagg_server_seconds": stats.server_seconds,
        "secagg_site_bytes_mean": site_bytes,
        "secagg_server_bytes_sent": stats.server_bytes_sent,
        "plain_server_seconds": plain_seconds,
        "plain_site_bytes": plain_bytes,
        "ratio_server_time": stats.server_seconds / plain_seconds,
        "ratio_site_bytes": site_bytes / plain_bytes,
        "max_abs_error_vs_plain": max_err,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n in {3, 10}, d = 1e4 only")
    args = ap.parse_args(argv)
    ns = (3, 10) if args.quick else (3, 10, 20)
    ds = (10_000,) if args.quick else (10_000, 1_000_000)

    rows = []
    header = (
        f"{'n':>3} {'d':>8} {'drop':>4} {'k':>3} {'site s':>8} {'server s':>9} {'plain s':>9} "
        f"{'srv ratio':>9} {'site MB':>8} {'plain MB':>8} {'B ratio':>7} {'max err':>8}"
    )
    print(header)
    for d in ds:
        for n in ns:
            for dropout in (False, True):
                r = bench(n, d, dropout)
                rows.append(r)
                print(
                    f"{n:>3} {d:>8} {str(dropout)[0]:>4} {r['ring_bits']:>3} "
                    f"{r['secagg_site_seconds_mean']:>8.3f} {r['secagg_server_seconds']:>9.3f} "
                    f"{r['plain_server_seconds']:>9.5f} {r['ratio_server_time']:>9.0f} "
                    f"{r['secagg_site_bytes_mean'] / 1e6:>8.3f} {r['plain_site_bytes'] / 1e6:>8.3f} "
                    f"{r['ratio_site_bytes']:>7.2f} {r['max_abs_error_vs_plain']:>8.1e}",
                    flush=True,
                )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "secure_aggregation",
                "quick": args.quick,
                "machine": {"python": platform.python_version(), "platform": platform.platform()},
                "note": "site/server seconds are for the whole round (all four stages), "
                "in-process, no network; plain = float32 vectors summed in float64",
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
