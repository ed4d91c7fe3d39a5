"""Attack class 2 — Sybil roster: the researcher (who also runs the aggregation server)
adds sites whose Ed25519 keys they generated, so that with threshold t they hold enough
"participants" to unmask the one real site's update, or to meet ``min_sites`` alone.

The federation is fixed by the data owners: each datasite pins its peers (name +
fingerprint of the identity key). A roster entry whose key is not pinned under that name
must be DENIED, and the reason must name the offending site or key fingerprint.

All variants go to ``general`` from the attacker's account in one batch.
"""

from __future__ import annotations

from typing import Callable

import pytest
import security_kit as K

from fedmtl.privacy.keys import SigningKey, VerifyKey

pytestmark = pytest.mark.integration

SITE = "general"


def _fake() -> str:
    return SigningKey.generate().verify_key.to_bytes().hex()


def _fingerprint(hex_key: str) -> str:
    return VerifyKey.from_bytes(bytes.fromhex(hex_key)).fingerprint()


# Each variant: real roster {site: key hex} -> (forged roster, names/keys the reason must cite)
Variant = Callable[[dict[str, str]], tuple[dict[str, str], list[str]]]


def _two_extra(real: dict[str, str]):
    return {**real, "evil-a": _fake(), "evil-b": _fake()}, ["evil-a", "evil-b"]


def _peers_replaced(real: dict[str, str]):
    forged = {s: (k if s == SITE else _fake()) for s, k in real.items()}
    return forged, [s for s in real if s != SITE]


def _own_key_replaced(real: dict[str, str]):
    return {**real, SITE: _fake()}, [SITE]


def _duplicate_key_new_name(real: dict[str, str]):
    return {**real, "st-mary-2": real["st-mary"]}, ["st-mary-2"]


def _duplicate_key_real_name(real: dict[str, str]):
    return {**real, "riverside": real["st-mary"]}, ["riverside"]


def _min_sites_by_fakes(real: dict[str, str]):
    return {SITE: real[SITE], "evil-a": _fake(), "evil-b": _fake()}, ["evil-a", "evil-b"]


def _own_site_missing(real: dict[str, str]):
    forged = {s: k for s, k in real.items() if s != SITE}
    forged["evil-a"] = _fake()
    return forged, ["evil-a", SITE]


VARIANTS: dict[str, Variant] = {
    "two-made-up-sites-added": _two_extra,
    "real-peers-replaced-by-made-up-keys": _peers_replaced,
    "own-key-replaced": _own_key_replaced,
    "duplicated-key-under-a-new-name": _duplicate_key_new_name,
    "duplicated-key-under-a-real-name": _duplicate_key_real_name,
    "min-sites-met-only-by-made-up-sites": _min_sites_by_fakes,
    "own-site-missing": _own_site_missing,
}


@pytest.fixture(scope="module")
def sybil(federation):
    base, _ = federation.legit_site_spec(SITE)
    subs, cite = {}, {}
    for i, (label, make) in enumerate(VARIANTS.items()):
        spec, fn = federation.variant_spec(base, f"s{i:02d}")
        roster, named = make(dict(spec["roster"]))
        spec["roster"] = roster
        # what a reason may cite for each offending entry: its site name, the key's
        # fingerprint or the key itself (a 12-character prefix is enough)
        cite[label] = [n for n in named if n in roster or n == SITE] + [
            x[:12] for n in named if n in roster for x in (_fingerprint(roster[n]), roster[n])
        ]
        subs[label] = federation.forge(label, SITE, spec, fn)
    return K.Batch(federation, subs), cite


@pytest.mark.parametrize("label", list(VARIANTS))
def test_unpinned_roster_is_denied_naming_the_key(sybil, federation, label):
    batch, cite = sybil
    sub, decision = batch.decision(label)
    print(f"{label}: {decision.status}: {decision.reason[:300]}")
    federation.assert_denied(sub, decision, allow_refused=False)
    assert any(c in decision.reason for c in cite[label]), (
        f"{label}: the deny reason does not name the unpinned site or key (any of {cite[label]}): "
        f"{decision.reason!r}"
    )
