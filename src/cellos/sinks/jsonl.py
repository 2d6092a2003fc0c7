"""JSON Lines sinks: a file mirror (``CELL_OS_JSONL_EVENTS``) or a stream such as stderr."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from typing import TextIO

from cellos.core.errors import SinkError
from cellos.core.ports import CloudEvent

#: DESIGN.md §6: one event per line, at most 1 MiB.
MAX_EVENT_BYTES = 1 << 20


def encode_line(event: CloudEvent) -> bytes:
    line = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    if len(line) > MAX_EVENT_BYTES:
        raise SinkError("jsonl", f"event {event.get('id')} is larger than {MAX_EVENT_BYTES} bytes")
    return line


class JsonlFileSink:
    """Appends one line per event; each line is one ``write`` on an O_APPEND descriptor, so
    several supervisors may share a file without interleaving partial lines."""

    name = "jsonl"

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._fd = os.open(
                path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640
            )
        except OSError as exc:
            raise SinkError(
                "CELL_OS_JSONL_EVENTS", f"cannot open {path!r}: {exc.strerror}"
            ) from None
        self._lock = threading.Lock()

    def emit(self, event: CloudEvent) -> None:
        line = encode_line(event)
        with self._lock:
            try:
                written = os.write(self._fd, line)
            except OSError as exc:
                raise SinkError("jsonl", f"cannot write {self.path!r}: {exc.strerror}") from None
            if written != len(line):
                raise SinkError("jsonl", f"short write to {self.path!r}")

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                # Not every target can be synced (pipes, /dev/*); the writes are done anyway.
                with contextlib.suppress(OSError):
                    os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1


class JsonlStreamSink:
    """Writes events to a text stream (the default sink in the portable profile is stderr)."""

    name = "stream"

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def emit(self, event: CloudEvent) -> None:
        self.stream.write(encode_line(event).decode())
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()
