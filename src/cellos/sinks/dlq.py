"""Dead-letter queue: an event a sink could not take is kept on disk, never dropped.

Each failed event becomes one file ``<CELLOS_DLQ_DIR>/<sink>/<runid>-<seq>-<id>.json``
written atomically (temp file + rename), so a replayer never sees half an event.
"""

from __future__ import annotations

import json
import os

from cellos.core.errors import SinkError
from cellos.core.log import get_logger
from cellos.core.ports import CloudEvent, EventSink

log = get_logger(__name__)


def _inner(event: CloudEvent) -> CloudEvent:
    data = event.get("data")
    if event.get("type") == "dev.cellos.events.signed_envelope.v1" and isinstance(data, dict):
        inner = data.get("event")
        if isinstance(inner, dict):
            return inner
    return event


class DlqSink:
    def __init__(self, inner: EventSink, directory: str, sink_name: str) -> None:
        self.inner = inner
        self.directory = os.path.join(directory, sink_name)
        self.sink_name = sink_name
        self.dead_lettered = 0

    def emit(self, event: CloudEvent) -> None:
        try:
            self.inner.emit(event)
        except Exception as exc:  # noqa: BLE001 - any delivery failure must dead-letter
            log.warning(
                "sink %s failed, dead-lettering event: %s",
                self.sink_name,
                exc,
                extra={"error": str(exc), "event_id": event.get("id")},
            )
            self._write(event)

    def _write(self, event: CloudEvent) -> None:
        inner = _inner(event)
        run_id, seq = inner.get("cellosrunid", "norun"), inner.get("cellosseq", 0)
        name = f"{run_id}-{seq:08d}-{event.get('id')}.json"
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            tmp = os.path.join(self.directory, f".{name}.tmp")
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(event, fh, separators=(",", ":"))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, os.path.join(self.directory, name))
        except (OSError, TypeError, ValueError) as exc:
            raise SinkError("CELLOS_DLQ_DIR", f"cannot dead-letter event: {exc}") from None
        self.dead_lettered += 1

    def close(self) -> None:
        self.inner.close()
