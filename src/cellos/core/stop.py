"""A request to stop a running cell early (a signal to its supervisor, a worker shutdown).

No I/O here (core): whoever waits on a workload registers a *waker*, a callable that makes its
wait return (e.g. a write to a self-pipe), and :meth:`StopRequest.set` calls every waker. ``set``
is safe to call from a Python signal handler: it only sets attributes and calls the wakers.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

#: ``command.v1.completed.reason`` of a workload stopped because its supervisor was signalled.
SUPERVISOR_SIGNAL = "supervisor_signal"


class StopRequest:
    def __init__(self) -> None:
        #: Why the cell is being stopped (``reason`` of its completed event); None: not asked.
        self.reason: str | None = None
        #: The signal that asked for it, if any (the supervisor then exits 128 + signal).
        self.signum: int | None = None
        #: A second request: skip what is left of the graceful period.
        self.hurry = False
        self._wakers: list[Callable[[], None]] = []

    def is_set(self) -> bool:
        return self.reason is not None

    def set(self, reason: str = SUPERVISOR_SIGNAL, signum: int | None = None) -> None:
        if self.reason is None:
            self.reason, self.signum = reason, signum
        else:
            self.hurry = True
        for wake in list(self._wakers):
            wake()

    def describe(self) -> str:
        if self.signum is None:
            return f"stopped ({self.reason})"
        return f"stopped by {signal.Signals(self.signum).name}"

    def add_waker(self, wake: Callable[[], None]) -> None:
        self._wakers.append(wake)

    def remove_waker(self, wake: Callable[[], None]) -> None:
        if wake in self._wakers:
            self._wakers.remove(wake)
