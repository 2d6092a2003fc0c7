"""The console's static files: served without a token (they hold no data; every data request
the page makes carries the token), under a strict Content-Security-Policy."""

from __future__ import annotations

from pathlib import Path
from typing import Final

from aiohttp import web

from cellos.server.problems import Problem

STATIC_DIR: Final = Path(__file__).with_name("static")
PREFIX: Final = "/console/"
_TYPES: Final = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".txt": "text/plain",
}
#: No inline script or style, nothing from another origin, no framing, no form posts.
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
#: The files, read once: a request names one of these or gets 404 (no path handling).
FILES: Final = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix in _TYPES}


def _file(name: str) -> web.Response:
    path = FILES.get(name)
    if path is None:
        raise Problem(404, f"no such console file: {name!r}")
    return web.Response(
        body=path.read_bytes(),
        content_type=_TYPES[path.suffix],
        charset="utf-8",
        headers=HEADERS,
    )


async def index(request: web.Request) -> web.Response:
    return _file("index.html")


async def asset(request: web.Request) -> web.Response:
    return _file(request.match_info["name"])


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get(PREFIX + "{name}", asset)
