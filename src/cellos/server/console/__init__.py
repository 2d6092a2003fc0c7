"""The web console of ``cellos serve`` (``GET /``): static files (:mod:`.static_files`), the
live feed of cell records with their evidence (:mod:`.feed`, :mod:`.evidence`) and its two
API routes (:mod:`.api`, declared in :mod:`cellos.server.routes`)."""

from __future__ import annotations

from aiohttp import web

from cellos.server.console import feed, static_files

OPEN_PREFIX = static_files.PREFIX


def setup_console(app: web.Application) -> None:
    static_files.add_routes(app)
    feed.install(app)
