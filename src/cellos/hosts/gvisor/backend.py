"""The ``gvisor`` backend: each cell is one runsc container.

``runsc --root <state> --network=none run --bundle <bundle> <container-id>`` with a unique
container id per run (with egress authority ``--network=host`` inside the cell's netns, see
below); stdout/stderr are the runsc process's pipes; the exit
status is the workload's. On timeout/TTL: ``runsc kill --all <id> TERM``, then ``KILL``;
teardown runs
``runsc delete --force`` and removes the state directory and the bundle.

Layout of a cell (under the cell-state store's root, :mod:`cellos.hosts.state`)::

    cells/<cellId>/record.json              names the runsc binary, root and container id
    cells/<cellId>/bundle/config.json
    cells/<cellId>/bundle/rootfs/           skeleton root (mount points, symlinks)
    cells/<cellId>/workspace/               bound read-write at run.workingDirectory
    runsc/<containerId>/                    runsc's --root (container state; a short path,
                                            because runsc's socket paths must fit 108 bytes)

Egress authority: the cell's scope (netns, veth, nft table, DNS and L7 proxies) is the one the
``cellos`` backend builds (:mod:`cellos.network.cell_egress`). Debian's runsc (2022) refuses
``--network=sandbox`` on kernels >= 6 ("cannot run with network enabled in root network
namespace": its root-netns test looks for ``/proc/sys/net/core/rmem_default``, which such
kernels show in every netns), so the bundle names the cell's netns (``linux.namespaces``
network ``path``), which the sandbox joins, and runsc runs with ``--network=host``: the sandbox
sees exactly the cell's veth and loopback, and the cell's nft table governs every packet. The
trade-off, stated in the evidence (``gvisor:network=host-in-cell-netns``): socket syscalls are
served by the host kernel (inside the cell's netns), not by gVisor's own netstack.

runsc dies with its supervisor (``PR_SET_PDEATHSIG``; runsc's attached sandbox and gofer die
with runsc), and ``cellos reap`` deletes what is left (:mod:`cellos.hosts.gvisor.reaper`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from msgspec.structs import replace

from cellos.core import isolation as iso
from cellos.core.errors import HostError, PolicyRefused
from cellos.core.ports import CellHandle, TeardownReport, WorkloadRequest, WorkloadResult
from cellos.core.spec import CellSpec
from cellos.hosts.artifacts import open_in_workspace
from cellos.hosts.gvisor import evidence
from cellos.hosts.gvisor.bundle import BundleConfig, build_config, host_binds, host_symlinks
from cellos.hosts.limit_reasons import with_limit_reason
from cellos.hosts.live import LiveCells, StoredBackend, create_network_or_undo
from cellos.hosts.process import (
    ENV_PROGRAM,
    HostCommand,
    ProcessGroupControl,
    SpawnOptions,
    run_host_command,
)
from cellos.hosts.secret_files import (
    SECRETS_DIRECTORY,
    HostLease,
    mount_host_tmpfs,
    unmount_host_tmpfs,
    write_files,
)
from cellos.hosts.state import CellState, CellStore

if TYPE_CHECKING:
    from cellos.network.cell_egress import CellEgress


@dataclass
class _LiveCell:
    spec: CellSpec
    state: CellState
    container_id: str
    runsc_root: str
    egress: CellEgress | None = None

    @property
    def cell_dir(self) -> str:
        return self.state.cell_dir

    @property
    def bundle(self) -> str:
        return self.state.path("bundle")

    @property
    def workspace(self) -> str:
        return self.state.path("workspace")

    @property
    def secrets(self) -> str:
        """Host tmpfs of the secret files (``runtimeBroker``), bound read-only into the cell."""
        return self.state.path("secrets")


_LIVE: LiveCells[_LiveCell] = LiveCells()
#: The workload runs as root of gVisor's own kernel (the bundle's default user).
WORKLOAD_UID = WORKLOAD_GID = 0


def runsc_argv(runsc: str, root: str, platform: str | None) -> list[str]:
    argv = [runsc, "--root", root]
    if platform:
        argv.append(f"--platform={platform}")
    return argv


def delete_container(runsc: list[str], root: str, container_id: str) -> list[str]:
    """``runsc delete --force`` the container (sandbox, gofer, its cgroups) and remove its
    root; return what is left."""
    residue: list[str] = []
    if os.path.isdir(root) and os.listdir(root):
        subprocess.run(
            [*runsc, "delete", "--force", container_id],
            capture_output=True,
            timeout=30,
            check=False,
        )
        listing = subprocess.run(
            [*runsc, "list", "--quiet"], capture_output=True, text=True, timeout=30, check=False
        )
        if listing.stdout.strip():
            residue.append(f"runsc:{container_id}")
    shutil.rmtree(root, ignore_errors=True)
    if os.path.lexists(root):
        residue.append(f"dir:{root}")
    return residue


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


class GvisorBackend(StoredBackend):
    name = "gvisor"

    def __init__(
        self,
        *,
        state_root: str | None = None,
        rootfs: str | None = None,
        runsc: str | None = None,
        platform: str | None = None,
        network_pool: str | None = None,
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
        self.store = CellStore(state_root)
        #: None: the default pool (imported only for cells with egress authority).
        self.network_pool = network_pool

    def _runsc(self, live: _LiveCell) -> list[str]:
        return runsc_argv(self.runsc, live.runsc_root, self.platform)

    # -- lifecycle ---------------------------------------------------------------------------

    def create(self, spec: CellSpec) -> CellHandle:
        egress_wanted = bool(spec.authority.egress_rules)
        # runsc names its control socket after the container id, under a root inside the cell
        # dir named the same: a socket path has 108 bytes, a cell id up to 128 characters.
        container_id = f"cellos-{spec.id[:24]}-{uuid.uuid4().hex[:12]}"
        runsc_root = os.path.join(self.store.root, "runsc", container_id)

        def make(cell: CellState) -> _LiveCell:
            live = _LiveCell(
                spec=spec, state=cell, container_id=container_id, runsc_root=runsc_root
            )
            try:
                for sub in (live.bundle, live.workspace):
                    os.mkdir(sub, 0o700)
                os.makedirs(runsc_root, mode=0o700)
                if self.rootfs is None:
                    self._skeleton(
                        os.path.join(live.bundle, "rootfs"),
                        spec,
                        resolv=egress_wanted and spec.authority.dns_authority is not None,
                    )
            except OSError as exc:
                shutil.rmtree(runsc_root, ignore_errors=True)
                raise HostError(
                    "CELLOS_STATE_DIR", f"cannot prepare the bundle: {exc.strerror}"
                ) from None
            return live

        # The record names runsc's root and container before either exists.
        record = {
            "runsc": self.runsc,
            "runscRoot": runsc_root,
            "containerId": container_id,
            "platform": self.platform,
        }
        live = self.open_cell(_LIVE, spec, record, make)
        if egress_wanted:
            create_network_or_undo(
                lambda: self._create_network(spec, live), lambda: self._teardown(live)
            )
        isolation = [
            iso.GVISOR_RUNSC,
            iso.NS_PID,
            iso.NS_MOUNT,
            iso.NS_IPC,
            iso.NS_UTS,
            iso.NS_NET,
            *(
                (iso.NETWORK_EGRESS_ALLOWLIST, iso.GVISOR_NETWORK_HOST_IN_CELL_NETNS)
                if live.egress is not None
                else (iso.NETWORK_LOOPBACK_ONLY,)
            ),
            iso.ROOT_READ_ONLY,
            iso.CAPS_NONE,
            iso.NO_NEW_PRIVS,
            iso.ENV_DECLARED_ONLY,
            iso.WORKSPACE_PRIVATE,
        ]
        limits = spec.limits
        if limits is not None:
            # OCI linux.resources, which runsc applies to the sandbox's cgroups.
            isolation += iso.limit_features(
                limits.memory_max_bytes, limits.pids_max, limits.cpu_max
            )
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

    def _create_network(self, spec: CellSpec, live: _LiveCell) -> None:
        """The cell's egress scope, recorded before it exists; runsc runs inside its netns."""
        from cellos.network.cell_egress import CellEgress

        CellEgress.open(spec, live, self.store.root, self.network_pool)

    def network_events(self, handle: CellHandle) -> list[tuple[str, dict[str, Any]]]:
        egress = self._live(handle).egress
        return egress.events() if egress is not None else []

    def _skeleton(self, root: str, spec: CellSpec, *, resolv: bool = False) -> None:
        """Mount points and symlinks of a read-only root built from host binds."""
        os.mkdir(root, 0o755)
        for path, target in host_symlinks().items():
            os.makedirs(os.path.join(root, os.path.dirname(path).lstrip("/")), exist_ok=True)
            os.symlink(target, os.path.join(root, path.lstrip("/")))
        points = [*host_binds(), "/proc", "/dev", "/tmp", spec.working_directory]
        if resolv:
            os.makedirs(os.path.join(root, "etc"), exist_ok=True)
            with open(os.path.join(root, "etc", "resolv.conf"), "w", encoding="ascii"):
                pass
        if spec.run is not None and spec.run.secrets_as_files:
            points.append(SECRETS_DIRECTORY)
        for path in points:
            dest = os.path.join(root, path.lstrip("/"))
            if os.path.isfile(path):
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with open(dest, "w", encoding="utf-8"):
                    pass
            else:
                os.makedirs(dest, exist_ok=True)

    def secret_files_refusal(self, spec: CellSpec) -> str | None:
        """The secrets' directory is bound onto /run/secrets: a rootfs directory (read-only,
        never changed) must already have that mount point."""
        if self.rootfs and not os.path.isdir(
            os.path.join(self.rootfs, SECRETS_DIRECTORY.lstrip("/"))
        ):
            return f"CELLOS_ROOTFS {self.rootfs} has no {SECRETS_DIRECTORY} directory to bind on"
        return None

    def _prepare_secrets(self, live: _LiveCell, request: WorkloadRequest) -> str | None:
        """A tmpfs under the cell's state directory (0700: only root reaches it) holding one
        file per secret (0400, the workload's uid); recorded before it is mounted."""
        if not request.secret_files:
            return None
        live.state.record["secretsMount"] = live.secrets
        try:
            live.state.save()
            mount_host_tmpfs(live.secrets, request.secret_files)
            write_files(live.secrets, request.secret_files, WORKLOAD_UID, WORKLOAD_GID)
        except OSError as exc:
            unmount_host_tmpfs(live.secrets)
            raise HostError(
                "CELLOS_STATE_DIR", f"cannot prepare the secret files: {exc.strerror}"
            ) from None
        except HostError:
            unmount_host_tmpfs(live.secrets)
            raise
        return live.secrets

    def run(self, handle: CellHandle, request: WorkloadRequest) -> WorkloadResult:
        live = self._live(handle)
        secrets_dir = self._prepare_secrets(live, request)
        try:
            return self._run_limited(live, request, secrets_dir)
        finally:
            if secrets_dir is not None:
                # The workload has ended: its secrets go now (teardown checks again).
                residue = unmount_host_tmpfs(secrets_dir)
                if residue:
                    raise HostError("spec.run.secretDelivery", f"left {', '.join(residue)}")

    def _run_limited(
        self, live: _LiveCell, request: WorkloadRequest, secrets_dir: str | None
    ) -> WorkloadResult:
        limits = live.spec.limits
        try:
            sandbox_cgroups = evidence.SandboxCgroups(live.container_id, limits)
            sandbox_cgroups.create()
        except OSError as exc:
            raise HostError(
                "spec.run.limits", f"cannot create the sandbox's cgroup: {exc.strerror}"
            ) from None
        counters: dict[str, int] = {}
        try:
            result, clone_failures = self._run(
                live, request, sandbox_cgroups.cgroups_path, secrets_dir
            )
        finally:
            if limits is not None and limits.memory_max_bytes:
                counters["oomKills"] = sandbox_cgroups.oom_kills()
            residue = sandbox_cgroups.remove()
        if residue:
            raise HostError("cgroup", f"cannot remove the sandbox's cgroups: {', '.join(residue)}")
        if clone_failures is not None:
            counters["pidsLimitHits"] = clone_failures
        return with_limit_reason(result, counters)

    def _run(
        self,
        live: _LiveCell,
        request: WorkloadRequest,
        cgroups_path: str,
        secrets_dir: str | None = None,
    ) -> tuple[WorkloadResult, int | None]:
        """runsc run; the result and, with pidsMax, how many forks the limit refused."""
        rootfs = self.rootfs or os.path.join(live.bundle, "rootfs")
        config = BundleConfig(
            rootfs=rootfs,
            workspace=live.workspace,
            host_binds=() if self.rootfs else host_binds(),
            cgroups_path=cgroups_path,
            resolv_conf=live.egress.resolv_conf if live.egress is not None else None,
            # The sandbox joins the cell's netns (else runsc would make it a new, empty one).
            netns_path=live.egress.netns_path if live.egress is not None else None,
            secrets_dir=secrets_dir,
            uid=WORKLOAD_UID,
            gid=WORKLOAD_GID,
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
        limits = live.spec.limits
        clones = None
        if limits is not None and limits.pids_max is not None:
            clones = evidence.CloneFailures(os.path.join(live.cell_dir, "strace.fifo"))
        # With egress authority the sandbox joins the cell's netns (named in the bundle) and
        # uses it as its host network; without, it has no network but its own loopback.
        network = "--network=host" if live.egress is not None else "--network=none"
        command = [
            *runsc,
            *(clones.runsc_flags() if clones else []),
            network,
            "run",
            "--bundle",
            live.bundle,
            live.container_id,
        ]
        # runsc itself needs no environment; the workload's is in config.json.
        lease = None
        if secrets_dir is not None and request.secret_lease_seconds is not None:
            # Counted from the start of runsc; the sandbox sees the removal at once (runsc
            # validates bind mounts against the host: --file-access-mounts=shared).
            lease = HostLease(secrets_dir, request.secret_lease_seconds)
            lease.start()
        try:
            result = run_host_command(
                HostCommand.for_workload(request, argv=command, env={}),
                SpawnOptions(
                    cwd="/",
                    on_spawn=live.state.write_pid,
                    control=RunscControl(runsc, live.container_id),
                    die_with_parent=True,
                ),
            )
        finally:
            if lease is not None:
                lease.cancel()
            failures = clones.finish() if clones else None
        return _explain(result), failures

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

    def _state_of(self, handle: CellHandle) -> CellState:
        return _LIVE.get(handle.cell_id).state

    def _teardown(self, live: _LiveCell) -> list[str]:
        residue = delete_container(self._runsc(live), live.runsc_root, live.container_id)
        if live.egress is not None:
            residue += live.egress.close()
        residue += unmount_host_tmpfs(live.secrets)
        shutil.rmtree(live.bundle, ignore_errors=True)
        residue += self.store.release(live.state)
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
