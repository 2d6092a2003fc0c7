"""The JSON Schema (OpenAPI component) of a run's evidence verdict."""

from __future__ import annotations

from typing import Any, Final

VERDICT: Final[dict[str, Any]] = {
    "type": "object",
    "description": "What a run's record proves, by the same verifier as `cellos events "
    "verify` (positions are stream sequences): signed, chain intact, complete, or the first "
    "problem.",
    "required": ["runId", "events", "ok", "signed", "kids", "chainIntact", "complete", "problem"],
    "properties": {
        "cellId": {"type": "string"},
        "runId": {"type": "string"},
        "events": {"type": "integer", "minimum": 0},
        "ok": {"type": "boolean"},
        "signed": {"type": "boolean"},
        "kids": {"type": "array", "items": {"type": "string"}},
        "chainIntact": {"type": "boolean"},
        "complete": {"type": "boolean"},
        "forced": {"type": "boolean"},
        "reaped": {"type": "boolean"},
        "problem": {
            "type": ["object", "null"],
            "required": ["kind", "streamSeq", "runSeq", "reason"],
            "properties": {
                "kind": {"type": "string"},
                "streamSeq": {"type": "integer"},
                "runSeq": {"type": ["integer", "null"]},
                "reason": {"type": "string"},
            },
        },
        "badges": {"type": "array", "items": {"type": "string"}},
        "verify": {"type": "string"},
    },
}
