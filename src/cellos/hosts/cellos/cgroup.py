"""A per-cell cgroup leaf under ``CELLOS_CGROUP_PARENT`` (created by mkdir, removed on destroy).

Joining happens in the child between fork and exec by writing ``0`` to ``cgroup.procs``,
which works on cgroup v1 and v2 alike, so the workload is never outside the leaf.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time


def leaf_path(parent: str, cell_id: str) -> str:
    return os.path.join(parent, f"cellos-{cell_id}")


def create_leaf(path: str) -> None:
    if os.path.isdir(path):
        remove_leaf(path)  # left by a crashed run of the same id
    os.mkdir(path)


def join_current_process(path: str) -> None:
    """Move the calling process into the leaf (called in the child before exec)."""
    fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY)
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)


def pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs"), encoding="ascii") as fh:
            return [int(line) for line in fh if line.strip()]
    except FileNotFoundError:
        return []


def remove_leaf(path: str, timeout: float = 5.0) -> int:
    """Kill everything in the leaf and remove it; return how many processes were killed."""
    killed = 0
    deadline = time.monotonic() + timeout
    while True:
        members = pids(path)
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed = max(killed, len(members))
        try:
            os.rmdir(path)
            return killed
        except FileNotFoundError:
            return killed
        except OSError as exc:
            # EBUSY until the killed members are fully gone.
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
        time.sleep(0.01)
