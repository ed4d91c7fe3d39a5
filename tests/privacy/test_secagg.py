"""fedmtl.privacy.secagg: the sum is right with and without dropouts; every attack the
server (relay) or a replay can mount on the messages fails with a named error."""

from __future__ import annotations

import numpy as np
import pytest

from fedmtl.privacy.keys import DecryptionError, SignatureError, SigningKey
from fedmtl.privacy.quantization import average_by_group, quantize, weight_by_group
from fedmtl.privacy.secagg import (
    MessageError,
    ProtocolStateError,
    RoundStats,
    SecAggParams,
    ServerSession,
    SiteSession,
    Stage,
    TooFewSitesError,
    UnmaskRefusedError,
    majority_threshold,
    run_local_round,
)

ATOL = 5 * 2**-16  # n sites x one quantum (2^-frac_bits) of rounding error


def _signatures(params, identities, signers, survivors):
    """Consistency signatures of ``signers`` over ``survivors`` (as colluding or honest
    sites would make them), site -> bytes."""
    return {s: identities[s].sign(params.consistency_payload(s, survivors)) for s in signers}


def expected_sum(inputs, sites):
    return [sum(inputs[s][i] for s in sites) for i in range(len(next(iter(inputs.values()))))]


def assert_sum(result, inputs, sites):
    for got, want in zip(result.arrays, expected_sum(inputs, sites)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


class Round:
    """Drives sessions stage by stage so a test can interfere between stages."""

    def __init__(self, params, identities, inputs):
        self.params, self.identities, self.inputs = params, identities, inputs
        self.sites = {s: SiteSession(params, site_id=s, identity=identities[s]) for s in params.sites}
        self.server = ServerSession(params)

    def advertise(self):
        self.adverts = {s: ss.advertise_keys() for s, ss in self.sites.items()}
        self.keys = self.server.collect_advertisements(list(self.adverts.values()))
        return self

    def share(self):
        self.shares = {s: ss.share_keys(self.keys) for s, ss in self.sites.items()}
        self.deliveries = self.server.collect_shares(list(self.shares.values()))
        return self

    def mask(self, sites=None):
        sites = self.params.sites if sites is None else sites
        self.masked = {s: self.sites[s].masked_input(self.deliveries[s], self.inputs[s]) for s in sites}
        self.check = self.server.collect_masked_inputs(list(self.masked.values()))
        return self

    def sign(self, sites=None):
        sites = list(self.masked) if sites is None else sites
        self.signed = {s: self.sites[s].consistency_check(self.check) for s in sites}
        self.request = self.server.collect_consistency(list(self.signed.values()))
        return self


# ----------------------------------------------------------------- correctness


def test_sum_without_dropouts(five_sites):
    # Prepare
    params, identities, inputs = five_sites
    # Execute
    result = run_local_round(params, identities=identities, inputs=inputs)
    # Assert
    assert result.survivors == params.sites and result.dropped == []
    assert_sum(result, inputs, params.sites)


def test_sum_with_one_dropout_after_sharing_keys(five_sites):
    # Prepare: site2 shared its keys then vanished, so its pairwise masks must be recovered
    params, identities, inputs = five_sites
    # Execute
    result = run_local_round(
        params, identities=identities, inputs=inputs, dropouts={"site2": Stage.MASKED_INPUT}, persist=True
    )
    # Assert
    assert result.dropped == ["site2"]
    assert_sum(result, inputs, [s for s in params.sites if s != "site2"])


def test_sum_with_n_minus_t_dropouts_at_different_stages(five_sites):
    # Prepare: n - t = 2 sites drop: one before sharing keys, one after
    params, identities, inputs = five_sites
    dropouts = {"site0": Stage.SHARE_KEYS, "site4": Stage.MASKED_INPUT}
    # Execute
    result = run_local_round(params, identities=identities, inputs=inputs, dropouts=dropouts, persist=True)
    # Assert
    assert result.survivors == ["site1", "site2", "site3"]
    assert result.dropped == ["site4"]  # site0 never shared keys: nothing to recover
    assert_sum(result, inputs, result.survivors)


def test_site_silent_at_unmask_still_counts(five_sites):
    # Prepare: site3 sent its masked input, then did not answer the unmask request
    params, identities, inputs = five_sites
    # Execute
    result = run_local_round(params, identities=identities, inputs=inputs, dropouts={"site3": Stage.UNMASK})
    # Assert
    assert "site3" in result.survivors
    assert_sum(result, inputs, params.sites)


def test_weighted_per_head_average_through_secure_aggregation(make_params):
    # Prepare: vector = trunk(6) + head A(2) + head B(2); site2 has no labels for head B
    groups = {"trunk": [slice(0, 6)], "A": [slice(6, 8)], "B": [slice(8, 10)]}
    counts = {
        "site0": {"trunk": 50, "A": 20, "B": 30},
        "site1": {"trunk": 10, "A": 10, "B": 5},
        "site2": {"trunk": 40, "A": 40, "B": 0},
    }
    params, identities = make_params(3, 2, shapes=((10,), (3,)), bound=100.0)
    rng = np.random.default_rng(3)
    updates = {s: rng.uniform(-1, 1, 10) for s in params.sites}
    inputs = {
        s: list(weight_by_group(updates[s], groups=groups, counts=counts[s], clip=1.0)) for s in params.sites
    }
    # Execute
    result = run_local_round(params, identities=identities, inputs=inputs)
    avg, totals = average_by_group(result.arrays[0], result.arrays[1], groups=groups)
    # Assert: equals the plain weighted FedAvg per head, up to quantisation
    for name, (sl,) in groups.items():
        want = sum(counts[s][name] * updates[s][sl] for s in params.sites) / sum(
            counts[s][name] for s in params.sites
        )
        np.testing.assert_allclose(avg[sl], want, atol=1e-4)
    assert totals == {"A": 70.0, "B": 35.0, "trunk": 100.0}


def test_stats_count_time_and_bytes(five_sites):
    params, identities, inputs = five_sites
    stats = RoundStats()
    run_local_round(params, identities=identities, inputs=inputs, stats=stats)
    assert set(stats.site_seconds) == set(params.sites)
    # each site sends at least its masked vector (12 + 5 elements of 4 bytes)
    assert all(b > params.size * 4 for b in stats.site_bytes_sent.values())
    assert stats.server_bytes_sent > 0


# ----------------------------------------------------------------- what the server sees


def test_single_masked_vector_looks_uniform(make_params):
    # Prepare: an all-zero input (maximally structured) for 65,536 elements in Z_2^32
    params, identities = make_params(3, 2, shapes=((65536,),), bound=1.0)
    inputs = {s: [np.zeros(65536)] for s in params.sites}
    rnd = Round(params, identities, inputs).advertise().share().mask()
    masked = rnd.masked["site0"]["masked"]
    plain = quantize(np.zeros(65536), params.quantization)

    def chi2_top_byte(v):
        hist = np.bincount((v >> 24).astype(np.int64), minlength=256)
        exp = v.size / 256
        return float(((hist - exp) ** 2 / exp).sum())

    # Execute
    stat_masked, stat_plain = chi2_top_byte(masked), chi2_top_byte(plain)
    # Assert: threshold = chi2.ppf(1 - 1e-9, df=255) = 414.5 (a false alarm once in 10^9 runs)
    assert stat_masked < 414.5
    assert stat_plain > 414.5  # the same test does catch an unmasked vector


# ----------------------------------------------------------------- dropout limits


def test_fewer_than_t_masked_inputs_aborts_at_server(five_sites):
    # Prepare
    params, identities, inputs = five_sites
    rnd = Round(params, identities, inputs).advertise().share()
    # Execute / Assert
    with pytest.raises(TooFewSitesError, match="aborted, nothing revealed"):
        rnd.mask(sites=["site0", "site1"])


def test_site_reveals_nothing_for_fewer_than_t_survivors(five_sites):
    # Prepare: a server that asks anyway with 2 < t survivors
    params, identities, inputs = five_sites
    rnd = Round(params, identities, inputs).advertise().share().mask()
    check = dict(rnd.check, survivors=["site0", "site1"])
    site = rnd.sites["site0"]
    # Execute / Assert: the site signs no survivor set smaller than t
    with pytest.raises(TooFewSitesError, match="revealing nothing"):
        site.consistency_check(check)
    assert site.stage == Stage.MASKED_INPUT and site._state.u3 == [] and site._state.revealed == {}


def test_run_local_round_aborts_with_too_many_dropouts(five_sites):
    params, identities, inputs = five_sites
    dropouts = {"site0": Stage.MASKED_INPUT, "site1": Stage.MASKED_INPUT, "site2": Stage.MASKED_INPUT}
    with pytest.raises(TooFewSitesError):
        run_local_round(params, identities=identities, inputs=inputs, dropouts=dropouts)


def test_too_few_adverts_aborts(make_params):
    params, identities = make_params(3, 2)
    site = SiteSession(params, site_id="site0", identity=identities["site0"])
    server = ServerSession(params)
    with pytest.raises(TooFewSitesError):
        server.collect_advertisements([site.advertise_keys()])


# ----------------------------------------------------------------- honest-site refusals


def test_site_refuses_to_reveal_both_kinds_for_one_peer(five_sites):
    # Prepare: site0 answered once with site4 as a survivor (self-mask share revealed)
    params, identities, inputs = five_sites
    rnd = Round(params, identities, inputs).advertise().share().mask().sign()
    site = rnd.sites["site0"]
    site.unmask(rnd.request)
    # Execute / Assert: a second request is refused by the stage order...
    u3 = ["site0", "site1", "site2", "site3"]
    lying = dict(rnd.request, survivors=u3, signatures=_signatures(params, identities, u3, u3))
    with pytest.raises(ProtocolStateError):
        site.unmask(lying)
    # ...and, even if the stage and the signed set were rolled back (t colluding signers),
    # by the per-peer record
    site._state.stage, site._state.u3 = Stage.CONSISTENCY, sorted(u3)
    with pytest.raises(UnmaskRefusedError, match="site4"):
        site.unmask(lying)


def test_site_refuses_when_told_it_dropped_or_given_unknown_survivors(five_sites):
    params, identities, inputs = five_sites
    rnd = Round(params, identities, inputs).advertise().share().mask()
    with pytest.raises(UnmaskRefusedError, match="listed as dropped"):
        rnd.sites["site0"].consistency_check(dict(rnd.check, survivors=["site1", "site2", "site3"]))
    with pytest.raises(UnmaskRefusedError, match="mallory"):
        rnd.sites["site0"].consistency_check(dict(rnd.check, survivors=["site0", "site1", "mallory"]))
    with pytest.raises(MessageError, match="twice"):
        rnd.sites["site0"].consistency_check(dict(rnd.check, survivors=["site0", "site1", "site1"]))
    assert rnd.sites["site0"].stage == Stage.MASKED_INPUT  # nothing signed


# ----------------------------------------------------------------- consistency check


def test_sum_with_dropouts_before_and_during_the_consistency_check(five_sites):
    # Prepare: site4 never sent its masked input; site3 sent it, then signed nothing
    params, identities, inputs = five_sites
    dropouts = {"site4": Stage.MASKED_INPUT, "site3": Stage.CONSISTENCY}
    # Execute
    result = run_local_round(params, identities=identities, inputs=inputs, dropouts=dropouts, persist=True)
    # Assert: site3's input counts (its self mask is recovered), site4's masks cancel
    assert result.survivors == ["site0", "site1", "site2", "site3"] and result.dropped == ["site4"]
    assert_sum(result, inputs, result.survivors)


def test_unmask_request_carries_one_signature_per_signer_over_u3(five_sites):
    params, identities, inputs = five_sites
    rnd = Round(params, identities, inputs).advertise().share().mask(sites=["site0", "site1", "site2", "site3"])
    rnd.sign(sites=["site0", "site1", "site2"])
    assert rnd.check["survivors"] == ["site0", "site1", "site2", "site3"]
    assert rnd.request["survivors"] == rnd.check["survivors"]
    assert sorted(rnd.request["signatures"]) == ["site0", "site1", "site2"]
    for site, sig in rnd.request["signatures"].items():
        params.roster[site].verify(sig, params.consistency_payload(site, rnd.check["survivors"]))
    # only signers are asked to unmask, and their reveals give the sum
    reveals = [rnd.sites[s].unmask(rnd.request) for s in rnd.signed]
    result = rnd.server.unmask(reveals)
    assert_sum(result, inputs, ["site0", "site1", "site2", "site3"])


def _refused(site, request, match):
    """``site`` refuses ``request`` with ``match`` in the reason and reveals nothing."""
    before = (site.stage, dict(site._state.revealed))
    with pytest.raises(UnmaskRefusedError, match=match):
        site.unmask(request)
    assert (site.stage, site._state.revealed) == before == (Stage.CONSISTENCY, {})


def test_forged_signature_is_refused(five_sites):
    # Prepare: the server replaces site1's signature by one of its own key, then by one
    # of site2's key under site1's name, then by site1's signature for another pass
    params, identities, inputs = five_sites
    rnd = Round(params, identities, inputs).advertise().share().mask().sign()
    u3 = rnd.request["survivors"]
    other_pass = params.for_round(params.round + 1)
    forgeries = {
        "server's key": SigningKey.generate().sign(params.consistency_payload("site1", u3)),
        "site2's key": identities["site2"].sign(params.consistency_payload("site1", u3)),
        "another pass": identities["site1"].sign(other_pass.consistency_payload("site1", u3)),
        "truncated": rnd.request["signatures"]["site1"][:32],
    }
    for why, sig in forgeries.items():
        request = dict(rnd.request, signatures={**rnd.request["signatures"], "site1": sig})
        # Execute / Assert
        _refused(rnd.sites["site0"], request, "signature of 'site1' is not over this survivor set")
    # the honest request still works afterwards
    assert rnd.sites["site0"].unmask(rnd.request)["type"] == "unmask"


def test_duplicated_or_foreign_signatures_are_refused(five_sites):
    # Prepare: only site0, site1 sign; the server pads the set to t = 3
    params, identities, inputs = five_sites
    rnd = Round(params, identities, inputs).advertise().share().mask()
    sigs = {s: rnd.sites[s].consistency_check(rnd.check)["signature"] for s in ("site0", "site1")}
    u3 = rnd.check["survivors"]
    site = rnd.sites["site0"]
    padded = {
        "site0's signature again, under site2": ({**sigs, "site2": sigs["site0"]}, "signature of 'site2'"),
        "a site outside the roster": ({**sigs, "mallory": sigs["site0"]}, "'mallory', which is not in the roster"),
        "signatures as a list": ([sigs["site0"], sigs["site0"], sigs["site1"]], "must be a dict"),
    }
    base = {**params.header("unmask_request"), "survivors": u3}
    for why, (signatures, match) in padded.items():
        # Execute / Assert
        _refused(site, dict(base, signatures=signatures), match)
    _refused(site, base, "no consistency signatures")


def test_fewer_than_t_signatures_are_refused(five_sites):
    params, identities, inputs = five_sites
    rnd = Round(params, identities, inputs).advertise().share().mask()
    sigs = {s: rnd.sites[s].consistency_check(rnd.check)["signature"] for s in ("site0", "site1")}
    request = {**params.header("unmask_request"), "survivors": rnd.check["survivors"], "signatures": sigs}
    # Execute / Assert: 2 valid signatures, t = 3
    _refused(rnd.sites["site0"], request, r"only 2 valid signature\(s\).*threshold is 3")
    # and the server does not even ask
    with pytest.raises(TooFewSitesError, match="signed the survivor set"):
        rnd.server.collect_consistency([{**params.header("consistency"), "site": s, "signature": g}
                                        for s, g in sigs.items()])


def test_signature_of_a_site_outside_u3_is_refused(five_sites):
    # Prepare: site4 dropped; a (colluding) site4 signs the survivor set anyway
    params, identities, inputs = five_sites
    rnd = Round(params, identities, inputs).advertise().share().mask(sites=["site0", "site1", "site2", "site3"])
    u3 = rnd.check["survivors"]
    sigs = {s: rnd.sites[s].consistency_check(rnd.check)["signature"] for s in ("site0", "site1")}
    sigs["site4"] = identities["site4"].sign(params.consistency_payload("site4", u3))
    request = {**params.header("unmask_request"), "survivors": u3, "signatures": sigs}
    # Execute / Assert
    _refused(rnd.sites["site0"], request, "'site4', which is not in the survivor set")


def test_different_survivor_sets_told_to_two_groups_unmask_nothing(five_sites):
    # Prepare: the dropout lie against site4. Group A (site0, site1, and site4 itself) is
    # told everyone survived: they would reveal site4's self-mask seed. Group B (site2,
    # site3) is told site4 dropped: they would reveal its mask key.
    params, identities, inputs = five_sites
    rnd = Round(params, identities, inputs).advertise().share().mask()
    story_a = list(params.sites)
    story_b = ["site0", "site1", "site2", "site3"]
    signed_a = {s: rnd.sites[s].consistency_check(dict(rnd.check, survivors=story_a))["signature"]
                for s in ("site0", "site1", "site4")}
    signed_b = {s: rnd.sites[s].consistency_check(dict(rnd.check, survivors=story_b))["signature"]
                for s in ("site2", "site3")}
    everything = {**signed_a, **signed_b}
    mask_key_shares_of_site4 = []
    # Execute: every request the server can build for group B
    for survivors, signatures in (
        (story_b, signed_b),  # honest signatures over B's story: 2 < t
        (story_b, everything),  # group A's signatures are over another set
        (story_a, signed_a),  # A's story with its 3 valid signatures: not what B signed
    ):
        request = {**params.header("unmask_request"), "survivors": survivors, "signatures": signatures}
        for s in ("site2", "site3"):
            try:
                reveal = rnd.sites[s].unmask(request)
            except UnmaskRefusedError as e:
                assert "revealing nothing" in str(e)
                continue
            mask_key_shares_of_site4.append(reveal["mask_key_shares"].get("site4"))
    # Assert: no site of group B revealed anything, so site4's mask key stays secret
    assert mask_key_shares_of_site4 == []
    assert all(rnd.sites[s]._state.revealed == {} for s in ("site2", "site3"))
    # a site signs one survivor set per round, whatever it is told next
    with pytest.raises(ProtocolStateError):
        rnd.sites["site2"].consistency_check(dict(rnd.check, survivors=story_a))


def test_signed_survivor_set_survives_serialisation(five_sites):
    params, identities, inputs = five_sites
    rnd = Round(params, identities, inputs).advertise().share().mask()
    rnd.sites["site0"].consistency_check(rnd.check)
    restored = SiteSession.from_bytes(rnd.sites["site0"].to_bytes(), identity=identities["site0"])
    assert restored.stage == Stage.CONSISTENCY and restored._state.u3 == params.sites
    with pytest.raises(ProtocolStateError):
        restored.consistency_check(dict(rnd.check, survivors=["site0", "site1", "site2"]))


def test_server_refuses_a_signature_not_over_its_survivor_set(five_sites):
    params, identities, inputs = five_sites
    rnd = Round(params, identities, inputs).advertise().share().mask()
    replies = [rnd.sites[s].consistency_check(rnd.check) for s in ("site0", "site1")]
    replies.append(rnd.sites["site2"].consistency_check(dict(rnd.check, survivors=["site0", "site1", "site2"])))
    with pytest.raises(MessageError, match="site2"):
        rnd.server.collect_consistency(replies)


def test_majority_threshold():
    assert [majority_threshold(n) for n in (2, 3, 4, 5, 6, 7)] == [2, 2, 3, 3, 4, 4]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError):
            majority_threshold(bad)


