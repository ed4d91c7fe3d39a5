"""The datasite's long-term identity keys.

On first launch a datasite makes an Ed25519 key (signing: secure-aggregation key
advertisements, ledger entries) and an X25519 key (key agreement). The private halves stay
in ``HOME/secrets`` (owner-only, never in a syft asset); the public halves go to
``HOME/public_keys.json`` and are published in the datasite's dataset description, where a
logged-in researcher reads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedmtl.datasites.site.home import secrets_dir
from fedmtl.fsutil import write_json_atomic
from fedmtl.privacy.keys import (
    AgreementKey,
    AgreementPublicKey,
    SigningKey,
    VerifyKey,
    load_private_key,
    save_private_key,
)

SIGNING_FILE = "identity_ed25519"
AGREEMENT_FILE = "identity_x25519"
PUBLIC_FILE = "public_keys.json"


@dataclass(frozen=True)
class PublicIdentity:
    """What a researcher learns about a site: its name and public keys."""

    site: str
    verify_key: VerifyKey
    agreement_key: AgreementPublicKey

    def to_dict(self) -> dict[str, str]:
        return {
            "site": self.site,
            "ed25519": self.verify_key.to_bytes().hex(),
            "x25519": self.agreement_key.to_bytes().hex(),
            "fingerprint": self.verify_key.fingerprint(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> "PublicIdentity":
        return cls(
            site=d["site"],
            verify_key=VerifyKey.from_bytes(bytes.fromhex(d["ed25519"])),
            agreement_key=AgreementPublicKey.from_bytes(bytes.fromhex(d["x25519"])),
        )

    @property
    def fingerprint(self) -> str:
        return self.verify_key.fingerprint()


@dataclass(frozen=True)
class Identity:
    site: str
    signing_key: SigningKey
    agreement_key: AgreementKey

    @property
    def public(self) -> PublicIdentity:
        return PublicIdentity(self.site, self.signing_key.verify_key, self.agreement_key.public_key)


def create(home: Path, site: str) -> Identity:
    """Make and store fresh identity keys (first launch only)."""
    d = secrets_dir(home)
    if (d / SIGNING_FILE).exists():
        raise FileExistsError(f"{d / SIGNING_FILE} exists; identity keys are made once")
    ident = Identity(site, SigningKey.generate(), AgreementKey.generate())
    save_private_key(d / SIGNING_FILE, ident.signing_key.to_bytes())
    save_private_key(d / AGREEMENT_FILE, ident.agreement_key.to_bytes())
    write_json_atomic(Path(home) / PUBLIC_FILE, ident.public.to_dict())
    return ident


def load(home: Path, site: str | None = None) -> Identity:
    home = Path(home)
    if site is None:
        site = json.loads((home / PUBLIC_FILE).read_text())["site"]
    d = home / "secrets"
    return Identity(
        site,
        SigningKey.from_bytes(load_private_key(d / SIGNING_FILE)),
        AgreementKey.from_bytes(load_private_key(d / AGREEMENT_FILE)),
    )


def load_public(home: Path) -> PublicIdentity:
    return PublicIdentity.from_dict(json.loads((Path(home) / PUBLIC_FILE).read_text()))
