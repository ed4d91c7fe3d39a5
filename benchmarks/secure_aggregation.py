"""Secure aggregation vs a plain float sum of the same vectors, measured side by side.

    python benchmarks/secure_aggregation.py [--quick]

For n sites and d parameters, with and without one dropout (a site that shared keys and
then vanished, so its masks are recovered), reports the mean per-site client time, the
server time and the bytes each site sends, next to the plain alternative (each site sends
its float32 vector, the server sums them).

Then, in the same run and on the same inputs, the quantiser: ``quantize_reference`` (the
previous implementation, numpy-Generator randomness and full-length temporaries, kept here
verbatim) against :func:`fedmtl.privacy.quantization.quantize` (AES-CTR keystream
randomness, chunked in place), next to the floor it cannot beat: the AES-CTR keystream for
the same number of values (one ring element each, as :meth:`SecAggParams.mask` draws it).
And the all-party compute of the masked-input stage and the unmasking (every site's
``masked_input`` + the server's ``collect_masked_inputs``, ``collect_consistency`` and
``unmask``; stages 1-2, the sites' consistency signatures and share reveal are timed apart)
for n = 10, d = 1M, once with each quantiser.

Writes benchmarks/results/secure_aggregation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import time
import warnings
from pathlib import Path

import numpy as np

import fedmtl.privacy.secagg_common as secagg_common
import fedmtl.privacy.secagg_site as secagg_site
from fedmtl.privacy.keys import SigningKey, keystream
from fedmtl.privacy.quantization import QuantizationConfig, dequantize_sum, quantize
from fedmtl.privacy.secagg import (
    RoundStats,
    SecAggParams,
    ServerSession,
    SiteSession,
    Stage,
    run_local_round,
)

RESULTS = Path(__file__).parent / "results" / "secure_aggregation.json"


def quantize_reference(
    values: np.ndarray, config: QuantizationConfig, *, rng: np.random.Generator | None = None
) -> np.ndarray:
    """The previous ``fedmtl.privacy.quantization.quantize``, verbatim (for the before/after)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(x)):
        raise ValueError("values contain NaN or inf; refusing to quantise them")
    rng = np.random.default_rng(secrets.randbits(128)) if rng is None else rng  # was cs_rng()
    scaled = np.clip(x, -config.bound, config.bound) * config.scale
    low = np.floor(scaled)
    q = low + (rng.random(scaled.shape) < (scaled - low))
    return q.astype(np.int64).astype(config.dtype)  # two's complement wrap mod 2^k


def _timeit(fn, repeat: int) -> dict:
    fn()  # warm up (allocator, caches)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"min_ms": 1e3 * min(times), "median_ms": 1e3 * float(np.median(times)), "repeat": repeat}


def runs_min(runs: list[dict]) -> float:
    return min(r["min_ms"] for r in runs)


def bench_quantize(d: int, n: int, repeat: int, seed: int = 0) -> dict:
    """Per-site quantisation of d values: reference vs new vs the AES-CTR keystream floor."""
    cfg = QuantizationConfig(bound=1.0, num_sites=n, frac_bits=16)
    x = np.random.default_rng(seed).uniform(-1, 1, d)  # float64, as secagg passes it
    nbytes = d * cfg.dtype.itemsize
    out = {"d": d, "ring_bits": cfg.bits, "frac_bits": cfg.frac_bits, "bound": cfg.bound}
    step = 1 << 18  # 256 KiB per call, as quantize draws it
    fns = {
        "reference": lambda: quantize_reference(x, cfg),
        "new": lambda: quantize(x, cfg),
        "keystream_one_call": lambda: keystream(os.urandom(32), nbytes),
        "keystream_chunked": lambda: [keystream(os.urandom(32), min(step, nbytes - i)) for i in range(0, nbytes, step)],
    }
    runs: dict[str, list[dict]] = {k: [] for k in fns}
    for _ in range(3):  # interleave so background load hits all three alike
        for k, fn in fns.items():
            runs[k].append(_timeit(fn, repeat))
    for k in fns:
        out[k] = {
            "min_ms": min(r["min_ms"] for r in runs[k]),
            "median_ms": float(np.median([r["median_ms"] for r in runs[k]])),
            "repeat": 3 * repeat,
        }
    # the floor: the cheaper of one keystream call and 256 KiB calls for the same bytes
    out["keystream"] = min(out.pop("keystream_one_call"), out["keystream_chunked"], key=lambda r: r["min_ms"])
    out["keystream_one_call_min_ms"] = runs_min(runs["keystream_one_call"])
    out["keystream_chunked_min_ms"] = out.pop("keystream_chunked")["min_ms"]
    floor = out["keystream"]["min_ms"]
    out["speedup_min"] = out["reference"]["min_ms"] / out["new"]["min_ms"]
    out["new_over_keystream_min"] = out["new"]["min_ms"] / floor
    out["reference_over_keystream_min"] = out["reference"]["min_ms"] / floor
    # sanity: both decode to the clipped input within one quantum, mean error ~ 0
    for k, fn in (("reference", quantize_reference), ("new", quantize)):
        err = dequantize_sum(fn(x, cfg), cfg) - x
        out[k]["max_abs_error"] = float(np.abs(err).max())
        out[k]["mean_error"] = float(err.mean())
    return out


