"""The NATS side of ``cellos serve``: projection follower, event reads, queue submissions.

:class:`Hub` replays ``CELLOS_EVENTS`` from its first sequence into a
:class:`~cellos.server.projection.Projection` (``start`` returns once caught up), keeps it
current with an ordered push consumer, reads the documents still waiting in ``CELLOS_CELLS``
(PENDING cells), hands out ordered consumers for the SSE endpoints, and -- when given the
host's DLQ directory -- replays dead-lettered events on start and periodically.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import Any

import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from cellos.core.canonical import strict_loads
from cellos.core.chain import RUN_ID_ATTR, SEQ_ATTR
from cellos.core.envelopes import cell_id_of, inner_event, is_envelope
from cellos.core.errors import CellosError
from cellos.core.loading import parse_document, validate_document
from cellos.core.signing import SignatureInvalid, VerifyKeys, unwrap_signed
from cellos.natsconn import connect
from cellos.server.problems import Problem
from cellos.server.projection import TERMINAL, Projection
from cellos.server.watermark import Watermark
from cellos.sinks.jetstream import STREAM, SUBJECTS, ensure_stream
from cellos.sinks.replay import DEFAULT_INTERVAL_SECONDS, replay_forever
from cellos.worker import queue

log = logging.getLogger(__name__)


def rfc3339(moment: datetime) -> str:
    """The event time format (microseconds, ``Z``), so times compare as the events' do."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _decode(data: bytes | None) -> Any:
    if not data:
        return None
    try:
        return strict_loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None


def event_item(
    seq: int, subject: str | None, data: bytes | None, rejected: str | None = None
) -> dict[str, Any]:
    """One stream message as the API shows it: the wire event plus what a client filters on."""
    payload = _decode(data)
    inner = inner_event(payload)
    item: dict[str, Any] = {
        "seq": seq,
        "subject": subject,
        "cellId": cell_id_of(inner) if inner is not None else None,
        "type": inner.get("type") if inner is not None else None,
        "time": inner.get("time") if inner is not None else None,
        "runId": inner.get(RUN_ID_ATTR) if inner is not None else None,
        "runSeq": inner.get(SEQ_ATTR) if inner is not None else None,
        "signed": is_envelope(payload),
        "event": payload,
    }
    if payload is None:
        item["rejected"] = "not a JSON event"
    elif rejected is not None:
        item["rejected"] = rejected
    return item


