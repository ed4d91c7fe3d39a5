"""Secure aggregation: what both parties share: parameters, errors, stages, message
encoding and validation helpers (see :mod:`fedmtl.privacy.secagg`)."""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from fedmtl.errors import (  # noqa: F401 - defined in fedmtl.errors, importable here
    MessageError,
    ProtocolStateError,
    TooFewSitesError,
    UnmaskRefusedError,
)
from fedmtl.privacy.keys import (
    AgreementKey,
    AgreementPublicKey,
    SignatureError,
    VerifyKey,
    hkdf_sha256,
    keystream,
)
from fedmtl.privacy.quantization import QuantizationConfig

#: v2: the consistency-check stage (sites sign the survivor set) before unmasking
PROTOCOL = "fedmtl-secagg-v2"
_SEED_BYTES = 32
_NONCE_BYTES = 12


class Stage(enum.IntEnum):
    """The ordered stages of one round (a site's state is the last stage it completed)."""

    NEW = 0
    ADVERTISE_KEYS = 1
    SHARE_KEYS = 2
    MASKED_INPUT = 3
    CONSISTENCY = 4
    UNMASK = 5


# --------------------------------------------------------------------------- helpers


def _encode(*fields: bytes | str | int) -> bytes:
    """Unambiguous byte encoding (length-prefixed) of fields, for signatures, AAD, info."""
    out = bytearray()
    for f in fields:
        if isinstance(f, str):
            f = f.encode()
        elif isinstance(f, int):
            f = f.to_bytes(8, "big", signed=True)
        out += len(f).to_bytes(4, "big") + f
    return bytes(out)


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s.encode(), validate=True)


def message_nbytes(msg: Any) -> int:
    """Payload size of a message: bytes, arrays and strings, recursively (for benchmarks)."""
    if isinstance(msg, (bytes, bytearray)):
        return len(msg)
    if isinstance(msg, np.ndarray):
        return msg.nbytes
    if isinstance(msg, str):
        return len(msg.encode())
    if isinstance(msg, Mapping):
        return sum(message_nbytes(k) + message_nbytes(v) for k, v in msg.items())
    if isinstance(msg, (list, tuple)):
        return sum(message_nbytes(v) for v in msg)
    return 8


