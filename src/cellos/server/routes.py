"""The routes of ``cellos serve``: one table that both registers the handlers (with their
query parameters parsed from the same declarations) and produces the OpenAPI document
(:mod:`cellos.server.openapi`). A route added here is documented and fuzzed by construction.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from cellos.server import handlers as h
from cellos.server.console import api as console
from cellos.server.params import QueryParam
from cellos.server.projection import CellState
from cellos.server.schemas import CELL_ID_PATTERN, TENANT_PATTERN

Handler = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]

DEFAULT_EVENTS_LIMIT: Final = 1000
MAX_EVENTS_LIMIT: Final = 10000
#: Largest stream sequence a client may name (JetStream sequences are uint64).
MAX_SEQ: Final = 2**63 - 1

SINCE: Final = QueryParam(
    "since",
    "Exclusive: the last stream sequence the client has seen (0: from the start). For the SSE "
    "endpoints the Last-Event-ID header is used when this is absent.",
    kind="integer",
    minimum=0,
    maximum=MAX_SEQ,
)
LIMIT: Final = QueryParam(
    "limit",
    "Most events to return.",
    kind="integer",
    minimum=0,
    maximum=MAX_EVENTS_LIMIT,
    default=DEFAULT_EVENTS_LIMIT,
)
STATE: Final = QueryParam(
    "state", "Only cells in this state.", kind="enum", choices=[s.value for s in CellState]
)
TENANT: Final = QueryParam(
    "tenant", "Only cells of this tenant.", pattern=TENANT_PATTERN, max_length=64
)
STREAM: Final = QueryParam(
    "stream", "Which output stream.", kind="enum", choices=["stdout", "stderr"], default="stdout"
)
FOLLOW: Final = QueryParam(
    "follow",
    "true: keep the stream open until the run has ended and all its output was sent.",
    kind="enum",
    choices=["true", "false"],
    default="false",
)
OFFSET: Final = QueryParam(
    "offset",
    "Bytes of the stream to skip (else the Last-Event-ID header, else 0).",
    kind="integer",
    minimum=0,
    maximum=MAX_SEQ,
)
_RUN_ID_PATTERN: Final = r"^[A-Za-z0-9-]{1,64}$"
RUN: Final = QueryParam(
    "run", "The run (default: the cell's current run).", pattern=_RUN_ID_PATTERN
)


@dataclass(frozen=True)
class Response:
    status: int
    description: str
    #: A component schema name (JSON), or ``None`` with ``media`` for a non-JSON body.
    schema: str | None = None
    media: str = "application/json"


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    operation_id: str
    summary: str
    params: Sequence[QueryParam] = ()
    responses: Sequence[Response] = ()
    #: Requires the bearer token (every route but the open ones).
    auth: bool = True
    #: Request body: its media types and component schema.
    body: tuple[Sequence[str], str] | None = None
    #: Long-lived Server-Sent Events response (not fuzzed: it never ends by itself).
    sse: bool = False
    path_params: dict[str, str] = field(default_factory=dict)


_ID = {"id": CELL_ID_PATTERN}
_SSE = Response(
    200,
    "Server-Sent Events: `retry`, then one `cellos.event` per stream message (`id` = stream "
    "sequence, `data` = an EventItem as JSON), `: keepalive` comments every 15 s.",
    None,
    "text/event-stream",
)

ROUTES: Final[tuple[Route, ...]] = (
    Route(
        "GET",
        "/healthz",
        h.healthz,
        "healthz",
        "Liveness (no token needed)",
        responses=[Response(200, "The server is up", "Health")],
        auth=False,
    ),
    Route(
        "POST",
        "/v1/cells",
        h.submit_cell,
        "submitCell",
        "Validate a document and put it on the work queue",
        responses=[
            Response(202, "Queued: the cell is PENDING", "Cell"),
            Response(200, "The identical document was already queued (duplicate: true)", "Cell"),
            Response(409, "The cell is PENDING, ADMITTED or RUNNING", "Problem"),
            Response(413, "The document is larger than 1 MiB", "Problem"),
            Response(415, "Not JSON or YAML", "Problem"),
            Response(422, "Invalid document: every problem in errors[]", "Problem"),
        ],
        body=(sorted(h.DOCUMENT_TYPES), "ExecutionCell"),
    ),
    Route(
        "GET",
        "/v1/cells",
        h.list_cells,
        "listCells",
        "The projected records of every cell, ordered by id",
        params=[STATE, TENANT],
        responses=[Response(200, "The cells", "CellList")],
    ),
    Route(
        "GET",
        "/v1/cells/{id}",
        h.get_cell,
        "getCell",
        "The projected record of one cell",
        responses=[
            Response(200, "The cell", "Cell"),
            Response(404, "No such cell", "Problem"),
        ],
        path_params=_ID,
    ),
    Route(
        "GET",
        "/v1/cells/{id}/events",
        h.cell_events,
        "listCellEvents",
        "The cell's stream messages after `since`",
        params=[SINCE, LIMIT],
        responses=[
            Response(200, "A page of events", "EventPage"),
            Response(404, "No such cell", "Problem"),
        ],
        path_params=_ID,
    ),
    Route(
        "GET",
        "/v1/cells/{id}/events/stream",
        h.cell_event_stream,
        "streamCellEvents",
        "Replay the cell's events after `since` (or Last-Event-ID), then follow",
        params=[SINCE],
        # A cell not known yet is waited for (it may just have been submitted): no 404.
        responses=[_SSE],
        sse=True,
        path_params=_ID,
    ),
    Route(
        "GET",
        "/v1/cells/{id}/logs",
        h.cell_logs,
        "streamCellLogs",
        "The cell's output (one stream) from `offset`, live with `follow=true`",
        params=[STREAM, FOLLOW, OFFSET, RUN],
        responses=[
            Response(
                200,
                "Server-Sent Events: `cellos.log` (`id` = the stream offset after the chunk, "
                "`data` = {runId, stream, offset, data (base64)}), `cellos.log.gap`, and a "
                "final `cellos.log.end`.",
                None,
                "text/event-stream",
            )
        ],
        sse=True,
        path_params=_ID,
    ),
    Route(
        "GET",
        "/v1/events/stream",
        h.event_stream,
        "streamEvents",
        "Replay every event after `since` (or Last-Event-ID), then follow",
        params=[SINCE],
        responses=[_SSE],
        sse=True,
    ),
    Route(
        "GET",
        "/v1/cells/{id}/runs/{run}/verdict",
        console.run_verdict,
        "getRunVerdict",
        "What the run's record proves (signed, chain intact, complete), by the verifier of "
        "`cellos events verify`",
        responses=[
            Response(200, "The verdict (a failed check is a 200 with `problem`)", "Verdict"),
            Response(404, "No such cell, or no such run of it", "Problem"),
        ],
        path_params={**_ID, "run": _RUN_ID_PATTERN},
    ),
    Route(
        "GET",
        "/v1/console/stream",
        console.console_stream,
        "streamConsoleCells",
        "The web console's feed: every cell record with its run's evidence, then each change",
        responses=[
            Response(
                200,
                "Server-Sent Events: one `cellos.cells` ({items, lastSeq}; each item a Cell "
                "plus `evidence`, a Verdict or null), then one `cellos.cell` per change "
                "(`id` = stream sequence).",
                None,
                "text/event-stream",
            )
        ],
        sse=True,
    ),
)
