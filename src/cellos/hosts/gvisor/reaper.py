"""The ``gvisor`` backend's part of reaping a dead cell (see :mod:`cellos.hosts.reaper`):
runsc itself (if it is still there), the sandbox and gofer of its container, its root."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Any

from cellos.hosts.gvisor import evidence
from cellos.hosts.gvisor.backend import delete_container, runsc_argv
from cellos.hosts.secret_files import unmount_host_tmpfs


def _is_runsc_of(pid: int, container_id: str) -> bool:
    """A recorded pid may have been reused since the crash: only kill that container's runsc."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return container_id.encode() in fh.read().split(b"\0")
    except OSError:
        return False


def reap_resources(record: dict[str, Any]) -> tuple[list[str], list[str]]:
    runsc, root, container = record.get("runsc"), record.get("runscRoot"), record.get("containerId")
    if not (isinstance(runsc, str) and isinstance(root, str) and isinstance(container, str)):
        return [], []  # died before naming a container: nothing of runsc exists
    pid = record.get("pid")
    if isinstance(pid, int) and pid > 1 and _is_runsc_of(pid, container):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    platform = record.get("platform")
    argv = runsc_argv(runsc, root, platform if isinstance(platform, str) else None)
    if os.path.isdir(root):
        subprocess.run(
            [*argv, "kill", "--all", container, "KILL"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    residue = delete_container(argv, root, container)
    secrets = record.get("secretsMount")
    if isinstance(secrets, str):
        # The host tmpfs of a cell's secret files (runtimeBroker): emptied and unmounted.
        residue += unmount_host_tmpfs(secrets)
    removed = [] if residue else [f"runsc:{container}"]
    # The sandbox's cgroups are named after the container (``/cellos/<id>`` in every
    # hierarchy): what runsc and CellOS made there goes too.
    try:
        left = evidence.SandboxCgroups(container, None).remove()
    except OSError as exc:
        left = [f"cgroup:/cellos/{container}: {exc.strerror}"]
    residue += left
    return removed, residue
