"""CellOS: run one declared workload with a narrow authority and leave signed evidence.

``cellos.run_cell(document, on_output=..., env=...)`` runs a cell from Python
(:mod:`cellos.api`); it is imported on first use, so ``import cellos`` stays cheap.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Any

__version__ = "0.1.0"


def _import_msgspec() -> None:
    """Every CellOS entry point validates documents with msgspec, whose import pulls in two
    modules for nothing CellOS uses. Each is stood in for while msgspec loads; anything
    imported later (the MCP SDK, pydantic, platform users) still gets the real module:

    - typing_extensions, when installed, only to recognise that package's TypedDict and
      Required variants (Python 3.11's typing has them); it pulls in inspect, ast and
      tokenize, ~10 ms on every ``cellos-supervisor`` start. Hidden: msgspec uses typing.
    - platform, which uuid imports only to call ``platform.system()`` once at import (it
      compiles nine regexes, ~1.5 ms). A module with just that function stands in.
    """
    stand_ins: dict[str, ModuleType | None] = {}
    if "typing_extensions" not in sys.modules:
        stand_ins["typing_extensions"] = None
    if "platform" not in sys.modules and "uuid" not in sys.modules:
        uname_only = ModuleType("platform")
        uname_only.system = lambda: os.uname().sysname  # type: ignore[attr-defined]
        stand_ins["platform"] = uname_only
    sys.modules.update(stand_ins)  # type: ignore[arg-type]
    try:
        import msgspec  # noqa: F401
    finally:
        for name in stand_ins:
            del sys.modules[name]


if "msgspec" not in sys.modules:
    _import_msgspec()


def __getattr__(name: str) -> Any:
    if name in ("run_cell", "RunOutcome"):
        from cellos import api

        return getattr(api, name)
    raise AttributeError(f"module 'cellos' has no attribute {name!r}")