# ----------------------------------------------------------------- tampering and replay


def test_substituted_public_key_is_rejected(five_sites):
    # Prepare: the relaying server swaps site1's mask key for one it controls
    params, identities, inputs = five_sites
    rnd = Round(params, identities, inputs).advertise()
    forged = dict(rnd.adverts["site1"], s_pk=rnd.adverts["site2"]["s_pk"])
    keys = dict(rnd.keys, adverts=[forged if a["site"] == "site1" else a for a in rnd.keys["adverts"]])
    # Execute / Assert: at the site and at an honest server alike
    with pytest.raises(SignatureError):
        rnd.sites["site0"].share_keys(keys)
    with pytest.raises(SignatureError):
        ServerSession(params).collect_advertisements(keys["adverts"])


def test_advert_signed_by_another_identity_is_rejected(five_sites):
    params, identities, inputs = five_sites
    rnd = Round(params, identities, inputs).advertise()
    forged = dict(rnd.adverts["site1"], signature=identities["site2"].sign(b"anything"))
    keys = dict(rnd.keys, adverts=[forged if a["site"] == "site1" else a for a in rnd.keys["adverts"]])
    with pytest.raises(SignatureError):
        rnd.sites["site0"].share_keys(keys)


def test_tampered_share_is_rejected(five_sites):
    # Prepare
    params, identities, inputs = five_sites
    rnd = Round(params, identities, inputs).advertise().share()
    delivery = rnd.deliveries["site0"]
    ct = bytearray(delivery["ciphertexts"]["site1"])
    ct[20] ^= 0x01
    tampered = dict(delivery, ciphertexts=dict(delivery["ciphertexts"], site1=bytes(ct)))
    # Execute / Assert
    with pytest.raises(DecryptionError):
        rnd.sites["site0"].masked_input(tampered, inputs["site0"])
    assert rnd.sites["site0"].stage == Stage.SHARE_KEYS  # nothing sent, nothing kept


