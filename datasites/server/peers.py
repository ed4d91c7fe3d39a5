"""Pinned peers: the datasites this datasite federates with, fixed by its owner.

A researcher builds a job's roster (``{site name: Ed25519 key}``); the datasite only
takes part if every other roster entry is a peer its owner pinned, by site name and the
fingerprint of its identity key (hex sha256 of the raw Ed25519 public key, printed by
``fedmtl datasite status``). Owners exchange fingerprints out of band (phone, signed
email) and pin each other::

    fedmtl datasite peers add --home HOME --name general --fingerprint 9c0e...
    fedmtl datasite peers list --home HOME
    fedmtl datasite peers remove --home HOME --name general

The pins live in the policy (``[[peers]]``, :class:`fedmtl.datasites.rules.policy.Peer`).
Every change writes ``HOME/policy.toml`` and is recorded in the signed ledger
(a ``policy_changed`` entry naming who changed it). A running datasite reads the policy
from the ledger at each review, so a change made here, from another process, applies to
the next request without a restart.

This module imports neither syft nor torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fedmtl.datasites.ledger import site_ledger
from fedmtl.datasites.rules.policy import Peer, Policy
from fedmtl.datasites.site import home as home_mod
from fedmtl.datasites.site import identity
from fedmtl.errors import DatasiteError, PeerError

__all__ = ["PeerError", "SiteFingerprint", "add_peer", "list_peers", "own_fingerprint", "pin_federation", "remove_peer"]


@dataclass(frozen=True)
class SiteFingerprint:
    """A datasite's own name and identity-key fingerprint (what its peers pin)."""

    name: str
    fingerprint: str


def own_fingerprint(home: str | Path) -> SiteFingerprint:
    """This datasite's name and the fingerprint of its Ed25519 identity key."""
    home = Path(home)
    cfg = home_mod.read_config(home)  # says what to do if ``home`` is not a datasite home
    try:
        public = identity.load_public(home)
    except (OSError, ValueError, KeyError) as e:
        raise DatasiteError(
            f"{home / identity.PUBLIC_FILE} is missing or unreadable ({e}); the home is incomplete, "
            "restore it from a backup"
        ) from None
    return SiteFingerprint(name=cfg["name"], fingerprint=public.fingerprint)


def _normalise(fingerprint: str) -> str:
    """Accept what people paste: surrounding spaces, upper case, ``:`` separators."""
    if not isinstance(fingerprint, str):
        raise PeerError(f"the fingerprint must be text (64 hex characters), got {type(fingerprint).__name__}")
    return fingerprint.strip().replace(":", "").lower()


def _current(home: Path) -> Policy:
    try:
        return site_ledger.current_policy(home)
    except RuntimeError as e:  # no policy recorded: the first launch did not finish
        raise DatasiteError(f"{e}; launch the datasite once (`fedmtl datasite launch --home {home}`)") from None


def _check_who(who: str) -> str:
    if not isinstance(who, str) or not who.strip():
        raise PeerError("say who makes the change (who=..., --who EMAIL); it goes to the ledger")
    return who.strip()


def add_peer(home: str | Path, *, name: str, fingerprint: str, who: str) -> Policy:
    """Pin peer ``name`` with the fingerprint of its identity key (replacing an earlier
    pin of that name); the change is recorded in the ledger. Returns the new policy."""
    home = Path(home)
    who = _check_who(who)
    own = own_fingerprint(home)
    fingerprint = _normalise(fingerprint)
    if name == own.name:
        raise PeerError(
            f"{name!r} is this datasite's own name; it counts as pinned already, pin the other sites"
        )
    if fingerprint == own.fingerprint:
        raise PeerError(
            f"{fingerprint[:16]}... is this datasite's own fingerprint ({own.name!r}); "
            f"ask the owner of {name!r} for theirs (`fedmtl datasite status` prints it)"
        )
    led = site_ledger.open_ledger(home)
    # read-modify-write under the ledger's lock, so concurrent changes are not lost
    with led._locked():
        new = _current(home).with_peer(name, fingerprint)  # validates
        site_ledger.install_policy(home, new, who=who)
    return new


def remove_peer(home: str | Path, *, name: str, who: str) -> Policy:
    """Unpin peer ``name`` (recorded in the ledger); jobs naming it are then denied.
    Raises :class:`PeerError` if no peer of that name is pinned. Returns the new policy."""
    home = Path(home)
    who = _check_who(who)
    home_mod.read_config(home)
    led = site_ledger.open_ledger(home)
    with led._locked():
        current = _current(home)
        if current.peer_by_name(name) is None:
            pinned = ", ".join(p.name for p in current.peers) or "none"
            raise PeerError(
                f"no peer named {name!r} is pinned at this datasite (pinned: {pinned}); nothing changed. "
                f"`fedmtl datasite peers list --home {home}` shows the pinned peers"
            )
        new = current.without_peer(name)
        site_ledger.install_policy(home, new, who=who)
    return new


def list_peers(home: str | Path) -> tuple[Peer, ...]:
    """The peers pinned in the datasite's current policy (as the ledger records it),
    sorted by name. This datasite itself is not listed (see :func:`own_fingerprint`)."""
    home = Path(home)
    home_mod.read_config(home)
    return _current(home).peers


def pin_federation(homes: Sequence[str | Path], who: str = "owner") -> dict[str, Policy]:
    """Make every home pin every other home (name + identity fingerprint): what the owners
    of a federation do by exchanging fingerprints, for demos and tests where one person
    holds every home. Returns ``{site name: new policy}``."""
    paths = [Path(h) for h in homes]
    sites = [own_fingerprint(h) for h in paths]
    names = [s.name for s in sites]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise PeerError(f"two homes hold a datasite of the same name {dups}; a federation needs distinct sites")
    out: dict[str, Policy] = {}
    for path, me in zip(paths, sites):
        led = site_ledger.open_ledger(path)
        with led._locked():
            new = _current(path)
            for other in sites:
                if other.name != me.name:
                    new = new.with_peer(other.name, other.fingerprint)
            site_ledger.install_policy(path, new, who=who)
        out[me.name] = new
    return out
