"""Secure aggregation with double masking (Bonawitz et al., CCS 2017), as a pure library.

One round has four ordered stages. Each site runs a :class:`SiteSession`; the researcher
(the aggregation server, which only relays) runs a :class:`ServerSession`. Every message
is a plain dict of ``str``/``int``/``bytes``/``list``/``dict``/``numpy`` values so it can
travel through PySyft code requests.

====================  ======================================  ===============================
stage                 site                                    server
====================  ======================================  ===============================
1 advertise keys      ``advertise_keys() -> advert``          ``collect_advertisements(adverts) -> keys``
2 share keys          ``share_keys(keys) -> shares``          ``collect_shares(shares) -> {site: delivery}``
3 masked input        ``masked_input(delivery, arrays) -> m`` ``collect_masked_inputs(ms) -> unmask_request``
4 unmask              ``unmask(unmask_request) -> reveal``    ``unmask(reveals) -> AggregateResult``
====================  ======================================  ===============================

Keys: each site generates, *per round*, two X25519 pairs: ``c`` (encrypting shares to
peers) and ``s`` (pairwise masks), and signs both public keys with its long-term Ed25519
identity (:class:`~fedmtl.privacy.keys.SigningKey`), bound to the job, the round and the
digest of the public parameters. Sites check every advert against the roster of identity
keys in :class:`SecAggParams` (part of the approved job spec), so a relaying server cannot
substitute a key. Fresh keys per round are deliberate: when a site drops, the server
reconstructs its mask key; a key reused in a later round would unmask that site there.

Masks: the pairwise seed of sites u, v is ``HKDF-SHA256(X25519(s_u, s_v), salt=params
digest, info=job|round|u|v)``; the mask is one :func:`~fedmtl.privacy.keys.keystream` call
viewed as uint32/uint64, added by the smaller id and subtracted by the larger, mod 2^k.
Each site also adds a self mask from a random 32-byte seed ``b_u``. ``b_u`` and ``s_u``'s
private key are Shamir-split t-of-n; each share goes to its peer under AES-256-GCM with a
key from ``X25519(c_u, c_v)`` and AAD binding (params digest, job, round, sender, receiver).

Unmasking: survivors reveal their shares of the *mask keys of dropped sites* and of the
*self masks of survivors*. A site reveals nothing if the survivor set is smaller than t,
is not a subset of the sites that shared keys, or leaves the site itself out; and it never
reveals both kinds of share for one peer. With ``t > n/2`` no two disjoint groups of t
honest sites exist, so even a lying server cannot collect both secrets of one site.

Not implemented: the consistency-check round of the paper's actively secure variant
(sites signing the survivor set). See docs/secure_aggregation.md.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fedmtl.errors import SecAggError
from fedmtl.privacy.keys import (
    AgreementKey,
    AgreementPublicKey,
    SigningKey,
    VerifyKey,
    aes_gcm_decrypt,
    aes_gcm_encrypt,
    hkdf_sha256,
    keystream,
)
from fedmtl.privacy.quantization import QuantizationConfig, dequantize_sum, quantize_into
from fedmtl.privacy.shamir import ShamirError, Share, combine_shares, split_secret

__all__ = [
    "PROTOCOL",
    "Stage",
    "SecAggParams",
    "SiteSession",
    "ServerSession",
    "AggregateResult",
    "RoundStats",
    "run_local_round",
    "message_nbytes",
    "TooFewSitesError",
    "ProtocolStateError",
    "MessageError",
    "UnmaskRefusedError",
]

PROTOCOL = "fedmtl-secagg-v1"
_SEED_BYTES = 32
_NONCE_BYTES = 12


class TooFewSitesError(SecAggError):
    """Fewer than t sites are left at some stage; the round is aborted, nothing revealed."""


class ProtocolStateError(SecAggError):
    """A stage was called out of order or twice (a replayed request)."""


class MessageError(SecAggError, ValueError):
    """A message is malformed, for another job/round/parameter set, from an unknown or
    duplicated sender, or inconsistent with earlier messages."""


class UnmaskRefusedError(SecAggError):
    """An honest site refuses an unmask request that could reveal a site's input."""


class Stage(enum.IntEnum):
    """The ordered stages of one round (a site's state is the last stage it completed)."""

    NEW = 0
    ADVERTISE_KEYS = 1
    SHARE_KEYS = 2
    MASKED_INPUT = 3
    UNMASK = 4


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


