"""JetStream event sink (DESIGN.md §6): durable, ordered, de-duplicated, replayable.

Each (signed) event is published to
``cellos.events.cell.<tenantId|default>.<cellId>.<phase>`` on stream ``CELLOS_EVENTS``
(``cellos.events.>``, file storage, 90-day max age) with ``Nats-Msg-Id`` = the event id, so a
re-publish (a retry, a DLQ replay) is dropped by the server's duplicate window. Every publish
waits for the server's ack. Failures are retried a bounded number of times with exponential
backoff; a circuit breaker stops hammering a dead server; what still fails raises
:class:`SinkError`, which the DLQ wrapper turns into a file on disk.

The supervisor is synchronous; nats-py is asyncio. The sink owns one event loop in a daemon
thread and every call hands a coroutine to it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from cellos.core.errors import SinkError
from cellos.core.events import PHASES, SIGNED_ENVELOPE
from cellos.core.log import get_logger
from cellos.core.ports import CloudEvent

log = get_logger(__name__)

STREAM = "CELLOS_EVENTS"
SUBJECTS = "cellos.events.>"
MAX_AGE_SECONDS = 90 * 24 * 3600
DEFAULT_URL = "nats://127.0.0.1:4222"

T = TypeVar("T")


def inner_event(event: CloudEvent) -> CloudEvent:
    data = event.get("data")
    if event.get("type") == SIGNED_ENVELOPE and isinstance(data, dict):
        inner = data.get("event")
        if isinstance(inner, dict):
            return inner
    return event


def cell_id_of(event: CloudEvent) -> str:
    subject = str(event.get("subject", ""))
    return subject.rsplit(":", 1)[-1] or "unknown"


def subject_token(cell_id: str) -> str:
    """A cell id may contain '.', which NATS reads as a token separator: it becomes '_' in
    the subject (the event itself carries the real id)."""
    return cell_id.replace(".", "_")


def subject_for(event: CloudEvent, tenant: str) -> str:
    phase = PHASES.get(str(event.get("type")), "other")
    return f"cellos.events.cell.{tenant}.{subject_token(cell_id_of(event))}.{phase}"


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
    ) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self.publish_timeout = publish_timeout
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.breaker = breaker or CircuitBreaker()
        self.published = 0
        self._tenants: OrderedDict[str, str] = OrderedDict()
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="cellos-jetstream", daemon=True
        )
        self._thread.start()
        self._lock = threading.Lock()
        try:
            self._call(self._connect(), connect_timeout + 5)
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
            raise SinkError("jetstream", f"{type(exc).__name__}: {exc}") from None

    async def _connect(self) -> None:
        if self._nc is not None and self._nc.is_connected:
            return
        if self._nc is not None:
            await self._nc.close()
        # A bounded number of reconnects: the client must fail fast (the event then goes to
        # the DLQ), and the next publish opens a new connection anyway.
        self._nc = await nats.connect(
            self.url,
            connect_timeout=self.connect_timeout,
            allow_reconnect=True,
            max_reconnect_attempts=2,
            reconnect_time_wait=0.2,
            name="cellos-supervisor",
            error_cb=_quiet,
            disconnected_cb=_quiet_event,
            closed_cb=_quiet_event,
        )
        self._js = self._nc.jetstream(timeout=self.publish_timeout)
        await ensure_stream(self._js)

    async def _publish(self, subject: str, payload: bytes, msg_id: str) -> None:
        if self._js is None or self._nc is None or not self._nc.is_connected:
            await self._connect()
        assert self._js is not None
        ack = await self._js.publish(
            subject, payload, timeout=self.publish_timeout, headers={"Nats-Msg-Id": msg_id}
        )
        if ack.stream != STREAM:
            raise SinkError("jetstream", f"published to stream {ack.stream!r}, not {STREAM}")

    # -- the sink ----------------------------------------------------------------------------

    def _tenant(self, inner: CloudEvent) -> str:
        run_id = str(inner.get("cellosrunid", ""))
        data = inner.get("data")
        corr = data.get("correlation") if isinstance(data, dict) else None
        if isinstance(corr, dict) and isinstance(corr.get("tenantId"), str):
            self._tenants[run_id] = corr["tenantId"]
            while len(self._tenants) > 4096:
                self._tenants.popitem(last=False)
        return self._tenants.get(run_id, "default")

    def emit(self, event: CloudEvent) -> None:
        inner = inner_event(event)
        with self._lock:
            subject = subject_for(inner, self._tenant(inner))
            if not self.breaker.allow():
                raise SinkError("jetstream", "circuit open after repeated publish failures")
            payload = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
            delay = self.backoff_seconds
            last: SinkError | None = None
            for attempt in range(self.retries + 1):
                try:
                    self._call(
                        self._publish(subject, payload, str(event["id"])),
                        self.publish_timeout + self.connect_timeout + 1,
                    )
                except SinkError as exc:
                    last = exc
                    if attempt < self.retries:
                        time.sleep(delay)
                        delay *= 2
                    continue
                self.breaker.success()
                self.published += 1
                return
            self.breaker.failure()
            assert last is not None
            raise last

    def close(self) -> None:
        async def shutdown() -> None:
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


async def _quiet(exc: Exception) -> None:
    # nats-py would log every connection error with a traceback; the sink reports them itself.
    log.debug("nats client error: %s", exc)


async def _quiet_event() -> None:
    return None


async def ensure_stream(js: JetStreamContext) -> None:
    """Create ``CELLOS_EVENTS`` if it does not exist (never shrink an operator's settings)."""
    try:
        await js.stream_info(STREAM)
    except nats.js.errors.NotFoundError:
        await js.add_stream(
            StreamConfig(
                name=STREAM,
                subjects=[SUBJECTS],
                storage=StorageType.FILE,
                max_age=MAX_AGE_SECONDS,
                duplicate_window=120,
            )
        )
