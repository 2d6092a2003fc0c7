"""The ``gvisor`` backend: each cell is one runsc container.

``runsc --root <state> --network=none run --bundle <bundle> <container-id>`` with a unique
container id per run; stdout/stderr are the runsc process's pipes; the exit status is the
workload's. On timeout/TTL: ``runsc kill --all <id> TERM``, then ``KILL``; teardown runs
``runsc delete --force`` and removes the state directory and the bundle.

Layout of a cell (under the backend's state root)::

    <root>/<cellId>-<rand>/bundle/config.json
    <root>/<cellId>-<rand>/bundle/rootfs/        skeleton root (mount points, symlinks)
    <root>/<cellId>-<rand>/workspace/            bound read-write at run.workingDirectory
    <root>/<cellId>-<rand>/runsc/                runsc's --root (container state)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, replace
from typing import BinaryIO

from cellos.core.errors import HostError, PolicyRefused
from cellos.core.ports import CellHandle, TeardownReport, WorkloadRequest, WorkloadResult
from cellos.core.spec import CellSpec
from cellos.hosts.artifacts import open_in_workspace
from cellos.hosts.gvisor.bundle import BundleConfig, build_config, host_binds, host_symlinks
from cellos.hosts.live import LiveCells
from cellos.hosts.process import (
    ENV_PROGRAM,
    ProcessGroupControl,
    SpawnOptions,
    spawn_isolated_workload,
)


def default_state_root() -> str:
    return "/run/cellos-gvisor" if os.geteuid() == 0 else f"/tmp/cellos-gvisor-{os.geteuid()}"


@dataclass
class _LiveCell:
    spec: CellSpec
    cell_dir: str
    container_id: str

    @property
    def bundle(self) -> str:
        return os.path.join(self.cell_dir, "bundle")

    @property
    def workspace(self) -> str:
        return os.path.join(self.cell_dir, "workspace")

    @property
    def runsc_root(self) -> str:
        return os.path.join(self.cell_dir, "runsc")


_LIVE: LiveCells[_LiveCell] = LiveCells()


class RunscControl:
    """Signals go through runsc (they must reach processes inside the sandbox's kernel)."""

    def __init__(self, runsc: list[str], container_id: str) -> None:
        self.runsc = runsc
        self.container_id = container_id
        self._group = ProcessGroupControl()

    def _kill(self, sig: str) -> None:
        subprocess.run(
            [*self.runsc, "kill", "--all", self.container_id, sig],
            capture_output=True,
            timeout=10,
            check=False,
        )

    def terminate(self, pid: int) -> None:
        self._kill("TERM")

    def kill(self, pid: int) -> None:
        if self._group.remaining(pid):
            self._kill("KILL")
        # The sandbox, gofer and runsc itself share the launcher's process group.
        self._group.kill(pid)

    def remaining(self, pid: int) -> list[int]:
        return self._group.remaining(pid)


class GvisorBackend:
    name = "gvisor"

    def __init__(
        self,
        *,
        state_root: str | None = None,
        rootfs: str | None = None,
        runsc: str | None = None,
        platform: str | None = None,
    ) -> None:
        found = shutil.which(runsc or "runsc")
        if found is None:
            raise HostError(
                "CELLOS_RUNSC",
                "gVisor's runsc is not installed; run scripts/setup.sh or apt-get install runsc",
            )
        if os.geteuid() != 0:
            raise PolicyRefused(
                "CELLOS_CELL_BACKEND",
                "the gvisor backend needs root here "
                "(Debian's runsc cannot run rootless with a user namespace)",
            )
        if rootfs is not None and not os.path.isdir(rootfs):
            raise PolicyRefused("CELLOS_ROOTFS", f"{rootfs!r} is not a directory")
        self.runsc = found
        self.platform = platform
        self.rootfs = rootfs
        self.state_root = state_root or default_state_root()

    def _runsc(self, live: _LiveCell) -> list[str]:
        argv = [self.runsc, "--root", live.runsc_root]
        if self.platform:
            argv.append(f"--platform={self.platform}")
        return argv

    # -- lifecycle ---------------------------------------------------------------------------

    def create(self, spec: CellSpec) -> CellHandle:
        if spec.authority.egress_rules or spec.authority.dns_authority is not None:
            # Refused rather than run without the network the document asks for. Debian's
            # runsc (2022) will not attach its netstack to a prepared namespace here
            # ("cannot run with network enabled in root network namespace").
            raise PolicyRefused(
                "spec.authority.egressRules",
                "egress authority is not available on the gvisor backend in this "
                "build (use the cellos backend)",
            )
        # runsc names its control socket after the container id, under a root inside the cell
        # dir named the same: a socket path has 108 bytes, a cell id up to 128 characters.
        container_id = f"cellos-{spec.id[:24]}-{uuid.uuid4().hex[:12]}"
        cell_dir = os.path.join(self.state_root, container_id)
        live = _LIVE.add(
            spec.id, lambda: _LiveCell(spec=spec, cell_dir=cell_dir, container_id=container_id)
        )
        try:
            os.makedirs(self.state_root, mode=0o711, exist_ok=True)
            os.mkdir(cell_dir, 0o700)
            for sub in ("bundle", "workspace", "runsc"):
                os.mkdir(os.path.join(cell_dir, sub), 0o700)
            if self.rootfs is None:
                self._skeleton(os.path.join(live.bundle, "rootfs"), spec)
        except OSError as exc:
            self._teardown(live)
            raise HostError(
                "CELLOS_STATE_DIR", f"cannot prepare the bundle: {exc.strerror}"
            ) from None
        isolation = [
            "gvisor:runsc",
            "ns:pid",
            "ns:mount",
            "ns:ipc",
            "ns:uts",
            "ns:net",
            "network:none",
            "root:read-only",
            "caps:none",
            "no_new_privs",
            "env:declared-only",
            "workspace:private",
        ]
        if spec.limits is not None:
            isolation.append("limits:oci-resources")
        return CellHandle(
            cell_id=spec.id,
            backend=self.name,
            isolation=tuple(isolation),
            resources={
                "containerId": container_id,
                "bundle": live.bundle,
                "workspace": live.workspace,
            },
        )

    def _skeleton(self, root: str, spec: CellSpec) -> None:
        """Mount points and symlinks of a read-only root built from host binds."""
        os.mkdir(root, 0o755)
        for path, target in host_symlinks().items():
            os.makedirs(os.path.join(root, os.path.dirname(path).lstrip("/")), exist_ok=True)
            os.symlink(target, os.path.join(root, path.lstrip("/")))
        points = [*host_binds(), "/proc", "/dev", "/tmp", spec.working_directory]
        for path in points:
            dest = os.path.join(root, path.lstrip("/"))
            if os.path.isfile(path):
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with open(dest, "w", encoding="utf-8"):
                    pass
            else:
                os.makedirs(dest, exist_ok=True)

    def run(self, handle: CellHandle, request: WorkloadRequest) -> WorkloadResult:
        live = self._live(handle)
        rootfs = self.rootfs or os.path.join(live.bundle, "rootfs")
        config = BundleConfig(
            rootfs=rootfs, workspace=live.workspace, host_binds=() if self.rootfs else host_binds()
        )
        argv = list(request.argv)
        if "HOME" not in request.env:
            # runsc sets HOME=/ when the bundle has none; the environment must be exactly the
            # declared one, so env(1) removes it again.
            argv = [ENV_PROGRAM, "-u", "HOME", "--", *argv]
        bundle = build_config(live.spec, config, argv=argv, env=request.env)
        path = os.path.join(live.bundle, "config.json")
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(bundle, fh)
        runsc = self._runsc(live)
        command = [*runsc, "--network=none", "run", "--bundle", live.bundle, live.container_id]
        # runsc itself needs no environment; the workload's is in config.json.
        runsc_request = WorkloadRequest(
            argv=request.argv,
            env={},
            working_directory="/",
            deadline_seconds=request.deadline_seconds,
            graceful_shutdown_seconds=request.graceful_shutdown_seconds,
        )
        result = spawn_isolated_workload(
            runsc_request,
            SpawnOptions(
                cwd="/",
                log_dir=live.cell_dir,
                command=command,
                control=RunscControl(runsc, live.container_id),
            ),
        )
        return _explain(result)

    def open_artifact(self, handle: CellHandle, path: str) -> BinaryIO:
        live = self._live(handle)
        return open_in_workspace(live.workspace, live.spec.working_directory, path)

    def destroy(self, handle: CellHandle) -> TeardownReport:
        live = _LIVE.get(handle.cell_id)
        residue = self._teardown(live)
        peers = len(_LIVE)
        return TeardownReport(
            cell_id=handle.cell_id,
            destroyed=not residue,
            peers_tracked_after=peers,
            residue=tuple(residue),
        )

    # -- helpers -----------------------------------------------------------------------------

    def _live(self, handle: CellHandle) -> _LiveCell:
        return _LIVE.get(handle.cell_id)

    def _teardown(self, live: _LiveCell) -> list[str]:
        residue: list[str] = []
        if os.path.isdir(live.runsc_root) and os.listdir(live.runsc_root):
            subprocess.run(
                [*self._runsc(live), "delete", "--force", live.container_id],
                capture_output=True,
                timeout=30,
                check=False,
            )
            listing = subprocess.run(
                [*self._runsc(live), "list", "--quiet"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if listing.stdout.strip():
                residue.append(f"runsc container {live.container_id}")
        shutil.rmtree(live.cell_dir, ignore_errors=True)
        if os.path.lexists(live.cell_dir):
            residue.append(live.cell_dir)
        _LIVE.remove(live.spec.id)
        return residue


def _explain(result: WorkloadResult) -> WorkloadResult:
    """runsc's own failures and env(1)'s exec failures are spawn errors, not exit codes."""
    err = result.stderr
    prefix = ENV_PROGRAM.encode() + b": "
    if result.exit_code in (126, 127) and err.startswith(prefix):
        first, _, rest = err.partition(b"\n")
        message = first[len(prefix) :].decode(errors="replace")
        return replace(
            result,
            exit_code=None,
            spawn_error=f"cannot start: {message}",
            reason="spawn_failed",
            stderr=rest,
        )
    if (
        result.exit_code is not None
        and result.exit_code != 0
        and (b"running container: " in err or b"creating container: " in err)
        and err.count(b"\n") <= 2
    ):
        message = err.decode(errors="replace").strip().splitlines()[-1]
        return replace(
            result,
            exit_code=None,
            spawn_error=f"cannot start: {message}",
            reason="spawn_failed",
            stderr=b"",
        )
    return result
