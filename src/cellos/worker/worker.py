"""``cellos worker``: pull cells from ``CELLOS_CELLS`` and run them through one warm supervisor.

One process, one ``Supervisor`` (built once with :func:`build_supervisor`: no interpreter
start and no composition per cell), ``concurrency`` cells at a time, each in a thread of a
pool (``Supervisor.run`` is synchronous; the NATS client is asyncio).

Per message:

1. Parse and validate the document; an invalid one is terminated (``term``) and logged, never
   redelivered.
2. Take the cell id's lease (:class:`~cellos.worker.queue.CellLocks`): two workers never run
   the same cell id at the same time. While another worker holds it, wait (keeping the message
   in progress) up to ``lock_wait``; then ``nak`` it with a delay.
3. On a redelivery (``num_delivered > 1``), look up the earlier attempts of this message in
   ``CELLOS_EVENTS`` (started events of the cell whose ``delivery`` names this stream sequence):
   their run ids go into ``delivery.previousRunIds``. An earlier attempt whose compliance summary
   says ``succeeded`` means the cell already ran to completion (its worker died before the ack):
   the message is acked without running the cell again.
4. Run the cell with ``delivery = {attempt, stream, streamSeq, previousRunIds}`` (recorded in
   the started event and the compliance summary) while a heartbeat sends ``in_progress`` and
   renews the lease every ``ack_wait / 3``.
5. Ack (and wait for the server's confirmation) only after ``Supervisor.run`` returned, i.e.
   after ``lifecycle.destroyed`` and the compliance summary were published.

SIGTERM / SIGINT: stop pulling; let running cells finish for up to ``grace_seconds`` (a second
signal cuts the grace short); then ask the supervisor to stop what is still running (its
backend sends SIGTERM, then SIGKILL, to each workload), let it tear those cells down and publish
their events (``reason: supervisor_signal``), and ``nak`` their messages so that another worker
runs them (the new run's ``previousRunIds`` names the interrupted one).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from cellos.core.envelopes import inner_event
from cellos.core.errors import InvalidSpec
from cellos.core.log import get_logger
from cellos.core.spec import ExecutionCell
from cellos.core.subjects import events_filter
from cellos.sinks.jetstream import STREAM as EVENTS_STREAM
from cellos.sinks.replay import DEFAULT_INTERVAL_SECONDS, replay_forever
from cellos.supervisor.lifecycle import RunOutcome, Supervisor
from cellos.worker.queue import (
    CONSUMER,
    DEFAULT_ACK_WAIT_SECONDS,
    DEFAULT_MAX_DELIVER,
    STREAM,
    CellLocks,
    Lease,
    connect,
    decode_document,
    ensure_consumer,
    ensure_locks,
    ensure_queue,
    holder_name,
    tenant_of,
)

log = get_logger(__name__)

#: Seconds between two tries to take a lease another worker holds.
LOCK_POLL_SECONDS = 0.1
#: Bound of the look-up of earlier attempts in CELLOS_EVENTS (evidence, never a blocker).
LOOKUP_SECONDS = 5.0
LOOKUP_MAX_EVENTS = 10_000
#: Longest pause between attempts to reach an unreachable lock stream.
LOCK_RETRY_MAX_SECONDS = 2.0
#: After the grace period: seconds between the stop request (SIGTERM to the workloads) and a
#: second one (SIGKILL), and how long the supervisor then gets to tear the cells down and
#: publish their events.
STOP_TERM_SECONDS = 3.0
STOP_TEARDOWN_SECONDS = 30.0


@dataclass(frozen=True)
class WorkerConfig:
    url: str
    concurrency: int = 1
    ack_wait: float = DEFAULT_ACK_WAIT_SECONDS
    max_deliver: int = DEFAULT_MAX_DELIVER
    grace_seconds: float = 30.0
    #: Longest wait of one pull request (and so of a stop request while idle).
    fetch_timeout: float = 1.0
    #: How long to wait for another worker's lease of the same cell id before deferring.
    lock_wait: float | None = None
    #: The supervisor's DLQ directory: its JetStream part is replayed on start and every
    #: ``dlq_replay_seconds`` (0: only on start), so an outage's events reach the stream.
    dlq_dir: str | None = None
    dlq_replay_seconds: float = DEFAULT_INTERVAL_SECONDS

    @property
    def heartbeat(self) -> float:
        return self.ack_wait / 3

    @property
    def lease_wait(self) -> float:
        # A dead holder's lease expires at most ack_wait (rounded up) after its last renewal.
        return self.lock_wait if self.lock_wait is not None else self.ack_wait + 2.0


@dataclass
class _Job:
    msg: Msg
    cell_id: str
    stream_seq: int
    attempt: int
    interrupted: bool = False


@dataclass
class EarlierAttempts:
    run_ids: list[str] = field(default_factory=list)
    #: Run id of an earlier attempt whose compliance summary says ``succeeded``.
    succeeded_run: str | None = None


class Worker:
    def __init__(
        self, config: WorkerConfig, supervisor: Supervisor, events_url: str | None = None
    ) -> None:
        if config.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.config = config
        self.supervisor = supervisor
        self.events_url = events_url or config.url
        self.holder = holder_name()
        self.completed = 0
        self._pool = ThreadPoolExecutor(
            max_workers=config.concurrency, thread_name_prefix="cellos-cell"
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._jobs: dict[int, _Job] = {}
        self._stop: asyncio.Event | None = None
        self._hurry: asyncio.Event | None = None
        self._js: JetStreamContext | None = None
        self._events_js: JetStreamContext | None = None
        self._locks: CellLocks | None = None
        #: True when cells were still running after the stop sequence (threads left behind).
        self.stuck = False

    # -- control -----------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    def request_stop(self, signame: str = "stop") -> None:
        """First call: graceful stop; a second call cuts the grace period short."""
        if self._stop is None or self._hurry is None:
            return
        if self._stop.is_set():
            self._hurry.set()
            _say(f"{signame} again: stopping in-flight cells now")
            return
        self._stop.set()
        running = len(self._jobs)
        _say(
            f"{signame}: no new cells; "
            + (
                f"finishing {running} in-flight cell(s) (grace {self.config.grace_seconds:g} s)"
                if running
                else "nothing in flight"
            )
        )

    async def run(self) -> None:
        """Pull and run cells until a stop is requested (SIGTERM, SIGINT or request_stop)."""
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        nc: Client | None = None
        events_nc: Client | None = None
        try:
            nc = await connect(
                self.config.url, name=f"cellos-worker {self.holder}", persistent=True
            )
            js = nc.jetstream(timeout=5.0)
            await ensure_queue(js)
            await ensure_locks(js)
            info = await ensure_consumer(js, self.config.ack_wait, self.config.max_deliver)
            self._adopt(info.config.ack_wait, info.config.max_deliver)
            sub = await js.pull_subscribe_bind(durable=CONSUMER, stream=STREAM)
            self._js = js
            self._locks = CellLocks(js, self.config.ack_wait, self.holder)
            if self.events_url == self.config.url:
                self._events_js = js
            else:
                events_nc = await connect(
                    self.events_url, name=f"cellos-worker-events {self.holder}", persistent=True
                )
                self._events_js = events_nc.jetstream(timeout=5.0)
            replayer: asyncio.Task[None] | None = None
            if self.config.dlq_dir:
                replayer = asyncio.create_task(
                    replay_forever(
                        self._events_js,
                        self.config.dlq_dir,
                        self.config.dlq_replay_seconds,
                        self._stop,
                        "cellos worker",
                    )
                )
            _say(
                f"ready: pulling {STREAM} as {CONSUMER} from {self.config.url} "
                f"(concurrency {self.config.concurrency}, ack wait {self.config.ack_wait:g} s, "
                f"backend {self.supervisor.backend.name})"
            )
            await self._pull(sub)
            await self._drain()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            if replayer is not None:
                replayer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await replayer
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            for client in (events_nc, nc):
                if client is not None and not client.is_closed:
                    try:
                        await asyncio.wait_for(client.drain(), 5)
                    except Exception:  # noqa: BLE001 - closing a dead connection may fail
                        await client.close()
            self._pool.shutdown(wait=not self.stuck, cancel_futures=True)
        _say(f"stopped after {self.completed} cell(s)")

    def _adopt(self, ack_wait: float | None, max_deliver: int | None) -> None:
        """Heartbeat and lease at the pace of the consumer as it is, not as we asked."""
        actual_wait = ack_wait or self.config.ack_wait
        actual_max = max_deliver if max_deliver and max_deliver > 0 else self.config.max_deliver
        if (actual_wait, actual_max) != (self.config.ack_wait, self.config.max_deliver):
            _say(
                f"consumer {CONSUMER} exists with ack wait {actual_wait:g} s and max deliver "
                f"{actual_max}: using those (not {self.config.ack_wait:g} s / "
                f"{self.config.max_deliver})"
            )
            self.config = replace(self.config, ack_wait=actual_wait, max_deliver=actual_max)

    # -- pulling -----------------------------------------------------------------------------

    async def _pull(self, sub: JetStreamContext.PullSubscription) -> None:
        assert self._stop is not None
        while not self._stop.is_set():
            free = self.config.concurrency - len(self._tasks)
            if free <= 0:
                await self._wait_any(self._tasks)
                continue
            try:
                # One at a time: a batch fetch that got fewer messages than it asked for waits
                # out its whole timeout before returning, delaying the cells it did get.
                msgs = await sub.fetch(batch=1, timeout=self.config.fetch_timeout)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except Exception as exc:  # noqa: BLE001 - a broken pull must not end the worker
                log.warning("pulling from %s failed: %s", STREAM, exc)
                await self._wait_any(set(), timeout=1.0)
                continue
            for msg in msgs:
                task = asyncio.create_task(self._handle(msg))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _wait_any(self, tasks: set[asyncio.Task[None]], timeout: float | None = None) -> None:
        """Until one of ``tasks`` ends, a stop is requested, or ``timeout``."""
        assert self._stop is not None
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({*tasks, stop}, timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            stop.cancel()

    async def _drain(self) -> None:
        """After a stop request: wait for in-flight cells, then stop what is left."""
        assert self._hurry is not None
        deadline = time.monotonic() + self.config.grace_seconds
        while self._tasks and not self._hurry.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            hurry = asyncio.create_task(self._hurry.wait())
            try:
                await asyncio.wait(
                    {*self._tasks, hurry}, timeout=remaining, return_when="FIRST_COMPLETED"
                )
            finally:
                hurry.cancel()
        if not self._tasks:
            return
        for job in self._jobs.values():
            job.interrupted = True
        if self._jobs:
            names = ", ".join(sorted(job.cell_id for job in self._jobs.values()))
            _say(
                f"grace period over: stopping {len(self._jobs)} cell(s) ({names}) "
                "and returning them to the queue"
            )
        # Each running cell is stopped by its backend (SIGTERM to the workload, however it is
        # isolated: sandbox, runsc, VMM), and its events say so (reason supervisor_signal).
        self.supervisor.stop()
        _, pending = await asyncio.wait(set(self._tasks), timeout=STOP_TERM_SECONDS)
        if pending:
            self.supervisor.stop()  # a second request: kill now, no more grace
            _, pending = await asyncio.wait(pending, timeout=STOP_TEARDOWN_SECONDS)
        if pending:
            self.stuck = True
            log.error(
                "%d cell(s) did not end; their messages are redelivered after the ack wait",
                len(pending),
            )

    # -- one message -------------------------------------------------------------------------

    async def _handle(self, msg: Msg) -> None:
        meta = msg.metadata
        seq = meta.sequence.stream
        attempt = meta.num_delivered
        source = f"{STREAM}#{seq}"
        try:
            document = decode_document(msg.data, source)
        except InvalidSpec as exc:
            problems = "; ".join(f"{path}: {reason}" for path, reason in exc.problems)
            log.error("%s: invalid document, terminated (never redelivered): %s", source, problems)
            await _settle(msg.term, source, "term")
            return
        except Exception:  # a document that breaks the parser is as unusable as an invalid one
            log.exception("%s: unreadable document, terminated (never redelivered)", source)
            await _settle(msg.term, source, "term")
            return
        if self.stopping:
            await self._give_back(msg)
            return
        lease = await self._acquire(msg, document.spec.id, seq, attempt)
        if lease is None:
            return
        try:
            await self._run_cell(msg, document, seq, attempt, lease)
        except Exception:  # one cell's failure must not end the worker
            log.exception("%s: cell %s failed in the worker", source, document.spec.id)
            await self._give_back(msg, delay=self.config.ack_wait)
        finally:
            assert self._locks is not None
            try:
                await self._locks.release(lease)
            except Exception as exc:  # noqa: BLE001 - the lease then expires by itself
                log.warning("cell %s: cannot release its lease: %s", document.spec.id, exc)

    async def _give_back(self, msg: Msg, delay: float | None = None) -> None:
        """``nak``: the message goes back to the queue (after ``delay`` seconds)."""
        meta = msg.metadata
        source = f"{STREAM}#{meta.sequence.stream}"
        if meta.num_delivered >= self.config.max_deliver:
            log.error(
                "%s: returned after its last delivery (%d, max deliver %d): it stays in %s "
                "but is not delivered again",
                source,
                meta.num_delivered,
                self.config.max_deliver,
                STREAM,
            )
        await _settle(functools.partial(msg.nak, delay=delay), source, "nak")

    async def _acquire(self, msg: Msg, cell_id: str, seq: int, attempt: int) -> Lease | None:
        assert self._locks is not None
        source = f"{STREAM}#{seq}"
        info = {"streamSeq": seq, "attempt": attempt}
        start = time.monotonic()
        next_beat = start + self.config.heartbeat
        holder: str | None = None
        backoff = LOCK_POLL_SECONDS
        while True:
            try:
                lease = await self._locks.acquire(cell_id, info)
            except Exception as exc:  # noqa: BLE001 - without a lease the cell must not run
                # The lock stream is unreachable (e.g. a NATS node is down): a transient
                # outage, not a failed delivery. Giving the message back would burn its
                # deliveries within seconds and strand it; keep it in progress and retry.
                if self.stopping:
                    await self._give_back(msg)
                    return None
                if backoff == LOCK_POLL_SECONDS:
                    log.warning("%s: cannot take the lease of cell %s: %s", source, cell_id, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, LOCK_RETRY_MAX_SECONDS)
                now = time.monotonic()
                if now >= next_beat:
                    await _settle(msg.in_progress, source, "in_progress")
                    next_beat = now + self.config.heartbeat
                continue
            backoff = LOCK_POLL_SECONDS
            if lease is not None:
                if holder is not None:
                    log.info("cell %s: lease taken after %.1f s", cell_id, time.monotonic() - start)
                return lease
            if holder is None:
                holder = await self._locks.holder_of(cell_id) or "another worker"
                log.info("cell %s is being run by %s; waiting for it", cell_id, holder)
            now = time.monotonic()
            # On the last delivery a nak would strand the message: keep waiting instead.
            last = attempt >= self.config.max_deliver
            if self.stopping or (now - start >= self.config.lease_wait and not last):
                delay = max(1.0, self.config.ack_wait)
                log.warning(
                    "%s: cell %s is still being run by %s; deferred by %.0f s",
                    source,
                    cell_id,
                    holder,
                    delay,
                )
                await self._give_back(msg, delay=delay)
                return None
            if now >= next_beat:
                await _settle(msg.in_progress, source, "in_progress")
                next_beat = now + self.config.heartbeat
            await asyncio.sleep(LOCK_POLL_SECONDS)

    async def _run_cell(
        self, msg: Msg, document: ExecutionCell, seq: int, attempt: int, lease: Lease
    ) -> None:
        cell_id = document.spec.id
        source = f"{STREAM}#{seq}"
        earlier = EarlierAttempts()
        if attempt > 1:
            earlier = await self._earlier_attempts(tenant_of(document), cell_id, seq)
        if earlier.succeeded_run is not None:
            log.warning(
                "%s: cell %s already ran to completion (run %s); acked without running it again",
                source,
                cell_id,
                earlier.succeeded_run,
            )
            await _settle(msg.ack_sync, source, "ack")
            return
        if self.stopping:
            await self._give_back(msg)
            return
        delivery: dict[str, Any] = {
            "attempt": attempt,
            "stream": STREAM,
            "streamSeq": seq,
            "previousRunIds": earlier.run_ids,
        }
        job = _Job(msg=msg, cell_id=cell_id, stream_seq=seq, attempt=attempt)
        self._jobs[seq] = job
        heartbeat = asyncio.create_task(self._heartbeat(msg, lease, {"streamSeq": seq}))
        log.info("running cell %s (attempt %d, %s)", cell_id, attempt, source)
        try:
            loop = asyncio.get_running_loop()
            outcome: RunOutcome = await loop.run_in_executor(
                self._pool, self.supervisor.run, document, delivery
            )
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            self._jobs.pop(seq, None)
        if job.interrupted:
            log.warning(
                "cell %s stopped by the worker's shutdown (run %s): returned to the queue",
                cell_id,
                outcome.run_id,
            )
            await self._give_back(msg)
            return
        if await _settle(msg.ack_sync, source, "ack"):
            self.completed += 1
        log.info(
            "cell %s %s (exit %d, run %s, %s)",
            cell_id,
            outcome.outcome,
            outcome.exit_code,
            outcome.run_id,
            source,
        )

    async def _heartbeat(self, msg: Msg, lease: Lease, info: Mapping[str, Any]) -> None:
        assert self._locks is not None
        source = f"{STREAM}#{msg.metadata.sequence.stream}"
        while True:
            await asyncio.sleep(self.config.heartbeat)
            await _settle(msg.in_progress, source, "in_progress")
            if lease.lost:
                continue
            try:
                if not await self._locks.renew(lease, info):
                    log.error(
                        "cell %s: its lease expired and was taken by another worker "
                        "(was this worker cut off from NATS?)",
                        lease.cell_id,
                    )
            except Exception as exc:  # noqa: BLE001 - retried at the next beat
                log.warning("cell %s: cannot renew its lease: %s", lease.cell_id, exc)

    # -- earlier attempts --------------------------------------------------------------------

    async def _earlier_attempts(self, tenant: str, cell_id: str, seq: int) -> EarlierAttempts:
        """Runs of earlier deliveries of message ``seq``, from CELLOS_EVENTS (best effort)."""
        found = EarlierAttempts()
        try:
            async with asyncio.timeout(LOOKUP_SECONDS):
                for event in await self._events_of(events_filter(tenant, cell_id, "started"), seq):
                    run_id = str(event.get("cellosrunid", ""))
                    if run_id and run_id not in found.run_ids:
                        found.run_ids.append(run_id)
                compliance = events_filter(tenant, cell_id, "compliance")
                for event in await self._events_of(compliance, seq):
                    data = event.get("data")
                    if isinstance(data, dict) and data.get("outcome") == "succeeded":
                        found.succeeded_run = str(event.get("cellosrunid", "?"))
        except Exception as exc:  # noqa: BLE001 - evidence only; the cell still runs
            log.warning(
                "cell %s: cannot look up earlier attempts in %s: %s", cell_id, EVENTS_STREAM, exc
            )
        return found

    async def _events_of(self, subject: str, seq: int) -> list[dict[str, Any]]:
        """Inner events on ``subject`` whose ``data.delivery`` names message ``seq``."""
        assert self._events_js is not None
        out: list[dict[str, Any]] = []
        next_seq = 1
        for _ in range(LOOKUP_MAX_EVENTS):
            try:
                raw = await self._events_js.get_msg(
                    EVENTS_STREAM, seq=next_seq, subject=subject, next=True
                )
            except nats.js.errors.NotFoundError:
                break
            if raw.seq is None:
                break
            next_seq = raw.seq + 1
            try:
                event = inner_event(_loads(raw.data or b""))
            except ValueError:
                continue
            if event is None:
                continue
            data = event.get("data")
            delivery = data.get("delivery") if isinstance(data, dict) else None
            if (
                isinstance(delivery, dict)
                and delivery.get("stream") == STREAM
                and delivery.get("streamSeq") == seq
            ):
                out.append(event)
        return out


def _loads(data: bytes) -> dict[str, Any]:
    import json

    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


async def _settle(action: Callable[[], Awaitable[Any]], source: str, what: str) -> bool:
    """Ack / nak / term / in_progress; a failure is logged (the server redelivers later)."""
    try:
        await action()
    except Exception as exc:  # noqa: BLE001 - the ack wait takes over
        log.warning("%s: %s failed: %s", source, what, exc or type(exc).__name__)
        return False
    return True


def _say(text: str) -> None:
    print(f"cellos worker: {text}", file=sys.stderr, flush=True)


def run_worker(config: WorkerConfig, environ: Mapping[str, str]) -> int:
    """``cellos worker``: compose the supervisor once, then pull until stopped."""
    from cellos.supervisor.composition import build_supervisor

    env = dict(environ)
    # A worker's events go to JetStream: to the queue's server unless CELLOS_NATS_URL says
    # otherwise (the ack then means "the run's events are published").
    if not env.get("CELLOS_NATS_URL", "").strip():
        env["CELLOS_NATS_URL"] = config.url
    supervisor = build_supervisor(env)
    if config.dlq_dir is None:
        from cellos.sinks.replay import replay_interval
        from cellos.supervisor.composition import default_dlq_dir

        config = replace(
            config,
            dlq_dir=env.get("CELLOS_DLQ_DIR", "").strip() or default_dlq_dir(),
            dlq_replay_seconds=replay_interval(env),
        )
    try:
        reaped = supervisor.reap_stale()
        for cell in reaped:
            _say(f"reaped {cell.cell_id} (left by a dead supervisor)")
        worker = Worker(config, supervisor, events_url=env["CELLOS_NATS_URL"])
        asyncio.run(worker.run())
    finally:
        supervisor.close()
    if worker.stuck:
        # Threads still inside Supervisor.run would keep the interpreter from exiting.
        sys.stderr.flush()
        os._exit(1)
    return 0
