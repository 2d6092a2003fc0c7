"""Replaying the JetStream DLQ (``cellos events replay-dlq``; workers and ``cellos serve`` on
start and every ``CELLOS_DLQ_REPLAY_SECONDS``).

Events the JetStream sink could not publish wait in ``<CELLOS_DLQ_DIR>/jetstream/``, one file
each (:mod:`cellos.sinks.dlq`). A replay publishes them run by run, in each run's chain order,
each with ``Nats-Msg-Id`` = the inner event's id (what the sink used), waits for the server's
ack, and only then removes the file. So a replay is idempotent: an event already on the
stream (its ack was lost, or another replayer was first) is answered as a duplicate by the
stream's duplicate window (2 min) and its file removed; a crash between the ack and the
removal re-publishes a duplicate at the next replay, which the window drops too. After the
window, such a crash could leave one duplicate message; readers fold by stream sequence and
ignore a repeated ``(run, seq)`` anyway.

A replay stops at the first publish that fails (NATS is away again): the rest stays, in order,
for the next one. One replayer at a time per directory (an advisory lock), so a worker and a
``cellos serve`` on the same host do not interleave a run's events.

The subject needs the run's tenant, which only some events name (``started``, the summary):
it is taken from any DLQ'd event of the run. A run none of whose DLQ'd events names it is left
for :data:`UNKNOWN_TENANT_GRACE_SECONDS` (its summary, which names it, is probably still to
come), then published under the default tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from nats.js import JetStreamContext

from cellos.core.envelopes import dedupe_id, inner_event, tenant_in
from cellos.natsconn import describe
from cellos.sinks.jetstream import STREAM, ensure_stream, subject_for

log = logging.getLogger(__name__)

SINK_DIR = "jetstream"
LOCK_NAME = ".replay.lock"
UNKNOWN_TENANT_GRACE_SECONDS = 60.0
DEFAULT_INTERVAL_SECONDS = 10.0
ENV_INTERVAL = "CELLOS_DLQ_REPLAY_SECONDS"


@dataclass
class ReplayReport:
    replayed: int = 0
    #: Already on the stream (acked as a duplicate): removed from the DLQ all the same.
    duplicates: int = 0
    runs: int = 0
    #: Files still in the DLQ after this replay (failed, postponed, unreadable).
    remaining: int = 0
    errors: list[str] = field(default_factory=list)
    #: Another replayer held the directory: nothing was done.
    busy: bool = False

    def summary(self) -> str:
        if self.busy:
            return "another replay of this DLQ is running; nothing done"
        text = (
            f"replayed {self.replayed} event(s) of {self.runs} run(s) "
            f"({self.duplicates} already on the stream); {self.remaining} left in the DLQ"
        )
        return text + (f"; first problem: {self.errors[0]}" if self.errors else "")

    def as_dict(self) -> dict[str, Any]:
        return {
            "replayed": self.replayed,
            "duplicates": self.duplicates,
            "runs": self.runs,
            "remaining": self.remaining,
            "errors": list(self.errors),
            "busy": self.busy,
        }


@dataclass
class _Entry:
    path: str
    raw: bytes
    event: dict[str, Any]
    run_id: str
    seq: int


def jetstream_dlq(dlq_dir: str) -> str:
    return os.path.join(dlq_dir, SINK_DIR)


def replay_interval(env: Mapping[str, str]) -> float:
    """``CELLOS_DLQ_REPLAY_SECONDS`` (default 10; 0 turns the periodic replay off)."""
    text = env.get(ENV_INTERVAL, "").strip()
    if not text:
        return DEFAULT_INTERVAL_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        from cellos.core.errors import InvalidSpec

        raise InvalidSpec(ENV_INTERVAL, "must be a number of seconds >= 0")
    return value


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[bool]:
    fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _read(directory: str, report: ReplayReport) -> dict[str, list[_Entry]]:
    runs: dict[str, list[_Entry]] = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith(".") or not name.endswith(".json"):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
            event = json.loads(raw)
            inner = inner_event(event)
            if not isinstance(event, dict) or inner is None:
                raise ValueError("not a CloudEvent")
            dedupe_id(event)
        except (OSError, ValueError) as exc:
            report.remaining += 1
            report.errors.append(f"{name}: unreadable, left in place ({exc})")
            continue
        run_id = str(inner.get("cellosrunid", "norun"))
        seq = inner.get("cellosseq")
        runs.setdefault(run_id, []).append(
            _Entry(path, raw, event, run_id, seq if isinstance(seq, int) else 0)
        )
    for entries in runs.values():
        entries.sort(key=lambda e: e.seq)
    return runs


def _tenant(entries: list[_Entry], now: float) -> tuple[bool, str | None]:
    """(ready, tenant) of one run's DLQ'd events."""
    for entry in entries:
        tenant = tenant_in(inner_event(entry.event))
        if tenant is not None:
            return True, tenant
    newest = max((_mtime(e.path) for e in entries), default=0.0)
    return now - newest >= UNKNOWN_TENANT_GRACE_SECONDS, None


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


async def replay_dlq(
    js: JetStreamContext, dlq_dir: str, *, publish_timeout: float = 5.0
) -> ReplayReport:
    """Publish what ``<dlq_dir>/jetstream`` holds, removing each file once acked."""
    report = ReplayReport()
    directory = jetstream_dlq(dlq_dir)
    if not os.path.isdir(directory):
        return report
    with _locked(directory) as mine:
        if not mine:
            report.busy = True
            return report
        runs = _read(directory, report)
        if not runs:
            return report
        await ensure_stream(js)
        now = time.time()
        stopped = False
        for run_id, entries in sorted(runs.items(), key=lambda kv: _mtime(kv[1][0].path)):
            ready, tenant = _tenant(entries, now)
            if stopped or not ready:
                report.remaining += len(entries)
                continue
            report.runs += 1
            for index, entry in enumerate(entries):
                try:
                    ack = await js.publish(
                        subject_for(entry.event, tenant),
                        entry.raw,
                        timeout=publish_timeout,
                        stream=STREAM,
                        headers={"Nats-Msg-Id": dedupe_id(entry.event)},
                    )
                except Exception as exc:  # noqa: BLE001 - kept for the next replay, in order
                    report.errors.append(f"run {run_id} seq {entry.seq}: {describe(exc)}")
                    report.remaining += len(entries) - index
                    stopped = True
                    break
                if ack.duplicate:
                    report.duplicates += 1
                else:
                    report.replayed += 1
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
    if report.replayed or report.errors:
        log.info("DLQ replay: %s", report.summary())
    return report


async def replay_forever(
    js: JetStreamContext, dlq_dir: str, interval: float, stop: asyncio.Event, who: str
) -> None:
    """Replay now, then every ``interval`` seconds until ``stop``; says what it replayed."""
    import sys

    while not stop.is_set():
        try:
            report = await replay_dlq(js, dlq_dir)
        except Exception as exc:  # noqa: BLE001 - NATS away: the next round retries
            log.warning("DLQ replay failed: %s", describe(exc))
        else:
            if report.replayed or report.duplicates:
                print(f"{who}: DLQ {dlq_dir}: {report.summary()}", file=sys.stderr, flush=True)
        if interval <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
