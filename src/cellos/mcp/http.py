"""Streamable HTTP for ``cellos mcp --http``, behind the same bearer token as ``cellos serve``.

The SDK's Starlette app is wrapped in a small ASGI guard: every HTTP request must carry
``Authorization: Bearer <token>`` (compared in constant time); anything else is a 401 that
says what is missing and never echoes what was sent.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import sys
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)


class BearerGuard:
    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan: the SDK's session manager starts there
            await self.app(scope, receive, send)
            return
        header = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value
        scheme, _, credentials = header.partition(b" ")
        if scheme.lower() != b"bearer" or not credentials.strip():
            await _deny(send, "a bearer token is required (Authorization: Bearer <token>)")
            return
        if not hmac.compare_digest(credentials.strip(), self.expected):
            log.warning("rejected an MCP request with a wrong token")
            await _deny(send, "the bearer token is not valid")
            return
        await self.app(scope, receive, send)


async def _deny(send: Send, detail: str) -> None:
    body = json.dumps({"status": 401, "title": "Unauthorized", "detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"www-authenticate", b'Bearer realm="cellos"'),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def serve_http(server: Any, token: str, host: str, port: int) -> None:
    """Listen (port 0: any free port), say where on stderr, serve until SIGINT/SIGTERM."""
    from mcp.server.transport_security import TransportSecuritySettings

    # The bearer token is the guard; Host/Origin checks are the SDK's DNS-rebinding defence,
    # kept on for loopback and relaxed only when the operator binds elsewhere on purpose.
    security = (
        None
        if host in ("127.0.0.1", "localhost", "::1")
        else TransportSecuritySettings(enable_dns_rebinding_protection=False)
    )
    app = BearerGuard(server.streamable_http_app(transport_security=security, host=host), token)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)  # before we say where: a client may connect at once
    bound = sock.getsockname()[1]
    where = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"cellos mcp: listening on http://{where}:{bound}/mcp", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