def _field(msg: Mapping, name: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(msg, Mapping):
        raise MessageError(f"a message must be a dict, got {type(msg).__name__}")
    if name not in msg:
        raise MessageError(f"message of type {msg.get('type')!r} lacks field {name!r}")
    value = msg[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise MessageError(f"field {name!r} has type {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- parameters


#: SecAggParams digests by object id (each entry is dropped when its object is collected)
_DIGESTS: dict[int, bytes] = {}


@dataclass(frozen=True)
class SecAggParams:
    """Public parameters of one round, identical at every party (part of the job spec).

    roster: site id -> long-term identity key, for every site allowed to take part.
    threshold: t, shares needed to reconstruct; 2 <= t <= len(roster). t > n/2 is
        needed for security against a server that lies about who dropped (warned here;
        a datasite's review denies such a job, see :func:`majority_threshold`).
    shapes: the shapes of the arrays each site contributes, flattened in this order.
    quantization: fixed-point encoding; its num_sites must be >= len(roster).
    """

    job_id: str
    round: int
    roster: Mapping[str, VerifyKey]
    threshold: int
    shapes: tuple[tuple[int, ...], ...]
    quantization: QuantizationConfig

    def __post_init__(self) -> None:
        if not isinstance(self.job_id, str) or not self.job_id:
            raise TypeError("job_id must be a non-empty str")
        if not isinstance(self.round, int) or isinstance(self.round, bool) or self.round < 0:
            raise TypeError(f"round must be a non-negative int, got {self.round!r}")
        roster = dict(self.roster)
        for site, vk in roster.items():
            if not isinstance(site, str) or not site:
                raise TypeError(f"site ids must be non-empty str, got {site!r}")
            if not isinstance(vk, VerifyKey):
                raise TypeError(f"roster[{site!r}] must be a VerifyKey, got {type(vk).__name__}")
        if len(set(roster.values())) != len(roster):
            raise ValueError("two sites in the roster share one identity key")
        object.__setattr__(self, "roster", dict(sorted(roster.items())))
        n = len(roster)
        if not isinstance(self.threshold, int) or not 2 <= self.threshold <= n:
            raise ValueError(
                f"threshold must be an int with 2 <= t <= number of sites ({n}), got {self.threshold!r}"
            )
        if 2 * self.threshold <= n:
            warnings.warn(
                f"secure-aggregation threshold t={self.threshold} <= n/2 (n={n}): a server that "
                "lies about dropouts could reconstruct one site's input; use t > n/2",
                UserWarning,
                stacklevel=3,
            )
        shapes = tuple(tuple(int(d) for d in s) for s in self.shapes)
        if not shapes or any(d < 0 for s in shapes for d in s):
            raise ValueError(f"shapes must be a non-empty list of shapes, got {self.shapes!r}")
        object.__setattr__(self, "shapes", shapes)
        if not isinstance(self.quantization, QuantizationConfig):
            raise TypeError("quantization must be a QuantizationConfig")
        if self.quantization.num_sites < n:
            raise ValueError(
                f"quantization.num_sites={self.quantization.num_sites} < {n} sites: "
                "the sum could overflow Z_(2^k)"
            )
        self.digest()

    @property
    def sites(self) -> list[str]:
        return list(self.roster)

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def share_point(self, site: str) -> int:
        """The Shamir x-coordinate of a site: its 1-based position in the sorted roster."""
        return self.sites.index(site) + 1

    def to_dict(self) -> dict:
        return {
            "protocol": PROTOCOL,
            "job_id": self.job_id,
            "round": self.round,
            "roster": {s: vk.to_bytes().hex() for s, vk in self.roster.items()},
            "threshold": self.threshold,
            "shapes": [list(s) for s in self.shapes],
            "quantization": self.quantization.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "SecAggParams":
        if d.get("protocol") != PROTOCOL:
            raise MessageError(f"parameters are for protocol {d.get('protocol')!r}, not {PROTOCOL}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # warned once when the params were made
            return cls(
                job_id=d["job_id"],
                round=int(d["round"]),
                roster={s: VerifyKey.from_bytes(bytes.fromhex(h)) for s, h in d["roster"].items()},
                threshold=int(d["threshold"]),
                shapes=tuple(tuple(s) for s in d["shapes"]),
                quantization=QuantizationConfig.from_dict(d["quantization"]),
            )

    def digest(self) -> bytes:
        """SHA-256 of the canonical parameters; bound into every signature, key and AAD."""
        # bound into every key, share and signature: computed once per object (the fields
        # are frozen), kept beside the object rather than in it (__dict__ holds the fields)
        found = _DIGESTS.get(id(self))
        if found is None:
            found = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).digest()
            _DIGESTS[id(self)] = found
            weakref.finalize(self, _DIGESTS.pop, id(self), None)
        return found

    def for_round(self, round: int) -> "SecAggParams":
        """The same parameters for another round."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return SecAggParams(
                job_id=self.job_id,
                round=round,
                roster=self.roster,
                threshold=self.threshold,
                shapes=self.shapes,
                quantization=self.quantization,
            )

    # ---- derivations shared by sites and server

    def advert_payload(self, site: str, c_pk: bytes, s_pk: bytes) -> bytes:
        return _encode(PROTOCOL, "advertise", self.digest(), self.job_id, self.round, site, c_pk, s_pk)

    def consistency_payload(self, site: str, survivors: Sequence[str]) -> bytes:
        """What ``site`` signs in the consistency check: the parameters' digest (job,
        pass, attempt, roster, threshold...) and the survivor set U3 it was told (sorted)."""
        u3 = sorted(survivors)
        return _encode(
            PROTOCOL, "consistency", self.digest(), self.job_id, self.round, site, len(u3), *u3
        )

    def share_context(self, sender: str, receiver: str) -> bytes:
        return _encode(PROTOCOL, "share", self.digest(), self.job_id, self.round, sender, receiver)

    def pair_seed(self, secret: bytes, u: str, v: str) -> bytes:
        lo, hi = sorted((u, v))
        info = _encode(PROTOCOL, "pairwise-mask", self.job_id, self.round, lo, hi)
        return hkdf_sha256(secret, length=_SEED_BYTES, salt=self.digest(), info=info)

    def mask(self, seed: bytes) -> np.ndarray:
        dtype = self.quantization.dtype
        return np.frombuffer(keystream(seed, self.size * dtype.itemsize), dtype=dtype)

    def check_header(self, msg: Mapping, kind: str) -> None:
        if _field(msg, "type", str) != kind:
            raise MessageError(f"expected a {kind!r} message, got {msg.get('type')!r}")
        if _field(msg, "job_id", str) != self.job_id:
            raise MessageError(f"message is for job {msg['job_id']!r}, this session is {self.job_id!r}")
        if _field(msg, "round", int) != self.round:
            raise MessageError(f"message is for round {msg['round']}, this session is round {self.round}")

    def header(self, kind: str) -> dict:
        return {"type": kind, "job_id": self.job_id, "round": self.round}


# --------------------------------------------------------------------------- helpers of both parties


def _share_key(
    p: SecAggParams, c_sk: AgreementKey, peer_c_pk: bytes, *, sender: str, receiver: str
) -> tuple[bytes, bytes]:
    aad = p.share_context(sender, receiver)
    secret = c_sk.exchange(AgreementPublicKey.from_bytes(peer_c_pk))
    return hkdf_sha256(secret, length=32, salt=p.digest(), info=aad), aad


def _decode(data: bytes, count: int) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        n = int.from_bytes(data[i : i + 4], "big")
        out.append(data[i + 4 : i + 4 + n])
        i += 4 + n
    if len(out) != count or i != len(data):
        raise MessageError("malformed share plaintext")
    return out


def _verify_adverts(p: SecAggParams, adverts: list) -> dict[str, tuple[bytes, bytes]]:
    """site -> (c_pk, s_pk), each signature checked against the roster (SignatureError)."""
    out: dict[str, tuple[bytes, bytes]] = {}
    for a in adverts:
        p.check_header(a, "advertise")
        site = _field(a, "site", str)
        if site not in p.roster:
            raise MessageError(f"advert from {site!r}, which is not in the roster")
        if site in out:
            raise MessageError(f"two adverts from {site!r} (a replayed message?)")
        c_pk, s_pk = (bytes(_field(a, k, (bytes, bytearray))) for k in ("c_pk", "s_pk"))
        sig = bytes(_field(a, "signature", (bytes, bytearray)))
        p.roster[site].verify(sig, p.advert_payload(site, c_pk, s_pk))
        if c_pk == s_pk:
            raise MessageError(f"site {site!r} advertised the same key twice")
        out[site] = (c_pk, s_pk)
    return dict(sorted(out.items()))


def _survivor_list(msg: Mapping) -> list[str]:
    """The ``survivors`` field of a message: a list of distinct site names (MessageError)."""
    survivors = _field(msg, "survivors", list)
    if not all(isinstance(v, str) and v for v in survivors):
        raise MessageError("survivors must be a list of site names")
    if len(set(survivors)) != len(survivors):
        raise MessageError(f"survivors name a site twice: {survivors}")
    return survivors


def consistency_problems(p: SecAggParams, survivors: Sequence[str], signatures: Any) -> tuple[list[str], list[str]]:
    """Check the consistency signatures of a survivor set U3.

    Args:
        p: the round's parameters (the roster's identity keys verify the signatures).
        survivors: U3, the survivor set the signatures must all be over.
        signatures: site -> Ed25519 signature of :meth:`SecAggParams.consistency_payload`.

    Returns:
        (the sites whose signature over exactly ``survivors`` verifies, sorted; every
        problem found: a signer outside the roster or outside U3, a value that is not
        bytes, a signature that does not verify). Distinct signers are the dict's keys.
    """
    if not isinstance(signatures, Mapping):
        return [], [f"signatures must be a dict of site -> signature, got {type(signatures).__name__}"]
    u3 = set(survivors)
    valid: list[str] = []
    problems: list[str] = []
    for site, sig in signatures.items():
        if not isinstance(site, str) or site not in p.roster:
            problems.append(f"a signature from {site!r}, which is not in the roster")
        elif site not in u3:
            problems.append(f"a signature from {site!r}, which is not in the survivor set")
        elif not isinstance(sig, (bytes, bytearray)):
            problems.append(f"the signature of {site!r} is not bytes")
        else:
            try:
                p.roster[site].verify(bytes(sig), p.consistency_payload(site, survivors))
            except SignatureError:
                problems.append(
                    f"the signature of {site!r} is not over this survivor set {sorted(survivors)} "
                    f"(forged, or {site!r} was told another one)"
                )
            else:
                valid.append(site)
    return sorted(valid), problems


def majority_threshold(n_sites: int) -> int:
    """The smallest safe threshold for ``n_sites`` sites: ``floor(n/2) + 1`` (t > n/2, so
    two disjoint groups of t sites cannot exist and a server that lies about dropouts
    cannot collect both kinds of share of one site).

    Args:
        n_sites: the size of the roster.

    Returns:
        ``n_sites // 2 + 1``.

    Raises:
        ValueError: ``n_sites`` is not a positive int.
    """
    if isinstance(n_sites, bool) or not isinstance(n_sites, int) or n_sites < 1:
        raise ValueError(f"n_sites must be a positive int, got {n_sites!r}")
    return n_sites // 2 + 1


def _checked_inputs(arrays: Sequence[np.ndarray], shapes: tuple[tuple[int, ...], ...]) -> list[np.ndarray]:
    """The input arrays as flat float32/float64 vectors (views where possible, no
    concatenated copy), after checking them against the agreed shapes and for NaN/inf."""
    if isinstance(arrays, np.ndarray):
        raise TypeError("pass a list of arrays (one per shape in params.shapes), not one array")
    arrays = [np.asarray(a) for a in arrays]
    got = tuple(a.shape for a in arrays)
    if got != shapes:
        raise ValueError(f"input shapes {got} differ from the agreed shapes {shapes}")
    out = []
    for a in arrays:
        if a.dtype != np.float64 and a.dtype != np.float32:
            a = a.astype(np.float64)
        if not _all_finite(a):
            raise ValueError("input contains NaN or inf; nothing was sent")
        out.append(a.reshape(-1))
    return out


def _all_finite(a: np.ndarray) -> bool:
    """No NaN or inf in the float array ``a``: one sum (NaN/inf make it non-finite), and
    the exact element check only when the sum is not finite (it may have overflowed)."""
    if a.size == 0:
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(a, axis=None)):
            return True
    return bool(np.isfinite(a).all())