def test_replayed_share_relabelled_as_another_sender_is_rejected(five_sites):
    # Prepare: the server replays site1's share to site0 as if it came from site2
    params, identities, inputs = five_sites
    rnd = Round(params, identities, inputs).advertise().share()
    delivery = rnd.deliveries["site0"]
    cts = dict(delivery["ciphertexts"], site2=delivery["ciphertexts"]["site1"])
    # Execute / Assert
    with pytest.raises(DecryptionError):
        rnd.sites["site0"].masked_input(dict(delivery, ciphertexts=cts), inputs["site0"])


def test_share_addressed_to_another_site_is_rejected(five_sites):
    params, identities, inputs = five_sites
    rnd = Round(params, identities, inputs).advertise().share()
    d0, d1 = rnd.deliveries["site0"], rnd.deliveries["site1"]
    cts = dict(d0["ciphertexts"], site2=d1["ciphertexts"]["site2"])
    with pytest.raises(DecryptionError):
        rnd.sites["site0"].masked_input(dict(d0, ciphertexts=cts), inputs["site0"])


def test_share_from_another_round_is_rejected(make_params, make_inputs):
    # Prepare: run round 0 to its delivery, then round 1; replay a round-0 share in round 1
    params0, identities = make_params(3, 2)
    params1 = params0.for_round(1)
    inputs = make_inputs(params0)
    old = Round(params0, identities, inputs).advertise().share()
    new = Round(params1, identities, inputs).advertise().share()
    d = new.deliveries["site0"]
    replay = dict(d, ciphertexts=dict(d["ciphertexts"], site1=old.deliveries["site0"]["ciphertexts"]["site1"]))
    # Execute / Assert: the ciphertext under a new round header fails authentication...
    with pytest.raises(DecryptionError):
        new.sites["site0"].masked_input(replay, inputs["site0"])
    # ...and the whole old message is refused by its header
    with pytest.raises(MessageError, match="round 0"):
        new.sites["site0"].masked_input(old.deliveries["site0"], inputs["site0"])


