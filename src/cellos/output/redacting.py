"""Redacting a byte stream that arrives in arbitrary chunks.

A secret may be split across two reads (``...tok`` then ``en123...``). Each stream keeps back
the shortest tail that could still be the start of a secret, and releases it only once the
next chunk shows what follows (or the stream ends). Only bytes that are a prefix of some
secret are held, so a line that ends in a newline is not delayed (unless a secret begins with
a newline).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = b"[REDACTED]"


class StreamRedactor:
    """Replaces every secret value in one stream by ``[REDACTED]``, across chunk boundaries."""

    def __init__(self, secrets: Iterable[bytes]) -> None:
        values = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._values = values
        # Longest first: a secret that contains another is replaced whole.
        self._pattern = re.compile(b"|".join(re.escape(v) for v in values)) if values else None
        self._longest = len(values[0]) if values else 0
        self._firsts = frozenset(v[0] for v in values)
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """What of the stream can be released now (redacted)."""
        if self._pattern is None:
            return chunk
        buf = self._pending + chunk if self._pending else chunk
        out: list[bytes] = []
        pos = 0
        for match in self._pattern.finditer(buf):
            out.append(buf[pos : match.start()])
            out.append(REDACTED)
            pos = match.end()
        hold = self._hold_from(buf, pos)
        out.append(buf[pos:hold])
        self._pending = buf[hold:]
        return b"".join(out)

    def flush(self) -> bytes:
        """The end of the stream: what was held back cannot become a secret any more."""
        rest, self._pending = self._pending, b""
        return rest

    def _hold_from(self, buf: bytes, pos: int) -> int:
        """The first index at or after ``pos`` from which the rest of ``buf`` is a proper
        prefix of a secret (``len(buf)`` when no such tail exists)."""
        start = max(pos, len(buf) - self._longest + 1)
        for index in range(start, len(buf)):
            if buf[index] not in self._firsts:
                continue
            tail = buf[index:]
            if any(value.startswith(tail) for value in self._values):
                return index
        return len(buf)
