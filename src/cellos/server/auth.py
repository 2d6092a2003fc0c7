"""Bearer-token authentication of ``cellos serve``."""

from __future__ import annotations

import hmac
import logging
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from cellos.core.errors import InvalidSpec
from cellos.server.problems import Problem

log = logging.getLogger(__name__)

#: Shortest accepted API token: anything shorter is guessable.
MIN_TOKEN_CHARS: Final = 16
TOKEN: Final = web.AppKey("token", str)
#: Paths served without a token (liveness, the API contract, the console's page).
OPEN_PATHS: Final = frozenset({"/healthz", "/openapi.json", "/"})
#: The console's static files: they hold no data (every data request carries the token).
OPEN_PREFIXES: Final = ("/console/",)


def check_token(token: str, source: str) -> str:
    """The token, or ``InvalidSpec(source, reason)`` (exit 2) if it is unusable."""
    token = token.strip()
    if not token:
        raise InvalidSpec(source, "is empty; cellos serve requires a bearer token")
    if len(token) < MIN_TOKEN_CHARS:
        raise InvalidSpec(source, f"must be at least {MIN_TOKEN_CHARS} characters")
    if not token.isascii() or not token.isprintable() or " " in token:
        raise InvalidSpec(source, "must be printable ASCII without spaces")
    return token


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in OPEN_PATHS or request.path.startswith(OPEN_PREFIXES):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, credentials = header.partition(" ")
    expected = request.app[TOKEN].encode()
    if scheme.lower() != "bearer" or not credentials.strip():
        raise Problem(401, "a bearer token is required (Authorization: Bearer <token>)")
    # Constant-time: the comparison must not tell how much of a guess was right.
    if not hmac.compare_digest(credentials.strip().encode(), expected):
        log.warning("rejected a request with a wrong token from %s", request.remote)
        raise Problem(401, "the bearer token is not valid")
    return await handler(request)
