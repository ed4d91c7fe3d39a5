"""Small, typed wrappers around the few primitives fedmtl needs.

This is the only module of fedmtl that imports ``cryptography.hazmat``. Everything
else (secure aggregation, the ledger, the datasite runtime) goes through it:

- :class:`SigningKey` / :class:`VerifyKey`: Ed25519 identities (a site's long-term key,
  the ledger key).
- :class:`AgreementKey` / :class:`AgreementPublicKey`: X25519 key agreement (per-job keys).
- :func:`hkdf_sha256`: RFC 5869 key derivation.
- :func:`aes_gcm_encrypt` / :func:`aes_gcm_decrypt`: authenticated encryption.
- :func:`keystream`: AES-256-CTR keystream from a 32-byte seed (mask expansion).
- :func:`save_private_key` / :func:`load_private_key`: raw key bytes on disk, mode 0o600,
  written atomically.

Misuse fails loudly: a wrong type raises ``TypeError``, a wrong length ``KeyFormatError``
(a ``ValueError``), a bad signature ``SignatureError``, a tampered ciphertext
``DecryptionError``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path
from typing import Union

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmtl.errors import DecryptionError, KeyAgreementError, KeyFileError, KeyFormatError, SignatureError
from fedmtl.fsutil import atomic_write_bytes

__all__ = [
    "KeyFormatError",
    "SignatureError",
    "DecryptionError",
    "KeyAgreementError",
    "KeyFileError",
    "SigningKey",
    "VerifyKey",
    "AgreementKey",
    "AgreementPublicKey",
    "hkdf_sha256",
    "aes_gcm_encrypt",
    "aes_gcm_decrypt",
    "keystream",
    "save_private_key",
    "load_private_key",
]

KEY_BYTES = 32
SIGNATURE_BYTES = 64
GCM_NONCE_BYTES = 12
KEYSTREAM_SEED_BYTES = 32
_HKDF_MAX_LENGTH = 255 * 32

PathLike = Union[str, "os.PathLike[str]"]


def _require_bytes(value: object, name: str, length: int | None = None) -> bytes:
    """Return ``value`` as bytes; TypeError for non bytes-like, KeyFormatError on length."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be bytes, got {type(value).__name__}")
    out = bytes(value)
    if length is not None and len(out) != length:
        raise KeyFormatError(f"{name} must be exactly {length} bytes, got {len(out)}")
    return out


_RAW = serialization.Encoding.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_NO_ENC = serialization.NoEncryption()


# --------------------------------------------------------------------------- Ed25519


class VerifyKey:
    """An Ed25519 public key. Equality and hashing are by raw bytes."""

    __slots__ = ("_key", "_raw")

    def __init__(self, key: Ed25519PublicKey):
        if not isinstance(key, Ed25519PublicKey):
            raise TypeError("use VerifyKey.from_bytes(raw) or SigningKey.verify_key")
        self._key = key
        self._raw = key.public_bytes(_RAW, _RAW_PUB)

    @classmethod
    def from_bytes(cls, raw: bytes) -> "VerifyKey":
        raw = _require_bytes(raw, "verify key", KEY_BYTES)
        return cls(Ed25519PublicKey.from_public_bytes(raw))

    def to_bytes(self) -> bytes:
        return self._raw

    def fingerprint(self) -> str:
        """Hex SHA-256 of the raw public key, for humans to compare out of band."""
        return hashlib.sha256(self._raw).hexdigest()

    def verify(self, signature: bytes, data: bytes) -> None:
        """Return None if ``signature`` is valid for ``data``; raise SignatureError if not."""
        signature = _require_bytes(signature, "signature")
        data = _require_bytes(data, "data")
        if len(signature) != SIGNATURE_BYTES:
            raise SignatureError(
                f"signature must be {SIGNATURE_BYTES} bytes, got {len(signature)}; "
                "the message was truncated or altered"
            )
        try:
            self._key.verify(signature, data)
        except InvalidSignature:
            raise SignatureError(
                f"signature does not verify under key {self.fingerprint()[:16]}...: "
                "the data was altered or signed by another key; do not use it"
            ) from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VerifyKey):
            return NotImplemented
        return hmac.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"VerifyKey({self.fingerprint()[:16]}...)"


