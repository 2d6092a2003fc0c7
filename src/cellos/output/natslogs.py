"""Publishing output chunks live to JetStream (stream ``CELLOS_LOGS``).

Subject ``cellos.logs.<tenant>.<cellId>.<stdout|stderr>``; each message carries headers
``Cellos-Run-Id``, ``Cellos-Cell-Id``, ``Cellos-Stream`` and ``Cellos-Offset`` (the position of
its first byte in the redacted stream), so a consumer sees a gap as an offset that does not
follow on from the previous message's end. ``Nats-Msg-Id`` = ``<run>.<stream>.<offset>``
de-duplicates a re-publish.

The workload is never slowed by NATS: ``write`` only appends to a bounded per-stream buffer
(``CELLOS_LOGS_BUFFER_BYTES``); an asyncio task in this module's own thread (started at the
first byte: a cell that prints nothing starts nothing) coalesces what is buffered into
messages and publishes them with acks. Bytes that do not fit the buffer, or whose publish
fails (NATS down), are dropped, counted, and reported in ``command.v1.completed``.

This module imports nats-py; it is imported only when ``CELLOS_NATS_URL`` is set.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig

from cellos.core.ports import STREAMS
from cellos.core.subjects import logs_subject

log = logging.getLogger(__name__)

STREAM = "CELLOS_LOGS"
SUBJECTS = "cellos.logs.>"
#: Largest message body (nats-server's default max_payload is 1 MiB; headers need room).
MAX_MESSAGE_BYTES = 256 << 10
#: How long a failed connection is left alone before the next attempt.
RECONNECT_SECONDS = 1.0

HEADER_RUN = "Cellos-Run-Id"
HEADER_CELL = "Cellos-Cell-Id"
HEADER_STREAM = "Cellos-Stream"
HEADER_OFFSET = "Cellos-Offset"


@dataclass(frozen=True)
class LogsStreamConfig:
    max_bytes: int
    max_age_seconds: int
    buffer_bytes: int


async def ensure_logs_stream(js: JetStreamContext, config: LogsStreamConfig) -> None:
    """Create ``CELLOS_LOGS`` if it does not exist (never change an operator's settings)."""
    try:
        await js.stream_info(STREAM)
    except nats.js.errors.NotFoundError:
        await js.add_stream(
            StreamConfig(
                name=STREAM,
                subjects=[SUBJECTS],
                storage=StorageType.FILE,
                max_bytes=config.max_bytes,
                max_age=config.max_age_seconds,
                discard=DiscardPolicy.OLD,
                duplicate_window=min(120, config.max_age_seconds),
            )
        )


@dataclass
class _Pending:
    chunks: collections.deque[tuple[int, bytes]] = field(default_factory=collections.deque)
    queued: int = 0
    #: Offset of the next byte written (published, queued or dropped).
    offset: int = 0
    #: Bytes taken out of the buffer whose publish has not answered yet.
    inflight: int = 0
    published: int = 0
    dropped: int = 0


class LogPublisher:
    """One per supervisor; a :class:`RunLogs` per run. Thread-safe."""

    def __init__(
        self,
        url: str,
        config: LogsStreamConfig,
        *,
        connect_timeout: float = 1.0,
        publish_timeout: float = 2.0,
    ) -> None:
        self.url = url
        self.config = config
        self.connect_timeout = connect_timeout
        self.publish_timeout = publish_timeout
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._next_connect = 0.0

    def run(self, cell_id: str, run_id: str, tenant: str) -> RunLogs:
        return RunLogs(self, cell_id, run_id, tenant)

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name="cellos-logs", daemon=True
                )
                self._thread.start()
            return self._loop

    async def _connected(self) -> JetStreamContext | None:
        if self._js is not None and self._nc is not None and self._nc.is_connected:
            return self._js
        if time.monotonic() < self._next_connect:
            return None
        self._next_connect = time.monotonic() + RECONNECT_SECONDS
        try:
            if self._nc is not None:
                await self._nc.close()
            self._nc = await nats.connect(
                self.url,
                connect_timeout=self.connect_timeout,
                allow_reconnect=False,
                name="cellos-logs",
                error_cb=_quiet,
                disconnected_cb=_quiet_event,
                closed_cb=_quiet_event,
            )
            self._js = self._nc.jetstream(timeout=self.publish_timeout)
            await ensure_logs_stream(self._js, self.config)
        except Exception as exc:  # noqa: BLE001 - any failure: drop and count, retry later
            log.warning("output is not published to NATS at %s: %s", self.url, exc)
            self._js = None
            return None
        return self._js

    async def publish(self, subject: str, body: bytes, headers: dict[str, str]) -> bool:
        js = await self._connected()
        if js is None:
            return False
        try:
            await js.publish(subject, body, timeout=self.publish_timeout, headers=headers)
        except Exception as exc:  # noqa: BLE001 - a failed publish is counted, never raised
            log.debug("log publish to %s failed: %s", subject, exc)
            return False
        return True

    def close(self) -> None:
        loop = self._loop
        if loop is None:
            return

        async def shutdown() -> None:
            if self._nc is not None and not self._nc.is_closed:
                try:
                    await asyncio.wait_for(self._nc.drain(), 2)
                except Exception:  # noqa: BLE001 - closing a dead connection may fail
                    await self._nc.close()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        except Exception:
            log.debug("closing the log publisher failed", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)


