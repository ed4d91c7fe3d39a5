"""The round data plane's wire format: signed, self-describing binary messages. Pure (no
syft, no network).

A round message of an approved job travels from the researcher to a datasite as one HTTP
body (see :mod:`fedmtl.datasites.server.dataplane` and docs/secure_aggregation.md)::

    MAGIC | u32 header length | header (UTF-8 JSON) | buffer 0 | buffer 1 | ...

The header is the message with every ``bytes`` value replaced by ``{"$b": i}``, every numpy
array by ``{"$a": i, "dtype": ..., "shape": [...]}`` and every tuple by ``{"$t": [...]}``;
``i`` indexes the ``buffers`` list of the header (each entry the byte length of one
buffer, in order). Decoding never unpickles: only the dtypes in :data:`DTYPES`, plain JSON
types, bytes, arrays and tuples come back, with bounded nesting, and every length is checked
against the body before it is read.

A *request* is the body above whose decoded value is an :class:`Envelope`. It travels with
an HTTP header (:data:`AUTH_HEADER`) that says, before the body is read, what the body is:
:class:`Claims` (job id, site, ``seq``, stage, the body's length and SHA-256), signed with
Ed25519 over ``AUTH_DOMAIN + claims`` by the researcher's per-job key whose public half the
approved site spec holds (``spec["dataplane_key"]``). A datasite verifies the header first
(it is small and bounded), then streams at most ``length`` bytes into the digest, and only
then decodes the body (:func:`open_request`), whose envelope must repeat the claims.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from fedmtl.errors import WireError

MAGIC = b"FMTL1\n"
#: what the per-job key signs: this prefix, then the canonical JSON of the claims
AUTH_DOMAIN = b"fedmtl-dataplane-auth-v1\x00"
#: the HTTP header that carries the signed claims of a request
AUTH_HEADER = "x-fedmtl-auth"
#: the auth header is a few hundred bytes; anything longer is refused unread
MAX_AUTH_HEADER = 1024
SIGNATURE_BYTES = 64
#: the only array dtypes that travel (no object arrays: nothing is ever unpickled)
DTYPES = frozenset({"float32", "float64", "int64", "int32", "uint64", "uint32", "uint8", "bool"})
MAX_DEPTH = 12
#: the header is small (keys, ids, numbers, the site spec with its schema: a few KiB to a
#: few tens of KiB); the bulk travels in buffers
MAX_HEADER = 256 << 10


# ------------------------------------------------------------------------------ codec


def encode(obj: Any) -> bytes:
    """``obj`` (dicts with str keys, lists, tuples, str, int, float, bool, None, bytes,
    numpy arrays and scalars) as one binary body."""
    buffers: list[bytes | memoryview] = []

    def enc(o: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise WireError(f"message nested deeper than {MAX_DEPTH}")
        if o is None or isinstance(o, (bool, str)):
            return o
        if isinstance(o, (int, float)):
            return o
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, (bytes, bytearray, memoryview)):
            buffers.append(bytes(o))
            return {"$b": len(buffers) - 1}
        if isinstance(o, np.ndarray):
            if o.dtype.name not in DTYPES:
                raise WireError(f"arrays of dtype {o.dtype.name} do not travel; use one of {sorted(DTYPES)}")
            a = np.ascontiguousarray(o)
            buffers.append(memoryview(a).cast("B") if a.size else b"")
            return {"$a": len(buffers) - 1, "dtype": a.dtype.name, "shape": list(a.shape)}
        if isinstance(o, tuple):
            return {"$t": [enc(v, depth + 1) for v in o]}
        if isinstance(o, list):
            return [enc(v, depth + 1) for v in o]
        if isinstance(o, Mapping):
            out = {}
            for k, v in o.items():
                if not isinstance(k, str):
                    raise WireError(f"message keys must be str, got {type(k).__name__}")
                if k.startswith("$"):
                    raise WireError(f"message keys may not start with '$' ({k!r})")
                out[k] = enc(v, depth + 1)
            return out
        raise WireError(f"a {type(o).__name__} cannot travel in a round message")

    tree = enc(obj, 0)
    header = json.dumps({"v": tree, "buffers": [len(b) if isinstance(b, bytes) else b.nbytes for b in buffers]},
                        separators=(",", ":"), allow_nan=True).encode()
    return b"".join([MAGIC, struct.pack(">I", len(header)), header, *buffers])


def decode(body: bytes | memoryview, *, max_bytes: int | None = None) -> Any:
    """The value :func:`encode` encoded; :class:`WireError` on anything malformed."""
    mv = memoryview(body)
    if max_bytes is not None and mv.nbytes > max_bytes:
        raise WireError(f"message of {mv.nbytes} bytes exceeds the limit of {max_bytes}")
    if mv.nbytes < len(MAGIC) + 4 or bytes(mv[: len(MAGIC)]) != MAGIC:
        raise WireError("not a fedmtl data-plane message (bad magic)")
    (hlen,) = struct.unpack(">I", mv[len(MAGIC): len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if hlen > MAX_HEADER or start + hlen > mv.nbytes:
        raise WireError("message header length is out of bounds")
    try:
        head = json.loads(bytes(mv[start: start + hlen]))
    except ValueError as e:
        raise WireError(f"message header is not JSON: {e}") from None
    except RecursionError:
        raise WireError(f"message header is nested too deeply (at most {MAX_DEPTH} levels)") from None
    if not isinstance(head, dict) or set(head) != {"v", "buffers"} or not isinstance(head["buffers"], list):
        raise WireError("message header must be {'v': ..., 'buffers': [...]}")
    offsets: list[tuple[int, int]] = []
    pos = start + hlen
    for n in head["buffers"]:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0 or pos + n > mv.nbytes:
            raise WireError("message buffer lengths do not match the body")
        offsets.append((pos, pos + n))
        pos += n
    if pos != mv.nbytes:
        raise WireError(f"{mv.nbytes - pos} unexpected trailing byte(s) in the message")
    used: set[int] = set()

    def buf(i: Any) -> memoryview:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(offsets) or i in used:
            raise WireError("message refers to a missing or reused buffer")
        used.add(i)
        a, b = offsets[i]
        return mv[a:b]

    def dec(o: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise WireError(f"message nested deeper than {MAX_DEPTH}")
        if isinstance(o, list):
            return [dec(v, depth + 1) for v in o]
        if not isinstance(o, dict):
            return o
        if "$b" in o:
            if set(o) != {"$b"}:
                raise WireError("malformed bytes reference")
            return bytes(buf(o["$b"]))
        if "$t" in o:
            if set(o) != {"$t"} or not isinstance(o["$t"], list):
                raise WireError("malformed tuple")
            return tuple(dec(v, depth + 1) for v in o["$t"])
        if "$a" in o:
            if set(o) != {"$a", "dtype", "shape"} or o["dtype"] not in DTYPES:
                raise WireError(f"malformed array (dtypes allowed: {sorted(DTYPES)})")
            shape = o["shape"]
            if not isinstance(shape, list) or len(shape) > 8 or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
            ):
                raise WireError("malformed array shape")
            raw = buf(o["$a"])
            dt = np.dtype(o["dtype"])
            if int(np.prod(shape, dtype=np.int64)) * dt.itemsize != raw.nbytes:
                raise WireError("array shape does not match its buffer")
            return np.frombuffer(raw, dtype=dt).reshape(shape).copy()
        return {str(k): dec(v, depth + 1) for k, v in o.items()}

    value = dec(head["v"], 0)
    if len(used) != len(offsets):
        raise WireError("message carries buffers nothing refers to")
    return value


# ------------------------------------------------------------------------------ envelope


@dataclass(frozen=True)
class Envelope:
    """What one signed request says: for which job and site, under which approved spec,
    in which order (``seq``: strictly increasing per job at a site), and the message."""

    job_id: str
    site: str
    seq: int
    spec: dict[str, Any]
    message: dict[str, Any]

    def to_obj(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "site": self.site, "seq": int(self.seq), "spec": self.spec,
                "message": self.message}


_STAGE = re.compile(r"^[a-z][a-z_]{0,31}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Claims:
    """What the signed auth header says about the body that follows it.

    Attributes:
        job_id: the approved job the request drives.
        site: the datasite it is meant for.
        seq: the request's sequence number (strictly increasing per job at a site).
        stage: the stage of its message (``advertise``, ``share_keys``, ..., ``spend``).
        length: the body's length in bytes.
        sha256: the body's SHA-256, lowercase hex.
    """

    job_id: str
    site: str
    seq: int
    stage: str
    length: int
    sha256: str

    def to_bytes(self) -> bytes:
        """The canonical bytes that are signed (sorted keys, no spaces)."""
        return json.dumps({"job_id": self.job_id, "site": self.site, "seq": int(self.seq), "stage": self.stage,
                           "length": int(self.length), "sha256": self.sha256},
                          sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class SignedRequest:
    """One request as it travels: the body and the value of its :data:`AUTH_HEADER`."""

    body: bytes
    auth: str

    def headers(self) -> dict[str, str]:
        """The HTTP headers to send with :attr:`body`."""
        return {AUTH_HEADER: self.auth, "content-type": "application/x-fedmtl"}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_request(env: Envelope, signing_key) -> SignedRequest:
    """The body of ``env`` and its auth header, signed with the job's key.

    Args:
        env: the request.
        signing_key: the job's :class:`fedmtl.privacy.keys.SigningKey` (its public half
            is the approved spec's ``dataplane_key``).

    Returns:
        The :class:`SignedRequest` (send ``body`` with ``headers()``).

    Raises:
        WireError: the envelope cannot travel (see :func:`encode`).
    """
    body = encode(env.to_obj())
    claims = Claims(job_id=env.job_id, site=env.site, seq=int(env.seq), stage=str(env.message.get("stage", "")),
                    length=len(body), sha256=hashlib.sha256(body).hexdigest())
    raw = claims.to_bytes()
    return SignedRequest(body=body, auth=f"{_b64(raw)}.{_b64(signing_key.sign(AUTH_DOMAIN + raw))}")


def read_auth(value: str | bytes | None) -> tuple[Claims, bytes, bytes]:
    """Parse an auth header WITHOUT trusting it: the claims, the signed bytes and the
    signature. The caller verifies the signature (:func:`verify_auth`) with the key of the
    spec it approved before it reads the body.

    Args:
        value: the header's value (``None``: the request carries none).

    Returns:
        ``(claims, signed bytes, signature)``.

    Raises:
        WireError: the header is missing, longer than :data:`MAX_AUTH_HEADER` or malformed.
    """
    if value is None:
        raise WireError(f"the request carries no {AUTH_HEADER} header; a data-plane request is signed "
                        "by the job's key (fedmtl.contract.wire.sign_request)")
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise WireError(f"the {AUTH_HEADER} header is not ASCII") from None
    if len(value) > MAX_AUTH_HEADER:
        raise WireError(f"the {AUTH_HEADER} header is longer than {MAX_AUTH_HEADER} characters")
    head, dot, tail = value.partition(".")
    try:
        raw, sig = _unb64(head), _unb64(tail)
        obj = json.loads(raw)
    except (ValueError, binascii.Error, RecursionError):
        raise WireError(f"the {AUTH_HEADER} header is not base64url(JSON).base64url(signature)") from None
    if not dot or len(sig) != SIGNATURE_BYTES:
        raise WireError(f"the {AUTH_HEADER} header carries no {SIGNATURE_BYTES}-byte signature")
    keys = {"job_id", "site", "seq", "stage", "length", "sha256"}
    if not isinstance(obj, dict) or set(obj) != keys:
        raise WireError(f"the {AUTH_HEADER} claims must be exactly {sorted(keys)}")
    ints = [obj["seq"], obj["length"]]
    if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in ints):
        raise WireError("the claims' seq and length must be positive integers")
    for field, rx in (("job_id", _NAME), ("site", _NAME), ("stage", _STAGE), ("sha256", _SHA256)):
        if not isinstance(obj[field], str) or not rx.match(obj[field]):
            raise WireError(f"the claims' {field} is malformed")
    claims = Claims(**obj)
    if claims.to_bytes() != raw:
        raise WireError(f"the {AUTH_HEADER} claims are not in canonical form")
    return claims, raw, sig


def verify_auth(signed: bytes, sig: bytes, verify_key) -> None:
    """Raise :class:`WireError` unless ``sig`` is ``verify_key``'s signature of the claims.

    Args:
        signed: the claims' bytes, as :func:`read_auth` returned them.
        sig: the signature.
        verify_key: the approved job's :class:`fedmtl.privacy.keys.VerifyKey`.

    Raises:
        WireError: the signature does not verify.
    """
    try:
        verify_key.verify(sig, AUTH_DOMAIN + signed)
    except Exception:  # noqa: BLE001 - any failure is a bad signature
        raise WireError("the request's signature does not verify with the approved job's key") from None


def open_request(body: bytes | memoryview, claims: Claims, *, max_bytes: int) -> Envelope:
    """Decode a request body whose length and digest were checked against ``claims``.

    Args:
        body: the body.
        claims: the verified claims of its auth header.
        max_bytes: the largest body accepted.

    Returns:
        The :class:`Envelope`; its job id, site, seq and stage are the claims'.

    Raises:
        WireError: the body is malformed or says something other than its claims.
    """
    obj = decode(body, max_bytes=max_bytes)
    if not isinstance(obj, dict) or set(obj) != {"job_id", "site", "seq", "spec", "message"}:
        raise WireError("request must hold exactly job_id, site, seq, spec and message")
    job_id, site, seq, spec, message = (obj[k] for k in ("job_id", "site", "seq", "spec", "message"))
    if not isinstance(job_id, str) or not isinstance(site, str):
        raise WireError("job_id and site must be strings")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq <= 0:
        raise WireError("seq must be a positive int")
    if not isinstance(spec, dict) or not isinstance(message, dict):
        raise WireError("spec and message must be tables")
    if (job_id, site, seq, message.get("stage")) != (claims.job_id, claims.site, claims.seq, claims.stage):
        raise WireError("the body's job id, site, seq or stage is not what its signed header says")
    return Envelope(job_id, site, seq, spec, message)


__all__ = ["AUTH_DOMAIN", "AUTH_HEADER", "Claims", "Envelope", "MAGIC", "MAX_AUTH_HEADER", "SignedRequest",
           "WireError", "decode", "encode", "open_request", "read_auth", "sign_request", "verify_auth"]
