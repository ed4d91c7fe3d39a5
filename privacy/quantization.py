"""Fixed-point encoding of float vectors into Z_(2^k) for secure aggregation, and the
per-head weighting that turns a secure sum into a weighted average.

Encoding (one site):  clip each value to [-bound, bound], multiply by ``2^frac_bits``,
round stochastically (unbiased: E[q] = x * 2^frac_bits), store two's complement mod 2^k.

Rounding randomness: by default it comes from the AES-256-CTR keystream
(:func:`fedmtl.privacy.keys.keystream`) under fresh 32-byte keys from the OS CSPRNG, one
key per block of values, never from numpy's generator. Each value gets 32 keystream bits
``r``; with ``f = scaled - floor(scaled)`` (exact in float64) it rounds up iff
``r * 2^-32 < f`` (exact compare), i.e. with probability ``ceil(f * 2^32) / 2^32``: the
rounding bias is below ``2^-32`` of a quantum (``2^-(32 + frac_bits)`` in value units).
Passing ``rng`` (a numpy Generator) uses ``rng.random()`` (53-bit uniforms) instead, for
reproducible tests. The work is done in fixed-size chunks in preallocated buffers (no
full-length temporaries besides the output).

Headroom bound (why the sum decodes exactly): each encoded value satisfies
``|q| <= bound * 2^frac_bits + 1``, so the true integer sum over ``n`` sites satisfies
``|sum| <= n * (bound * 2^frac_bits + 1)``. Decoding reads the sum mod 2^k as a signed
integer, which is exact when that bound is ``< 2^(k-1)``. :class:`QuantizationConfig`
picks the smallest k in {32, 64} with

    k - 1 >= ceil(log2(n * (bound * 2^frac_bits + 1)))

and refuses a configuration that would need more than 64 bits. The de-quantised sum is
within ``n / 2^frac_bits`` of the float sum of the clipped inputs (per element; the
stochastic rounding error has mean zero).

Weighting (per task head): a site sends ``count_h * update_h`` on head h's slices plus the
vector of counts; the server divides the summed slices by the summed counts
(:func:`weight_by_group`, :func:`average_by_group`). Set ``bound`` to cover
``max_count * clip`` *and* ``max_count`` (see :func:`weighted_bound`).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from fedmtl.privacy.keys import KEYSTREAM_SEED_BYTES, keystream

__all__ = [
    "QuantizationConfig",
    "cs_rng",
    "quantize",
    "quantize_into",
    "dequantize_sum",
    "weighted_bound",
    "weight_by_group",
    "average_by_group",
]

_SUPPORTED_BITS = (32, 64)


@dataclass(frozen=True)
class QuantizationConfig:
    """Public parameters every party must agree on.

    bound: max |value| after weighting; larger values are clipped.
    num_sites: the most sites whose inputs are summed.
    frac_bits: fixed-point fractional bits (resolution 2^-frac_bits).
    """

    bound: float
    num_sites: int
    frac_bits: int = 16

    def __post_init__(self) -> None:
        if not (isinstance(self.bound, (int, float)) and math.isfinite(self.bound) and self.bound > 0):
            raise ValueError(f"bound must be a positive finite number, got {self.bound!r}")
        if not isinstance(self.num_sites, int) or self.num_sites < 1:
            raise ValueError(f"num_sites must be a positive int, got {self.num_sites!r}")
        if not isinstance(self.frac_bits, int) or not 0 <= self.frac_bits <= 52:
            raise ValueError(f"frac_bits must be an int in 0..52, got {self.frac_bits!r}")
        if self.required_bits > 64:
            raise ValueError(
                f"bound={self.bound}, num_sites={self.num_sites}, frac_bits={self.frac_bits} "
                f"need {self.required_bits} bits, more than 64: lower frac_bits or bound"
            )

    @property
    def scale(self) -> int:
        return 1 << self.frac_bits

    @property
    def required_bits(self) -> int:
        """1 sign bit + bits of the largest possible |sum|."""
        max_abs_sum = self.num_sites * (math.ceil(self.bound * self.scale) + 1)
        return 1 + max_abs_sum.bit_length()

    @property
    def bits(self) -> int:
        """k: the ring is Z_(2^k), k in {32, 64} (numpy's natural overflow does mod 2^k)."""
        return next(b for b in _SUPPORTED_BITS if b >= self.required_bits)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint32 if self.bits == 32 else np.uint64)

    def to_dict(self) -> dict:
        return {"bound": float(self.bound), "num_sites": self.num_sites, "frac_bits": self.frac_bits}

    @classmethod
    def from_dict(cls, d: Mapping) -> "QuantizationConfig":
        return cls(bound=float(d["bound"]), num_sites=int(d["num_sites"]), frac_bits=int(d["frac_bits"]))


