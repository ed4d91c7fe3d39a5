"""Secure aggregation, the server's side: :class:`ServerSession` and an in-process
driver of whole rounds (see :mod:`fedmtl.privacy.secagg`)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from fedmtl.privacy.keys import (
    AgreementKey,
    AgreementPublicKey,
    SigningKey,
)
from fedmtl.privacy.quantization import dequantize_sum
from fedmtl.privacy.secagg_common import (
    MessageError,
    ProtocolStateError,
    SecAggParams,
    Stage,
    TooFewSitesError,
    _field,
    _verify_adverts,
    consistency_problems,
    message_nbytes,
)
from fedmtl.privacy.secagg_site import SiteSession
from fedmtl.privacy.shamir import ShamirError, Share, combine_shares

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
        self._signatures: dict[str, bytes] = {}

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
        """Keep the masked vectors; the returned ``consistency_request`` (the survivor set
        U3) goes to every survivor, who signs it (:meth:`collect_consistency`)."""
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
        return {**self.params.header("consistency_request"), "survivors": list(self._masked)}

    def collect_consistency(self, messages: Sequence[Mapping]) -> dict:
        """Check the survivors' signatures over U3; the returned ``unmask_request`` (U3
        and every signature) goes to each site that signed.

        Args:
            messages: the ``consistency`` replies of sites in U3.

        Returns:
            the ``unmask_request``: ``survivors`` (U3) and ``signatures`` (site -> bytes).

        Raises:
            MessageError: a reply from outside U3, twice from one site, or with a
                signature that does not verify over U3.
            TooFewSitesError: fewer than t sites signed; nothing can be revealed.
        """
        self._expect(Stage.MASKED_INPUT)
        p = self.params
        u3 = list(self._masked)
        msgs = self._senders(messages, "consistency", u3)
        signatures = {s: bytes(_field(m, "signature", (bytes, bytearray))) for s, m in msgs.items()}
        valid, problems = consistency_problems(p, u3, signatures)
        if problems:
            raise MessageError("consistency signatures: " + "; ".join(problems))
        self._at_least_t(valid, "signed the survivor set")
        self._signatures = signatures
        self.stage = Stage.CONSISTENCY
        return {**p.header("unmask_request"), "survivors": u3, "signatures": dict(signatures)}

    def unmask(self, reveals: Sequence[Mapping]) -> AggregateResult:
        """Reconstruct the dropped sites' pairwise masks and survivors' self masks; the sum."""
        self._expect(Stage.CONSISTENCY)
        p = self.params
        survivors = list(self._masked)
        dropped = sorted(set(self._u2) - set(survivors))
        msgs = self._senders(reveals, "unmask", self._signatures)
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
        it shared keys, then vanished, so its masks must be recovered;
        ``Stage.CONSISTENCY``: it sent its masked input, then signed nothing).
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
    check = server_step(server.collect_masked_inputs, list(masked.values()))
    signed = site_step(Stage.CONSISTENCY, masked, lambda ss: ss.consistency_check(check))
    request = server_step(server.collect_consistency, list(signed.values()))
    reveals = site_step(Stage.UNMASK, signed, lambda ss: ss.unmask(request))
    return server_step(server.unmask, list(reveals.values()))

