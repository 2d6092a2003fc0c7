"""Canonical JSON bytes and digests (DESIGN.md §4; no I/O).

Signatures and the run chain are computed over RFC 8785 (JCS) bytes, not over whatever text a
sink happened to write: JCS fixes key order, number formatting and string escaping, so any
consumer that re-serialises an event (a JSON store, a message broker, another language) still
arrives at the same bytes and therefore the same digest.
"""

from __future__ import annotations

import json
from typing import Any

from cellos.core.ids import sha256

#: I-JSON's exact integer range: JCS refuses integers beyond it.
_MAX_SAFE_INT = 2**53 - 1


class _NotPlain(Exception):
    """The value needs the full JCS serializer (floats, non-ASCII keys, odd types)."""


def _plain_copy(obj: Any) -> Any:
    """A deep copy of a *plain* JSON value, or ``_NotPlain``.

    Plain: dicts with ASCII string keys, lists, strings, booleans, ``None`` and integers in the
    I-JSON range. For those, ``json.dumps(sort_keys=True, ensure_ascii=False, compact)`` writes
    exactly the RFC 8785 bytes: the same escapes (``\\b \\f \\n \\r \\t``, other control
    characters as lower-case ``\\u00xx``), and ASCII keys sort the same by code point as by
    UTF-16 unit. Floats (JCS number formatting) and non-ASCII keys (UTF-16 order) are left to
    the ``rfc8785`` library. The equivalence is property-tested against it.
    """
    kind = type(obj)
    if kind is str or kind is bool or obj is None:
        return obj
    if kind is int:
        if -_MAX_SAFE_INT <= obj <= _MAX_SAFE_INT:
            return obj
        raise _NotPlain
    if kind is dict:
        out = {}
        for key, value in obj.items():
            if type(key) is not str or not key.isascii():
                raise _NotPlain
            out[key] = _plain_copy(value)
        return out
    if kind is list:
        return [_plain_copy(value) for value in obj]
    raise _NotPlain


def _plain_or_not(obj: Any) -> tuple[Any, bool]:
    """(a plain copy of ``obj``, True), or (None, False) when it needs the full serializer."""
    try:
        return _plain_copy(obj), True
    except _NotPlain:
        return None, False
    except RecursionError:
        raise ValueError("value nested too deeply to canonicalise") from None


def _plain_bytes(plain: Any) -> bytes:
    text = json.dumps(
        plain, ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")
    )
    return text.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError (a ValueError)


def canonical_bytes(obj: Any) -> bytes:
    """RFC 8785 canonical UTF-8 bytes of a JSON value.

    Raises ``ValueError`` (``rfc8785.CanonicalizationError`` or ``UnicodeEncodeError``) for
    values JCS cannot represent: integers beyond the I-JSON safe range (±2**53-1),
    NaN/Infinity, non-string keys, lone surrogates or non-JSON types. Failing is deliberate: a
    value two parsers could read differently must not be signed.
    """
    plain, ok = _plain_or_not(obj)
    return _plain_bytes(plain) if ok else _jcs(obj)


def copy_and_canonical(obj: Any) -> tuple[Any, bytes]:
    """A deep copy of ``obj`` (a JSON value) and its canonical bytes, in one walk when the
    value is plain (the hot path: every event of every cell is chained, many are signed)."""
    plain, ok = _plain_or_not(obj)
    if ok:
        return plain, _plain_bytes(plain)
    import copy  # the rare non-plain value only: a plain run never imports it

    copied = copy.deepcopy(obj)
    return copied, _jcs(copied)


def _jcs(obj: Any) -> bytes:
    # Imported on first use: events of a plain run never need the full serializer.
    import rfc8785

    return rfc8785.dumps(obj)


def copy_and_digest(obj: Any) -> tuple[Any, str]:
    """A deep copy of ``obj`` and the SHA-256 of its canonical bytes (see above)."""
    copied, data = copy_and_canonical(obj)
    return copied, sha256_hex(data)


def sha256_hex(data: bytes) -> str:
    """Lower-case hex SHA-256, the digest format of ``cellosprev`` and evidence digests."""
    return str(sha256(data).hexdigest())


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