class RunLogs:
    """The output of one run on its way to NATS: ``write`` never blocks."""

    def __init__(self, publisher: LogPublisher, cell_id: str, run_id: str, tenant: str) -> None:
        self.publisher = publisher
        self.cell_id = cell_id
        self.run_id = run_id
        self.subjects = {s: logs_subject(tenant, cell_id, s) for s in STREAMS}
        self.streams = {s: _Pending() for s in STREAMS}
        self._lock = threading.Lock()
        self._wake: asyncio.Event | None = None
        self._pump: Future[None] | None = None
        self._closing = False
        self._finished = False

    def write(self, stream: str, data: bytes) -> None:
        pending = self.streams[stream]
        with self._lock:
            offset = pending.offset
            pending.offset += len(data)
            if self._closing or pending.queued + len(data) > self.publisher.config.buffer_bytes:
                pending.dropped += len(data)
                return
            was_empty = not pending.chunks
            pending.chunks.append((offset, data))
            pending.queued += len(data)
        if self._pump is None:
            self._start()
        elif was_empty and self._wake is not None:
            self.publisher.loop().call_soon_threadsafe(self._wake.set)

    def _start(self) -> None:
        loop = self.publisher.loop()
        ready = threading.Event()

        async def main() -> None:
            self._wake = asyncio.Event()
            self._wake.set()
            ready.set()
            await self._run()

        self._pump = asyncio.run_coroutine_threadsafe(main(), loop)
        ready.wait(5)

    def _take(self, stream: str) -> tuple[int, bytes] | None:
        """The next message of ``stream``: consecutive chunks, up to MAX_MESSAGE_BYTES."""
        pending = self.streams[stream]
        with self._lock:
            if not pending.chunks:
                return None
            start, first = pending.chunks.popleft()
            parts, size = [first], len(first)
            while pending.chunks and size < MAX_MESSAGE_BYTES:
                offset, data = pending.chunks[0]
                if offset != start + size or size + len(data) > MAX_MESSAGE_BYTES:
                    break  # a gap (dropped bytes) starts a new message
                pending.chunks.popleft()
                parts.append(data)
                size += len(data)
            pending.queued -= size
            pending.inflight += size
        body = b"".join(parts)
        if len(body) > MAX_MESSAGE_BYTES:
            # One chunk bigger than a message: send its head now, put the rest back first.
            with self._lock:
                pending.chunks.appendleft((start + MAX_MESSAGE_BYTES, body[MAX_MESSAGE_BYTES:]))
                pending.queued += len(body) - MAX_MESSAGE_BYTES
                pending.inflight -= len(body) - MAX_MESSAGE_BYTES
            body = body[:MAX_MESSAGE_BYTES]
        return start, body

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            sent = True
            while sent:
                sent = False
                for stream in STREAMS:
                    item = self._take(stream)
                    if item is None:
                        continue
                    sent = True
                    offset, body = item
                    headers = {
                        HEADER_RUN: self.run_id,
                        HEADER_CELL: self.cell_id,
                        HEADER_STREAM: stream,
                        HEADER_OFFSET: str(offset),
                        "Nats-Msg-Id": f"{self.run_id}.{stream}.{offset}",
                    }
                    ok = await self.publisher.publish(self.subjects[stream], body, headers)
                    with self._lock:
                        if self._finished:
                            return  # answered after finish() gave up: already counted
                        pending = self.streams[stream]
                        pending.inflight -= len(body)
                        if ok:
                            pending.published += len(body)
                        else:
                            pending.dropped += len(body)
            if self._closing:
                return

    def finish(self, timeout: float) -> dict[str, dict[str, Any]]:
        """Publish what is buffered (waiting at most ``timeout``); per stream, the bytes
        published and dropped. What could not be published in time counts as dropped."""
        with self._lock:
            self._closing = True
        if self._pump is not None and self._wake is not None:
            self.publisher.loop().call_soon_threadsafe(self._wake.set)
            try:
                self._pump.result(timeout)
            except (FutureTimeout, Exception):  # noqa: BLE001 - counted below
                self._pump.cancel()
        stats: dict[str, dict[str, Any]] = {}
        with self._lock:
            self._finished = True
            for stream, pending in self.streams.items():
                # Still buffered or unanswered when the wait ended: not known to be stored.
                pending.dropped += pending.queued + pending.inflight
                pending.chunks.clear()
                pending.queued = pending.inflight = 0
                stats[stream] = {
                    "publishedBytes": pending.published,
                    "droppedBytes": pending.dropped,
                }
        return stats


async def _quiet(exc: Exception) -> None:
    log.debug("nats client error: %s", exc)


async def _quiet_event() -> None:
    return None
