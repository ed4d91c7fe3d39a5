"""Secure aggregation with double masking (Bonawitz et al., CCS 2017), as a pure library.

One round has five ordered stages. Each site runs a :class:`SiteSession`; the researcher
(the aggregation server, which only relays) runs a :class:`ServerSession`. Every message
is a plain dict of ``str``/``int``/``bytes``/``list``/``dict``/``numpy`` values so it can
travel through PySyft code requests.

====================  ======================================  ===============================
stage                 site                                    server
====================  ======================================  ===============================
1 advertise keys      ``advertise_keys() -> advert``          ``collect_advertisements(adverts) -> keys``
2 share keys          ``share_keys(keys) -> shares``          ``collect_shares(shares) -> {site: delivery}``
3 masked input        ``masked_input(delivery, arrays) -> m`` ``collect_masked_inputs(ms) -> consistency_request``
4 consistency check   ``consistency_check(request) -> sig``   ``collect_consistency(sigs) -> unmask_request``
5 unmask              ``unmask(unmask_request) -> reveal``    ``unmask(reveals) -> AggregateResult``
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

Consistency check (the paper's round "ConsistencyCheck"): the server sends every
survivor the survivor set U3 (the sites whose masked inputs it holds); each site signs,
with its identity key, the parameters' digest (job, pass, attempt...) and U3, once per
round, and the server forwards the signatures with the unmask request.

Unmasking: survivors reveal their shares of the *mask keys of dropped sites* and of the
*self masks of survivors*. A site reveals nothing unless the request's U3 is the one it
signed and carries at least t valid signatures over that U3 from distinct roster sites in
U3; nor if U3 is smaller than t, is not a subset of the sites that shared keys, or leaves
the site itself out; and it never reveals both kinds of share for one peer. With
``t > n/2`` (:func:`majority_threshold`) two groups of t signers always share an honest
site, which signed only one U3, so a server that tells sites different dropout stories
gets the t matching signatures for at most one of them and cannot collect both secrets of
any site. See docs/secure_aggregation.md.
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
    consistency_problems,
    majority_threshold,
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
    "majority_threshold",
    "consistency_problems",
    "TooFewSitesError",
    "ProtocolStateError",
    "MessageError",
    "UnmaskRefusedError",
]