def test_replayed_stage_request_is_refused(five_sites):
    params, identities, inputs = five_sites
    rnd = Round(params, identities, inputs).advertise().share()
    with pytest.raises(ProtocolStateError):
        rnd.sites["site0"].share_keys(rnd.keys)
    with pytest.raises(ProtocolStateError):
        rnd.sites["site0"].advertise_keys()


def test_duplicate_or_foreign_messages_are_refused_by_server(five_sites):
    params, identities, inputs = five_sites
    rnd = Round(params, identities, inputs)
    adverts = [ss.advertise_keys() for ss in rnd.sites.values()]
    with pytest.raises(MessageError, match="two adverts"):
        ServerSession(params).collect_advertisements(adverts + adverts[:1])
    with pytest.raises(MessageError, match="job"):
        ServerSession(params).collect_advertisements([dict(a, job_id="other") for a in adverts])


def test_sites_with_different_parameters_cannot_agree(make_params):
    # Prepare: the server hands site0 parameters with another threshold
    params, identities = make_params(3, 2)
    other = make_params(3, 3)[0]
    honest = [SiteSession(params, site_id=s, identity=identities[s]) for s in params.sites]
    adverts = [ss.advertise_keys() for ss in honest]
    keys = ServerSession(params).collect_advertisements(adverts)
    fooled = SiteSession(
        type(params)(**{**params.__dict__, "threshold": 3}), site_id="site0", identity=identities["site0"]
    )
    fooled.advertise_keys()
    # Execute / Assert: signatures bind the parameter digest
    assert other.digest() != params.digest()
    with pytest.raises(SignatureError):
        fooled.share_keys(keys)


