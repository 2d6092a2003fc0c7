"""CellOS: run one declared workload with a narrow authority and leave signed evidence.

``cellos.run_cell(document, on_output=..., env=...)`` runs a cell from Python
(:mod:`cellos.api`); it is imported on first use, so ``import cellos`` stays cheap.
"""

from __future__ import annotations

import sys
from typing import Any

__version__ = "0.1.0"


if "msgspec" not in sys.modules:
    # Without what msgspec would load for features CellOS does not use (start-up latency).
    from cellos.core.msgspec_import import import_msgspec

    import_msgspec()


def __getattr__(name: str) -> Any:
    if name in ("run_cell", "RunOutcome"):
        from cellos import api

        return getattr(api, name)
    raise AttributeError(f"module 'cellos' has no attribute {name!r}")
