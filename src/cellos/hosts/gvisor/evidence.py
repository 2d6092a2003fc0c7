"""Why a gVisor cell ended: OOM kills and pids-limit hits, read where they are observable.

* **Cgroups.** Every sandbox gets an explicit ``linux.cgroupsPath``,
  ``/cellos/<container id>`` in every hierarchy. The whole sandbox (runsc, gofer, Sentry and
  the workload's memory, which the Sentry holds) is charged there. runsc removes the cgroups
  it creates when the container ends cleanly (and with them the counters), but not when it
  is killed (timeout, TTL) or fails; a cgroup that already exists it neither configures nor
  removes. So CellOS creates the memory (and cpu) leaf itself, applies ``run.limits`` to it,
  reads ``oom_kill`` (``memory.oom_control`` on v1, ``memory.events`` on v2) after the run,
  and then removes the container's cgroup from every hierarchy, whoever made it.
  An OOM kill shows as the workload dying of SIGKILL (137), or, when the host kernel picks
  the Sentry, as the sandbox failing.
* **Processes.** ``pidsMax`` is ``RLIMIT_NPROC`` inside the Sentry (see ``bundle.py``): a
  host pids limit would count the Sentry's threads (~40 for an idle sandbox, ~10 per guest
  process under ptrace), and the Go runtime aborts when it cannot create one. The Sentry
  has no counter of refused forks, so runsc's syscall trace of ``clone``/``fork``/``vfork``
  is read from a FIFO (never stored: a fork loop could fill a disk) and each one that failed
  with ``EAGAIN`` is a pids-limit hit, as ``pids.events max`` counts them on the host.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import threading

import msgspec

from cellos.core.spec import Limits
from cellos.hosts.cellos import cgroups

#: An strace exit line of the Sentry for a process-creating syscall that failed with EAGAIN.
_CLONE_EAGAIN = re.compile(
    rb"\] \[\s*\d+:\s*\d+\] .{0,64} X (?:clone3?|v?fork)\(.*\) = .* errno=11 \("
)
STRACE_SYSCALLS = "clone,clone3,fork,vfork"


def cgroup_mounts() -> list[str]:
    """Every cgroup hierarchy's mount point (v1 and v2)."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            if right.split()[:1] in (["cgroup"], ["cgroup2"]):
                found.append(left.split()[4])
    return found


class SandboxCgroups:
    """The sandbox's host cgroups: the leaves CellOS makes (memory, and cpu when limited)
    and, after the run, every hierarchy's cgroup of the container."""

    def __init__(self, container_id: str, limits: Limits | None) -> None:
        layout = cgroups.detect()
        wanted = [c for c in cgroups.needed_controllers(limits) if c != "pids"]
        missing = [c for c in wanted if c not in layout.by_controller]
        if missing:
            raise OSError(0, f"no cgroup hierarchy offers {', '.join(missing)}")
        #: What the bundle's ``linux.cgroupsPath`` says: the same name in every hierarchy.
        self.cgroups_path = f"/{cgroups.DEFAULT_PARENT}/{container_id}"
        self.cgroup = cgroups.CellCgroup(
            {c: layout.by_controller[c].mount + self.cgroups_path for c in wanted},
            {c: layout.by_controller[c].version for c in wanted},
        )
        self.limits = msgspec.structs.replace(limits, pids_max=None) if limits else None

    def create(self) -> None:
        try:
            self.cgroup.create(self.limits)
        except OSError:
            self.remove()
            raise

    def oom_kills(self) -> int:
        path = self.cgroup.leaves.get("memory")
        if path is None:
            return 0
        if self.cgroup.versions["memory"] == 2:
            text, key = _read(os.path.join(path, "memory.events")), "oom_kill"
        else:
            text, key = _read(os.path.join(path, "memory.oom_control")), "oom_kill"
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
        return 0

    def remove(self) -> list[str]:
        """Kill what is left in the container's cgroups and remove them; return residue."""
        residue = self.cgroup.remove()[1]
        for mount in cgroup_mounts():
            path = mount + self.cgroups_path
            if os.path.isdir(path) and path not in self.cgroup.leaves.values():
                try:
                    cgroups.remove_leaf(path)
                except OSError:
                    residue.append(path)
        return residue


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read()
    except OSError:
        return ""


class CloneFailures:
    """Counts the Sentry's failed process creations from runsc's debug log, a FIFO."""

    def __init__(self, fifo: str) -> None:
        self.fifo = fifo
        os.mkfifo(fifo, 0o600)
        self._read_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        # Our own writer keeps the FIFO from reading EOF before runsc opens it.
        self._write_fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop = threading.Event()
        self._partial = b""
        self.count = 0
        self._thread = threading.Thread(target=self._loop, name="gvisor-strace", daemon=True)
        self._thread.start()

    def runsc_flags(self) -> list[str]:
        return ["--strace", f"--strace-syscalls={STRACE_SYSCALLS}", f"--debug-log={self.fifo}"]

    def _consume(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-8192:]
        self.count += sum(1 for line in lines if _CLONE_EAGAIN.search(line))

    def _drain(self) -> bool:
        """Read what is there; False at EOF."""
        while True:
            try:
                data = os.read(self._read_fd, 1 << 16)
            except BlockingIOError:
                return True
            if not data:
                return False
            self._consume(data)

    def _loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._read_fd], [], [], 0.2)
            if ready and not self._drain():
                return

    def finish(self) -> int:
        """Stop reading (runsc has exited), count what is left, remove the FIFO."""
        self._stop.set()
        self._thread.join()
        os.close(self._write_fd)
        self._drain()
        os.close(self._read_fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.fifo)
        return self.count
