"""On-disk state of live cells, so that duplicates are refused across processes and a crashed
supervisor's residue can always be found (DESIGN.md §9: record before create).

Layout under the state root::

    cells/<cellId>.lock      flock held for the whole life of the cell
    cells/<cellId>/record.json   resources the cell owns (written before they are created)
    cells/<cellId>/workspace/    the cell's private working directory
    cells/<cellId>/stdout.log, stderr.log
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any


def default_state_root() -> str:
    if os.geteuid() == 0:
        return "/run/cellos"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "cellos") if runtime else f"/tmp/cellos-{os.geteuid()}"


class CellBusy(Exception):
    """Another live cell (in any process) holds this id."""


@dataclass
class CellRecord:
    cell_id: str
    cell_dir: str
    lock_fd: int
    resources: dict[str, Any] = field(default_factory=dict)

    @property
    def workspace(self) -> str:
        return os.path.join(self.cell_dir, "workspace")

    def save(self) -> None:
        tmp = os.path.join(self.cell_dir, "record.json.tmp")
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        with os.fdopen(fd, "w") as fh:
            json.dump({"cellId": self.cell_id, "supervisorPid": os.getpid(), **self.resources}, fh)
        os.replace(tmp, os.path.join(self.cell_dir, "record.json"))

    def write_pid(self, pid: int) -> None:
        """Record the launcher's pid (cheaper than rewriting the record on the hot path)."""
        fd = os.open(
            os.path.join(self.cell_dir, "pid"),
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        try:
            os.write(fd, str(pid).encode())
        finally:
            os.close(fd)


def _cells_dir(root: str) -> str:
    path = os.path.join(root, "cells")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def acquire(
    root: str, cell_id: str, resources: dict[str, Any] | None = None
) -> tuple[CellRecord, dict[str, Any] | None]:
    """Lock ``cell_id``; return its fresh record (saved, naming ``resources`` the caller is
    about to create) and the stale record a crash left, if any."""
    cells = _cells_dir(root)
    lock_path = os.path.join(cells, f"{cell_id}.lock")
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CellBusy(cell_id) from None
        # The previous owner may have unlinked the lock file between our open and flock;
        # then we hold a lock on a dead inode and must start over.
        try:
            same = os.stat(lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    cell_dir = os.path.join(cells, cell_id)
    stale = read_record(cell_dir)
    if os.path.lexists(cell_dir):
        shutil.rmtree(cell_dir, ignore_errors=True)
    os.mkdir(cell_dir, 0o700)
    record = CellRecord(
        cell_id=cell_id, cell_dir=cell_dir, lock_fd=fd, resources=dict(resources or {})
    )
    record.save()
    os.mkdir(record.workspace, 0o700)
    return record, stale


def read_record(cell_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(cell_dir, "record.json"), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    try:
        with open(os.path.join(cell_dir, "pid"), encoding="ascii") as fh:
            data["pid"] = int(fh.read())
    except (OSError, ValueError):
        pass
    return data


def release(root: str, record: CellRecord) -> list[str]:
    """Remove the cell's directory and lock; return what could not be removed."""
    residue: list[str] = []
    _remove_cell_dir(record.cell_dir)
    if os.path.lexists(record.cell_dir):
        residue.append(record.cell_dir)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(root, "cells", f"{record.cell_id}.lock"))
    os.close(record.lock_fd)
    return residue


def _remove_cell_dir(cell_dir: str) -> None:
    """Remove a cell's directory: the usual few files directly, anything else by rmtree."""
    with contextlib.suppress(OSError):
        for name in ("record.json", "pid", "stdout.log", "stderr.log"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(cell_dir, name))
        os.rmdir(os.path.join(cell_dir, "workspace"))  # fails unless empty: then rmtree
        os.rmdir(cell_dir)
        return
    shutil.rmtree(cell_dir, ignore_errors=True)