class SigningKey:
    """An Ed25519 private key (a site's long-term identity)."""

    __slots__ = ("_key",)

    def __init__(self, key: Ed25519PrivateKey):
        if not isinstance(key, Ed25519PrivateKey):
            raise TypeError("use SigningKey.generate() or SigningKey.from_bytes(raw)")
        self._key = key

    @classmethod
    def generate(cls) -> "SigningKey":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_bytes(cls, raw: bytes) -> "SigningKey":
        raw = _require_bytes(raw, "signing key", KEY_BYTES)
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def to_bytes(self) -> bytes:
        """The raw 32-byte seed. Keep it secret: see :func:`save_private_key`."""
        return self._key.private_bytes(_RAW, _RAW_PRIV, _NO_ENC)

    @property
    def verify_key(self) -> VerifyKey:
        return VerifyKey(self._key.public_key())

    def sign(self, data: bytes) -> bytes:
        """A 64-byte Ed25519 signature of ``data``."""
        return self._key.sign(_require_bytes(data, "data"))

    def __repr__(self) -> str:
        return f"SigningKey(verify_key={self.verify_key!r})"


# --------------------------------------------------------------------------- X25519


class AgreementPublicKey:
    """An X25519 public key. Equality and hashing are by raw bytes."""

    __slots__ = ("_key", "_raw")

    def __init__(self, key: X25519PublicKey):
        if not isinstance(key, X25519PublicKey):
            raise TypeError("use AgreementPublicKey.from_bytes(raw) or AgreementKey.public_key")
        self._key = key
        self._raw = key.public_bytes(_RAW, _RAW_PUB)

    @classmethod
    def from_bytes(cls, raw: bytes) -> "AgreementPublicKey":
        raw = _require_bytes(raw, "agreement public key", KEY_BYTES)
        return cls(X25519PublicKey.from_public_bytes(raw))

    def to_bytes(self) -> bytes:
        return self._raw

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AgreementPublicKey):
            return NotImplemented
        return hmac.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"AgreementPublicKey({self._raw.hex()[:16]}...)"


class AgreementKey:
    """An X25519 private key (per job; never leaves the site)."""

    __slots__ = ("_key",)

    def __init__(self, key: X25519PrivateKey):
        if not isinstance(key, X25519PrivateKey):
            raise TypeError("use AgreementKey.generate() or AgreementKey.from_bytes(raw)")
        self._key = key

    @classmethod
    def generate(cls) -> "AgreementKey":
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_bytes(cls, raw: bytes) -> "AgreementKey":
        raw = _require_bytes(raw, "agreement key", KEY_BYTES)
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def to_bytes(self) -> bytes:
        return self._key.private_bytes(_RAW, _RAW_PRIV, _NO_ENC)

    @property
    def public_key(self) -> AgreementPublicKey:
        return AgreementPublicKey(self._key.public_key())

    def exchange(self, peer: AgreementPublicKey) -> bytes:
        """The raw 32-byte X25519 shared secret. Derive keys from it with :func:`hkdf_sha256`."""
        if not isinstance(peer, AgreementPublicKey):
            raise TypeError(f"peer must be an AgreementPublicKey, got {type(peer).__name__}")
        try:
            return self._key.exchange(peer._key)
        except ValueError:
            raise KeyAgreementError(
                "X25519 produced an all-zero shared secret: the peer public key is a "
                "low-order point; reject that peer"
            ) from None

    def __repr__(self) -> str:
        return f"AgreementKey(public_key={self.public_key!r})"


