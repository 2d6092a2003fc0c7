"""Small readers of /proc used to find every process that belongs to a cell."""

from __future__ import annotations

import os
from collections.abc import Iterator

import msgspec


class ProcStat(msgspec.Struct, frozen=True):
    pid: int
    state: str
    ppid: int
    pgrp: int


def stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` after ``comm``, or None when the process is gone.

    ``fields[0]`` is the state, ``fields[19]`` the start time. ``os.open``/``os.read`` rather
    than ``open()``: this runs for every process on the host after every stub workload, and the
    buffered file object costs more than the read."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        # comm may contain spaces and parentheses: split after the last ')'.
        return os.read(fd, 4096).rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    finally:
        os.close(fd)


def iter_procs() -> Iterator[ProcStat]:
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := stat_fields(entry)) is not None:
            yield ProcStat(int(entry), fields[0].decode(), int(fields[1]), int(fields[2]))


def pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def live_in_namespace(ns: str) -> list[int]:
    """Non-zombie processes whose pid namespace is ``ns`` (as read from /proc/<pid>/ns/pid)."""
    return [p.pid for p in iter_procs() if p.state != "Z" and pid_namespace(p.pid) == ns]


def is_running(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] != b"Z"


def runs_in(pid: int, directory: str) -> bool:
    """Whether ``pid`` runs with ``directory`` as its working directory: how a recorded VMM pid
    (which may have been reused since) is told to be the one started there."""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return cwd in (directory, f"{directory} (deleted)")
