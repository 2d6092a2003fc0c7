"""Canonical JSON bytes and digests (DESIGN.md §4; no I/O).

Signatures and the run chain are computed over RFC 8785 (JCS) bytes, not over whatever text a
sink happened to write: JCS fixes key order, number formatting and string escaping, so any
consumer that re-serialises an event (a JSON store, a message broker, another language) still
arrives at the same bytes and therefore the same digest.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import rfc8785


def canonical_bytes(obj: Any) -> bytes:
    """RFC 8785 canonical UTF-8 bytes of a JSON value.

    Raises ``rfc8785.CanonicalizationError`` (a ``ValueError``) for values JCS cannot represent:
    integers beyond the I-JSON safe range (±2**53-1), NaN/Infinity, non-string keys, or
    non-JSON types. Failing is deliberate: a value two parsers could read differently must not
    be signed.
    """
    return rfc8785.dumps(obj)


def sha256_hex(data: bytes) -> str:
    """Lower-case hex SHA-256, the digest format of ``cellosprev`` and evidence digests."""
    return hashlib.sha256(data).hexdigest()


def event_digest(event: dict[str, Any]) -> str:
    """The chain digest of one event: SHA-256 of its canonical bytes."""
    return sha256_hex(canonical_bytes(event))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def strict_loads(text: str | bytes) -> Any:
    """Parse JSON, refusing duplicate object keys and NaN/Infinity.

    Parsers disagree on duplicate keys (first wins vs last wins), so a signed document with
    duplicates could mean one thing to the verifier and another to a consumer; refusing them
    keeps "what was verified" and "what is read" the same. Raises ``ValueError``.
    """
    return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
