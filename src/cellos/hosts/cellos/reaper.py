"""Finding and removing what dead supervisors left behind (``cellos reap``).

A cell's lock file is held (flock) for as long as its supervisor lives. A lock that can be
taken therefore belongs to a dead supervisor: its record names every resource the cell had
(recorded before each was created), and each is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import shutil
import signal
from typing import Any

from cellos.core.ports import ReapedCell
from cellos.hosts.cellos import cgroups
from cellos.hosts.cellos.state import read_record
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
    network = record.get("network")
    if isinstance(network, dict):
        from cellos.network import scope

        left = scope.destroy(network)
        residue += left
        if not left:
            removed.append(f"network:{network.get('netns')}")
    paths = record.get("cgroups")
    for path in paths if isinstance(paths, list) else []:
        if isinstance(path, str) and os.path.isdir(path):
            try:
                cgroups.remove_leaf(path)
                removed.append(f"cgroup:{path}")
            except OSError:
                residue.append(f"cgroup:{path}")
    return removed, residue


def _reap_one(cells: str, cell_id: str) -> ReapedCell | None:
    lock_path = os.path.join(cells, f"{cell_id}.lock")
    cell_dir = os.path.join(cells, cell_id)
    fd = -1
    if os.path.exists(lock_path):
        fd = os.open(lock_path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None  # a live supervisor owns it
    try:
        record = read_record(cell_dir) or {}
        removed, residue = reap_resources(record)
        if os.path.lexists(cell_dir):
            shutil.rmtree(cell_dir, ignore_errors=True)
            (residue if os.path.lexists(cell_dir) else removed).append(f"dir:{cell_dir}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        correlation = record.get("correlation")
        return ReapedCell(
            cell_id,
            tuple(removed),
            tuple(residue),
            correlation=correlation if isinstance(correlation, dict) else None,
        )
    finally:
        if fd >= 0:
            os.close(fd)


def reap(state_root: str) -> list[ReapedCell]:
    cells = os.path.join(state_root, "cells")
    try:
        entries = os.listdir(cells)
    except FileNotFoundError:
        return []
    ids = sorted({e.removesuffix(".lock") for e in entries if not e.startswith(".")})
    reaped = []
    for cell_id in ids:
        result = _reap_one(cells, cell_id)
        if result is not None:
            reaped.append(result)
    return reaped
