"""``GET /v1/cells/{id}/logs``: a cell's output, from ``CELLOS_LOGS``, as Server-Sent Events.

Query: ``stream`` (``stdout``, default, or ``stderr``), ``follow`` (``true``: keep the stream
open until the run has ended), ``offset`` (bytes of the stream to skip; ``Last-Event-ID``
resumes after the last event a client saw), ``run`` (a run id; default the cell's current
run, or for a cell not started yet, the next run that produces output).

Events: ``cellos.log`` with ``id`` = the stream offset after it and data ``{runId, stream,
offset, data}`` (``data`` base64: output may be binary); ``cellos.log.gap`` with ``{from, to}``
when bytes never reached NATS (dropped under back-pressure or an outage: the completed event
counts them); ``cellos.log.end`` with ``{runId, stream, offset}`` once the run has ended and
everything published was sent (``follow=false``: once caught up).

A cell that is not known yet (submitted but not picked up, or its first event still on its
way) is waited for, not answered 404: its output is sent once it appears.
"""

from __future__ import annotations

import base64
import contextlib
from datetime import datetime
from typing import Any, Final

import nats.errors
from aiohttp import web
from nats.js.api import ConsumerConfig, DeliverPolicy

from cellos.core.subjects import logs_filter
from cellos.output.natslogs import HEADER_OFFSET, HEADER_RUN, STREAM
from cellos.server.projection import TERMINAL
from cellos.server.sse import SseStream

#: How often an idle follower checks whether the run has ended.
POLL_SECONDS: Final = 0.25


def _start_config(view: dict[str, Any] | None) -> ConsumerConfig:
    """From the start of the subject, or for a PENDING cell from its submission (earlier
    runs' output is older than that)."""
    if view is not None and view.get("state") == "PENDING" and view.get("submittedAt"):
        when = datetime.fromisoformat(str(view["submittedAt"]).replace("Z", "+00:00"))
        return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=when)
    return ConsumerConfig(deliver_policy=DeliverPolicy.ALL)


async def stream_logs(
    request: web.Request,
    hub: Any,
    *,
    stream: str,
    follow: bool,
    run: str | None,
    offset: int,
) -> web.StreamResponse:
    """The parameters are parsed and checked by the route (:mod:`cellos.server.routes`)."""
    cell_id = request.match_info["id"]
    view = hub.projection.get(cell_id)
    run = run or (view["runId"] if view is not None and view.get("state") != "PENDING" else None)
    from cellos.output.natslogs import LogsStreamConfig, ensure_logs_stream
    from cellos.output.settings import (
        DEFAULT_LOGS_BUFFER_BYTES,
        DEFAULT_LOGS_MAX_AGE_SECONDS,
        DEFAULT_LOGS_MAX_BYTES,
    )

    # The stream may not exist yet (no cell has printed anything): create it as a supervisor
    # would, so that the consumer can wait on it.
    await ensure_logs_stream(
        hub.js,
        LogsStreamConfig(
            DEFAULT_LOGS_MAX_BYTES, DEFAULT_LOGS_MAX_AGE_SECONDS, DEFAULT_LOGS_BUFFER_BYTES
        ),
    )
    sub = await hub.js.subscribe(
        logs_filter(cell_id, stream),
        stream=STREAM,
        ordered_consumer=True,
        config=_start_config(view),
    )
    sse = await SseStream.open(request)
    expected = offset
    caught_up = False

    def run_ended() -> bool:
        record = hub.projection.cells.get(cell_id)
        if record is None or run is None or run not in record.runs:
            return False
        return record.runs[run].state in TERMINAL

    try:
        while not hub.closing.is_set():
            try:
                msg = await sub.next_msg(timeout=POLL_SECONDS)
            except nats.errors.TimeoutError:
                if sse.client_gone():
                    break
                caught_up = True
                if not follow or run_ended():
                    end = {"runId": run, "stream": stream, "offset": expected}
                    await sse.send("cellos.log.end", end)
                    break
                await sse.idle()
                continue
            headers = msg.headers or {}
            msg_run = headers.get(HEADER_RUN)
            if run is None:
                run = msg_run  # the first run that printed something since we started
            if msg_run != run:
                continue
            start = int(headers.get(HEADER_OFFSET, "0"))
            data = msg.data or b""
            end_offset = start + len(data)
            if end_offset <= expected:
                continue
            if start > expected:
                gap = {"runId": run, "stream": stream, "from": expected, "to": start}
                await sse.send("cellos.log.gap", gap)
                expected = start
            piece = data[expected - start :]
            item = {
                "runId": run,
                "stream": stream,
                "offset": expected,
                "data": base64.b64encode(piece).decode(),
            }
            await sse.send("cellos.log", item, end_offset)
            expected = end_offset
            if not follow and caught_up and msg.metadata.num_pending == 0:
                break
    except (ConnectionResetError, nats.errors.ConnectionClosedError):
        pass
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return sse.response
