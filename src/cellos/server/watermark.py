"""A monotonic position (a stream sequence folded so far) that tasks can wait for.

Built on a fresh ``asyncio.Event`` per advance rather than an ``asyncio.Condition``: a
condition's waiter must re-acquire its lock when cancelled, and on Python 3.11 a waiter
cancelled at shutdown (a subscription callback torn down mid-wait) was seen never to finish,
hanging ``cellos serve`` on SIGTERM. An event wait holds no lock, so cancelling it is instant,
and :meth:`close` releases every waiter at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time


class Watermark:
    def __init__(self) -> None:
        self.value = 0
        self.closed = False
        self._moved = asyncio.Event()

    def advance(self, value: int) -> None:
        """Record progress (never backwards) and wake every waiter to look again."""
        if value > self.value:
            self.value = value
        self._wake()

    def close(self) -> None:
        """Release every waiter now and make later waits return at once."""
        self.closed = True
        self._wake()

    async def wait(self, target: int, timeout: float | None) -> bool:
        """Whether ``target`` was reached before ``timeout`` (``None``: no bound) or closing."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.value < target:
            if self.closed:
                return False
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            moved = self._moved
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(moved.wait(), remaining)
        return True

    def _wake(self) -> None:
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()
