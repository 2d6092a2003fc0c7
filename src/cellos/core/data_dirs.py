"""Where CellOS keeps data that outlives a cell (dead-letter queue, output logs, MCP runs).

One rule for every kind: root uses ``/var/lib/cellos/<kind>``; a normal user the XDG state
directory (``$XDG_STATE_HOME`` or ``~/.local/state``) under ``cellos/<kind>``.
"""

from __future__ import annotations

import os


def default_data_dir(kind: str) -> str:
    if os.geteuid() == 0:
        return os.path.join("/var/lib/cellos", kind)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(base, "cellos", kind)
