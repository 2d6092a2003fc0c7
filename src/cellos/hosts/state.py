"""The cell-state store: one lock and one record per live cell, for every backend.

Layout under the state root (``CELLOS_STATE_DIR``; default ``/run/cellos`` as root, else
``$XDG_RUNTIME_DIR/cellos`` or ``/tmp/cellos-<uid>``)::

    cells/<cellId>.lock          flock held by the cell's supervisor for the cell's whole life;
                                 its content: the owner (pid, start time) and where the cell's
                                 run chain stands (run id, last seq, digest, type)
    cells/<cellId>/record.json   the backend and every resource the cell owns, each written
                                 *before* it is created (cgroups, netns, slot, runsc container)
    cells/<cellId>/pid           the host process the backend started (launcher, runsc, VMM)
    cells/<cellId>/...           the backend's own files (workspace, logs, bundle)

Liveness is decided by the lock alone, never by a file's existence: a cell whose lock can be
taken has no living supervisor (flock dies with its holder), and the lock is verified to still
be the file at the path (a releasing supervisor unlinks it before closing it). The lock is
taken before the cell's directory exists and released only after it is gone, so a lock held
with a directory beside it can only mean a dead owner's cell.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from typing import Any

import msgspec

from cellos.core.errors import HostError
from cellos.core.log import get_logger
from cellos.core.ports import ChainPosition
from cellos.hosts.procfs import stat_fields

log = get_logger(__name__)

#: The lock file's content is rewritten in place (pwrite at 0) at this fixed size, so that a
#: shorter rewrite never leaves a stale tail and no truncate is needed on the hot path.
OWNER_BYTES = 512
#: How long ``acquire`` waits for a lock held by a reaper (or by a supervisor that has not
#: yet written its name into it) before it calls the id busy.
ACQUIRE_PATIENCE_SECONDS = 5.0


def default_state_root() -> str:
    """One rule for every backend (``CELLOS_STATE_DIR`` overrides it)."""
    if os.geteuid() == 0:
        return "/run/cellos"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "cellos") if runtime else f"/tmp/cellos-{os.geteuid()}"


def default_cache_root() -> str:
    """Per-user cache of built artifacts (sandbox launcher, microVM images): ``/var/cache/cellos``
    as root, else ``${XDG_CACHE_HOME:-~/.cache}/cellos``."""
    if os.geteuid() == 0:
        return "/var/cache/cellos"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cellos")


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart)."""
    fields = stat_fields(pid)
    try:
        return int(fields[19]) if fields is not None else None
    except (IndexError, ValueError):
        return None


_own: tuple[int, int | None] | None = None


def _own_start() -> int | None:
    """This process's start time, read once (per pid: a forked child reads its own)."""
    global _own
    pid = os.getpid()
    if _own is None or _own[0] != pid:
        _own = (pid, process_start(pid))
    return _own[1]


