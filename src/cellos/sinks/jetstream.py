"""JetStream event sink (DESIGN.md §6): durable, ordered, de-duplicated, replayable.

Each (signed) event is published to ``cellos.events.cell.<tenant>.<cellId>.<phase>``
(:func:`cellos.core.subjects.event_subject`: tenant and cell id encoded injectively) on
stream ``CELLOS_EVENTS`` (``cellos.events.>``, file storage, 90-day max age) with
``Nats-Msg-Id`` = the inner event's id, so a re-publish (a retry, a DLQ replay) is dropped by
the server's duplicate window.

**Pipelined publishes.** :meth:`JetStreamSink.emit` does not wait for the server's ack: it
hands the event to the sink's event loop, which publishes in order and keeps at most
``window`` acks outstanding (``emit`` blocks when the window is full). Acks are checked in
order; an event whose ack fails (timeout, error) is retried alone, with exponential backoff
behind a circuit breaker, and what still fails goes to the dead-letter handler (the DLQ,
:class:`cellos.sinks.dlq.DlqSink`). :meth:`flush` waits until every event so far is acked or
dead-lettered: the supervisor calls it before it reports a run, so a worker acks a cell only
once ``lifecycle.destroyed`` and the summary are on the stream (or in the DLQ). The first
event of a run (``lifecycle.started``) is flushed at once: the workload must not start when
not even it could be delivered.

The supervisor is synchronous; nats-py is asyncio. The sink owns one event loop in a daemon
thread and every call hands work to it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, TypeVar

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck, StorageType, StreamConfig

from cellos.core.envelopes import cell_id_of, dedupe_id, inner_event, tenant_in
from cellos.core.errors import SinkError
from cellos.core.events import LIFECYCLE_STARTED, PHASES
from cellos.core.log import get_logger
from cellos.core.ports import CloudEvent
from cellos.core.subjects import event_subject
from cellos.natsconn import DEFAULT_URL, connect, describe
from cellos.natsconn import ensure_stream as _ensure

log = get_logger(__name__)

STREAM = "CELLOS_EVENTS"
SUBJECTS = "cellos.events.>"
MAX_AGE_SECONDS = 90 * 24 * 3600
DUPLICATE_WINDOW_SECONDS = 120
#: Publishes whose ack is awaited at the same time (the pipeline's depth).
DEFAULT_WINDOW = 256

__all__ = ["DEFAULT_URL", "STREAM", "SUBJECTS", "JetStreamSink", "ensure_stream", "subject_for"]

T = TypeVar("T")
#: Called (in the sink's thread) with an event that could not be published and why.
DeadLetter = Callable[[CloudEvent, SinkError], None]


def events_stream_config() -> StreamConfig:
    return StreamConfig(
        name=STREAM,
        description="CellOS events: every step of every cell, hash-chained per run",
        subjects=[SUBJECTS],
        storage=StorageType.FILE,
        max_age=MAX_AGE_SECONDS,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
    )


async def ensure_stream(js: JetStreamContext) -> None:
    """Create ``CELLOS_EVENTS`` if it does not exist (never change an operator's settings)."""
    await _ensure(js, events_stream_config())


def subject_for(event: CloudEvent, tenant: str | None) -> str:
    """The subject of a (wire or inner) event."""
    inner = inner_event(event) or event
    phase = PHASES.get(str(inner.get("type")), "other")
    return event_subject(tenant, cell_id_of(inner) or "unknown", phase)


class TenantMemory:
    """The tenant of each recent run: only some events (started, summary) name it."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._by_run: OrderedDict[str, str] = OrderedDict()

    def tenant(self, inner: CloudEvent) -> str | None:
        run_id = str(inner.get("cellosrunid", ""))
        named = tenant_in(inner)
        if named is not None:
            self._by_run[run_id] = named
            self._by_run.move_to_end(run_id)
            while len(self._by_run) > self.size:
                self._by_run.popitem(last=False)
            return named
        return self._by_run.get(run_id)


class CircuitBreaker:
    """Open after ``threshold`` consecutive failures; let one attempt through after ``reset``."""

    def __init__(self, threshold: int = 5, reset_seconds: float = 5.0) -> None:
        self.threshold = threshold
        self.reset_seconds = reset_seconds
        self.failures = 0
        self.opened_at: float | None = None

    def allow(self) -> bool:
        if self.opened_at is None:
            return True
        return time.monotonic() - self.opened_at >= self.reset_seconds

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None

    def failure(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            self.opened_at = time.monotonic()


@dataclass
class _Item:
    event: CloudEvent
    subject: str
    payload: bytes
    msg_id: str
    ack: asyncio.Future[PubAck] | None = None


class JetStreamSink:
    name = "jetstream"

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        require: bool = False,
        connect_timeout: float = 2.0,
        publish_timeout: float = 2.0,
        retries: int = 3,
        backoff_seconds: float = 0.05,
        breaker: CircuitBreaker | None = None,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self.publish_timeout = publish_timeout
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.breaker = breaker or CircuitBreaker()
        self.published = 0
        #: Set by the DLQ wrapper; without one, a failed event is reported by :meth:`flush`.
        self.dead_letter: DeadLetter | None = None
        self._tenants = TenantMemory()
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="cellos-jetstream", daemon=True
        )
        self._thread.start()
        self._lock = threading.Lock()
        # The pipeline: a slot per event until it is acked or dead-lettered.
        self._slots = threading.BoundedSemaphore(max(1, window))
        self._settled = threading.Condition()
        self._queued = 0
        self._done = 0
        self._failures: list[str] = []
        self._sendq: asyncio.Queue[_Item] | None = None
        self._inflight: asyncio.Queue[_Item] | None = None
        try:
            self._call(self._start(), connect_timeout + 5)
        except SinkError as exc:
            if require:
                self.close()
                raise SinkError(
                    "CELL_OS_REQUIRE_JETSTREAM",
                    f"JetStream at {url} is required but unavailable: {exc.reason}",
                ) from None
            log.warning(
                "JetStream unavailable at start; events go to the DLQ until it is back",
                extra={"url": url},
            )

    # -- plumbing ----------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise SinkError(
                "jetstream", f"no answer from {self.url} within {timeout:.1f}s"
            ) from None
        except SinkError:
            raise
        except Exception as exc:  # noqa: BLE001 - every client error becomes a SinkError
            raise SinkError("jetstream", describe(exc)) from None

    async def _start(self) -> None:
        self._sendq = asyncio.Queue()
        self._inflight = asyncio.Queue()
        self._tasks = [
            asyncio.create_task(self._sender()),
            asyncio.create_task(self._acker()),
        ]
        await self._connect()

    async def _connect(self) -> None:
        if self._nc is not None and self._nc.is_connected:
            return
        if self._nc is not None:
            await self._nc.close()
        # A bounded number of reconnects: the client must fail fast (the event then goes to
        # the DLQ), and the next publish opens a new connection anyway.
        self._nc = await connect(
            self.url, name="cellos-supervisor", connect_timeout=self.connect_timeout
        )
        self._js = self._nc.jetstream(timeout=self.publish_timeout)
        await ensure_stream(self._js)

    def _headers(self, item: _Item) -> dict[str, str]:
        return {"Nats-Msg-Id": item.msg_id}

    async def _sender(self) -> None:
        """Publish queued events in order, without waiting for their acks."""
        assert self._sendq is not None and self._inflight is not None
        while True:
            item = await self._sendq.get()
            try:
                if not self.breaker.allow():
                    raise SinkError("jetstream", "circuit open")
                if self._js is None or self._nc is None or not self._nc.is_connected:
                    await self._connect()
                assert self._js is not None
                item.ack = await self._js.publish_async(
                    item.subject, item.payload, headers=self._headers(item)
                )
            except Exception:  # noqa: BLE001 - the acker retries it alone
                item.ack = None
            self._inflight.put_nowait(item)

    async def _acker(self) -> None:
        """Check acks in publish order; retry or dead-letter what failed."""
        assert self._inflight is not None
        while True:
            item = await self._inflight.get()
            error: SinkError | None = None
            try:
                if item.ack is None:
                    raise SinkError("jetstream", "publish failed")
                ack = await asyncio.wait_for(item.ack, self.publish_timeout)
                self._check(ack)
                self.breaker.success()
                self.published += 1
            except Exception:  # noqa: BLE001 - retried alone, in order
                error = await self._retry(item)
            self._settle(item, error)

    def _check(self, ack: PubAck) -> None:
        if ack.stream != STREAM:
            raise SinkError("jetstream", f"published to stream {ack.stream!r}, not {STREAM}")

    async def _retry(self, item: _Item) -> SinkError | None:
        if item.ack is not None and not item.ack.done():
            item.ack.cancel()
        delay = self.backoff_seconds
        last: SinkError = SinkError("jetstream", "circuit open after repeated publish failures")
        for attempt in range(self.retries + 1):
            if not self.breaker.allow():
                break
            try:
                async with asyncio.timeout(self.publish_timeout + self.connect_timeout + 1):
                    if self._js is None or self._nc is None or not self._nc.is_connected:
                        await self._connect()
                    assert self._js is not None
                    ack = await self._js.publish(
                        item.subject,
                        item.payload,
                        timeout=self.publish_timeout,
                        headers=self._headers(item),
                    )
                self._check(ack)
            except Exception as exc:  # noqa: BLE001 - every client error is one failure
                last = exc if isinstance(exc, SinkError) else SinkError("jetstream", describe(exc))
                if attempt < self.retries:
                    await asyncio.sleep(delay)
                    delay *= 2
                continue
            self.breaker.success()
            self.published += 1
            return None
        self.breaker.failure()
        return last

    def _settle(self, item: _Item, error: SinkError | None) -> None:
        if error is not None:
            handler = self.dead_letter
            try:
                if handler is None:
                    raise error
                handler(item.event, error)
            except Exception as exc:  # noqa: BLE001 - reported by flush()
                with self._settled:
                    self._failures.append(f"event {item.msg_id}: {exc}")
        with self._settled:
            self._done += 1
            self._settled.notify_all()
        self._slots.release()

    # -- the sink ----------------------------------------------------------------------------

    def emit(self, event: CloudEvent) -> None:
        inner = inner_event(event) or event
        with self._lock:
            subject = subject_for(inner, self._tenants.tenant(inner))
            if not self.breaker.allow():
                # Fail fast while NATS is known to be away: the DLQ takes it at once.
                raise SinkError("jetstream", "circuit open after repeated publish failures")
            payload = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
            item = _Item(event, subject, payload, dedupe_id(event))
            self._slots.acquire()
            with self._settled:
                self._queued += 1
            assert self._sendq is not None
            self._loop.call_soon_threadsafe(self._sendq.put_nowait, item)
        if inner.get("type") == LIFECYCLE_STARTED:
            # The supervisor runs the workload only once its start is recorded somewhere.
            self.flush()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every event emitted so far is acked or dead-lettered; ``SinkError`` if
        one was neither (no DLQ, or the DLQ failed too)."""
        if timeout is None:
            # Worst case: each outstanding event retried alone until the breaker opens.
            timeout = (
                30.0
                + (self.publish_timeout + self.connect_timeout + 1)
                * (self.retries + 1)
                * self.breaker.threshold
            )
        deadline = time.monotonic() + timeout
        with self._settled:
            target = self._queued
            while self._done < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SinkError(
                        "jetstream",
                        f"{target - self._done} event(s) still unconfirmed after {timeout:.0f}s",
                    )
                self._settled.wait(remaining)
            failures, self._failures = self._failures, []
        if failures:
            raise SinkError("jetstream", f"{len(failures)} event(s) lost: {failures[0]}")

    def close(self) -> None:
        if self._sendq is not None:
            try:
                self.flush(timeout=30)
            except SinkError as exc:
                log.error("JetStream sink closed with events unconfirmed: %s", exc.reason)

        async def shutdown() -> None:
            for task in getattr(self, "_tasks", []):
                task.cancel()
            if self._nc is not None and not self._nc.is_closed:
                try:
                    await asyncio.wait_for(self._nc.drain(), 5)
                except Exception:  # noqa: BLE001 - closing a dead connection may fail
                    await self._nc.close()

        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            except Exception:
                log.debug("JetStream close failed", exc_info=True)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