# ----------------------------------------------------------------- misuse and persistence


def test_wrong_identity_or_inputs_fail_loudly(five_sites):
    params, identities, inputs = five_sites
    with pytest.raises(ValueError, match="not the roster's key"):
        SiteSession(params, site_id="site0", identity=identities["site1"])
    with pytest.raises(ValueError, match="not in the roster"):
        SiteSession(params, site_id="mallory", identity=identities["site1"])
    rnd = Round(params, identities, inputs).advertise().share()
    with pytest.raises(ValueError, match="shapes"):
        rnd.sites["site0"].masked_input(rnd.deliveries["site0"], [np.zeros(17)])
    with pytest.raises(ValueError, match="NaN"):
        rnd.sites["site0"].masked_input(rnd.deliveries["site0"], [np.full((3, 4), np.nan), np.zeros(5)])
    with pytest.raises(TypeError):
        rnd.sites["site0"].masked_input(rnd.deliveries["site0"], np.zeros(17))


def test_parameters_validate_threshold(make_params):
    with pytest.raises(ValueError):
        make_params(3, 4)
    with pytest.raises(ValueError):
        make_params(3, 1)
    p, _ = make_params(4, 3)
    with pytest.warns(UserWarning, match="t > n/2"):
        SecAggParams(**{**p.__dict__, "threshold": 2})