def _one_round_stage34(params, identities, inputs) -> dict:
    """Set up stages 1-2 untimed; time every site's masked_input and the server's
    collect_masked_inputs + collect_consistency + unmask (the sites' consistency
    signatures and share reveal are timed separately)."""
    sessions = {s: SiteSession(params, site_id=s, identity=identities[s]) for s in params.sites}
    server = ServerSession(params)
    keys = server.collect_advertisements([ss.advertise_keys() for ss in sessions.values()])
    deliveries = server.collect_shares([ss.share_keys(keys) for ss in sessions.values()])
    # attribution: time inside the quantiser and inside the mask keystream calls
    spent = {"quantize_s": 0.0, "mask_keystream_s": 0.0}
    real_q, real_ks = secagg_site.quantize_into, secagg_common.keystream

    def timed(fn, key):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - t0

        return wrapper

    secagg_site.quantize_into = timed(real_q, "quantize_s")
    secagg_common.keystream = timed(real_ks, "mask_keystream_s")
    try:
        t_sites = 0.0
        masked = []
        for s, ss in sessions.items():
            t0 = time.perf_counter()
            masked.append(ss.masked_input(deliveries[s], inputs[s]))
            t_sites += time.perf_counter() - t0
        t0 = time.perf_counter()
        check = server.collect_masked_inputs(masked)
        t_server = time.perf_counter() - t0
        t0 = time.perf_counter()
        signed = [ss.consistency_check(check) for ss in sessions.values()]
        t_sign = time.perf_counter() - t0
        t0 = time.perf_counter()
        request = server.collect_consistency(signed)
        t_server += time.perf_counter() - t0
        t0 = time.perf_counter()
        reveals = [ss.unmask(request) for ss in sessions.values()]
        t_reveal = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = server.unmask(reveals)
        t_server += time.perf_counter() - t0
    finally:
        secagg_site.quantize_into, secagg_common.keystream = real_q, real_ks
    return {
        "sites_masked_input_s": t_sites,
        "server_s": t_server,
        "sites_reveal_s": t_reveal,
        "sites_consistency_s": t_sign,
        "all_party_s": t_sites + t_server,
        **spent,
        "result": result.arrays[0],
    }


