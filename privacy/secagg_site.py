"""Secure aggregation, the site's side: :class:`SiteSession` (see :mod:`fedmtl.privacy.secagg`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from fedmtl.privacy.keys import (
    AgreementKey,
    AgreementPublicKey,
    SigningKey,
    aes_gcm_decrypt,
    aes_gcm_encrypt,
)
from fedmtl.privacy.quantization import quantize_into
from fedmtl.privacy.secagg_common import (
    _NONCE_BYTES,
    _SEED_BYTES,
    MessageError,
    ProtocolStateError,
    SecAggParams,
    Stage,
    TooFewSitesError,
    UnmaskRefusedError,
    _b64,
    _checked_inputs,
    _decode,
    _encode,
    _field,
    _share_key,
    _survivor_list,
    _unb64,
    _verify_adverts,
    consistency_problems,
)
from fedmtl.privacy.shamir import Share, split_secret

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
    u3: list[str] = field(default_factory=list)  # the one survivor set this site signed
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
            "u3": list(self.u3),
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
            u3=list(d.get("u3", [])),
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
        inputs = _checked_inputs(arrays, p.shapes)  # validate input before touching state
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

        # encode each input straight into its slice of the ring vector (no float64 copy)
        y = np.empty(p.size, dtype=p.quantization.dtype)
        o = 0
        for x in inputs:
            quantize_into(x, p.quantization, y[o : o + x.size], rng=rng)
            o += x.size
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

    def consistency_check(self, request: Mapping) -> dict:
        """Sign the survivor set U3 the server says sent masked inputs (once per round).

        Args:
            request: the server's ``consistency_request`` (``survivors``: U3).

        Returns:
            a ``consistency`` message: this site's Ed25519 identity signature over the
            parameters' digest and U3 (:meth:`SecAggParams.consistency_payload`).

        Raises:
            UnmaskRefusedError: U3 leaves this site out or names a site that did not share
                keys (this site signs nothing).
            TooFewSitesError: U3 has fewer than t sites.
            ProtocolStateError: not right after ``masked_input`` (a site signs one U3 per
                round; a second request is refused).
        """
        self._expect(Stage.MASKED_INPUT)
        p, st = self.params, self._state
        p.check_header(request, "consistency_request")
        survivors = _survivor_list(request)
        self._check_survivors(survivors)
        st.u3 = sorted(survivors)
        st.stage = Stage.CONSISTENCY
        return {
            **p.header("consistency"),
            "site": self.site_id,
            "signature": self._identity.sign(p.consistency_payload(self.site_id, st.u3)),
        }

    def _check_survivors(self, survivors: list[str]) -> None:
        p, st = self.params, self._state
        if not set(survivors) <= set(st.u2):
            raise UnmaskRefusedError(
                f"survivors {sorted(set(survivors) - set(st.u2))} did not share keys with this site; "
                "revealing nothing"
            )
        if self.site_id not in survivors:
            raise UnmaskRefusedError(f"site {self.site_id!r} is listed as dropped; revealing nothing")
        if len(survivors) < p.threshold:
            raise TooFewSitesError(
                f"only {len(survivors)} survivor(s), threshold is {p.threshold}: revealing nothing, abort"
            )

    # ---- stage 5

    def unmask(self, request: Mapping) -> dict:
        """Reveal shares: mask keys of dropped sites, self-mask seeds of survivors, only
        against at least t consistency signatures over the survivor set this site signed.

        Args:
            request: the server's ``unmask_request``: ``survivors`` (U3) and
                ``signatures`` (site -> consistency signature, from sites in U3).

        Returns:
            an ``unmask`` message with this site's shares of the survivors' self-mask seeds
            and of the dropped sites' mask keys.

        Raises:
            UnmaskRefusedError: U3 is not the one this site signed, fewer than t valid
                signatures over it, a forged or foreign signature, or revealing would give
                away both kinds of share of one site. Nothing is revealed and the session
                stays where it was.
            ProtocolStateError: not right after ``consistency_check``.
        """
        self._expect(Stage.CONSISTENCY)
        p, st = self.params, self._state
        p.check_header(request, "unmask_request")
        try:
            survivors = _survivor_list(request)
        except MessageError as e:
            raise UnmaskRefusedError(f"{e}; revealing nothing") from None
        if sorted(survivors) != st.u3:
            raise UnmaskRefusedError(
                f"the unmask request's survivor set {sorted(survivors)} is not the one this site signed "
                f"{st.u3} (the server told sites different dropout stories?); revealing nothing"
            )
        self._check_survivors(survivors)
        if "signatures" not in request:
            raise UnmaskRefusedError("the unmask request carries no consistency signatures; revealing nothing")
        valid, problems = consistency_problems(p, st.u3, request["signatures"])
        if problems:
            raise UnmaskRefusedError(
                "consistency check failed: " + "; ".join(problems) + "; revealing nothing"
            )
        if len(valid) < p.threshold:
            raise UnmaskRefusedError(
                f"consistency check failed: only {len(valid)} valid signature(s) over the survivor set "
                f"{st.u3} ({valid}), threshold is {p.threshold} (sites may have been told different "
                "survivor sets); revealing nothing"
            )
        dropped = sorted(set(st.u2) - set(st.u3))
        plan = {v: "self_mask" for v in st.u3} | {v: "mask_key" for v in dropped}
        clash = [v for v, kind in plan.items() if st.revealed.get(v, kind) != kind]
        if clash:
            raise UnmaskRefusedError(
                f"already revealed the other kind of share for {clash}: revealing both would "
                "expose their inputs; refusing"
            )
        own = st.own_shares
        self_mask_shares = {
            v: own["b"] if v == self.site_id else st.received[v][0] for v in st.u3
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