# --------------------------------------------------------------------------- symmetric


def hkdf_sha256(ikm: bytes, *, length: int, salt: bytes | None, info: bytes) -> bytes:
    """RFC 5869 HKDF with SHA-256. ``salt=None`` means the RFC's all-zero default."""
    ikm = _require_bytes(ikm, "ikm")
    if salt is not None:
        salt = _require_bytes(salt, "salt")
    info = _require_bytes(info, "info")
    if not isinstance(length, int) or isinstance(length, bool):
        raise TypeError(f"length must be an int, got {type(length).__name__}")
    if not 1 <= length <= _HKDF_MAX_LENGTH:
        raise ValueError(f"length must be in 1..{_HKDF_MAX_LENGTH}, got {length}")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def _check_gcm(key: object, nonce: object) -> tuple[bytes, bytes]:
    key_b = _require_bytes(key, "key")
    if len(key_b) not in (16, 24, 32):
        raise KeyFormatError(f"AES-GCM key must be 16, 24 or 32 bytes, got {len(key_b)}")
    return key_b, _require_bytes(nonce, "nonce", GCM_NONCE_BYTES)


def aes_gcm_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-GCM ciphertext with the 16-byte tag appended. Never reuse (key, nonce)."""
    key_b, nonce_b = _check_gcm(key, nonce)
    return AESGCM(key_b).encrypt(
        nonce_b, _require_bytes(plaintext, "plaintext"), _require_bytes(aad, "aad")
    )


def aes_gcm_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """The plaintext; DecryptionError if the ciphertext, key, nonce or AAD do not match."""
    key_b, nonce_b = _check_gcm(key, nonce)
    ciphertext = _require_bytes(ciphertext, "ciphertext")
    aad = _require_bytes(aad, "aad")
    try:
        return AESGCM(key_b).decrypt(nonce_b, ciphertext, aad)
    except InvalidTag:
        raise DecryptionError(
            "AES-GCM authentication failed: the ciphertext was tampered with, or it was "
            "made for another key, nonce or context (job, round, sender, receiver)"
        ) from None


def keystream(seed: bytes, nbytes: int) -> bytes:
    """``nbytes`` of AES-256-CTR keystream under the 32-byte ``seed`` (zero IV), in one call.

    Deterministic: the same seed gives the same stream. Use each seed for one purpose only
    (derive it with :func:`hkdf_sha256` and a distinct ``info``).
    """
    seed = _require_bytes(seed, "seed", KEYSTREAM_SEED_BYTES)
    if not isinstance(nbytes, int) or isinstance(nbytes, bool):
        raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return encryptor.update(bytes(nbytes)) + encryptor.finalize()


# --------------------------------------------------------------------------- key files


def save_private_key(path: PathLike, raw: bytes) -> None:
    """Write ``raw`` to ``path`` with mode 0o600, atomically (temp file + rename).

    The parent folder must exist. An existing file at ``path`` is replaced whole or not
    at all.
    """
    raw = _require_bytes(raw, "raw")
    if not raw:
        raise KeyFormatError("refusing to save an empty private key")
    target = Path(path)
    if not target.parent.is_dir():
        raise KeyFileError(f"folder {target.parent} does not exist; create it (mode 0o700) first")
    atomic_write_bytes(target, raw, mode=0o600)


def load_private_key(path: PathLike) -> bytes:
    """The raw bytes saved by :func:`save_private_key`.

    Raises KeyFileError if the file is missing or readable/writable by group or others
    (fix with ``chmod 600 PATH``).
    """
    target = Path(path)
    try:
        st = target.stat()
    except FileNotFoundError:
        raise KeyFileError(f"private key file {target} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"private key path {target} is not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"private key file {target} has mode {oct(st.st_mode & 0o777)}: group/others "
            f"can access it. Run `chmod 600 {target}` (and rotate the key if it leaked)."
        )
    return target.read_bytes()
