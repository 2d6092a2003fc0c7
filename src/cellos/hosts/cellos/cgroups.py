"""Per-cell cgroups on cgroup v2, cgroup v1 or a hybrid of both, chosen at run time.

Each controller a cell needs (``pids`` always, for tracking and kill-all; ``memory`` and ``cpu``
when ``run.limits`` asks) is taken from the unified (v2) hierarchy when it offers it, else from
the v1 hierarchy that has it. A cell therefore owns one leaf per hierarchy used, named
``<parent>/cellos-<cellId>``; every leaf path is recorded before it is created.

The workload joins the leaves between fork and exec (:meth:`CellCgroup.join_current_process`),
so nothing of it ever runs outside them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Iterable

import msgspec

from cellos.core.spec import Limits

CONTROLLERS = ("pids", "memory", "cpu")
DEFAULT_PARENT = "cellos"


class Hierarchy(msgspec.Struct, frozen=True):
    mount: str
    version: int
    controllers: frozenset[str]


class CgroupLayout(msgspec.Struct, frozen=True):
    """Which hierarchy serves each controller on this host."""

    by_controller: dict[str, Hierarchy]

    def describe(self) -> dict[str, str]:
        return {c: f"v{h.version}:{h.mount}" for c, h in self.by_controller.items()}


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fstype, super options) of every cgroup mount, from mountinfo."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(rfields) >= 3 and rfields[0] in ("cgroup", "cgroup2"):
                found.append((fields[4], rfields[0], rfields[2]))
    return found


def favordynmods() -> tuple[str | None, bool]:
    """(the cgroup2 mount point or None, whether it is mounted with ``favordynmods``).

    Every cell's launcher joins the cell's cgroup by writing its pid to ``cgroup.procs``: a
    task migration, which takes the kernel's cgroup threadgroup lock for writing. Unless some
    cgroup2 mount has ``favordynmods`` (the kernel option is global), that write waits for an
    RCU grace period whenever no migration happened in the last ~20 ms: measured here 5-20 ms
    for the write, against 0.1 ms with the option, which costs forks and exits a little
    instead. ``cellos doctor`` reports it; ``scripts/setup.sh`` turns it on as root."""
    mount = None
    for point, fstype, options in _mounts():
        if fstype == "cgroup2":
            if "favordynmods" in options.split(","):
                return point, True
            mount = mount or point
    return mount, False


def detect() -> CgroupLayout:
    hierarchies: list[Hierarchy] = []
    for mount, fstype, options in _mounts():
        if fstype == "cgroup2":
            ctrls = frozenset(_read(os.path.join(mount, "cgroup.controllers")).split())
            hierarchies.append(Hierarchy(mount, 2, ctrls))
        else:
            hierarchies.append(
                Hierarchy(mount, 1, frozenset(options.split(",")) & set(CONTROLLERS))
            )
    by_controller: dict[str, Hierarchy] = {}
    for ctrl in CONTROLLERS:
        v2 = [h for h in hierarchies if h.version == 2 and ctrl in h.controllers]
        v1 = [h for h in hierarchies if h.version == 1 and ctrl in h.controllers]
        if v2 or v1:
            by_controller[ctrl] = (v2 or v1)[0]
    return CgroupLayout(by_controller)


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    """The file's text, "" when it cannot be read. Bytes decoded as UTF-8 (kernel files are
    ASCII): an "ascii" text file would load a codec module on every supervisor's start."""
    try:
        with open(path, "rb") as fh:
            return fh.read().decode()
    except (OSError, UnicodeDecodeError):
        return ""


def _counter(text: str, key: str) -> int:
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def needed_controllers(limits: Limits | None) -> list[str]:
    needed = ["pids"]
    if limits is not None and limits.memory_max_bytes is not None:
        needed.append("memory")
    if limits is not None and limits.cpu_max is not None:
        needed.append("cpu")
    return needed


def parent_relative(parent: str | None, layout: CgroupLayout) -> str:
    """``CELLOS_CGROUP_PARENT`` may be a path inside any hierarchy or a relative name."""
    if not parent:
        return DEFAULT_PARENT
    for hierarchy in layout.by_controller.values():
        mount = hierarchy.mount.rstrip("/") + "/"
        if parent.startswith(mount):
            return parent[len(mount) :].strip("/") or DEFAULT_PARENT
    return parent.strip("/")