@dataclass(frozen=True)
class SecAggParams:
    """Public parameters of one round, identical at every party (part of the job spec).

    roster: site id -> long-term identity key, for every site allowed to take part.
    threshold: t, shares needed to reconstruct; 2 <= t <= len(roster). t > n/2 is
        needed for security against a server that lies about who dropped (warned).
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
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).digest()

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


# --------------------------------------------------------------------------- site side


@dataclass
class _SiteState:
    """Everything a site must keep between stages (secret: store owner-only)."""

    stage: Stage = Stage.NEW
    c_sk: bytes = b""
    s_sk: bytes = b""
    b_seed: bytes = b""
    adverts: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # U1: site -> (c_pk, s_pk)
    own_shares: dict[str, bytes] = field(default_factory=dict)  # "b", "s" -> own Share bytes
    received: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # U2\{me}: (b, s) shares
    u2: list[str] = field(default_factory=list)
    revealed: dict[str, str] = field(default_factory=dict)  # peer -> "self_mask" | "mask_key"

    def to_dict(self) -> dict:
        return {
            "stage": int(self.stage),
            "c_sk": _b64(self.c_sk),
            "s_sk": _b64(self.s_sk),
            "b_seed": _b64(self.b_seed),
            "adverts": {k: [_b64(c), _b64(s)] for k, (c, s) in self.adverts.items()},
            "own_shares": {k: _b64(v) for k, v in self.own_shares.items()},
            "received": {k: [_b64(b), _b64(s)] for k, (b, s) in self.received.items()},
            "u2": list(self.u2),
            "revealed": dict(self.revealed),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "_SiteState":
        return cls(
            stage=Stage(d["stage"]),
            c_sk=_unb64(d["c_sk"]),
            s_sk=_unb64(d["s_sk"]),
            b_seed=_unb64(d["b_seed"]),
            adverts={k: (_unb64(c), _unb64(s)) for k, (c, s) in d["adverts"].items()},
            own_shares={k: _unb64(v) for k, v in d["own_shares"].items()},
            received={k: (_unb64(b), _unb64(s)) for k, (b, s) in d["received"].items()},
            u2=list(d["u2"]),
            revealed=dict(d["revealed"]),
        )


class SiteSession:
    """One site's side of one round. Call the stages in order; each call happens once.

    ``to_bytes()`` holds the round's secret keys: store it owner-only (e.g. with
    :func:`fedmtl.privacy.keys.save_private_key`), and persist it *before* returning a
    stage's message, so a restart can never answer the same stage twice.
    """

    def __init__(self, params: SecAggParams, *, site_id: str, identity: SigningKey):
        if not isinstance(params, SecAggParams):
            raise TypeError("params must be SecAggParams")
        if not isinstance(identity, SigningKey):
            raise TypeError("identity must be a SigningKey (the site's long-term key)")
        if site_id not in params.roster:
            raise ValueError(f"site {site_id!r} is not in the roster {params.sites}")
        if params.roster[site_id] != identity.verify_key:
            raise ValueError(
                f"identity key {identity.verify_key.fingerprint()[:16]} is not the roster's key "
                f"for {site_id!r}: load the site's own identity key"
            )
        self.params = params
        self.site_id = site_id
        self._identity = identity
        self._state = _SiteState()

    @property
    def stage(self) -> Stage:
        return self._state.stage

    def _expect(self, done: Stage) -> None:
        if self._state.stage != done:
            raise ProtocolStateError(
                f"site {self.site_id!r} is past stage {self._state.stage.name}; this call needs "
                f"stage {done.name} done last (a replayed or out-of-order request?)"
            )

    # ---- persistence

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"params": self.params.to_dict(), "site_id": self.site_id, "state": self._state.to_dict()}
        ).encode()

    @classmethod
    def from_bytes(cls, blob: bytes, *, identity: SigningKey) -> "SiteSession":
        d = json.loads(blob)
        session = cls(SecAggParams.from_dict(d["params"]), site_id=d["site_id"], identity=identity)
        session._state = _SiteState.from_dict(d["state"])
        return session

    # ---- stage 1

    def advertise_keys(self) -> dict:
        """Fresh X25519 pairs for this round, signed with the identity key."""
        self._expect(Stage.NEW)
        c, s = AgreementKey.generate(), AgreementKey.generate()
        c_pk, s_pk = c.public_key.to_bytes(), s.public_key.to_bytes()
        st = self._state
        st.c_sk, st.s_sk = c.to_bytes(), s.to_bytes()
        st.stage = Stage.ADVERTISE_KEYS
        return {
            **self.params.header("advertise"),
            "site": self.site_id,
            "c_pk": c_pk,
            "s_pk": s_pk,
            "signature": self._identity.sign(self.params.advert_payload(self.site_id, c_pk, s_pk)),
        }

    # ---- stage 2

    def share_keys(self, keys: Mapping) -> dict:
        """Verify every advert, then send each peer its encrypted shares of b_u and s_u."""
        self._expect(Stage.ADVERTISE_KEYS)
        p, st = self.params, self._state
        p.check_header(keys, "keys")
        adverts = _verify_adverts(p, _field(keys, "adverts", list))
        mine = adverts.get(self.site_id)
        own_pks = (
            AgreementKey.from_bytes(st.c_sk).public_key.to_bytes(),
            AgreementKey.from_bytes(st.s_sk).public_key.to_bytes(),
        )
        if mine != own_pks:
            raise MessageError(f"the key list does not hold site {self.site_id!r}'s own keys unchanged")
        if len(adverts) < p.threshold:
            raise TooFewSitesError(
                f"only {len(adverts)} site(s) advertised keys, threshold is {p.threshold}; abort the round"
            )
        st.adverts = adverts
        st.b_seed = os.urandom(_SEED_BYTES)
        n = len(p.sites)
        b_shares = split_secret(st.b_seed, threshold=p.threshold, num_shares=n)
        s_shares = split_secret(st.s_sk, threshold=p.threshold, num_shares=n)
        c_sk = AgreementKey.from_bytes(st.c_sk)
        ciphertexts = {}
        for peer, (c_pk, _) in adverts.items():
            i = p.share_point(peer) - 1
            if peer == self.site_id:
                st.own_shares = {"b": b_shares[i].to_bytes(), "s": s_shares[i].to_bytes()}
                continue
            key, aad = _share_key(p, c_sk, c_pk, sender=self.site_id, receiver=peer)
            nonce = os.urandom(_NONCE_BYTES)
            plain = _encode(b_shares[i].to_bytes(), s_shares[i].to_bytes())
            ciphertexts[peer] = nonce + aes_gcm_encrypt(key, nonce, plain, aad)
        st.stage = Stage.SHARE_KEYS
        return {**p.header("shares"), "site": self.site_id, "ciphertexts": ciphertexts}

    # ---- stage 3

    def masked_input(
        self, delivery: Mapping, arrays: Sequence[np.ndarray], *, rng: np.random.Generator | None = None
    ) -> dict:
        """Decrypt the shares addressed to this site, then return the masked, quantised input."""
        self._expect(Stage.SHARE_KEYS)
        p, st = self.params, self._state
        p.check_header(delivery, "delivery")
        if _field(delivery, "site", str) != self.site_id:
            raise MessageError(f"delivery is addressed to {delivery['site']!r}, not {self.site_id!r}")
        u2 = _field(delivery, "u2", list)
        if len(set(u2)) != len(u2) or self.site_id not in u2 or not set(u2) <= set(st.adverts):
            raise MessageError("u2 must list distinct sites that advertised keys, including this one")
        if len(u2) < p.threshold:
            raise TooFewSitesError(
                f"only {len(u2)} site(s) shared keys, threshold is {p.threshold}; abort the round"
            )
        cts = _field(delivery, "ciphertexts", dict)
        if set(cts) != set(u2) - {self.site_id}:
            raise MessageError("the delivery's ciphertexts do not match u2 (one per peer expected)")
        vector = _flatten(arrays, p.shapes)  # validate input before touching state
        c_sk = AgreementKey.from_bytes(st.c_sk)
        received = {}
        for sender in sorted(cts):
            ct = cts[sender]
            if not isinstance(ct, (bytes, bytearray)) or len(ct) < _NONCE_BYTES + 16:
                raise MessageError(f"ciphertext from {sender!r} is not bytes of a valid length")
            key, aad = _share_key(p, c_sk, st.adverts[sender][0], sender=sender, receiver=self.site_id)
            plain = aes_gcm_decrypt(key, bytes(ct[:_NONCE_BYTES]), bytes(ct[_NONCE_BYTES:]), aad)
            b_share, s_share = _decode(plain, 2)
            for raw in (b_share, s_share):
                share = Share.from_bytes(raw)
                if share.x != p.share_point(self.site_id) or share.threshold != p.threshold:
                    raise MessageError(f"share from {sender!r} is not for this site's point/threshold")
            received[sender] = (b_share, s_share)

        # vector is this call's own float64 copy: encode into its buffer (no new array)
        y = quantize_into(vector, p.quantization, vector.view(p.quantization.dtype)[: vector.size], rng=rng)
        y += p.mask(st.b_seed)
        s_sk = AgreementKey.from_bytes(st.s_sk)
        for peer in u2:
            if peer == self.site_id:
                continue
            seed = p.pair_seed(s_sk.exchange(AgreementPublicKey.from_bytes(st.adverts[peer][1])), self.site_id, peer)
            if self.site_id < peer:
                y += p.mask(seed)
            else:
                y -= p.mask(seed)
        st.received, st.u2 = received, sorted(u2)
        st.stage = Stage.MASKED_INPUT
        return {**p.header("masked"), "site": self.site_id, "masked": y}

    # ---- stage 4

    def unmask(self, request: Mapping) -> dict:
        """Reveal shares: mask keys of dropped sites, self-mask seeds of survivors."""
        self._expect(Stage.MASKED_INPUT)
        p, st = self.params, self._state
        p.check_header(request, "unmask_request")
        survivors = _field(request, "survivors", list)
        if len(set(survivors)) != len(survivors) or not set(survivors) <= set(st.u2):
            raise UnmaskRefusedError("survivors must be distinct sites that shared keys; revealing nothing")
        if self.site_id not in survivors:
            raise UnmaskRefusedError(f"site {self.site_id!r} is listed as dropped; revealing nothing")
        if len(survivors) < p.threshold:
            raise TooFewSitesError(
                f"only {len(survivors)} survivor(s), threshold is {p.threshold}: revealing nothing, abort"
            )
        dropped = sorted(set(st.u2) - set(survivors))
        plan = {v: "self_mask" for v in survivors} | {v: "mask_key" for v in dropped}
        clash = [v for v, kind in plan.items() if st.revealed.get(v, kind) != kind]
        if clash:
            raise UnmaskRefusedError(
                f"already revealed the other kind of share for {clash}: revealing both would "
                "expose their inputs; refusing"
            )
        own = st.own_shares
        self_mask_shares = {
            v: own["b"] if v == self.site_id else st.received[v][0] for v in survivors
        }
        mask_key_shares = {v: st.received[v][1] for v in dropped}
        st.revealed.update(plan)
        st.stage = Stage.UNMASK
        return {
            **p.header("unmask"),
            "site": self.site_id,
            "self_mask_shares": self_mask_shares,
            "mask_key_shares": mask_key_shares,
        }


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


def _flatten(arrays: Sequence[np.ndarray], shapes: tuple[tuple[int, ...], ...]) -> np.ndarray:
    if isinstance(arrays, np.ndarray):
        raise TypeError("pass a list of arrays (one per shape in params.shapes), not one array")
    arrays = [np.asarray(a) for a in arrays]
    got = tuple(a.shape for a in arrays)
    if got != shapes:
        raise ValueError(f"input shapes {got} differ from the agreed shapes {shapes}")
    flat = np.concatenate([a.astype(np.float64, copy=False).ravel() for a in arrays])
    if not np.all(np.isfinite(flat)):
        raise ValueError("input contains NaN or inf; nothing was sent")
    return flat


# --------------------------------------------------------------------------- server side


@dataclass
class AggregateResult:
    """The de-quantised sum, in the agreed shapes, and who took part."""

    arrays: list[np.ndarray]
    survivors: list[str]
    dropped: list[str]


class ServerSession:
    """The aggregation server (the researcher): relays messages, learns only the sum."""

    def __init__(self, params: SecAggParams):
        if not isinstance(params, SecAggParams):
            raise TypeError("params must be SecAggParams")
        self.params = params
        self.stage = Stage.NEW
        self._adverts: dict[str, tuple[bytes, bytes]] = {}
        self._u2: list[str] = []
        self._masked: dict[str, np.ndarray] = {}

    def _expect(self, done: Stage) -> None:
        if self.stage != done:
            raise ProtocolStateError(f"server is at stage {self.stage.name}; this call needs {done.name}")

    def _at_least_t(self, sites: Iterable[str], what: str) -> None:
        n = len(list(sites))
        if n < self.params.threshold:
            raise TooFewSitesError(
                f"only {n} site(s) {what}, threshold is {self.params.threshold}: round "
                f"{self.params.round} of job {self.params.job_id!r} aborted, nothing revealed"
            )

    def _senders(self, messages: Sequence[Mapping], kind: str, allowed: Iterable[str]) -> dict[str, Mapping]:
        allowed = set(allowed)
        out: dict[str, Mapping] = {}
        for m in messages:
            self.params.check_header(m, kind)
            site = _field(m, "site", str)
            if site not in allowed:
                raise MessageError(f"{kind!r} message from {site!r}, which may not send one now")
            if site in out:
                raise MessageError(f"two {kind!r} messages from {site!r} (a replayed message?)")
            out[site] = m
        return dict(sorted(out.items()))

    def collect_advertisements(self, adverts: Sequence[Mapping]) -> dict:
        """Verify the adverts; the returned ``keys`` message goes to every advertising site."""
        self._expect(Stage.NEW)
        self._adverts = _verify_adverts(self.params, list(adverts))
        self._at_least_t(self._adverts, "advertised keys")
        self.stage = Stage.ADVERTISE_KEYS
        return {**self.params.header("keys"), "adverts": list(adverts)}

    def collect_shares(self, messages: Sequence[Mapping]) -> dict[str, dict]:
        """Route the encrypted shares; returns one ``delivery`` message per site in U2."""
        self._expect(Stage.ADVERTISE_KEYS)
        msgs = self._senders(messages, "shares", self._adverts)
        self._at_least_t(msgs, "shared keys")
        u2 = list(msgs)
        for site, m in msgs.items():
            if not set(u2) - {site} <= set(_field(m, "ciphertexts", dict)):
                raise MessageError(f"site {site!r} sent no shares for some peers in {u2}")
        self._u2 = u2
        self.stage = Stage.SHARE_KEYS
        return {
            v: {
                **self.params.header("delivery"),
                "site": v,
                "u2": list(u2),
                "ciphertexts": {u: msgs[u]["ciphertexts"][v] for u in u2 if u != v},
            }
            for v in u2
        }

    def collect_masked_inputs(self, messages: Sequence[Mapping]) -> dict:
        """Keep the masked vectors; the returned ``unmask_request`` goes to every survivor."""
        self._expect(Stage.SHARE_KEYS)
        msgs = self._senders(messages, "masked", self._u2)
        dtype, size = self.params.quantization.dtype, self.params.size
        for site, m in msgs.items():
            y = _field(m, "masked", np.ndarray)
            if y.dtype != dtype or y.shape != (size,):
                raise MessageError(f"masked vector from {site!r} is {y.dtype}{y.shape}, expected {dtype}({size},)")
        self._at_least_t(msgs, "sent masked inputs")
        self._masked = {s: m["masked"] for s, m in msgs.items()}
        self.stage = Stage.MASKED_INPUT
        return {**self.params.header("unmask_request"), "survivors": list(self._masked)}

    def unmask(self, reveals: Sequence[Mapping]) -> AggregateResult:
        """Reconstruct the dropped sites' pairwise masks and survivors' self masks; the sum."""
        self._expect(Stage.MASKED_INPUT)
        p = self.params
        survivors = list(self._masked)
        dropped = sorted(set(self._u2) - set(survivors))
        msgs = self._senders(reveals, "unmask", survivors)
        self._at_least_t(msgs, "answered the unmask request")
        b_shares: dict[str, list[Share]] = {v: [] for v in survivors}
        s_shares: dict[str, list[Share]] = {v: [] for v in dropped}
        for site, m in msgs.items():
            for kind, wanted, into in (
                ("self_mask_shares", survivors, b_shares),
                ("mask_key_shares", dropped, s_shares),
            ):
                got = _field(m, kind, dict)
                if set(got) != set(wanted):
                    raise MessageError(f"{site!r} revealed {kind} for {sorted(got)}, expected {sorted(wanted)}")
                for v, raw in got.items():
                    into[v].append(Share.from_bytes(bytes(raw)))

        total = np.zeros(p.size, dtype=p.quantization.dtype)
        for y in self._masked.values():
            total += y
        try:
            for v in survivors:
                total -= p.mask(combine_shares(b_shares[v]))
            for v in dropped:
                s_sk = AgreementKey.from_bytes(combine_shares(s_shares[v]))
                if s_sk.public_key.to_bytes() != self._adverts[v][1]:
                    raise MessageError(f"reconstructed mask key of {v!r} does not match its advert")
                for u in survivors:
                    seed = p.pair_seed(s_sk.exchange(AgreementPublicKey.from_bytes(self._adverts[u][1])), u, v)
                    # survivor u added +mask if u < v, else -mask: remove it
                    if u < v:
                        total -= p.mask(seed)
                    else:
                        total += p.mask(seed)
        except ShamirError as exc:
            raise MessageError(f"revealed shares are inconsistent: {exc}") from exc
        flat = dequantize_sum(total, p.quantization)
        arrays, start = [], 0
        for shape in p.shapes:
            stop = start + math.prod(shape)
            arrays.append(flat[start:stop].reshape(shape))
            start = stop
        self.stage = Stage.UNMASK
        return AggregateResult(arrays=arrays, survivors=survivors, dropped=dropped)


# --------------------------------------------------------------------------- local driver


@dataclass
class RoundStats:
    """Timings (seconds) and payload sizes (bytes) of a local round."""

    site_seconds: dict[str, float] = field(default_factory=dict)
    server_seconds: float = 0.0
    site_bytes_sent: dict[str, int] = field(default_factory=dict)
    server_bytes_sent: int = 0


def run_local_round(
    params: SecAggParams,
    *,
    identities: Mapping[str, SigningKey],
    inputs: Mapping[str, Sequence[np.ndarray]],
    dropouts: Mapping[str, Stage] | None = None,
    persist: bool = False,
    stats: RoundStats | None = None,
) -> AggregateResult:
    """Drive every site in ``inputs`` and the server through one round, in process.

    dropouts: site -> the first stage it does not perform (e.g. ``Stage.MASKED_INPUT``:
        it shared keys, then vanished, so its masks must be recovered).
    persist: round-trip each site through ``to_bytes``/``from_bytes`` between stages,
        as the datasite runtime does.
    stats: filled with per-site and server times and bytes sent, if given.
    """
    dropouts = dict(dropouts or {})
    stats = stats if stats is not None else RoundStats()
    sessions = {s: SiteSession(params, site_id=s, identity=identities[s]) for s in sorted(inputs)}

    def site_step(stage: Stage, active: Iterable[str], fn) -> dict[str, dict]:
        out = {}
        for s in active:
            if dropouts.get(s, Stage.UNMASK + 1) <= stage:
                continue
            t0 = time.perf_counter()
            if persist:
                sessions[s] = SiteSession.from_bytes(sessions[s].to_bytes(), identity=identities[s])
            out[s] = fn(sessions[s])
            stats.site_seconds[s] = stats.site_seconds.get(s, 0.0) + time.perf_counter() - t0
            stats.site_bytes_sent[s] = stats.site_bytes_sent.get(s, 0) + message_nbytes(out[s])
        return out

    def server_step(fn, arg):
        t0 = time.perf_counter()
        out = fn(arg)
        stats.server_seconds += time.perf_counter() - t0
        if not isinstance(out, AggregateResult):
            stats.server_bytes_sent += message_nbytes(out)
        return out

    server = ServerSession(params)
    adverts = site_step(Stage.ADVERTISE_KEYS, sessions, lambda ss: ss.advertise_keys())
    keys = server_step(server.collect_advertisements, list(adverts.values()))
    shares = site_step(Stage.SHARE_KEYS, adverts, lambda ss: ss.share_keys(keys))
    deliveries = server_step(server.collect_shares, list(shares.values()))
    masked = site_step(
        Stage.MASKED_INPUT, deliveries, lambda ss: ss.masked_input(deliveries[ss.site_id], inputs[ss.site_id])
    )
    request = server_step(server.collect_masked_inputs, list(masked.values()))
    reveals = site_step(Stage.UNMASK, masked, lambda ss: ss.unmask(request))
    return server_step(server.unmask, list(reveals.values()))
