"""Signalling and enumerating every process of a sandboxed cell.

The process the supervisor starts is the launcher's outer process; inside, the launcher's pid 1
reaps orphans and the workload runs as pid 2 in its own session. So:

* graceful stop: SIGTERM to every process of the cell's pid namespace except its pid 1
  (signalling pid 1 or the outer process would end the cell at once, with no grace);
* hard stop: SIGKILL to the cgroup's members (when the cell has a cgroup) and to pid 1, whose
  death makes the kernel kill every process left in the namespace;
* "is anything left": the cgroup's members, else the namespace's members.
"""

from __future__ import annotations

import contextlib
import os
import signal

from cellos.hosts.cellos.cgroups import CellCgroup
from cellos.hosts.procfs import is_running, iter_procs, live_in_namespace, pid_namespace


class CellControl:
    def __init__(self, cgroup: CellCgroup | None) -> None:
        self.cgroup = cgroup
        self._init_pid: int | None = None
        self._pidns: str | None = None

    def _learn(self, outer: int) -> None:
        """Find the cell's pid 1 (the outer process's child) and its pid namespace."""
        if self._pidns is not None:
            return
        own = pid_namespace(os.getpid())
        for proc in iter_procs():
            if proc.ppid == outer:
                ns = pid_namespace(proc.pid)
                if ns is not None and ns != own:
                    self._init_pid, self._pidns = proc.pid, ns
                    return

    def terminate(self, pid: int) -> None:
        self._learn(pid)
        if self._pidns is None:
            self.kill(pid)  # no namespace found (the cell is already going away)
            return
        for member in live_in_namespace(self._pidns):
            if member != self._init_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member, signal.SIGTERM)

    def kill(self, pid: int) -> None:
        if is_running(pid):
            # Once the launcher has exited its pid 1 is gone too; no need to look for it.
            self._learn(pid)
        if self.cgroup is not None:
            self.cgroup.kill_all()
        for target in (self._init_pid, pid):
            if target is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(target, signal.SIGKILL)

    def workload_processes(self, pid: int) -> list[int]:
        """The workload's processes: the cell's, without the launcher and the cell's pid 1."""
        if is_running(pid):
            self._learn(pid)
        return [p for p in self.remaining(pid) if p not in (pid, self._init_pid)]

    def remaining(self, pid: int) -> list[int]:
        if self.cgroup is not None:
            return [p for p in self.cgroup.procs() if is_running(p)]
        if self._pidns is not None:
            return live_in_namespace(self._pidns)
        return [pid] if is_running(pid) else []
