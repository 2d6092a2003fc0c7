"""One shape for every Server-Sent Events response of ``cellos serve`` (events, logs, console).

Each stream opens the same way (no caching, no proxy buffering, a reconnect delay), encodes its
events the same way (compact JSON, one ``data:`` line) and keeps an idle connection alive with
a comment line, so that proxies do not drop it and a gone client is noticed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Final

from aiohttp import web

#: Longest silence on a stream before a keep-alive comment is written.
KEEPALIVE_SECONDS: Final = 15.0
#: Reconnect delay a client is told to use, in milliseconds.
RETRY_MS: Final = 2000

_HEADERS: Final = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def encode(name: str, data: Any, event_id: int | None = None) -> bytes:
    """One SSE event: ``id`` (if any), ``event`` and its data as one line of compact JSON."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"{head}event: {name}\ndata: {body}\n\n".encode()


class SseStream:
    """An opened event stream: write events, and keep it alive while there is nothing."""

    def __init__(self, request: web.Request, response: web.StreamResponse) -> None:
        self.request = request
        self.response = response
        self._loop = asyncio.get_running_loop()
        self._last_write = self._loop.time()

    @classmethod
    async def open(cls, request: web.Request) -> SseStream:
        response = web.StreamResponse(headers=_HEADERS)
        await response.prepare(request)
        await response.write(f"retry: {RETRY_MS}\n\n".encode())
        return cls(request, response)

    async def send(self, name: str, data: Any, event_id: int | None = None) -> None:
        await self.response.write(encode(name, data, event_id))
        self._last_write = self._loop.time()

    def client_gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    async def idle(self) -> None:
        """Nothing to send this turn: write a keep-alive comment if the stream has been quiet
        for :data:`KEEPALIVE_SECONDS`."""
        if self._loop.time() - self._last_write >= KEEPALIVE_SECONDS:
            await self.response.write(b": keepalive\n\n")
            self._last_write = self._loop.time()
