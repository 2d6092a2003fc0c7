"""Redaction: no secret value ever leaves the supervisor inside an event.

Values are registered as the broker resolves them; every string in an event (keys included)
has each registered value replaced by ``[REDACTED]`` before the event is chained and signed.
"""

from __future__ import annotations

import threading
from typing import Any

REDACTED = "[REDACTED]"


class Redactor:
    def __init__(self) -> None:
        self._values: set[str] = set()
        self._lock = threading.Lock()

    def add(self, value: str) -> None:
        if value:
            with self._lock:
                self._values.add(value)

    def forget(self, values: set[str] | None = None) -> None:
        with self._lock:
            if values is None:
                self._values.clear()
            else:
                self._values -= values

    def text(self, value: str) -> str:
        # Longest first, so a secret that contains another is replaced whole.
        for secret in sorted(self._values, key=len, reverse=True):
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value

    def bytes(self, value: bytes) -> bytes:
        for secret in sorted(self._values, key=len, reverse=True):
            raw = secret.encode()
            if raw in value:
                value = value.replace(raw, REDACTED.encode())
        return value

    def apply(self, obj: Any) -> Any:
        if not self._values:
            return obj
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, dict):
            return {self.apply(k): self.apply(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.apply(v) for v in obj]
        return obj