class Hub:
    """The NATS side: projection follower, event reads, queue submissions, SSE consumers."""

    def __init__(
        self,
        nats_url: str,
        keys: VerifyKeys | None = None,
        *,
        dlq_dir: str | None = None,
        dlq_replay_seconds: float = DEFAULT_INTERVAL_SECONDS,
    ) -> None:
        self.nats_url = nats_url
        self.keys = keys
        self.dlq_dir = dlq_dir
        self.dlq_replay_seconds = dlq_replay_seconds
        self.projection = Projection()
        #: Stream sequences not folded because they failed verification, with the reason.
        self.rejected: dict[int, str] = {}
        self.closing = asyncio.Event()
        #: The stream sequence the projection has folded so far.
        self.applied = Watermark()
        self._caught_up = asyncio.Event()
        self._scan_lock = asyncio.Lock()
        self._queue_scanned = 0
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._subs: list[Subscription] = []
        self._scan_task: asyncio.Task[None] | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self._scan_wanted = asyncio.Event()

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("hub not started")
        return self._js

    async def start(self) -> None:
        """Connect, replay ``CELLOS_EVENTS`` until caught up, then read the queue."""
        # Fail fast when NATS is not there at start (a persistent connection would wait for
        # it forever); once serving, reconnect forever.
        probe = await connect(self.nats_url, name="cellos-serve-probe")
        await probe.close()
        self._nc = await connect(self.nats_url, name="cellos-serve", persistent=True)
        self._js = self._nc.jetstream(timeout=5.0)
        await ensure_stream(self._js)
        info = await self._js.stream_info(STREAM)
        target = info.state.last_seq if info.state.messages else 0
        sub = await self._js.subscribe(
            SUBJECTS,
            stream=STREAM,
            cb=self._on_event,
            ordered_consumer=True,
            # Missed heartbeats are how a restarted nats-server is noticed: keep it short.
            idle_heartbeat=2.0,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )
        self._subs.append(sub)
        if target:
            caught_up = asyncio.create_task(self._caught_up.wait())
            reached = asyncio.create_task(self.wait_applied(target, timeout=None))
            try:
                await asyncio.wait({caught_up, reached}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                caught_up.cancel()
                reached.cancel()
        await queue.ensure_queue(self._js)
        await self.scan_queue()
        # Submissions by anyone (``cellos submit``, another server): a plain subscription
        # on the queue's subjects only says "look again"; what counts is the stream.
        self._subs.append(await self._nc.subscribe(queue.SUBJECTS, cb=self._on_submit))
        self._scan_task = asyncio.create_task(self._scan_loop())
        if self.dlq_dir:
            self._replay_task = asyncio.create_task(
                replay_forever(
                    self.js, self.dlq_dir, self.dlq_replay_seconds, self.closing, "cellos serve"
                )
            )

    def stop_waiting(self) -> None:
        """Shutdown has begun: release every request or callback waiting on the hub."""
        self.closing.set()
        self.applied.close()

    async def close(self) -> None:
        self.stop_waiting()
        for task in (self._scan_task, self._replay_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self._nc is not None and not self._nc.is_closed:
            try:
                await asyncio.wait_for(self._nc.drain(), 5)
            except Exception:  # noqa: BLE001 - closing a dead connection may fail
                await self._nc.close()

    # -- projection follower -----------------------------------------------------------------

    def _verify(self, payload: Any) -> str | None:
        if payload is None:
            return "not a JSON event"
        if self.keys is None:
            return None
        if not is_envelope(payload):
            return "unsigned event, but verify keys were given"
        try:
            unwrap_signed(payload, self.keys)
        except SignatureInvalid as exc:
            return exc.reason
        return None

    async def _on_event(self, msg: Msg) -> None:
        meta = msg.metadata
        seq = meta.sequence.stream
        if seq > self.projection.last_seq:
            payload = _decode(msg.data)
            reason = self._verify(payload)
            if reason is not None:
                self.rejected[seq] = reason
                self.projection.skip(seq, payload)
                log.warning("stream seq %d not folded: %s", seq, reason)
            else:
                self.projection.apply(seq, payload, msg.subject)
        if meta.num_pending == 0:
            self._caught_up.set()
        self.applied.advance(self.projection.last_seq)

    async def wait_applied(self, seq: int, timeout: float | None = 30.0) -> bool:
        """Wait until the projection has folded stream sequence ``seq``."""

        return await self.applied.wait(seq, timeout)

    # -- reading events ----------------------------------------------------------------------

    async def fetch(self, seq: int) -> dict[str, Any] | None:
        try:
            msg = await self.js.get_msg(STREAM, seq)
        except nats.js.errors.NotFoundError:
            return None  # expired or deleted
        return event_item(seq, msg.subject, msg.data, self.rejected.get(seq))

    async def fetch_many(self, seqs: list[int]) -> list[dict[str, Any]]:
        gate = asyncio.Semaphore(16)

        async def one(seq: int) -> dict[str, Any] | None:
            async with gate:
                return await self.fetch(seq)

        items = await asyncio.gather(*(one(s) for s in seqs))
        return [item for item in items if item is not None]

    async def follow(self, start: int) -> Subscription:
        """An ordered consumer of ``CELLOS_EVENTS`` from stream sequence ``start``."""
        return await self.js.subscribe(
            SUBJECTS,
            stream=STREAM,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, start)
            ),
        )

    # -- the work queue ----------------------------------------------------------------------

    async def _on_submit(self, msg: Msg) -> None:
        self._scan_wanted.set()

    async def _scan_loop(self) -> None:
        while not self.closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._scan_wanted.wait(), 30)
            self._scan_wanted.clear()
            # Let a burst of submissions land before looking.
            await asyncio.sleep(0.05)
            try:
                await self.scan_queue()
            except Exception:  # NATS away for a moment: the next scan retries
                log.debug("queue scan failed", exc_info=True)

    async def scan_queue(self) -> None:
        """Fold the documents still waiting in ``CELLOS_CELLS`` after the last one seen."""
        async with self._scan_lock:
            seq = self._queue_scanned + 1
            while True:
                try:
                    msg = await self.js.get_msg(
                        queue.STREAM, seq, subject=queue.SUBJECTS, next=True
                    )
                except nats.js.errors.NotFoundError:
                    return
                if msg.seq is None:
                    return
                self._apply_submission(msg.seq, msg.data, msg.time)
                self._queue_scanned = msg.seq
                seq = msg.seq + 1

    def _apply_submission(self, seq: int, data: bytes | None, when: datetime | None) -> None:
        try:
            document = queue.decode_document(data or b"", f"{queue.STREAM}:{seq}")
        except CellosError as exc:
            log.warning("queue message %d is not a valid document: %s", seq, exc)
            return
        self.projection.apply_submission(
            document.spec.id,
            rfc3339(when or datetime.now(UTC)),
            tenant=queue.tenant_of(document),
            queue_seq=seq,
        )

    async def submit(self, data: bytes) -> tuple[int, dict[str, Any], bool]:
        """Validate and queue a document: (HTTP status, cell record, duplicate)."""
        document = validate_document(parse_document(data, "<request body>"))
        cell_id = document.spec.id
        current = self.projection.cells.get(cell_id)
        if current is not None and current.state not in TERMINAL:
            raise Problem(
                409,
                f"cell {cell_id} is {current.state.value}; submit it again once it has finished",
            )
        submitted = await queue.publish_document(self.js, document)
        if not submitted.duplicate:
            await self.scan_queue()
        view = self.projection.get(cell_id)
        if view is None:
            # Picked up and acknowledged before we looked: its events are on their way.
            view = {"id": cell_id, "tenant": queue.tenant_of(document), "state": "PENDING"}
        return (200 if submitted.duplicate else 202), view, submitted.duplicate
