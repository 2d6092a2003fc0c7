"""Dead-letter queue: an event a sink could not take is kept on disk, never dropped.

Each failed event becomes one file ``<CELLOS_DLQ_DIR>/<sink>/<runid>-<seq>-<id>.json`` (the
wire event itself, envelope included) written atomically (temp file + rename), so a replayer
(:mod:`cellos.sinks.replay`, ``cellos events replay-dlq``) never sees half an event.

**Per-run order.** Once one event of a run has been dead-lettered, every later event of that
run is dead-lettered too, even if the sink is back: otherwise the stream would hold events
N+1.. before the replayed N, and the run's chain would read as reordered. The replay then
appends the run's tail in order.

A sink that publishes asynchronously (the JetStream sink) reports its failures later, from
its own thread, through its ``dead_letter`` hook, which this wrapper sets.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict

from cellos.core.envelopes import inner_event
from cellos.core.errors import SinkError
from cellos.core.log import get_logger
from cellos.core.ports import CloudEvent, EventSink

log = get_logger(__name__)

#: Runs remembered as "in the DLQ" (a worker runs many; the oldest are forgotten).
MAX_STUCK_RUNS = 4096


def dlq_file_name(event: CloudEvent) -> str:
    """``<runid>-<seq, 8 digits>-<id>.json``: sorted by name = ordered within a run."""
    inner = inner_event(event) or event
    run_id, seq = inner.get("cellosrunid", "norun"), inner.get("cellosseq", 0)
    seq = seq if isinstance(seq, int) else 0
    return f"{run_id}-{seq:08d}-{event.get('id')}.json"


class DlqSink:
    def __init__(self, inner: EventSink, directory: str, sink_name: str) -> None:
        self.inner = inner
        self.directory = os.path.join(directory, sink_name)
        self.sink_name = sink_name
        self.dead_lettered = 0
        self._lock = threading.Lock()
        self._stuck: OrderedDict[str, None] = OrderedDict()
        if hasattr(inner, "dead_letter"):
            inner.dead_letter = self._dead_letter

    def emit(self, event: CloudEvent) -> None:
        if self._run_of(event) in self._stuck:
            self._write(event)
            return
        try:
            self.inner.emit(event)
        except Exception as exc:  # noqa: BLE001 - any delivery failure must dead-letter
            self._dead_letter(event, exc)

    def _dead_letter(self, event: CloudEvent, exc: Exception) -> None:
        log.warning(
            "sink %s failed, dead-lettering event: %s",
            self.sink_name,
            exc,
            extra={"error": str(exc), "event_id": event.get("id")},
        )
        with self._lock:
            self._stuck[self._run_of(event)] = None
            while len(self._stuck) > MAX_STUCK_RUNS:
                self._stuck.popitem(last=False)
        self._write(event)

    @staticmethod
    def _run_of(event: CloudEvent) -> str:
        inner = inner_event(event) or event
        return str(inner.get("cellosrunid", "norun"))

    def _write(self, event: CloudEvent) -> None:
        name = dlq_file_name(event)
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
        with self._lock:
            self.dead_lettered += 1

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()
