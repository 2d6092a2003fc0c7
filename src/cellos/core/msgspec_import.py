"""Importing msgspec without the modules it loads for features a supervisor does not use.

Every CellOS entry point validates documents with msgspec, and ``cellos-supervisor`` runs once
per cell, so what msgspec's import loads is latency on every cell. While it loads,
``sys.modules`` holds stand-ins; afterwards they leave it, and a later ``import`` of any of
these names gets the real module (the MCP SDK, pydantic, ``cellos schema``):

- ``typing_extensions``: hidden. msgspec imports it, when installed, only to recognise that
  package's TypedDict and Required variants (Python 3.11's typing has them); it pulls in
  inspect, ast and tokenize: ~10 ms.
- ``platform``: a module with ``system()`` only. uuid imports platform just to call it once at
  import; platform compiles nine regexes (~1.5 ms).
- ``datetime``: the C module ``_datetime``. datetime.py re-exports its types after first
  executing a pure-Python implementation of them (~2 ms); msgspec gets the same types.
- ``textwrap`` and ``msgspec.inspect``: imported on first attribute use. Only
  ``msgspec.json.schema`` (``cellos schema``) and type inspection use them (~2 ms).
"""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Any


class OnFirstUse(ModuleType):
    """Stands in for module ``name``: the first attribute read imports the real module (if
    nothing has yet) and every read is answered by it."""

    def __getattr__(self, attr: str) -> Any:
        real = sys.modules.get(self.__name__)
        if real is None or real is self:
            sys.modules.pop(self.__name__, None)
            __import__(self.__name__)
            real = sys.modules[self.__name__]
        return getattr(real, attr)


def _uname_only_platform() -> ModuleType:
    module = ModuleType("platform")
    module.system = lambda: os.uname().sysname  # type: ignore[attr-defined]
    return module


def import_msgspec() -> None:
    """Import msgspec with the stand-ins above for every name not imported already."""
    wanted: dict[str, ModuleType | None] = {
        "typing_extensions": None,
        "platform": _uname_only_platform(),
        "datetime": __import__("_datetime"),  # (typeshed has no stub for the C module)
        "textwrap": OnFirstUse("textwrap"),
        "msgspec.inspect": OnFirstUse("msgspec.inspect"),
    }
    if "uuid" in sys.modules:
        del wanted["platform"]  # uuid has asked platform already
    stand_ins = {name: module for name, module in wanted.items() if name not in sys.modules}
    sys.modules.update(stand_ins)  # type: ignore[arg-type]
    try:
        import msgspec  # noqa: F401
    finally:
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