def test_site_state_survives_serialisation_between_every_stage(five_sites):
    # Prepare
    params, identities, inputs = five_sites
    # Execute
    result = run_local_round(params, identities=identities, inputs=inputs, persist=True)
    # Assert
    assert_sum(result, inputs, params.sites)


def test_serialised_state_needs_the_right_identity(five_sites):
    params, identities, _ = five_sites
    site = SiteSession(params, site_id="site0", identity=identities["site0"])
    site.advertise_keys()
    blob = site.to_bytes()
    with pytest.raises(ValueError):
        SiteSession.from_bytes(blob, identity=identities["site1"])
    restored = SiteSession.from_bytes(blob, identity=identities["site0"])
    assert restored.stage == Stage.ADVERTISE_KEYS and restored.params == params


# ----------------------------------------------------------------- inputs and parameters, fast paths


def test_inputs_of_any_real_dtype_sum_like_float64(make_params):
    # Prepare: the same values as float32, float64, int and a non-contiguous view
    params, identities = make_params(3, 2, shapes=((4, 3), (6,)), bound=100.0)
    base = np.arange(12, dtype=np.float64).reshape(3, 4).T - 5.0  # a transposed (strided) view
    inputs = {
        "site0": [base, np.linspace(-2, 2, 6)],
        "site1": [base.astype(np.float32), np.arange(6)],  # ints become floats
        "site2": [np.ascontiguousarray(base), np.linspace(-2, 2, 6).astype(np.float32)],
    }
    # Execute
    result = run_local_round(params, identities=identities, inputs=inputs)
    # Assert: every site's input counted as its float64 value
    want = [sum(np.asarray(inputs[s][i], dtype=np.float64) for s in params.sites) for i in range(2)]
    for got, w in zip(result.arrays, want):
        np.testing.assert_allclose(got, w, atol=3 * 2**-16, rtol=0)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_one_non_finite_value_is_refused_in_either_array(five_sites, bad):
    params, identities, inputs = five_sites
    rnd = Round(params, identities, inputs).advertise().share()
    for which in (0, 1):
        arrays = [a.copy() for a in inputs["site0"]]
        arrays[which].flat[-1] = bad
        with pytest.raises(ValueError, match="NaN or inf; nothing was sent"):
            rnd.sites["site0"].masked_input(rnd.deliveries["site0"], arrays)
    # the refusals touched no state: the site still sends its real input
    rnd.sites["site0"].masked_input(rnd.deliveries["site0"], inputs["site0"])


def test_finite_values_whose_sum_overflows_are_accepted(make_params):
    # Prepare: values near the float64 maximum (their sum overflows; each is finite)
    params, identities = make_params(2, 2, shapes=((2,),), bound=1.0)
    big = np.array([1.5e308, 1.5e308])
    inputs = {"site0": [big], "site1": [np.zeros(2)]}
    # Execute: the values are clipped to the bound, not refused
    result = run_local_round(params, identities=identities, inputs=inputs)
    # Assert
    np.testing.assert_allclose(result.arrays[0], [1.0, 1.0], atol=2 * 2**-16)


def test_parameter_digest_is_computed_once_and_matches_the_canonical_form(make_params):
    import copy
    import hashlib
    import json

    params, _ = make_params(3, 2)
    want = hashlib.sha256(json.dumps(params.to_dict(), sort_keys=True).encode()).digest()
    assert params.digest() == want
    assert params.digest() is params.digest()
    assert copy.deepcopy(params).digest() == want
    assert params.for_round(1).digest() != want
    assert SecAggParams(**{**params.__dict__, "job_id": "job-2"}).digest() != want
