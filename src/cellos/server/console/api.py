"""The console's two API routes (declared in :mod:`cellos.server.routes`, so they are in the
OpenAPI document): a run's evidence verdict, and the live stream of cell records."""

from __future__ import annotations

import asyncio
from typing import Any, Final

from aiohttp import web

from cellos.core.chain import RUN_ID_ATTR
from cellos.core.envelopes import inner_event
from cellos.server.console.evidence import RunEvidence
from cellos.server.console.feed import FEED
from cellos.server.handlers import HUB
from cellos.server.problems import Problem
from cellos.server.sse import SseStream

#: How often a quiet stream looks whether its client is gone or the server stops.
POLL_SECONDS: Final = 1.0
Query = dict[str, Any]


async def run_verdict(request: web.Request, query: Query) -> web.Response:
    """Recomputed from the stream's messages (not the live index), as ``cellos events
    verify`` would from a file holding them."""
    hub = request.app[HUB]
    cell_id, run_id = request.match_info["id"], request.match_info["run"]
    if hub.projection.get(cell_id) is None:
        raise Problem(404, f"no cell {cell_id!r} is known")
    evidence = RunEvidence(run_id, hub.keys)
    for item in await hub.fetch_many(hub.projection.event_seqs(cell_id)):
        inner = inner_event(item["event"])
        if inner is not None and inner.get(RUN_ID_ATTR) == run_id:
            evidence.feed(int(item["seq"]), item["event"])
    if evidence.events == 0:
        raise Problem(404, f"cell {cell_id!r} has no run {run_id!r} on the stream")
    return web.json_response({"cellId": cell_id, **evidence.verdict()})


async def console_stream(request: web.Request, query: Query) -> web.StreamResponse:
    """Every cell record (with its run's evidence) as one ``cellos.cells`` event, then one
    ``cellos.cell`` event per change, in stream order and without coalescing."""
    hub, feed = request.app[HUB], request.app[FEED]
    await feed.caught_up(hub.projection.last_seq)
    stream = await SseStream.open(request)
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    # Listen before the snapshot: a change between the two is queued, not lost.
    feed.listeners.add(queue)
    try:
        # The records come from the projection and the evidence from the index, each fed by
        # its own consumer: the snapshot is as new as the older of the two. Labelled with the
        # newer one, a change the other had not folded yet (e.g. ADMITTED -> RUNNING) was
        # skipped below as already sent, and the row stayed stale until the next change.
        snapshot_seq = min(feed.index.last_seq, hub.projection.last_seq)
        items = [feed.record(cid) for cid in sorted(hub.projection.cells)]
        snapshot = {"items": [i for i in items if i is not None], "lastSeq": snapshot_seq}
        await stream.send("cellos.cells", snapshot, snapshot_seq)
        while not hub.closing.is_set():
            try:
                seq, cell_id = await asyncio.wait_for(queue.get(), POLL_SECONDS)
            except TimeoutError:
                if stream.client_gone():
                    break
                await stream.idle()
                continue
            if seq <= snapshot_seq:
                continue
            record = feed.record(cell_id)
            if record is not None:
                await stream.send("cellos.cell", record, seq)
    except ConnectionResetError:
        pass
    finally:
        feed.listeners.discard(queue)
    return stream.response