def cs_rng() -> np.random.Generator:
    """A numpy Generator seeded with 128 bits from the OS CSPRNG. :func:`quantize` no longer
    needs it (its default randomness is the AES-CTR keystream); kept for callers that want
    a Generator to pass as ``rng``. Masks never come from numpy."""
    return np.random.default_rng(secrets.randbits(128))


# Values per chunk: the float64 scratch buffers (3 x 512 KiB) stay in cache, and each
# keystream call (4 bytes per value, 256 KiB) stays small: multi-MiB one-shot calls were
# measured several times slower per byte here (fresh pages for their input and output).
_CHUNK = 65536
_U32_TO_UNIT = 2.0**-32  # r * 2^-32 is exact in float64 for any uint32 r


def _uniform_source(rng: np.random.Generator | None):
    """``fill(u)``: write uniforms in [0, 1) into the float64 buffer ``u``."""
    if rng is None:

        def fill(u: np.ndarray) -> None:
            bits = np.frombuffer(keystream(secrets.token_bytes(KEYSTREAM_SEED_BYTES), 4 * u.size), np.uint32)
            np.multiply(bits, _U32_TO_UNIT, out=u)

    elif isinstance(rng, np.random.Generator):

        def fill(u: np.ndarray) -> None:
            rng.random(out=u)

    else:  # anything with .random(size) (e.g. a legacy RandomState)

        def fill(u: np.ndarray) -> None:
            u[...] = rng.random(u.size)

    return fill


