"""CellOS: run one declared workload with a narrow authority and leave signed evidence.

``cellos.run_cell(document, on_output=..., env=...)`` runs a cell from Python
(:mod:`cellos.api`); it is imported on first use, so ``import cellos`` stays cheap.
"""

from __future__ import annotations

import sys
from typing import Any

__version__ = "0.1.0"

# Every CellOS entry point validates documents with msgspec, and msgspec imports
# typing_extensions when it is installed only to recognise that package's TypedDict and
# Required variants, which CellOS never uses (Python 3.11's typing has them). That import
# pulls in inspect, ast and tokenize: ~10 ms on every `cellos-supervisor` start. Hiding it
# while msgspec loads keeps msgspec on the standard typing; anything imported later (the MCP
# SDK, pydantic) still gets typing_extensions normally.
if "msgspec" not in sys.modules and "typing_extensions" not in sys.modules:
    sys.modules["typing_extensions"] = None  # type: ignore[assignment]
    try:
        import msgspec  # noqa: F401
    finally:
        del sys.modules["typing_extensions"]


def __getattr__(name: str) -> Any:
    if name in ("run_cell", "RunOutcome"):
        from cellos import api

        return getattr(api, name)
    raise AttributeError(f"module 'cellos' has no attribute {name!r}")
