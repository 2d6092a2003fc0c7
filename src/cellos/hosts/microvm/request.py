"""What a microVM cell's document becomes in the guest, and what the guest's report means.

Pure functions used by the qemu backend's ``create``/``run``/``open_artifact``:

* the working directory is checked before anything boots (the guest creates it if missing,
  but it cannot be one of the guest's own system directories);
* artifact paths are resolved as for the other isolating backends: a relative path is
  relative to the working directory (``hosts/artifacts.py``);
* ``run.limits`` become the settings of the workload's cgroup inside the guest;
* the guest's ``CELLOS:LIMITS`` counters become ``reason``/``limits`` of the result, as the
  ``cellos`` backend reports its cgroup's counters.
"""

from __future__ import annotations

import posixpath

from msgspec.structs import replace

from cellos.core.ports import WorkloadResult
from cellos.core.spec import CellSpec, Limits
from cellos.hosts.host_root import HOSTNAME_MAX, refuse_reserved_working_directory
from cellos.hosts.limit_reasons import with_limit_reason

#: Guest paths the workload's working directory may not be (or be under): the guest's
#: kernel filesystems and the initramfs's programs.
GUEST_RESERVED = ("/proc", "/sys", "/dev", "/bin", "/usr", "/init")


def check_working_directory(spec: CellSpec) -> None:
    """PolicyRefused naming ``spec.run.workingDirectory`` when the guest cannot provide it."""
    refuse_reserved_working_directory(
        spec.working_directory, list(GUEST_RESERVED), "the microVM guest"
    )


def guest_hostname(spec: CellSpec) -> str:
    return spec.id[:HOSTNAME_MAX]


def guest_artifact_path(spec: CellSpec, path: str) -> str | None:
    """The absolute guest path of an artifact, or None when a relative path leaves the
    working directory (``..``) or names nothing."""
    if posixpath.isabs(path):
        return posixpath.normpath(path)
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return posixpath.join(spec.working_directory, *parts)


def cgroup_settings(limits: Limits | None) -> dict[str, str]:
    """The workload cgroup's files in the guest (cgroup v2) for ``run.limits``."""
    settings: dict[str, str] = {}
    if limits is not None and limits.memory_max_bytes is not None:
        settings["memory.max"] = str(limits.memory_max_bytes)
    if limits is not None and limits.pids_max is not None:
        settings["pids.max"] = str(limits.pids_max)
    return settings


def explain(result: WorkloadResult, counters: dict[str, int] | None) -> WorkloadResult:
    """Spawn errors have no exit code; the guest cgroup's counters explain a limit kill."""
    if result.spawn_error:
        return replace(result, exit_code=None, reason="spawn_failed")
    return with_limit_reason(result, counters)
