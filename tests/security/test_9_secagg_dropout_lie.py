"""Attack class 9 — the dropout lie at five sites: the researcher relays every secure-
aggregation message, so it can tell two groups of sites different stories about who
dropped. Sites told "site X survived" reveal shares of X's self-mask seed; sites told
"X dropped" reveal shares of X's mask key; with both, X's masked update is unmasked.

Five sites: the suite's three real datasites plus two stand-ins (in-process
:class:`~fedmtl.privacy.secagg.SiteSession`\\ s with identity keys of their own, which the
owners pin like any peer). The defences:

- review denies a threshold t <= n/2 of the roster (t = 2 of 5), so two disjoint groups
  of t sites cannot exist;
- at t = 3 of 5 each site signs the one survivor set it is told (the consistency check)
  and reveals shares only against t signatures over the survivor set it signed: the
  group told "X dropped" is refused, and the attacker never holds X's mask key.

Both tests FAIL if the attack works: the weak job approved, or any share of the target's
mask key handed out.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import security_kit as K

from fedmtl.datasites.server import peers
from fedmtl.privacy.keys import SigningKey
from fedmtl.privacy.secagg import ServerSession, SiteSession, UnmaskRefusedError
from fedmtl.researcher.job import SyftTransport

pytestmark = pytest.mark.integration

STAND_INS = ("stand-in-a", "stand-in-b")
OWNER = "owner@hospital.example"
#: the site whose update the attacker wants
TARGET = "riverside"
#: told the target survived (its own site among them): reveal its self-mask seed
GROUP_A = ("general", "stand-in-a", TARGET)
#: told the target dropped: would reveal its mask key
GROUP_B = ("st-mary", "stand-in-b")


@pytest.fixture(scope="module")
def five_sites(federation):
    """The owners pin two stand-ins; the same legit job over the five sites is submitted
    to the three real datasites twice: at threshold 2 (t <= n/2) and at 3 (the default
    floor(5/2) + 1). Yields (batch, specs by threshold, stand-in keys, researcher email)."""
    keys = {n: SigningKey.generate() for n in STAND_INS}
    homes = [h.home for h in federation.handles.values()]
    for home in homes:
        for name, key in keys.items():
            peers.add_peer(home, name=name, fingerprint=key.verify_key.fingerprint(), who=OWNER)
    try:
        email = federation.researcher("secagg dropout lie")
        # made for the three connected sites, its threshold left to the default
        job = federation.job(K.legit_spec(name="lie", scaling="range", secagg={"clip": 1.0}), email=email)
        assert job.spec.secagg.threshold == 2, "the default threshold of a 3-site job is floor(3/2) + 1 = 2"
        roster = {**job.site_specs["general"]["roster"], **{n: k.verify_key.to_bytes().hex() for n, k in keys.items()}}
        subs, specs = {}, {}
        for t in (2, 3):
            specs[t] = {}
            for site in K.SITES:
                spec, fn = federation.variant_spec(job.site_specs[site], f"t{t}")
                spec["roster"] = dict(roster)
                spec["job"]["secagg"]["threshold"] = t
                specs[t][site] = (spec, fn)
                subs[f"t{t}@{site}"] = federation.forge(f"t{t}@{site}", site, spec, fn, email=email)
        yield K.Batch(federation, subs), specs, keys, email
    finally:
        for home in homes:
            for name in keys:
                peers.remove_peer(home, name=name, who=OWNER)


@pytest.mark.parametrize("site", K.SITES)
def test_threshold_of_at_most_half_the_roster_is_denied(five_sites, federation, site):
    batch, _, _, _ = five_sites
    sub, decision = batch.decision(f"t2@{site}")
    print(f"t=2 of 5 at {site}: {decision.status}: {decision.reason[:300]}")
    federation.assert_denied(sub, decision, allow_refused=False)
    assert "training.min_secagg_threshold" in decision.reason, decision.reason
    assert "not more than half of the 5 sites in the roster" in decision.reason, decision.reason
    assert "secagg.threshold >= 3" in decision.reason, decision.reason


def test_two_dropout_stories_unmask_no_site(five_sites, federation):
    # Prepare: the t = 3 job is approved at the three real datasites
    batch, specs, keys, email = five_sites
    for site in K.SITES:
        _, decision = batch.decision(f"t3@{site}")
        assert decision.status == "APPROVED", f"the t=3 job over 5 pinned sites was not approved at {site}: {decision}"
    spec, fn = specs[3]["general"]
    transport = SyftTransport(federation.session(email), fn)
    p, attempt = 1, 0
    plan = K.protocol().plan(spec, p)
    params = K.protocol().secagg_params(spec, p, attempt, plan)
    assert params.threshold == 3 and params.sites == sorted([*K.SITES, *STAND_INS])
    stand_ins = {n: SiteSession(params, site_id=n, identity=k) for n, k in keys.items()}
    zeros = [np.zeros(shape) for shape in plan.shapes]

    def real(site: str, stage: str, **extra) -> dict:
        return transport.call(site, {"stage": stage, "pass": p, "attempt": attempt, **extra})

    def ok(reply: dict, what: str) -> dict:
        assert reply.get("ok"), f"{what}: {reply.get('error')}"
        return reply["message"]

    # the honest part of the round, with the five sites
    server = ServerSession(params)
    weights = np.zeros(federation.model_size(spec), dtype=np.float32)
    adverts = [ok(real(s, "advertise", weights=weights), f"advertise at {s}") for s in K.SITES]
    adverts += [ss.advertise_keys() for ss in stand_ins.values()]
    keys_msg = server.collect_advertisements(adverts)
    shares = [ok(real(s, "share_keys", keys=keys_msg), f"share_keys at {s}") for s in K.SITES]
    shares += [ss.share_keys(keys_msg) for ss in stand_ins.values()]
    deliveries = server.collect_shares(shares)
    masked = [ok(real(s, "masked_input", delivery=deliveries[s]), f"masked_input at {s}") for s in K.SITES]
    masked += [ss.masked_input(deliveries[n], zeros) for n, ss in stand_ins.items()]
    check = server.collect_masked_inputs(masked)
    assert check["survivors"] == params.sites  # everyone's masked input is in

    # Execute: the lie. Group A is told everyone survived, group B that the target dropped
    story_a = list(params.sites)
    story_b = [s for s in params.sites if s != TARGET]

    def sign(site: str, story: list[str]) -> bytes:
        request = dict(check, survivors=story)
        if site in stand_ins:
            return stand_ins[site].consistency_check(request)["signature"]
        return ok(real(site, "consistency", request=request), f"consistency at {site}")["signature"]

    sigs_a = {s: sign(s, story_a) for s in GROUP_A}
    sigs_b = {s: sign(s, story_b) for s in GROUP_B}

    def unmask(site: str, survivors: list[str], signatures: dict) -> tuple[dict | None, str]:
        request = {**params.header("unmask_request"), "survivors": survivors, "signatures": signatures}
        if site in stand_ins:
            try:
                return stand_ins[site].unmask(request), ""
            except UnmaskRefusedError as e:
                return None, str(e)
        reply = real(site, "unmask", request=request)
        return (reply["message"], "") if reply.get("ok") else (None, f"{reply.get('kind')}: {reply.get('error')}")

    mask_key_shares = []  # shares of the target's mask key the attacker got
    refusals: dict[tuple[str, str], str] = {}
    attempts = {
        # B's story with B's two honest signatures: fewer than t = 3
        "two signatures": (story_b, sigs_b, r"only 2 valid signature\(s\) over the survivor set"),
        # B's story padded with A's signatures, which are over A's story
        "signatures over the other story": (story_b, {**sigs_a, **sigs_b}, "is not over this survivor set"),
        # A's story with A's three valid signatures: not what B signed
        "the other story": (story_a, sigs_a, "is not the one this site signed"),
    }
    for label, (survivors, signatures, _) in attempts.items():
        for site in GROUP_B:
            reveal, why = unmask(site, survivors, signatures)
            if reveal is not None:
                mask_key_shares.append(reveal["mask_key_shares"].get(TARGET))
            refusals[(label, site)] = why
    # group A, asked honestly about the story it signed, reveals self-mask seeds only
    self_mask_shares = []
    for site in GROUP_A:
        reveal, why = unmask(site, story_a, sigs_a)
        assert reveal is not None, f"{site} refused the story it signed: {why}"
        assert reveal["mask_key_shares"] == {}
        self_mask_shares.append(reveal["self_mask_shares"][TARGET])

    # Assert: no share of the target's mask key left any site; without t of them the
    # pairwise masks of the target's update cannot be removed
    assert mask_key_shares == [], f"ATTACK SUCCEEDED: {len(mask_key_shares)} share(s) of {TARGET}'s mask key revealed"
    assert len(self_mask_shares) == params.threshold  # what an honest unmask gives, no more
    for (label, site), why in refusals.items():
        match = attempts[label][2]
        assert "UnmaskRefusedError" in why or site in stand_ins, f"{site} ({label}): {why}"
        assert "revealing nothing" in why, f"{site} ({label}) did not refuse as expected: {why!r}"
        assert re.search(match, why), f"{site} ({label}): the refusal does not say why ({match!r}): {why!r}"
    # and a site that signed one story signs no other in this pass and attempt
    again = real("st-mary", "consistency", request=dict(check, survivors=story_a))
    assert not again.get("ok") and again.get("kind") == "ProtocolStateError", again
