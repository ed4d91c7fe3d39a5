"""Fixed-point encoding of float vectors into Z_(2^k) for secure aggregation, and the
per-head weighting that turns a secure sum into a weighted average.

Encoding (one site):  clip each value to [-bound, bound], multiply by ``2^frac_bits``,
round stochastically (unbiased: E[q] = x * 2^frac_bits), store two's complement mod 2^k.

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

__all__ = [
    "QuantizationConfig",
    "cs_rng",
    "quantize",
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
    """A numpy Generator seeded with 128 bits from the OS CSPRNG (for rounding noise only;
    masks never come from numpy)."""
    return np.random.default_rng(secrets.randbits(128))


def quantize(
    values: np.ndarray, config: QuantizationConfig, *, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Clip, scale, stochastically round; return a ``config.dtype`` array (mod 2^k)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(x)):
        raise ValueError("values contain NaN or inf; refusing to quantise them")
    rng = cs_rng() if rng is None else rng
    scaled = np.clip(x, -config.bound, config.bound) * config.scale
    low = np.floor(scaled)
    q = low + (rng.random(scaled.shape) < (scaled - low))
    return q.astype(np.int64).astype(config.dtype)  # two's complement wrap mod 2^k


def dequantize_sum(total: np.ndarray, config: QuantizationConfig) -> np.ndarray:
    """Decode a sum of encodings (mod 2^k, at most ``num_sites`` terms) to float64."""
    total = np.asarray(total)
    if total.dtype != config.dtype:
        raise TypeError(f"expected a {config.dtype} array, got {total.dtype}")
    signed = total.view(np.int32 if config.bits == 32 else np.int64)
    return signed.astype(np.float64) / config.scale


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
