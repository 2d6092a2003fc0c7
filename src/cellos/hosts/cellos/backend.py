"""The default ``cellos`` backend: tracks live cells and runs the workload with hygiene.

This is the portable core of the backend: live-cell tracking (no duplicate live id, no double
destroy, ``peers_tracked_after``), a private workspace per cell, bounded logs, an optional
cgroup leaf, and everything the cell created recorded before it is created. Namespaces,
seccomp and limits slot into :meth:`CellosBackend.run` through :class:`SpawnOptions`.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import signal
import threading
from dataclasses import dataclass
from typing import BinaryIO

from cellos.core.errors import ExportError, HostError
from cellos.core.ports import CellHandle, TeardownReport, WorkloadRequest, WorkloadResult
from cellos.core.spec import CellSpec
from cellos.hosts.artifacts import open_beneath
from cellos.hosts.cellos import cgroup, state
from cellos.hosts.process import SpawnOptions, spawn_isolated_workload


@dataclass
class _LiveCell:
    record: state.CellRecord
    working_directory: str
    cgroup: str | None = None
    pgid: int | None = None


# Live cells are a property of the host, not of one backend object: every backend instance in
# this process shares the table (other processes are kept out by the state-dir lock).
_LIVE: dict[str, _LiveCell] = {}
_LIVE_LOCK = threading.Lock()


class CellosBackend:
    name = "cellos"

    def __init__(self, *, state_root: str | None = None, cgroup_parent: str | None = None) -> None:
        self.state_root = state_root or state.default_state_root()
        self.cgroup_parent = cgroup_parent
        if cgroup_parent is not None and not os.path.isdir(cgroup_parent):
            raise HostError("CELLOS_CGROUP_PARENT", f"{cgroup_parent!r} is not a directory")

    # -- lifecycle ---------------------------------------------------------------------------

    def create(self, spec: CellSpec) -> CellHandle:
        with _LIVE_LOCK:
            if spec.id in _LIVE:
                raise HostError("spec.id", f"a live cell with id {spec.id!r} already exists")
            try:
                record, stale = state.acquire(self.state_root, spec.id)
            except state.CellBusy:
                raise HostError(
                    "spec.id", f"a live cell with id {spec.id!r} already exists (another process)"
                ) from None
            except OSError as exc:
                raise HostError(
                    "CELLOS_STATE_DIR", f"cannot create cell state: {exc.strerror}"
                ) from None
            live = _LiveCell(record=record, working_directory=spec.run.working_directory)
            _LIVE[spec.id] = live
        if stale and isinstance(stale.get("cgroup"), str):
            with contextlib.suppress(OSError):
                cgroup.remove_leaf(stale["cgroup"])
        try:
            if self.cgroup_parent is not None:
                leaf = cgroup.leaf_path(self.cgroup_parent, spec.id)
                record.resources["cgroup"] = leaf
                record.save()  # recorded before it exists, so a reaper always finds it
                cgroup.create_leaf(leaf)
                live.cgroup = leaf
        except OSError as exc:
            self._teardown(spec.id, live)
            raise HostError(
                "CELLOS_CGROUP_PARENT", f"cannot create cgroup leaf: {exc.strerror}"
            ) from None
        isolation = ["env-cleared", "fds-closed", "process-group", "private-workspace"]
        resources = {"workspace": record.workspace}
        if live.cgroup:
            isolation.append("cgroup-leaf")
            resources["cgroup"] = live.cgroup
        return CellHandle(
            cell_id=spec.id, backend=self.name, isolation=tuple(isolation), resources=resources
        )

    def run(self, handle: CellHandle, request: WorkloadRequest) -> WorkloadResult:
        live = self._live(handle)
        leaf = live.cgroup

        def on_spawn(pid: int) -> None:
            live.pgid = pid
            live.record.resources["pgid"] = pid
            live.record.save()

        options = SpawnOptions(
            cwd=live.record.workspace,
            log_dir=live.record.cell_dir,
            preexec=(lambda: cgroup.join_current_process(leaf)) if leaf else None,
            on_spawn=on_spawn,
        )
        return spawn_isolated_workload(request, options)

    def open_artifact(self, handle: CellHandle, path: str) -> BinaryIO:
        live = self._live(handle)
        workdir = live.working_directory
        if posixpath.isabs(path):
            norm = posixpath.normpath(path)
            if norm != workdir and not norm.startswith(workdir.rstrip("/") + "/"):
                raise ExportError(path, f"is outside the cell's workspace {workdir}")
            relative = posixpath.relpath(norm, workdir)
        else:
            relative = path
        return open_beneath(live.record.workspace, relative, path)

    def destroy(self, handle: CellHandle) -> TeardownReport:
        with _LIVE_LOCK:
            live = _LIVE.get(handle.cell_id)
            if live is None:
                raise HostError(
                    handle.cell_id, "cell is not live (already destroyed or never created)"
                )
        killed, residue = self._teardown(handle.cell_id, live)
        with _LIVE_LOCK:
            peers = len(_LIVE)
        return TeardownReport(
            cell_id=handle.cell_id,
            destroyed=not residue,
            peers_tracked_after=peers,
            processes_killed=killed,
            residue=tuple(residue),
        )

    # -- helpers -----------------------------------------------------------------------------

    def _live(self, handle: CellHandle) -> _LiveCell:
        live = _LIVE.get(handle.cell_id)
        if live is None:
            raise HostError(handle.cell_id, "cell is not live")
        return live

    def _teardown(self, cell_id: str, live: _LiveCell) -> tuple[int, list[str]]:
        killed = 0
        residue: list[str] = []
        if live.pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(live.pgid, signal.SIGKILL)
        if live.cgroup is not None:
            try:
                killed += cgroup.remove_leaf(live.cgroup)
            except OSError:
                residue.append(live.cgroup)
        residue += state.release(self.state_root, live.record)
        with _LIVE_LOCK:
            _LIVE.pop(cell_id, None)
        return killed, residue
