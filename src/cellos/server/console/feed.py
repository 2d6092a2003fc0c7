"""The console's live feed: an :class:`EvidenceIndex` kept current from ``CELLOS_EVENTS`` by an
ordered consumer of its own, and the listeners (open console streams) told which cell changed.

Its own consumer, not a hook in :class:`cellos.server.hub.Hub`: the console adds to the
server without changing how the projection is fed. Each change is announced only once the
hub's projection has folded the same sequence, so a listener that reads the cell record gets
one that includes the change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

from aiohttp import web
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, DeliverPolicy

from cellos.core.envelopes import cell_id_of, inner_event
from cellos.server.console.evidence import EvidenceIndex
from cellos.server.handlers import HUB
from cellos.server.hub import Hub, _decode
from cellos.server.watermark import Watermark
from cellos.sinks.jetstream import STREAM, SUBJECTS

log = logging.getLogger(__name__)

#: How long a new console stream waits for the index to reach the projection.
CATCH_UP_SECONDS: Final = 30.0


class ConsoleFeed:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.index = EvidenceIndex(hub.keys)
        self.listeners: set[asyncio.Queue[tuple[int, str]]] = set()
        #: The stream sequence the evidence index has folded so far.
        self.advanced = Watermark()
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.hub.js.subscribe(
            SUBJECTS,
            stream=STREAM,
            cb=self._on_event,
            ordered_consumer=True,
            idle_heartbeat=2.0,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )

    async def close(self) -> None:
        self.advanced.close()
        if self._sub is not None:
            # Bounded: on a cluster whose node went away an unsubscribe may never be answered,
            # and shutting the server down must not wait for it.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._sub.unsubscribe(), CLOSE_SECONDS)

    async def _on_event(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        payload = _decode(msg.data)
        inner = inner_event(payload)
        cell_id = cell_id_of(inner) if inner is not None else None
        changed = self.index.feed(seq, payload, cell_id)
        if changed and cell_id is not None:
            await self.hub.wait_applied(seq)
            for queue in self.listeners:
                queue.put_nowait((seq, cell_id))
        self.advanced.advance(self.index.last_seq)

    async def caught_up(self, seq: int) -> bool:
        """Wait until the index has folded stream sequence ``seq``."""

        return await self.advanced.wait(seq, CATCH_UP_SECONDS)

    def record(self, cell_id: str) -> dict[str, Any] | None:
        """The cell's projected record with its current run's evidence."""
        view = self.hub.projection.get(cell_id)
        if view is None:
            return None
        return {**view, "evidence": self.index.verdict(cell_id, view.get("runId"))}


#: Longest wait for the feed's subscription to close at shutdown.
CLOSE_SECONDS: Final = 2.0

FEED: Final = web.AppKey("console_feed", ConsoleFeed)


def install(app: web.Application) -> None:
    """Start the feed with the app, stop it with the app."""

    # Created now (the app's state is frozen once it starts), connected on startup.
    app[FEED] = ConsoleFeed(app[HUB])

    async def start(app: web.Application) -> None:
        await app[FEED].start()

    async def stop(app: web.Application) -> None:
        await app[FEED].close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
