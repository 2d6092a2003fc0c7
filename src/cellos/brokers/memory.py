"""In-process broker: values are put in by the embedding program (tests, libraries)."""

from __future__ import annotations

import threading
from collections.abc import Mapping

from cellos.core.errors import SecretBrokerError


class MemoryBroker:
    name = "memory"

    def __init__(self, values: Mapping[str, str] | None = None) -> None:
        self._values = dict(values or {})
        self._leases: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def resolve(self, cell_id: str, key: str) -> str:
        with self._lock:
            if key not in self._values:
                raise SecretBrokerError(key, "secret not found in broker 'memory'")
            self._leases.setdefault(cell_id, set()).add(key)
            return self._values[key]

    def leased(self, cell_id: str) -> set[str]:
        with self._lock:
            return set(self._leases.get(cell_id, set()))

    def revoke(self, cell_id: str) -> None:
        with self._lock:
            self._leases.pop(cell_id, None)