def lock_now(fd: int) -> bool:
    """Take ``fd``'s exclusive lock if nobody holds it (the caller keeps or closes ``fd``)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class CellBusy(Exception):
    """Another live cell (in any process) holds this id."""


def _write_owner(fd: int, owner: dict[str, Any]) -> None:
    data = json.dumps(owner, separators=(",", ":")).encode()
    os.pwrite(fd, data.ljust(OWNER_BYTES), 0)
    if len(data) > OWNER_BYTES:
        os.ftruncate(fd, len(data))


def read_owner(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _owner_alive(owner: dict[str, Any]) -> bool:
    pid, start = owner.get("pid"), owner.get("start")
    return isinstance(pid, int) and start is not None and process_start(pid) == start


def chain_of(owner: dict[str, Any]) -> ChainPosition | None:
    chain = owner.get("chain")
    if not isinstance(chain, dict):
        return None
    try:
        return ChainPosition(
            run_id=str(chain["runId"]),
            seq=int(chain["seq"]),
            digest=str(chain["digest"]),
            event_type=str(chain["type"]),
        )
    except (KeyError, TypeError, ValueError):
        return None


class CellState(msgspec.Struct):
    """A live cell's lock (held) and record, owned by this process."""

    cell_id: str
    cell_dir: str
    lock_fd: int
    record: dict[str, Any] = msgspec.field(default_factory=dict)
    owner: dict[str, Any] = msgspec.field(default_factory=dict)

    def path(self, name: str) -> str:
        return os.path.join(self.cell_dir, name)

    def save(self) -> None:
        """Rewrite the record atomically (call it *before* creating what it now names)."""
        tmp = self.path("record.json.tmp")
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            data = json.dumps(self.record).encode()
            while data:
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)
        os.replace(tmp, self.path("record.json"))

    def write_pid(self, pid: int) -> None:
        """Record the host process the backend started (cheaper than rewriting the record on
        the hot path)."""
        fd = os.open(
            self.path("pid"),
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        try:
            os.write(fd, str(pid).encode())
        finally:
            os.close(fd)

    def note_chain(self, position: ChainPosition) -> None:
        """Where the run's chain stands (one pwrite on the held lock file per event)."""
        self.owner["chain"] = {
            "runId": position.run_id,
            "seq": position.seq,
            "digest": position.digest,
            "type": position.event_type,
        }
        _write_owner(self.lock_fd, self.owner)


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


class CellStore:
    def __init__(self, root: str | None = None) -> None:
        self.root = root or default_state_root()
        self.cells = os.path.join(self.root, "cells")

    def cell_dir(self, cell_id: str) -> str:
        return os.path.join(self.cells, cell_id)

    def _lock_path(self, cell_id: str) -> str:
        return os.path.join(self.cells, f"{cell_id}.lock")

    def ids(self) -> list[str]:
        """Every cell id with a lock or a directory in the store (live or not)."""
        try:
            entries = os.listdir(self.cells)
        except FileNotFoundError:
            return []
        return sorted(
            {e.removesuffix(".lock") for e in entries if not e.startswith(".")}
            - {e for e in entries if e.endswith(".tmp")}
        )

    # -- owning a cell -----------------------------------------------------------------------

    def acquire(
        self, cell_id: str, backend: str, record: dict[str, Any] | None = None
    ) -> CellState:
        """Lock ``cell_id`` and write its record (naming what the caller is about to create).
        What a dead earlier owner of the id left (if no reaper got to it yet) is removed first.

        Raises :class:`HostError` naming ``spec.id`` when a live cell holds the id, or
        ``CELLOS_STATE_DIR`` when the store cannot be written."""
        try:
            try:
                fd = self._lock(cell_id)
            except FileNotFoundError:  # the first cell of this store (or it was removed)
                os.makedirs(self.cells, mode=0o700, exist_ok=True)
                fd = self._lock(cell_id)
        except CellBusy:
            raise HostError(
                "spec.id", f"a live cell with id {cell_id!r} already exists (another process)"
            ) from None
        except OSError as exc:
            raise HostError(
                "CELLOS_STATE_DIR", f"cannot create cell state in {self.root}: {exc.strerror}"
            ) from None
        cell_dir = self.cell_dir(cell_id)
        try:
            owner = {"pid": os.getpid(), "start": _own_start()}
            _write_owner(fd, owner)
            stale = read_record(cell_dir)
            if stale is not None:
                from cellos.hosts.reaper import reap_record

                log.warning("cell %s: removing what a dead supervisor left", cell_id)
                reap_record(stale)
            if os.path.lexists(cell_dir):
                rmtree(cell_dir, ignore_errors=True)
            os.mkdir(cell_dir, 0o700)
            state = CellState(
                cell_id=cell_id,
                cell_dir=cell_dir,
                lock_fd=fd,
                record={"cellId": cell_id, "backend": backend, **(record or {})},
                owner=owner,
            )
            state.save()
        except OSError as exc:
            rmtree(cell_dir, ignore_errors=True)
            self._drop_lock(cell_id, fd)
            raise HostError(
                "CELLOS_STATE_DIR", f"cannot create cell state in {self.root}: {exc.strerror}"
            ) from None
        return state

    def _lock(self, cell_id: str) -> int:
        path = self._lock_path(cell_id)
        give_up = time.monotonic() + ACQUIRE_PATIENCE_SECONDS
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            if not lock_now(fd):
                owner = read_owner(fd)
                os.close(fd)
                # A living owner: a duplicate. Anyone else (a reaper, which never writes the
                # owner, or a supervisor between its flock and its owner write) holds it
                # only briefly: wait for them.
                if _owner_alive(owner) or time.monotonic() > give_up:
                    raise CellBusy(cell_id) from None
                time.sleep(0.005)
                continue
            if self._is_current(path, fd):
                return fd
            os.close(fd)  # unlinked by its previous owner after our open: start over

    @staticmethod
    def _is_current(path: str, fd: int) -> bool:
        try:
            return os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self, state: CellState) -> list[str]:
        """Remove the cell's directory, then its lock; return what could not be removed."""
        residue: list[str] = []
        remove_cell_dir(state.cell_dir)
        if os.path.lexists(state.cell_dir):
            residue.append(state.cell_dir)
        self._drop_lock(state.cell_id, state.lock_fd)
        return residue

    def _drop_lock(self, cell_id: str, fd: int) -> None:
        # Unlinked while still held: whoever opened the old file finds it is not current.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._lock_path(cell_id))
        os.close(fd)

    # -- a reaper's side ---------------------------------------------------------------------

    def claim_dead(self, cell_id: str, *, create: bool = False) -> int | None:
        """The lock of ``cell_id`` if nobody alive holds it (the caller must pass it to
        :meth:`drop_dead`), else None. A directory without a lock (or, with ``create``, any
        id) gets a lock first."""
        path = self._lock_path(cell_id)
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        if create or (not os.path.lexists(path) and os.path.lexists(self.cell_dir(cell_id))):
            flags |= os.O_CREAT
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            return None
        if not lock_now(fd) or not self._is_current(path, fd):
            os.close(fd)
            return None
        return fd

    def drop_dead(self, cell_id: str, fd: int) -> None:
        self._drop_lock(cell_id, fd)


def rmtree(path: str, ignore_errors: bool = True) -> None:
    # shutil (with zlib, bz2, lzma) only for the rare directory that is not the usual few files.
    import shutil

    shutil.rmtree(path, ignore_errors=ignore_errors)


def remove_cell_dir(cell_dir: str) -> None:
    """Remove a cell's directory: the usual few files directly, anything else by rmtree."""
    with contextlib.suppress(OSError):
        for name in ("record.json", "pid"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(cell_dir, name))
        os.rmdir(os.path.join(cell_dir, "workspace"))  # fails unless empty: then rmtree
        os.rmdir(cell_dir)
        return
    rmtree(cell_dir, ignore_errors=True)
