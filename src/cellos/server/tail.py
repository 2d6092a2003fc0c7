"""``cellos events tail``: follow ``CELLOS_EVENTS``, verifying signatures and run chains.

Every message is checked by the same :class:`cellos.verify.EventVerifier` as
``cellos events verify`` uses for files, with the JetStream stream sequence as the position, so
the first message whose signature or chain fails is named by its stream sequence
(``error: stream seq N: reason``, exit 1).

Reading from the middle (``--since``, or a stream whose oldest messages have expired) anchors
each run at the first of its events that is read: the chain is verified from there on, and
the printed line says ``(anchored)``. From the first sequence of a complete stream every run
must start at its sequence 0. Runs still open when ``--no-follow`` stops are not an error
(the stream is live); ``cellos events verify`` on a saved log checks completeness.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any, TextIO

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from cellos.core.chain import RUN_ID_ATTR, SEQ_ATTR
from cellos.core.envelopes import cell_id_of
from cellos.core.envelopes import inner_event as unwrap
from cellos.core.errors import CellosError
from cellos.core.signing import VerifyKeys
from cellos.natsconn import connect
from cellos.sinks.jetstream import STREAM, SUBJECTS
from cellos.verify import EventVerifier

_TYPE_PREFIX = "dev.cellos.events.cell."
#: Without --follow, stop when no message has come for this long (a deleted tail message).
_IDLE_STOP_SECONDS = 5.0


@dataclass(frozen=True)
class TailOptions:
    url: str
    keys: VerifyKeys | None = None
    since: int = 0
    cell: str | None = None
    follow: bool = True
    json_lines: bool = False


def _line(seq: int, event: dict[str, Any], kid: str | None, anchored: bool) -> str:
    kind = str(event.get("type", "?")).removeprefix(_TYPE_PREFIX)
    run = str(event.get(RUN_ID_ATTR, "?"))[:8]
    signed = f"signed:{kid}" if kid else "unsigned"
    note = " (anchored)" if anchored else ""
    return (
        f"{seq}\t{event.get('time', '?')}\t{cell_id_of(event) or '?'}\t{kind}\t"
        f"run {run} #{event.get(SEQ_ATTR, '?')}\t{signed}{note}"
    )


def _is_cell(data: bytes, cell_id: str) -> bool:
    """Whether a message belongs to ``cell_id``; one that cannot be read is everyone's (it
    is verified, and fails, whatever the filter)."""
    payload: Any = None
    with contextlib.suppress(UnicodeDecodeError, ValueError):
        payload = json.loads(data.decode("utf-8"))
    inner = unwrap(payload)
    return inner is None or cell_id_of(inner) == cell_id


async def tail(opts: TailOptions, out: TextIO, err: TextIO) -> int:
    nc = await connect(opts.url, name="cellos-events-tail")
    try:
        js = nc.jetstream(timeout=5.0)
        try:
            info = await js.stream_info(STREAM)
        except nats.js.errors.NotFoundError:
            raise CellosError(STREAM, f"no such stream at {opts.url}") from None
        state = info.state
        start = max(opts.since + 1, state.first_seq, 1)
        end = state.last_seq if state.messages else 0
        if not opts.follow and start > end:
            print(f"ok: no events after stream seq {opts.since}", file=err)
            return 0
        verifier = EventVerifier(
            opts.keys,
            anchor_unknown_runs=start > 1 or state.first_seq > 1,
            position_name="stream seq",
        )
        seen_runs: set[str] = set()
        sub = await js.subscribe(
            SUBJECTS,
            stream=STREAM,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
            ),
        )
        first = last = 0
        idle = None if opts.follow else _IDLE_STOP_SECONDS
        try:
            while True:
                try:
                    msg: Msg = await sub.next_msg(timeout=idle)
                except nats.errors.TimeoutError:
                    break  # only without --follow: what remained was deleted
                meta = msg.metadata
                seq = meta.sequence.stream
                first = first or seq
                last = seq
                done = not opts.follow and (seq >= end or meta.num_pending == 0)
                if opts.cell is not None and not _is_cell(msg.data, opts.cell):
                    if done:
                        break
                    continue
                step = verifier.feed_bytes(msg.data, seq)
                if step.error is not None:
                    out.flush()
                    position, reason = step.error
                    print(f"error: stream seq {position}: {reason}", file=err)
                    return 1
                assert step.event is not None
                run_id = str(step.event.get(RUN_ID_ATTR))
                anchored = run_id not in seen_runs and step.event.get(SEQ_ATTR) != 0
                seen_runs.add(run_id)
                if opts.json_lines:
                    out.write(msg.data.decode("utf-8").rstrip("\n") + "\n")
                else:
                    out.write(_line(seq, step.event, step.kid, anchored) + "\n")
                out.flush()
                if done:
                    break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        signed = "signed, " if opts.keys else ""
        where = f" (stream seq {first}..{last})" if first else ""
        print(
            f"ok: {verifier.events} events in {verifier.runs} run(s), {signed}chain intact{where}",
            file=err,
        )
        return 0
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def run_tail(opts: TailOptions, out: TextIO, err: TextIO) -> int:
    try:
        return asyncio.run(tail(opts, out, err))
    except KeyboardInterrupt:
        return 130
