"""Decoding the guest channel as it arrives, so that a microVM cell's output is live too.

The VMM's stdout is the guest's serial port: guest init (``guest/init.c``) sends the
workload's output as ``CELLOS:OUT:<base64>`` / ``CELLOS:ERR:<base64>`` lines while it runs.
:class:`GuestChannel` is the VMM's output sink: it decodes those lines at once and hands the
bytes to the cell's own output sink; every other ``CELLOS:`` line (exit code, artifacts,
spawn error) is kept and decoded at the end by :func:`~.qemu_probe.parse_channel`. Lines
that are not channel lines (kernel noise) are ignored, as ``parse_channel`` does.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

from cellos.core.errors import HostError
from cellos.core.ports import OutputSink
from cellos.hosts.microvm.qemu_probe import parse_channel

#: Longest line kept while waiting for its newline (channel lines are ~4 KiB; longer ones are
#: kernel noise and are skipped).
MAX_LINE = 64 << 10
#: Bytes of each stream kept for ``WorkloadResult.stdout``/``stderr`` (as process.py does).
HEAD_BYTES = 1 << 20
_KINDS = {b"CELLOS:OUT:": "stdout", b"CELLOS:ERR:": "stderr"}


class GuestChannel:
    def __init__(
        self, output: OutputSink | None, on_ready: Callable[[], None] | None = None
    ) -> None:
        self.output = output
        #: Called once, when the guest init says ``CELLOS:READY`` (it then listens).
        self.on_ready = on_ready
        self.heads = {"stdout": bytearray(), "stderr": bytearray()}
        self.totals = {"stdout": 0, "stderr": 0}
        self._line = bytearray()
        self._skipping = False
        self._other: list[str] = []
        self._error: str | None = None
        #: The guest sent its exit code (a pool guest's reader stops there).
        self.exited = False

    def write(self, stream: str, data: bytes) -> None:
        if stream != "stdout":
            return  # the VMM's own stderr: diagnostics of QEMU, not the workload's output
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                self._partial(data[start:])
                return
            self._partial(data[start:end])
            if not self._skipping:
                self._handle(bytes(self._line).rstrip(b"\r"))
            self._line.clear()
            self._skipping = False
            start = end + 1

    def _partial(self, piece: bytes) -> None:
        if self._skipping:
            return
        self._line += piece
        if len(self._line) > MAX_LINE:
            self._line.clear()
            self._skipping = True

    def _handle(self, line: bytes) -> None:
        if not line.startswith(b"CELLOS:"):
            return
        stream = _KINDS.get(line[:11])
        if stream is None:
            if line == b"CELLOS:READY" and self.on_ready is not None:
                ready, self.on_ready = self.on_ready, None
                ready()
            self._other.append(line.decode("utf-8", "replace"))
            if line.startswith(b"CELLOS:EXIT:"):
                self.exited = True
            return
        try:
            data = base64.b64decode(line[11:], validate=True)
        except (binascii.Error, ValueError) as exc:
            self._error = self._error or f"malformed {line[7:10].decode()} line: {exc}"
            return
        self.totals[stream] += len(data)
        head = self.heads[stream]
        if len(head) < HEAD_BYTES:
            head += data[: HEAD_BYTES - len(head)]
        if self.output is not None and data:
            self.output.write(stream, data)

    def finish(self) -> dict[str, Any]:
        """What ``parse_channel`` returns, with the workload's output counted as it went by.
        Raises HostError for a malformed channel."""
        if self._line and not self._skipping:
            self._handle(bytes(self._line).rstrip(b"\r"))
            self._line.clear()
        if self._error is not None:
            raise HostError("guest channel", self._error)
        result = parse_channel(self._other)
        result.update(
            stdout=bytes(self.heads["stdout"]),
            stderr=bytes(self.heads["stderr"]),
            stdout_bytes=self.totals["stdout"],
            stderr_bytes=self.totals["stderr"],
        )
        return result
