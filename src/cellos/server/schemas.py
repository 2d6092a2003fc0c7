"""JSON Schemas (OpenAPI 3.1 components) of what the API returns.

The cell record schema is checked against :meth:`cellos.server.projection.CellRecord.view`
by the tests (same key set), and the live server's answers against the whole document by the
schemathesis fuzz, so this cannot drift from what is served.
"""

from __future__ import annotations

from typing import Any, Final

from cellos.server.console.schema import VERDICT
from cellos.server.projection import CellState

_STR_OR_NULL: Final = {"type": ["string", "null"]}
_INT_OR_NULL: Final = {"type": ["integer", "null"]}
CELL_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
TENANT_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"

CELL: Final[dict[str, Any]] = {
    "type": "object",
    "description": "The projected state of one cell (its latest run).",
    "required": ["id", "tenant", "state"],
    "properties": {
        "id": {"type": "string"},
        "tenant": {"type": "string"},
        "state": {"type": "string", "enum": [s.value for s in CellState]},
        "runId": _STR_OR_NULL,
        "attempt": _INT_OR_NULL,
        "exitCode": _INT_OR_NULL,
        "outcome": _STR_OR_NULL,
        "terminalState": _STR_OR_NULL,
        "reason": _STR_OR_NULL,
        "errors": {"type": "array", "items": {"type": "string"}},
        "backend": _STR_OR_NULL,
        "submittedAt": _STR_OR_NULL,
        "startedAt": _STR_OR_NULL,
        "finishedAt": _STR_OR_NULL,
        "updatedAt": _STR_OR_NULL,
        "lastSeq": {"type": "integer", "minimum": 0},
        "events": {"type": "integer", "minimum": 0},
        "runs": {"type": "integer", "minimum": 0},
        "duplicate": {"type": "boolean"},
    },
}

CELL_LIST: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["items", "count", "lastSeq"],
    "properties": {
        "items": {"type": "array", "items": {"$ref": "#/components/schemas/Cell"}},
        "count": {"type": "integer", "minimum": 0},
        "lastSeq": {"type": "integer", "minimum": 0},
    },
}

EVENT_ITEM: Final[dict[str, Any]] = {
    "type": "object",
    "description": "One message of CELLOS_EVENTS: the wire event (envelope included) and what "
    "a client filters on. `rejected` says why the server did not fold it.",
    "required": ["seq", "subject", "cellId", "type", "time", "runId", "runSeq", "signed", "event"],
    "properties": {
        "seq": {"type": "integer", "minimum": 1},
        "subject": _STR_OR_NULL,
        "cellId": _STR_OR_NULL,
        "type": _STR_OR_NULL,
        "time": _STR_OR_NULL,
        "runId": _STR_OR_NULL,
        "runSeq": {},
        "signed": {"type": "boolean"},
        "event": {},
        "rejected": {"type": "string"},
    },
}

EVENT_PAGE: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["cellId", "items", "lastSeq", "more"],
    "properties": {
        "cellId": {"type": "string"},
        "items": {"type": "array", "items": {"$ref": "#/components/schemas/EventItem"}},
        "lastSeq": {"type": "integer", "minimum": 0},
        "more": {"type": "boolean"},
    },
}

PROBLEM: Final[dict[str, Any]] = {
    "type": "object",
    "description": "RFC 9457 problem details.",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "pattern": "^urn:cellos:problem:"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["path", "reason"],
                "properties": {"path": {"type": "string"}, "reason": {"type": "string"}},
            },
        },
    },
}

HEALTH: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"type": "string", "const": "ok"}},
}

DOCUMENT: Final[dict[str, Any]] = {
    "type": "object",
    "description": "An ExecutionCell document; its full JSON Schema is printed by `cellos "
    "schema` (this is its outline). Validated exactly as `cellos validate` does: 422 with "
    "every problem otherwise.",
    "required": ["apiVersion", "kind", "spec"],
    "properties": {
        "apiVersion": {"const": "cellos.io/v1"},
        "kind": {"const": "ExecutionCell"},
        "spec": {"type": "object"},
    },
}

COMPONENTS: Final[dict[str, dict[str, Any]]] = {
    "Cell": CELL,
    "CellList": CELL_LIST,
    "EventItem": EVENT_ITEM,
    "EventPage": EVENT_PAGE,
    "Problem": PROBLEM,
    "Health": HEALTH,
    "ExecutionCell": DOCUMENT,
    "Verdict": VERDICT,
}