class CellCgroup(msgspec.Struct):
    """The leaves of one cell; ``leaves`` maps controller -> leaf directory."""

    leaves: dict[str, str]
    versions: dict[str, int] = msgspec.field(default_factory=dict)

    @property
    def paths(self) -> list[str]:
        return sorted(set(self.leaves.values()))

    @classmethod
    def plan(
        cls, layout: CgroupLayout, parent: str, cell_id: str, controllers: Iterable[str]
    ) -> CellCgroup:
        leaves, versions = {}, {}
        for ctrl in controllers:
            hierarchy = layout.by_controller[ctrl]
            leaves[ctrl] = os.path.join(hierarchy.mount, parent, f"cellos-{cell_id}")
            versions[ctrl] = hierarchy.version
        return cls(leaves, versions)

    def create(self, limits: Limits | None, pids_overhead: int = 0) -> None:
        """Make the leaves and apply ``limits``; ``pids_overhead`` processes that are not the
        workload's (a launcher's) are added to ``pidsMax``, which counts the workload's."""
        for path in self.paths:
            if os.path.isdir(path):
                remove_leaf(path)  # left behind by a crashed run of the same id
            parent = os.path.dirname(path)
            os.makedirs(parent, exist_ok=True)
            if any(self.versions[c] == 2 for c, p in self.leaves.items() if p == path):
                _enable_v2_controllers(parent, [c for c, p in self.leaves.items() if p == path])
            os.mkdir(path)
        if limits is not None:
            self._apply(limits, pids_overhead)

    def _apply(self, limits: Limits, pids_overhead: int) -> None:
        if limits.pids_max is not None:
            pids_max = str(limits.pids_max + pids_overhead)
            _write(os.path.join(self.leaves["pids"], "pids.max"), pids_max)
        if limits.memory_max_bytes is not None:
            path, size = self.leaves["memory"], str(limits.memory_max_bytes)
            if self.versions["memory"] == 2:
                _write(os.path.join(path, "memory.max"), size)
                with contextlib.suppress(FileNotFoundError):
                    _write(os.path.join(path, "memory.swap.max"), "0")
            else:
                _write(os.path.join(path, "memory.limit_in_bytes"), size)
                # Without this the workload could spill past the limit into swap.
                with contextlib.suppress(FileNotFoundError):
                    _write(os.path.join(path, "memory.memsw.limit_in_bytes"), size)
        if limits.cpu_max is not None:
            path = self.leaves["cpu"]
            quota, period = limits.cpu_max.quota_micros, limits.cpu_max.period_micros
            if self.versions["cpu"] == 2:
                _write(os.path.join(path, "cpu.max"), f"{quota} {period}")
            else:
                _write(os.path.join(path, "cpu.cfs_period_us"), str(period))
                _write(os.path.join(path, "cpu.cfs_quota_us"), str(quota))

    def procs_files(self) -> tuple[str, ...]:
        """The leaves' ``cgroup.procs`` files: the launcher writes its pid into each before it
        creates any namespace, so nothing of the cell ever runs outside the leaves."""
        return tuple(os.path.join(path, "cgroup.procs") for path in self.paths)

    def procs(self) -> list[int]:
        return pids_in(self.leaves["pids"])

    def kill_all(self) -> None:
        for pid in self.procs():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def pressure(self) -> dict[str, int]:
        """Kernel counters that explain an abnormal end: OOM kills and pids-limit hits."""
        counters = {"oomKills": 0, "pidsLimitHits": 0}
        if "memory" in self.leaves:
            path = self.leaves["memory"]
            if self.versions["memory"] == 2:
                counters["oomKills"] = _counter(
                    _read(os.path.join(path, "memory.events")), "oom_kill"
                )
            else:
                counters["oomKills"] = _counter(
                    _read(os.path.join(path, "memory.oom_control")), "oom_kill"
                )
        counters["pidsLimitHits"] = _counter(
            _read(os.path.join(self.leaves["pids"], "pids.events")), "max"
        )
        return counters

    def remove(self) -> tuple[int, list[str]]:
        """Kill what is left and remove every leaf; return (processes killed, residue)."""
        killed, residue = 0, []
        for path in self.paths:
            try:
                killed = max(killed, remove_leaf(path))
            except OSError:
                residue.append(path)
        return killed, residue


def _enable_v2_controllers(parent: str, controllers: list[str]) -> None:
    """cgroup v2 only offers a controller to children whose parent enabled it."""
    wanted = [c for c in controllers if c in CONTROLLERS]
    chain = []
    path = parent
    while os.path.exists(os.path.join(path, "cgroup.subtree_control")):
        chain.append(path)
        up = os.path.dirname(path)
        if up == path or not os.path.exists(os.path.join(up, "cgroup.subtree_control")):
            break
        path = up
    for path in reversed(chain):
        enabled = set(_read(os.path.join(path, "cgroup.subtree_control")).split())
        for ctrl in wanted:
            if ctrl not in enabled:
                with contextlib.suppress(OSError):
                    _write(os.path.join(path, "cgroup.subtree_control"), f"+{ctrl}")


def pids_in(path: str) -> list[int]:
    return [
        int(line) for line in _read(os.path.join(path, "cgroup.procs")).split() if line.isdigit()
    ]


def remove_leaf(path: str, timeout: float = 5.0) -> int:
    """Kill everything in a leaf and rmdir it; return how many processes were killed."""
    killed = 0
    deadline = time.monotonic() + timeout
    kill_file = os.path.join(path, "cgroup.kill")
    while True:
        # The usual leaf is already empty: one rmdir, no read of its members.
        try:
            os.rmdir(path)
            return killed
        except FileNotFoundError:
            return killed
        except OSError as exc:
            # EBUSY until the members are killed and fully gone.
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
        members = pids_in(path)
        if members and os.path.exists(kill_file):
            with contextlib.suppress(OSError):
                _write(kill_file, "1")
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed = max(killed, len(members))
        time.sleep(0.0005)


def usable(layout: CgroupLayout, parent: str, controllers: Iterable[str]) -> str | None:
    """None when leaves for ``controllers`` can be made under ``parent``; else the reason."""
    for ctrl in controllers:
        hierarchy = layout.by_controller.get(ctrl)
        if hierarchy is None:
            return f"no cgroup hierarchy offers the {ctrl!r} controller"
        base = os.path.join(hierarchy.mount, parent)
        probe = base if os.path.isdir(base) else hierarchy.mount
        if not os.access(probe, os.W_OK):
            return f"cgroup directory {probe} is not writable by this user"
    return None
