"""The ``qemu`` and ``firecracker`` backends' part of reaping a dead cell (see
:mod:`cellos.hosts.reaper`): its VMM, if it outlived its supervisor (it normally dies with it:
``PR_SET_PDEATHSIG``). The network scope is the shared reaper's; a qemu guest's tap needs
nothing of its own: it is not persistent, so it goes with the VMM's descriptor (and lives in
the cell's namespace, which goes too)."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

from cellos.hosts.procfs import is_running, runs_in


def reap_resources(record: dict[str, Any]) -> tuple[list[str], list[str]]:
    return _reap_vmm(record)


def _reap_vmm(record: dict[str, Any]) -> tuple[list[str], list[str]]:
    # A warm pool's guest runs in its directory of the pool, a cold boot in the cell's.
    pid, cell_dir = record.get("pid"), record.get("vmmDir") or record.get("cellDir")
    if not (isinstance(pid, int) and pid > 1 and isinstance(cell_dir, str)):
        return [], []
    if not runs_in(pid, cell_dir):  # the pid may have been reused since the crash
        return [], []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    _wait_gone(pid)
    return [f"vmm:{pid}"], []


def _wait_gone(pid: int, timeout: float = 5.0) -> None:
    """SIGKILL is asynchronous: the VMM's descriptors (the tap's among them) are closed only
    once it is gone."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_running(pid):
            return  # gone, or a zombie: either way its files are closed
        time.sleep(0.01)
