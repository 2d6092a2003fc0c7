"""``CELL_OS_USE_NOOP_SINK=1``: drop every event (portable profile only)."""

from __future__ import annotations

from cellos.core.ports import CloudEvent


class NoopSink:
    name = "noop"

    def emit(self, event: CloudEvent) -> None:
        del event

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None