def bench_all_party(n: int, d: int, repeat: int, seed: int = 0) -> dict:
    """All-party compute of stages 3-4 for n sites, d values: reference vs new quantiser."""
    identities = {f"site{i:02d}": SigningKey.generate() for i in range(n)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = SecAggParams(
            job_id="bench-all-party",
            round=0,
            roster={s: k.verify_key for s, k in identities.items()},
            threshold=n // 2 + 1,
            shapes=((d,),),
            quantization=QuantizationConfig(bound=1.0, num_sites=n, frac_bits=16),
        )
    rng = np.random.default_rng(seed)
    inputs = {s: [rng.uniform(-1, 1, d).astype(np.float32)] for s in identities}
    plain = np.sum([inputs[s][0].astype(np.float64) for s in params.sites], axis=0)
    new = secagg_site.quantize_into

    def reference(values, config, out, *, rng=None):
        # the previous quantiser (full-length temporaries, numpy Generator) into the slice
        out[...] = quantize_reference(values, config, rng=rng)
        return out

    quantisers = {"reference": reference, "new": new}
    runs: dict[str, list[dict]] = {k: [] for k in quantisers}
    try:
        for i in range(repeat + 1):  # the first pass of each is a warm-up
            for k, fn in quantisers.items():  # interleaved: same background for both
                secagg_site.quantize_into = fn
                r = _one_round_stage34(params, identities, inputs)
                r["max_abs_error_vs_plain"] = float(np.abs(r.pop("result") - plain).max())
                if i:
                    runs[k].append(r)
    finally:
        secagg_site.quantize_into = new
    out = {"n": n, "d": d, "ring_bits": params.quantization.bits, "repeat": repeat}
    for k, rs in runs.items():
        best = min(rs, key=lambda r: r["all_party_s"])
        out[k] = {
            "all_party_s_min": best["all_party_s"],
            "all_party_s_median": float(np.median([r["all_party_s"] for r in rs])),
            "sites_masked_input_s_at_min": best["sites_masked_input_s"],
            "server_s_at_min": best["server_s"],
            "sites_reveal_s_at_min": best["sites_reveal_s"],
            "sites_consistency_s_at_min": best["sites_consistency_s"],
            "quantize_s_at_min": best["quantize_s"],
            "mask_keystream_s_at_min": best["mask_keystream_s"],
            "max_abs_error_vs_plain": max(r["max_abs_error_vs_plain"] for r in rs),
        }
    out["speedup_min"] = out["reference"]["all_party_s_min"] / out["new"]["all_party_s_min"]
    return out


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
    ap.add_argument("--repeat", type=int, default=5, help="timed repeats per measurement")
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

    qd = 10_000 if args.quick else 1_000_000
    an = 10
    print(f"\nquantise d={qd} (per site; ms, min of {3 * args.repeat} / median):")
    qb = bench_quantize(qd, an, args.repeat)
    floor = qb["keystream"]["min_ms"]
    for k, label in (("reference", "reference (old)"), ("new", "new (keystream)"), ("keystream", "AES-CTR floor")):
        print(
            f"  {label:<16} {qb[k]['min_ms']:8.3f} {qb[k]['median_ms']:8.3f}   "
            f"{qb[k]['min_ms'] / floor:6.1f}x keystream"
        )
    print(f"  speedup {qb['speedup_min']:.1f}x")

    print(f"\nall-party compute, n={an}, d={qd} (sites' masked_input + server collect/unmask; s):")
    ab = bench_all_party(an, qd, args.repeat)
    ks_all = (an * (an - 1) + 2 * an) * floor / 1e3  # n*(n-1) pairwise masks + 2n self masks
    for k in ("reference", "new"):
        r = ab[k]
        print(
            f"  {k:<10} min {r['all_party_s_min']:.4f}  median {r['all_party_s_median']:.4f}  "
            f"(sites {r['sites_masked_input_s_at_min']:.4f}, server {r['server_s_at_min']:.4f}; "
            f"of which quantise {r['quantize_s_at_min']:.4f}, mask keystream "
            f"{r['mask_keystream_s_at_min']:.4f}; {r['all_party_s_min'] / ks_all:.1f}x its keystream floor)"
        )
    ab["keystream_floor_s"] = ks_all
    ab["new_over_keystream_floor"] = ab["new"]["all_party_s_min"] / ks_all
    ab["reference_over_keystream_floor"] = ab["reference"]["all_party_s_min"] / ks_all
    print(f"  speedup {ab['speedup_min']:.2f}x; keystream floor of the stage {ks_all:.4f} s")

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
                "quantize": qb,
                "all_party": ab,
                "note_quantize": "per-site quantisation of d float64 values in [-1, 1) (bound 1, "
                "frac_bits 16): reference = previous implementation (numpy Generator), new = "
                "fedmtl.privacy.quantization.quantize (AES-CTR keystream randomness, chunked in "
                "place), keystream = the cheaper of one keys.keystream call and 256 KiB calls for "
                "d ring elements (both reported); min over runs",
                "note_all_party": "every site's masked_input + server collect_masked_inputs + "
                "unmask, summed, in-process, n sites; stages 1-2 and the sites' share reveal "
                "untimed (reveal reported separately); quantize_s / mask_keystream_s: time inside "
                "the quantiser / the masks' keystream calls in that round; keystream_floor_s = "
                "(n*(n-1) pairwise + 2n self masks) x the quantize section's keystream floor",
            },
            indent=2,
        )
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
