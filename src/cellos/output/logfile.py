"""The durable per-cell log of one output stream: bounded, created on the first byte.

``<CELLOS_LOG_DIR>/<cellId>/<runId>.<stream>.log`` holds the first ``CELLOS_LOG_MAX_BYTES``
bytes of the (redacted) stream; the rest is counted as dropped and reported in
``command.v1.completed``. A cell that prints nothing creates no file (a ``/bin/true`` cell pays
for no ``open``). A failure to write (full disk) never stops the workload: it is counted as
dropped too, and the reason is reported.
"""

from __future__ import annotations

import os


class BoundedLog:
    def __init__(self, path: str, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.written = 0
        self.dropped = 0
        #: Why the log stopped taking bytes before its bound (None: it did not).
        self.error: str | None = None
        self._fd = -1

    def room(self) -> int:
        """Bytes the log will still take."""
        return 0 if self.error is not None else max(0, self.max_bytes - self.written)

    def write(self, data: bytes) -> None:
        take = min(len(data), self.room())
        done = 0
        if take:
            try:
                if self._fd < 0:
                    self._open()
                view = memoryview(data)[:take]
                while done < take:
                    done += os.write(self._fd, view[done:])
            except OSError as exc:
                # Bytes written before the failure stay; the log takes nothing more.
                self.error = f"cannot write {self.path}: {exc.strerror or exc}"
                self.close()
        self.written += done
        self.dropped += len(data) - done

    def _open(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        self._fd = os.open(
            self.path,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
