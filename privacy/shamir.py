"""Shamir secret sharing of byte strings over the prime field GF(2^127 - 1).

A secret of any length is cut into 15-byte chunks (120 bits, below the field size); each
chunk is the constant term of its own random polynomial of degree ``threshold - 1``.
Share ``x`` holds the polynomials' values at ``x``. Any ``threshold`` shares give the
secret back (Lagrange interpolation at 0); fewer reveal nothing about it.

Pure Python integers, randomness from :mod:`secrets`. No state, no I/O.
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass
from typing import Sequence

from fedmtl.errors import ShamirError

__all__ = ["PRIME", "Share", "ShamirError", "split_secret", "combine_shares"]

PRIME = 2**127 - 1
CHUNK_BYTES = 15
_ELEMENT_BYTES = 16
_HEADER = struct.Struct(">HHI")  # x, threshold, secret length
MAX_SHARES = 2**16 - 1


@dataclass(frozen=True)
class Share:
    """One share: the point ``x`` (1..65535) and one field element per secret chunk."""

    x: int
    threshold: int
    secret_len: int
    ys: tuple[int, ...]

    def to_bytes(self) -> bytes:
        return _HEADER.pack(self.x, self.threshold, self.secret_len) + b"".join(
            y.to_bytes(_ELEMENT_BYTES, "big") for y in self.ys
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> "Share":
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"share must be bytes, got {type(data).__name__}")
        if len(data) < _HEADER.size:
            raise ShamirError(f"share is {len(data)} bytes, shorter than its header")
        x, threshold, secret_len = _HEADER.unpack_from(data)
        body = bytes(data[_HEADER.size :])
        n_chunks = _num_chunks(secret_len)
        if len(body) != n_chunks * _ELEMENT_BYTES:
            raise ShamirError(
                f"share body is {len(body)} bytes; a {secret_len}-byte secret needs "
                f"{n_chunks * _ELEMENT_BYTES}"
            )
        ys = tuple(
            int.from_bytes(body[i : i + _ELEMENT_BYTES], "big")
            for i in range(0, len(body), _ELEMENT_BYTES)
        )
        share = cls(x=x, threshold=threshold, secret_len=secret_len, ys=ys)
        share._validate()
        return share

    def _validate(self) -> None:
        if not 1 <= self.x <= MAX_SHARES:
            raise ShamirError(f"share point x={self.x} is outside 1..{MAX_SHARES}")
        if not 1 <= self.threshold <= MAX_SHARES:
            raise ShamirError(f"share threshold {self.threshold} is outside 1..{MAX_SHARES}")
        if any(not 0 <= y < PRIME for y in self.ys):
            raise ShamirError("share value is not a field element (>= 2^127 - 1)")


def _num_chunks(secret_len: int) -> int:
    return max(1, -(-secret_len // CHUNK_BYTES))


def _eval_poly(coeffs: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % PRIME
    return acc


def split_secret(secret: bytes, *, threshold: int, num_shares: int) -> list[Share]:
    """``num_shares`` shares at x = 1..num_shares; any ``threshold`` of them recover ``secret``."""
    if not isinstance(secret, (bytes, bytearray)):
        raise TypeError(f"secret must be bytes, got {type(secret).__name__}")
    for name, value in (("threshold", threshold), ("num_shares", num_shares)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 1 <= threshold <= num_shares <= MAX_SHARES:
        raise ValueError(
            f"need 1 <= threshold <= num_shares <= {MAX_SHARES}, "
            f"got threshold={threshold}, num_shares={num_shares}"
        )
    if len(secret) >= 2**32:
        raise ValueError("secret too long")
    secret = bytes(secret)
    chunks = [
        int.from_bytes(secret[i : i + CHUNK_BYTES], "big")
        for i in range(0, max(len(secret), 1), CHUNK_BYTES)
    ]
    polys = [[c] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)] for c in chunks]
    return [
        Share(
            x=x,
            threshold=threshold,
            secret_len=len(secret),
            ys=tuple(_eval_poly(p, x) for p in polys),
        )
        for x in range(1, num_shares + 1)
    ]


def combine_shares(shares: Sequence[Share]) -> bytes:
    """The secret from at least ``threshold`` shares (extra shares are ignored).

    Raises ShamirError for too few shares, duplicate points, or shares of different secrets'
    shapes. (Shares of different secrets with the same shape cannot be told apart: that
    needs the authenticated channel the caller provides.)
    """
    shares = list(shares)
    if not shares:
        raise ShamirError("no shares given")
    for s in shares:
        if not isinstance(s, Share):
            raise TypeError(f"expected Share, got {type(s).__name__}")
        s._validate()
    first = shares[0]
    if any(
        (s.threshold, s.secret_len, len(s.ys)) != (first.threshold, first.secret_len, len(first.ys))
        for s in shares
    ):
        raise ShamirError("shares disagree on threshold or secret length: they are not of one secret")
    xs = [s.x for s in shares]
    if len(set(xs)) != len(xs):
        raise ShamirError(f"duplicate share points {sorted(xs)}")
    if len(shares) < first.threshold:
        raise ShamirError(
            f"{len(shares)} share(s) given, {first.threshold} needed to reconstruct the secret"
        )
    used = shares[: first.threshold]
    lagrange = []
    for i, si in enumerate(used):
        num, den = 1, 1
        for j, sj in enumerate(used):
            if i != j:
                num = num * sj.x % PRIME
                den = den * (sj.x - si.x) % PRIME
        lagrange.append(num * pow(den, -1, PRIME) % PRIME)
    out = bytearray()
    n_chunks = len(first.ys)
    for k in range(n_chunks):
        value = sum(coef * s.ys[k] for coef, s in zip(lagrange, used)) % PRIME
        width = min(CHUNK_BYTES, first.secret_len - k * CHUNK_BYTES)
        if width <= 0:  # the single chunk of an empty secret
            continue
        if value >= 1 << (8 * width):
            raise ShamirError("reconstructed value does not fit the secret: shares are inconsistent")
        out += value.to_bytes(width, "big")
    return bytes(out)
