"""JSON Lines sinks: a file mirror (``CELL_OS_JSONL_EVENTS``) or a stream such as stderr."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
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
    """Appends one line per event, so that several supervisors may share one file.

    Each line is one ``write`` on an O_APPEND descriptor under an exclusive ``flock`` (held by
    every CellOS appender around its append and any undo). A line the file cannot take whole
    (a short write or an error, e.g. ENOSPC) is removed again: the file is truncated back to
    the offset the line landed at, and only while nothing was appended after it, so a failed
    append leaves the file exactly as it was and the next line never glues onto a fragment.
    """

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
        try:
            # Only a regular file can be truncated back (not /dev/*, pipes or ttys).
            self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
        except OSError:
            self._regular = False
        self._lock = threading.Lock()

    def _fail(self, what: str, exc: OSError) -> SinkError:
        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return SinkError("jsonl", f"{what} {self.path!r}: {exc.strerror} ({code})")

    def emit(self, event: CloudEvent) -> None:
        line = encode_line(event)
        with self._lock:
            locked = False
            if self._regular:
                # Not every filesystem supports flock; appends stay atomic without it.
                with contextlib.suppress(OSError):
                    fcntl.flock(self._fd, fcntl.LOCK_EX)
                    locked = True
            try:
                self._append(line)
            finally:
                if locked:
                    with contextlib.suppress(OSError):
                        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _append(self, line: bytes) -> None:
        if self._regular:
            line = self._after_complete_line(line)
        try:
            written = os.write(self._fd, line)
        except OSError as exc:
            raise self._fail("cannot write", exc) from None  # nothing was written
        if written == len(line):
            return
        # A short write: the file took only part of the line. Writing the rest once tells why
        # (or, after an interruption, completes the line).
        why: OSError | None = None
        end = self._position()
        try:
            if end is not None and self._size() == end:
                rest = os.write(self._fd, line[written:])
                if written + rest == len(line):
                    return
                written += rest
                end += rest
        except OSError as exc:
            why = exc
        undo = self._undo(end, written)
        reason = (
            f"{why.strerror} ({errno.errorcode.get(why.errno or 0, why.errno)})"
            if why is not None
            else "short write"
        )
        raise SinkError(
            "jsonl",
            f"cannot write {self.path!r}: {reason} after {written} of {len(line)} bytes; {undo}",
        )

    def _after_complete_line(self, line: bytes) -> bytes:
        """A file left ending in a fragment (by an older writer, or a crash) gets a newline
        first, so this event stays a line of its own and the verifier names the fragment."""
        try:
            size = os.fstat(self._fd).st_size
            if size and os.pread(self._fd, 1, size - 1) != b"\n":
                return b"\n" + line
        except OSError:
            pass
        return line

    def _position(self) -> int | None:
        try:
            return os.lseek(self._fd, 0, os.SEEK_CUR)  # O_APPEND: the end of what we wrote
        except OSError:
            return None

    def _size(self) -> int | None:
        try:
            return os.fstat(self._fd).st_size
        except OSError:
            return None

    def _undo(self, end: int | None, written: int) -> str:
        """Truncate the fragment away, only if it is still the last thing in the file."""
        if not self._regular or end is None:
            return "the fragment could not be removed (not a regular file)"
        if self._size() != end:
            return "the fragment could not be removed (another writer appended after it)"
        try:
            os.ftruncate(self._fd, end - written)
        except OSError as exc:
            return f"the fragment could not be removed: {exc.strerror}"
        return "the partial line was removed"

    def flush(self) -> None:
        return None  # every write is done inside emit()

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

    def __init__(self, stream: TextIO | None) -> None:
        #: None when the process was started with the stream closed (``2>&-``).
        self.stream = stream

    def emit(self, event: CloudEvent) -> None:
        if self.stream is None:
            raise SinkError("stream", "the stream is closed")
        self.stream.write(encode_line(event).decode())
        self.stream.flush()

    def flush(self) -> None:
        return None  # every write is done inside emit()

    def close(self) -> None:
        if self.stream is not None:
            with contextlib.suppress(OSError):
                self.stream.flush()
