"""The HTTP handlers of ``cellos serve``. Each takes the request and its query parameters,
already parsed by :func:`cellos.server.params.read_query` from the route's declaration in
:mod:`cellos.server.routes`."""

from __future__ import annotations

import contextlib
from typing import Any, Final

import nats.errors
from aiohttp import web

from cellos.core.errors import InvalidSpec
from cellos.server.hub import Hub, event_item
from cellos.server.problems import Problem
from cellos.server.sse import SseStream
from cellos.worker import queue

HUB: Final = web.AppKey("hub", Hub)
#: SSE comment sent when nothing else was, so proxies and clients see a live connection.
DOCUMENT_TYPES: Final = frozenset(
    {"application/json", "application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"}
)
Query = dict[str, Any]


def _cell_or_404(hub: Hub, cell_id: str) -> dict[str, Any]:
    view = hub.projection.get(cell_id)
    if view is None:
        raise Problem(404, f"no cell {cell_id!r} is known")
    return view


def _since(request: web.Request, query: Query) -> int:
    """``since``, else the SSE ``Last-Event-ID`` header, else 0."""
    if query.get("since") is None and request.headers.get("Last-Event-ID"):
        text = request.headers["Last-Event-ID"].strip()
        if not text.isascii() or not text.isdigit() or len(text) > 19:
            raise Problem(400, "Last-Event-ID must be a stream sequence")
        return int(text)
    return int(query.get("since") or 0)


async def healthz(request: web.Request, query: Query) -> web.Response:
    return web.json_response({"status": "ok"})


async def list_cells(request: web.Request, query: Query) -> web.Response:
    hub = request.app[HUB]
    state, tenant = query["state"], query["tenant"]
    items = [
        cell
        for cell in hub.projection.snapshot()
        if (state is None or cell["state"] == state)
        and (tenant is None or cell["tenant"] == tenant)
    ]
    return web.json_response(
        {"items": items, "count": len(items), "lastSeq": hub.projection.last_seq}
    )


async def get_cell(request: web.Request, query: Query) -> web.Response:
    return web.json_response(_cell_or_404(request.app[HUB], request.match_info["id"]))


async def submit_cell(request: web.Request, query: Query) -> web.Response:
    hub = request.app[HUB]
    ctype = request.content_type
    if request.headers.get("Content-Type") and ctype not in DOCUMENT_TYPES:
        raise Problem(
            415, f"send the document as application/json or application/yaml, not {ctype}"
        )
    data = await request.read()
    try:
        status, view, duplicate = await hub.submit(data)
    except InvalidSpec as exc:
        raise Problem(
            422,
            f"{exc.path}: {exc.reason}",
            errors=[{"path": p, "reason": r} for p, r in exc.problems],
        ) from None
    except queue.QueueError as exc:
        raise Problem(503, exc.reason) from None
    body = {**view, "duplicate": duplicate} if duplicate else view
    return web.json_response(body, status=status, headers={"Location": f"/v1/cells/{view['id']}"})


async def cell_events(request: web.Request, query: Query) -> web.Response:
    hub = request.app[HUB]
    cell_id = request.match_info["id"]
    _cell_or_404(hub, cell_id)
    since = _since(request, query)
    limit = int(query["limit"])
    seqs = hub.projection.event_seqs(cell_id, since)
    more = len(seqs) > limit
    items = await hub.fetch_many(seqs[:limit])
    last = seqs[:limit][-1] if seqs[:limit] else since
    return web.json_response({"cellId": cell_id, "items": items, "lastSeq": last, "more": more})


async def _stream(request: web.Request, query: Query, cell_id: str | None) -> web.StreamResponse:
    hub = request.app[HUB]
    since = _since(request, query)
    start = since + 1
    if cell_id is not None:
        # A cell not known yet (submitted, or its first event on its way) is waited for.
        seqs = hub.projection.event_seqs(cell_id, since) if hub.projection.get(cell_id) else []
        # Skip the part of the stream that holds nothing of this cell.
        start = seqs[0] if seqs else max(start, hub.projection.last_seq + 1)
    stream = await SseStream.open(request)
    sub = await hub.follow(start)
    try:
        while not hub.closing.is_set():
            try:
                msg = await sub.next_msg(timeout=1.0)
            except nats.errors.TimeoutError:
                if stream.client_gone():
                    break
                await stream.idle()
                continue
            seq = msg.metadata.sequence.stream
            # The projection first: a client that sees event N and then asks for the cell
            # gets a record that includes N.
            await hub.wait_applied(seq)
            item = event_item(seq, msg.subject, msg.data, hub.rejected.get(seq))
            if cell_id is not None and item["cellId"] != cell_id:
                continue
            await stream.send("cellos.event", item, seq)
    except (ConnectionResetError, nats.errors.ConnectionClosedError):
        pass
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return stream.response


async def cell_event_stream(request: web.Request, query: Query) -> web.StreamResponse:
    return await _stream(request, query, request.match_info["id"])


async def event_stream(request: web.Request, query: Query) -> web.StreamResponse:
    return await _stream(request, query, None)


async def cell_logs(request: web.Request, query: Query) -> web.StreamResponse:
    from cellos.server.logs import stream_logs

    offset = query.get("offset")
    if offset is None:
        header = request.headers.get("Last-Event-ID", "").strip()
        if header and not header.isdigit():
            raise Problem(400, "Last-Event-ID must be a byte offset")
        offset = int(header) if header else 0
    return await stream_logs(
        request,
        request.app[HUB],
        stream=query.get("stream") or "stdout",
        follow=query.get("follow") == "true",
        run=query.get("run"),
        offset=offset,
    )
