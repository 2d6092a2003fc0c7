"""The ``qemu`` and ``firecracker`` backends' part of reaping a dead cell (see
:mod:`cellos.hosts.reaper`): its VMM, if it outlived its supervisor (it normally dies with it:
``PR_SET_PDEATHSIG``)."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any


def _is_vmm_of(pid: int, cell_dir: str) -> bool:
    """A recorded pid may have been reused since the crash: the VMM runs in the cell's dir."""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return cwd in (cell_dir, f"{cell_dir} (deleted)")


def reap_resources(record: dict[str, Any]) -> tuple[list[str], list[str]]:
    # A warm pool's guest runs in its directory of the pool, a cold boot in the cell's.
    pid, cell_dir = record.get("pid"), record.get("vmmDir") or record.get("cellDir")
    if not (isinstance(pid, int) and pid > 1 and isinstance(cell_dir, str)):
        return [], []
    if not _is_vmm_of(pid, cell_dir):
        return [], []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    return [f"vmm:{pid}"], []
