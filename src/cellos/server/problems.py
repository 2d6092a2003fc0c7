"""RFC 9457 problem details: the one error format of ``cellos serve``.

Handlers raise :class:`Problem`; :func:`problems_middleware` renders it, and turns aiohttp's
own HTTP errors (404, 405, 413), NATS failures (503) and anything unexpected (500, logged) into
the same shape, so a client never sees a traceback or an HTML error page.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Final

import nats.errors
import nats.js.errors
from aiohttp import web
from aiohttp.typedefs import Handler

from cellos.core.loading import MAX_DOCUMENT_BYTES

log = logging.getLogger(__name__)

PROBLEM_JSON: Final = "application/problem+json"
PROBLEM_PREFIX: Final = "urn:cellos:problem:"

KIND_BY_STATUS: Final = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    406: "not-acceptable",
    409: "conflict",
    413: "payload-too-large",
    415: "unsupported-media-type",
    422: "invalid-document",
    500: "internal",
    503: "unavailable",
}
TITLE_BY_STATUS: Final = {
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Invalid Document",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    kind: str,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> web.Response:
    """An RFC 9457 problem details response."""
    body: dict[str, Any] = {
        "type": PROBLEM_PREFIX + kind,
        "title": title,
        "status": status,
        "detail": detail,
    }
    if instance is not None:
        body["instance"] = instance
    body.update(extensions)
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type=PROBLEM_JSON,
        headers=headers,
    )


class Problem(Exception):
    """Raised by handlers; rendered by the middleware as problem details."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str | None = None,
        kind: str | None = None,
        **ext: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title or TITLE_BY_STATUS.get(status, "Error")
        self.detail = detail
        self.kind = kind or KIND_BY_STATUS.get(status, "error")
        self.ext = ext


def bad_request(detail: str) -> Problem:
    return Problem(400, detail)


@web.middleware
async def problems_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as exc:
        headers = {"WWW-Authenticate": 'Bearer realm="cellos"'} if exc.status == 401 else None
        return problem(
            exc.status,
            exc.title,
            exc.detail,
            kind=exc.kind,
            instance=request.path,
            headers=headers,
            **exc.ext,
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else None
        if exc.status == 404:
            detail = f"no such resource: {request.path}"
        elif exc.status == 405:
            detail = f"{request.method} is not allowed on {request.path}"
        elif exc.status == 413:
            detail = f"the request body is larger than {MAX_DOCUMENT_BYTES} bytes"
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow",)}
        return problem(
            exc.status,
            exc.reason,
            detail or exc.reason,
            kind=KIND_BY_STATUS.get(exc.status, "error"),
            instance=request.path,
            headers=headers,
        )
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        log.warning("NATS request failed: %s", exc)
        return problem(
            503,
            "Service Unavailable",
            f"JetStream did not answer: {type(exc).__name__}",
            kind="unavailable",
            instance=request.path,
        )
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return problem(
            500,
            "Internal Server Error",
            "the server failed to handle the request; see its log",
            kind="internal",
            instance=request.path,
        )
