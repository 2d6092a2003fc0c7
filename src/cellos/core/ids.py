"""Random ids, timestamps and SHA-256 without the stdlib's heavier modules.

``cellos-supervisor`` runs once per cell, so its start is a CI job's latency. ``uuid`` imports
``platform``, ``datetime`` and ``hashlib`` load more than an event needs (``hashlib`` loads
OpenSSL through ``_hashlib``); these helpers give the same values from ``os``, ``time`` and
CPython's built-in SHA-256.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any


def uuid4() -> str:
    """A random (version 4, RFC 4122 variant) UUID in its canonical text form."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def rfc3339_now() -> str:
    """UTC now with microseconds, e.g. ``2024-05-01T12:00:00.123456Z``."""
    ns = time.time_ns()
    seconds, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{rest // 1000:06d}Z"


def _sha256_factory() -> Callable[..., Any]:
    try:  # CPython's own implementation: no OpenSSL to load (3.11: _sha256, 3.12+: _sha2)
        from _sha256 import sha256  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        try:
            from _sha2 import sha256  # type: ignore[import-not-found, no-redef, unused-ignore]
        except ImportError:
            from hashlib import sha256  # type: ignore[assignment, unused-ignore]
    return sha256  # type: ignore[no-any-return, unused-ignore]


sha256 = _sha256_factory()
