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

from fedmtl.privacy.secagg_common import (
    PROTOCOL,
    MessageError,
    ProtocolStateError,
    SecAggParams,
    Stage,
    TooFewSitesError,
    UnmaskRefusedError,
    message_nbytes,
)
from fedmtl.privacy.secagg_server import AggregateResult, RoundStats, ServerSession, run_local_round
from fedmtl.privacy.secagg_site import SiteSession

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
