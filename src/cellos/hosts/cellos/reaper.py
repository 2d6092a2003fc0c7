"""The ``cellos`` backend's part of reaping a dead cell (see :mod:`cellos.hosts.reaper`):
its launcher, its network scope and its cgroup leaves, as its record names them."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
from typing import Any

from cellos.hosts.cellos import cgroups
from cellos.hosts.host_root import HOSTNAME_MAX


def _is_launcher(pid: int, cell_id: str) -> bool:
    """A recorded pid may have been reused since the crash: only kill the cell's launcher."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return False
    hostname = cell_id[:HOSTNAME_MAX].encode()
    return any(
        flag == b"--hostname" and value == hostname for flag, value in itertools.pairwise(argv)
    )


def reap_resources(record: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Kill a dead cell's launcher and remove its cgroup leaves; return (removed, residue)."""
    removed: list[str] = []
    residue: list[str] = []
    pid = record.get("pid")
    cell_id = record.get("cellId")
    if isinstance(pid, int) and pid > 1 and isinstance(cell_id, str) and _is_launcher(pid, cell_id):
        # Normally the cell died with its supervisor already (the launcher's PDEATHSIG).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    paths = record.get("cgroups")
    for path in paths if isinstance(paths, list) else []:
        if isinstance(path, str) and os.path.isdir(path):
            try:
                cgroups.remove_leaf(path)
                removed.append(f"cgroup:{path}")
            except OSError:
                residue.append(f"cgroup:{path}")
    return removed, residue
