"""``cellos serve``: the HTTP API over the cell-state projection (DESIGN.md §1, L7).

The server owns no state of its own (see :mod:`cellos.server.hub`): a restarted server answers
exactly what it answered before. The modules:

* :mod:`cellos.server.hub` -- the NATS side (replay, follow, queue, SSE consumers, DLQ replay);
* :mod:`cellos.server.routes` -- the route table: paths, handlers, query parameters, responses;
* :mod:`cellos.server.handlers` -- the HTTP handlers;
* :mod:`cellos.server.params` -- strict query-parameter parsing;
* :mod:`cellos.server.problems` -- RFC 9457 problem details;
* :mod:`cellos.server.auth` -- the bearer token;
* :mod:`cellos.server.openapi` -- ``GET /openapi.json``, generated from the route table.

This module composes them: :func:`build_app` and :func:`serve`.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from cellos.core.errors import CellosError
from cellos.core.loading import MAX_DOCUMENT_BYTES
from cellos.core.signing import VerifyKeys
from cellos.server.auth import TOKEN, auth_middleware, check_token
from cellos.server.console import setup_console
from cellos.server.handlers import HUB
from cellos.server.hub import Hub
from cellos.server.openapi import OPENAPI_PATH, openapi_document
from cellos.server.params import read_query
from cellos.server.problems import problems_middleware
from cellos.server.routes import ROUTES, Route
from cellos.sinks.replay import DEFAULT_INTERVAL_SECONDS

__all__ = ["Hub", "ServeConfig", "build_app", "check_token", "serve"]

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8080


@dataclass(frozen=True)
class ServeConfig:
    nats_url: str
    token: str
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    #: When set, only events signed by one of these keys are folded into the projection.
    keys: VerifyKeys | None = None
    #: This host's DLQ directory: its JetStream part is replayed on start and periodically.
    dlq_dir: str | None = None
    dlq_replay_seconds: float = DEFAULT_INTERVAL_SECONDS


def _bind(route: Route) -> Callable[[web.Request], Any]:
    """The aiohttp handler of ``route``: its query parameters parsed from its declaration."""

    async def handle(request: web.Request) -> web.StreamResponse:
        return await route.handler(request, read_query(request, route.params))

    handle.__name__ = route.operation_id
    return handle


def build_app(hub: Hub, token: str) -> web.Application:
    app = web.Application(
        middlewares=[problems_middleware, auth_middleware], client_max_size=MAX_DOCUMENT_BYTES
    )
    app[HUB] = hub
    app[TOKEN] = token
    for route in ROUTES:
        app.router.add_route(route.method, route.path, _bind(route))
    document = openapi_document(ROUTES)

    async def openapi(request: web.Request) -> web.Response:
        read_query(request, ())
        return web.json_response(document)

    app.router.add_get(OPENAPI_PATH, openapi)
    setup_console(app)

    async def on_shutdown(app: web.Application) -> None:
        hub.stop_waiting()

    app.on_shutdown.append(on_shutdown)
    return app


async def serve(config: ServeConfig, ready: Callable[[str], None] | None = None) -> None:
    """Replay, listen, and serve until SIGINT/SIGTERM."""
    hub = Hub(
        config.nats_url,
        config.keys,
        dlq_dir=config.dlq_dir,
        dlq_replay_seconds=config.dlq_replay_seconds,
    )
    try:
        await hub.start()
        app = build_app(hub, config.token)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, config.host, config.port)
            try:
                await site.start()
            except OSError as exc:
                raise CellosError(
                    "--port",
                    f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
                ) from None
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)
            if ready is not None:
                host, port = _bound_address(site, config)
                ready(
                    f"serving http://{host}:{port} ({len(hub.projection.cells)} cells, "
                    f"stream seq {hub.projection.last_seq})"
                )
            await stop.wait()
        finally:
            hub.stop_waiting()
            await runner.cleanup()
    finally:
        await hub.close()


def _bound_address(site: web.TCPSite, config: ServeConfig) -> tuple[str, int]:
    server = site._server  # the asyncio server: the real port when 0 was asked for
    sockets = getattr(server, "sockets", None) or []
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        return str(host), int(port)
    return config.host, config.port