def quantize(
    values: np.ndarray, config: QuantizationConfig, *, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Clip, scale, stochastically round; return a ``config.dtype`` array (mod 2^k).

    ``values`` is not modified. Without ``rng`` the rounding randomness is AES-CTR
    keystream under fresh random keys (see the module docstring).
    """
    x = _as_float_vector(values)
    return quantize_into(x, config, np.empty(x.size, dtype=config.dtype), rng=rng)


def quantize_into(
    values: np.ndarray,
    config: QuantizationConfig,
    out: np.ndarray,
    *,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """:func:`quantize` into the preallocated ``out`` (``config.dtype``, one element per
    value, contiguous); returns ``out``.

    ``out`` may reuse the memory of ``values`` when it starts at the same address and its
    items are no wider (e.g. ``vec.view(config.dtype)[:vec.size]`` for a float64 ``vec``
    the caller owns): each chunk of values is read before its encodings are written, and
    those land on bytes already read. ``values`` is then overwritten. Any other overlap is
    refused.
    """
    x = _as_float_vector(values)
    n = x.size
    if not isinstance(out, np.ndarray) or out.dtype != config.dtype or out.shape != (n,):
        raise ValueError(f"out must be a {config.dtype} array of shape ({n},)")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be contiguous and writeable")
    if n and np.shares_memory(out, x) and not (
        x.flags.c_contiguous
        and x.ctypes.data == out.ctypes.data
        and x.dtype.itemsize >= out.dtype.itemsize
    ):
        raise ValueError("out overlaps values other than as a same-start prefix of no wider items")
    q = out.view(np.int32 if config.bits == 32 else np.int64)  # two's complement view
    scale = float(config.scale)
    top = float(config.bound) * scale  # exact: scale is a power of two; clip(x)*s == clip(x*s)
    fill = _uniform_source(rng)
    c = max(1, min(_CHUNK, n))
    scaled, low, u = np.empty(c), np.empty(c), np.empty(c)
    hit = np.empty(c, dtype=bool)
    for start in range(0, n, c):
        stop = min(start + c, n)
        m = stop - start
        xs, s, lo, uu, h, qq = x[start:stop], scaled[:m], low[:m], u[:m], hit[:m], q[start:stop]
        with np.errstate(over="ignore"):  # a huge finite value may scale to inf: clipped below
            np.multiply(xs, scale, out=s, dtype=np.float64)
        # NaN propagates through both reductions, so a clean chunk is finite and in bounds
        if not (np.minimum.reduce(s) >= -top and np.maximum.reduce(s) <= top):
            if not np.isfinite(xs).all():
                raise ValueError("values contain NaN or inf; refusing to quantise them")
            np.clip(s, -top, top, out=s)
        np.floor(s, out=lo)
        np.subtract(s, lo, out=s)  # fractional part, exact, in [0, 1)
        fill(uu)
        np.less(uu, s, out=h)  # round up with probability ~ frac: E[q] = scaled
        np.copyto(qq, lo, casting="unsafe")  # |lo| <= bound * scale fits the signed view
        np.add(qq, h, out=qq)
    return out


def _as_float_vector(values: np.ndarray) -> np.ndarray:
    x = np.asarray(values)
    if x.dtype != np.float64 and x.dtype != np.float32:
        x = np.asarray(values, dtype=np.float64)
    return x.reshape(-1)


def dequantize_sum(total: np.ndarray, config: QuantizationConfig) -> np.ndarray:
    """Decode a sum of encodings (mod 2^k, at most ``num_sites`` terms) to float64."""
    total = np.asarray(total)
    if total.dtype != config.dtype:
        raise TypeError(f"expected a {config.dtype} array, got {total.dtype}")
    signed = total.view(np.int32 if config.bits == 32 else np.int64)
    # one pass; multiplying by 2^-frac_bits is exactly the division by the scale
    return np.multiply(signed, 1.0 / config.scale, dtype=np.float64)


def weighted_bound(*, clip: float, max_count: int) -> float:
    """The ``bound`` that covers both ``count * clip(update)`` and the counts themselves."""
    return float(max_count) * max(float(clip), 1.0)


def _check_groups(groups: Mapping[str, Sequence[slice]], size: int) -> None:
    covered = np.zeros(size, dtype=np.int64)
    for name, slices in groups.items():
        for s in slices:
            start, stop, step = s.indices(size)
            if step != 1 or s.stop is not None and s.stop > size:
                raise ValueError(f"group {name!r}: slice {s} does not fit a vector of size {size}")
            covered[start:stop] += 1
    if not np.all(covered == 1):
        raise ValueError(
            "groups must cover every element of the vector exactly once "
            f"({int(np.sum(covered == 0))} uncovered, {int(np.sum(covered > 1))} overlapping)"
        )


def weight_by_group(
    update: np.ndarray,
    *,
    groups: Mapping[str, Sequence[slice]],
    counts: Mapping[str, int],
    clip: float,
) -> tuple[np.ndarray, np.ndarray]:
    """``(count_g * clip(update) on each group's slices, counts in sorted group order)``.

    A group with count 0 (a site without labels for a head) contributes zeros.
    """
    update = np.asarray(update, dtype=np.float64)
    if update.ndim != 1:
        raise ValueError(f"update must be a flat vector, got shape {update.shape}")
    _check_groups(groups, update.size)
    if set(counts) != set(groups):
        raise ValueError(f"counts name {sorted(counts)}, groups name {sorted(groups)}: they must match")
    out = np.clip(update, -clip, clip)
    names = sorted(groups)
    for name in names:
        c = counts[name]
        if not isinstance(c, (int, np.integer)) or c < 0:
            raise ValueError(f"count for {name!r} must be a non-negative int, got {c!r}")
        for s in groups[name]:
            out[s] *= c
    return out, np.array([counts[n] for n in names], dtype=np.float64)


def average_by_group(
    weighted_sum: np.ndarray,
    count_sum: np.ndarray,
    *,
    groups: Mapping[str, Sequence[slice]],
) -> tuple[np.ndarray, dict[str, float]]:
    """Divide each group's summed slices by its summed count.

    Returns ``(average, total_counts)``. A group whose total count is 0 (no site had
    labels for it) stays 0: that head is not updated.
    """
    weighted_sum = np.asarray(weighted_sum, dtype=np.float64)
    _check_groups(groups, weighted_sum.size)
    names = sorted(groups)
    count_sum = np.asarray(count_sum, dtype=np.float64).ravel()
    if count_sum.size != len(names):
        raise ValueError(f"count_sum has {count_sum.size} entries for {len(names)} groups")
    out = np.zeros_like(weighted_sum)
    totals = {}
    for name, total in zip(names, count_sum):
        total = float(np.rint(total))  # counts are integers; rounding removes quantisation error
        totals[name] = total
        if total > 0:
            for s in groups[name]:
                out[s] = weighted_sum[s] / total
    return out, totals
