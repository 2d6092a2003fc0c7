"""Relaying output to the supervisor's own stdout/stderr without ever stalling the cell.

Each stream has a bounded queue and a writer thread (started at its first chunk: a cell that
prints nothing starts none). While the reader keeps up, a full queue pushes back on the
workload (its pipe is read more slowly), exactly as a shell pipeline would. When the reader
has made no progress for ``stall_seconds`` with the queue full (``cellos-supervisor x.yaml |
sleep 100``), the relay stops waiting: what does not fit is dropped for the terminal only and
counted (the durable log, the digest and NATS have every byte), so the workload's timeout and
the teardown are never held up by a terminal. A reader that has gone (EPIPE) is ignored.
"""

from __future__ import annotations

import collections
import errno
import os
import threading
import time

#: Bytes queued per stream before the relay pushes back.
QUEUE_BYTES = 4 << 20
#: Bytes per write(2): small enough that a slow reader's progress is seen often.
_WRITE_SLICE = 256 << 10
#: Queued chunks are written together, up to this many bytes (fewer wake-ups and syscalls).
_BATCH_BYTES = 1 << 20
#: A reader that takes nothing for this long is stalled: from then on, drop instead of wait.
STALL_SECONDS = 1.0


class _StreamRelay:
    def __init__(self, name: str, fd: int, queue_bytes: int, stall_seconds: float) -> None:
        self.name = name
        self.fd = fd
        self.queue_bytes = queue_bytes
        self.stall_seconds = stall_seconds
        self.chunks: collections.deque[bytes] = collections.deque()
        self.queued = 0
        self.relayed = 0
        self.dropped = 0
        self.stalled = False
        self.gone = False
        self.error: str | None = None
        self.progress_at = time.monotonic()
        self.cond = threading.Condition()
        self.closed = False
        self.thread: threading.Thread | None = None

    def put(self, data: bytes) -> None:
        with self.cond:
            if self.gone or self.error is not None:
                return  # nobody to relay to: nothing is "dropped" from a closed stream
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self._run, name=f"cellos-relay-{self.name}", daemon=True
                )
                self.thread.start()
            if self.queued + len(data) > self.queue_bytes and not self.stalled:
                # Push back while the reader makes progress; give up once it has not for a
                # whole stall period (measured from its last progress, not from now).
                while self.queued + len(data) > self.queue_bytes and self.queued:
                    left = self.progress_at + self.stall_seconds - time.monotonic()
                    if left <= 0:
                        self.stalled = True
                        break
                    self.cond.wait(left)
                    if self.gone or self.error is not None:
                        return
            if self.stalled and self.queued + len(data) > self.queue_bytes:
                self.dropped += len(data)
                return
            self.chunks.append(data)
            self.queued += len(data)
            self.cond.notify_all()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.chunks and not self.closed:
                    self.cond.wait()
                if not self.chunks:
                    return
                parts = [self.chunks.popleft()]
                size = len(parts[0])
                while self.chunks and size + len(self.chunks[0]) <= _BATCH_BYTES:
                    parts.append(self.chunks.popleft())
                    size += len(parts[-1])
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            failure = self._write(data)
            with self.cond:
                self.queued -= len(data)
                self.progress_at = time.monotonic()
                if failure is not None:
                    self.chunks.clear()
                    self.queued = 0
                elif self.queued <= self.queue_bytes // 2:
                    self.stalled = False  # the reader caught up again: relay, do not drop
                self.cond.notify_all()
                if failure is not None:
                    return

    def _write(self, data: bytes) -> str | None:
        view = memoryview(data)
        try:
            while view:
                done = os.write(self.fd, view[:_WRITE_SLICE])
                self.relayed += done
                view = view[done:]
                self.progress_at = time.monotonic()
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                self.gone = True
                return "gone"
            self.error = exc.strerror or str(exc)
            return self.error
        return None

    def drain(self, deadline: float) -> None:
        """Wait until everything queued is written, the reader stalls, or ``deadline``."""
        with self.cond:
            while self.queued and not self.gone and self.error is None:
                now = time.monotonic()
                stall_at = self.progress_at + self.stall_seconds
                if now >= deadline or now >= stall_at:
                    break
                self.cond.wait(min(deadline, stall_at) - now)
            # What is still queued will not be relayed in time: count it as dropped.
            if self.queued and not self.gone and self.error is None:
                self.dropped += self.queued
            self.closed = True
            self.cond.notify_all()


class TerminalRelay:
    """An :class:`~cellos.core.ports.OutputSink` writing each stream to a descriptor
    (``None``: that stream is closed and gets nothing)."""

    def __init__(
        self,
        fds: dict[str, int | None],
        *,
        queue_bytes: int = QUEUE_BYTES,
        stall_seconds: float = STALL_SECONDS,
    ) -> None:
        self.streams = {
            name: _StreamRelay(name, fd, queue_bytes, stall_seconds)
            for name, fd in fds.items()
            if fd is not None
        }

    def write(self, stream: str, data: bytes) -> None:
        relay = self.streams.get(stream)
        if relay is not None:
            relay.put(data)

    def drain(self, timeout: float = 30.0) -> None:
        """At the end of the run: let the reader take what is queued (see ``_StreamRelay``)."""
        deadline = time.monotonic() + timeout
        for relay in self.streams.values():
            relay.drain(deadline)

    def dropped(self) -> dict[str, int]:
        return {name: r.dropped for name, r in self.streams.items() if r.dropped}

    def errors(self) -> dict[str, str]:
        return {name: r.error for name, r in self.streams.items() if r.error is not None}
