"""The round data plane's wire format: signed, self-describing binary messages. Pure (no
syft, no network).

A round message of an approved job travels from the researcher to a datasite as one HTTP
body (see :mod:`fedmtl.datasites.dataplane` and docs/secure_aggregation.md)::

    MAGIC | u32 header length | header (UTF-8 JSON) | buffer 0 | buffer 1 | ...

The header is the message with every ``bytes`` value replaced by ``{"$b": i}``, every numpy
array by ``{"$a": i, "dtype": ..., "shape": [...]}`` and every tuple by ``{"$t": [...]}``;
``i`` indexes the ``buffers`` list of the header (each entry the byte length of one
buffer, in order). Decoding never unpickles: only the dtypes in :data:`DTYPES`, plain JSON
types, bytes, arrays and tuples come back, with bounded nesting, and every length is checked
against the body before it is read.

A *request* is the body above whose decoded value is an :class:`Envelope`, followed by an
Ed25519 signature (64 bytes) over ``DOMAIN + body``, made with the researcher's per-job key
whose public half the approved site spec holds (``spec["dataplane_key"]``).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from fedmtl.errors import FedMTLError

MAGIC = b"FMTL1\n"
DOMAIN = b"fedmtl-dataplane-request-v1\x00"
SIGNATURE_BYTES = 64
#: the only array dtypes that travel (no object arrays: nothing is ever unpickled)
DTYPES = frozenset({"float32", "float64", "int64", "int32", "uint64", "uint32", "uint8", "bool"})
MAX_DEPTH = 12
#: the header is small (keys, ids, numbers); the bulk travels in buffers
MAX_HEADER = 16 << 20


class WireError(FedMTLError):
    """A malformed, oversized or badly signed data-plane message."""


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


def sign_request(env: Envelope, signing_key) -> bytes:
    """The request body: the encoded envelope followed by its signature."""
    body = encode(env.to_obj())
    return body + signing_key.sign(DOMAIN + body)


def open_request(raw: bytes, *, max_bytes: int) -> tuple[Envelope, bytes, bytes]:
    """Decode a request WITHOUT trusting it: the envelope, the signed body and the
    signature. The caller verifies the signature with the key of the spec it approved
    (:func:`verify_request`) before acting on anything in it."""
    if len(raw) <= SIGNATURE_BYTES:
        raise WireError("request too short to carry a signature")
    body, sig = raw[:-SIGNATURE_BYTES], raw[-SIGNATURE_BYTES:]
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
    return Envelope(job_id, site, seq, spec, message), body, sig


def verify_request(body: bytes, sig: bytes, verify_key) -> None:
    """Raise :class:`WireError` unless ``sig`` is ``verify_key``'s signature of ``body``."""
    try:
        verify_key.verify(sig, DOMAIN + body)
    except Exception:  # noqa: BLE001 - any failure is a bad signature
        raise WireError("the request's signature does not verify with the approved job's key") from None


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


__all__ = ["DOMAIN", "Envelope", "MAGIC", "WireError", "decode", "encode", "open_request", "sign_request",
           "verify_request"]
