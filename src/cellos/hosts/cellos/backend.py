"""The default ``cellos`` backend: a real sandbox per cell.

Each cell gets new pid, mount, ipc, uts, network and cgroup namespaces (and a user namespace
when the supervisor is not root), a private root of read-only binds entered with
``pivot_root``, a fresh ``/proc``, a minimal ``/dev``, a private ``/tmp`` and a read-write
workspace at ``run.workingDirectory``; ``no_new_privs``, no capabilities, a seccomp deny
list and Landlock; cgroup leaves with ``run.limits`` (v2, v1 or hybrid, detected at run time).
The mount and namespace work is the ``cellos-sandbox`` launcher's (see :mod:`sandbox`).

Live-cell tracking: no duplicate live id (in this process or any other, through the state
directory lock), no double destroy, ``peers_tracked_after``. Every resource is recorded in the
cell's state record before it is created, so ``cellos reap`` can always find it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

import msgspec

from cellos.core import isolation as iso
from cellos.core.errors import HostError, PolicyRefused
from cellos.core.ports import (
    CellHandle,
    InjectedSecret,
    TeardownReport,
    WorkloadRequest,
    WorkloadResult,
)
from cellos.core.secrets_env import INJECTION_TRUST_VARIABLES
from cellos.core.spec import CellSpec
from cellos.hosts.artifacts import open_in_workspace
from cellos.hosts.cellos import cgroups
from cellos.hosts.cellos.control import CellControl
from cellos.hosts.cellos.launcher import landlock_abi, launcher_path
from cellos.hosts.cellos.sandbox import (
    CA_BUNDLE_PATH,
    LAUNCHER_PROCESSES,
    SandboxPlan,
    isolation_features,
    launcher_argv,
)
from cellos.hosts.cellos.seccomp_filter import workload_filter_bpf
from cellos.hosts.host_root import (
    host_binds,
    host_symlinks,
    refuse_reserved_working_directory,
)
from cellos.hosts.limit_reasons import with_limit_reason
from cellos.hosts.live import LiveCells, StoredBackend, create_network_or_undo
from cellos.hosts.process import HostCommand, SpawnOptions, run_host_command
from cellos.hosts.secret_files import SECRETS_DIRECTORY, sealed_memfd
from cellos.hosts.state import CellState, CellStore

if TYPE_CHECKING:
    from cellos.network.cell_ca import CellCA
    from cellos.network.cell_egress import CellEgress


class _LiveCell(msgspec.Struct):
    state: CellState
    plan: SandboxPlan
    cgroup: cgroups.CellCgroup | None = None
    pid: int | None = None
    egress: CellEgress | None = None
    #: Variables the workload gets on top of the declared ones (the CA bundle of a cell with
    #: secretInjection).
    extra_env: dict[str, str] = msgspec.field(default_factory=dict)


#: A root supervisor's workloads run as nobody/nogroup: without capabilities uid 0 would still
#: own, and so could read, the root-only files in the host binds (e.g. /etc/ssl/private).
#: (The microVM guest init uses the same ids.)
WORKLOAD_UID = WORKLOAD_GID = 65534

# Live cells are a property of the host, not of one backend object: every backend instance in
# this process shares the table (other processes are kept out by the state-dir lock).
_LIVE: LiveCells[_LiveCell] = LiveCells()


class CellosBackend(StoredBackend):
    name = "cellos"

    def __init__(
        self,
        *,
        state_root: str | None = None,
        cgroup_parent: str | None = None,
        rootfs: str | None = None,
        launcher: str | None = None,
        network_pool: str | None = None,
        injection_upstream_ca: str | None = None,
    ) -> None:
        self.store = CellStore(state_root)
        #: CA file the L7 proxy verifies injection upstreams against (None: the host's trust
        #: store); ``CELLOS_INJECTION_UPSTREAM_CA``, for tests and enterprise TLS inspection.
        if injection_upstream_ca is not None and not os.path.isfile(injection_upstream_ca):
            raise PolicyRefused(
                "CELLOS_INJECTION_UPSTREAM_CA", f"{injection_upstream_ca!r} is not a file"
            )
        self.injection_upstream_ca = injection_upstream_ca
        self.state_root = self.store.root
        #: None: the default pool (cellos.network.scope, imported only for egress cells).
        self.network_pool = network_pool
        self.cgroup_parent = cgroup_parent
        # An absolute parent names a directory in one hierarchy (it must exist); a relative
        # one is created under every hierarchy the cell needs.
        if cgroup_parent is not None and (
            ".." in cgroup_parent.split("/")
            or (os.path.isabs(cgroup_parent) and not os.path.isdir(cgroup_parent))
        ):
            raise PolicyRefused(
                "CELLOS_CGROUP_PARENT",
                f"{cgroup_parent!r} is not an existing directory or a relative name",
            )
        if rootfs is not None and not os.path.isdir(rootfs):
            raise PolicyRefused("CELLOS_ROOTFS", f"{rootfs!r} is not a directory")
        self.rootfs = rootfs
        self.launcher = launcher_path(launcher)
        self.landlock_abi = landlock_abi()
        self.layout = cgroups.detect()
        self.cgroup_rel = cgroups.parent_relative(cgroup_parent, self.layout)
        # Root runs cells without a user namespace; anyone else needs one to sandbox at all.
        self.user_namespace = os.geteuid() != 0

    # -- lifecycle ---------------------------------------------------------------------------

    def create(self, spec: CellSpec) -> CellHandle:
        self._check_working_directory(spec.working_directory)
        limits = spec.limits
        controllers = cgroups.needed_controllers(limits)
        why_not = cgroups.usable(self.layout, self.cgroup_rel, controllers)
        wants_limits = len(controllers) > 1 or (limits is not None and limits.pids_max is not None)
        if why_not is not None and (wants_limits or self.cgroup_parent is not None):
            raise PolicyRefused(
                "spec.run.limits" if wants_limits else "CELLOS_CGROUP_PARENT",
                f"cannot be enforced on this host: {why_not}",
            )
        # Planned (pure) now so that the first state record already names the leaves: a
        # reaper must always find what exists, and one record write is cheaper than two.
        planned = (
            cgroups.CellCgroup.plan(self.layout, self.cgroup_rel, spec.id, controllers)
            if why_not is None
            else None
        )

        def make(cell: CellState) -> _LiveCell:
            workspace = cell.path("workspace")
            try:
                os.mkdir(workspace, 0o700)
                if not self.user_namespace:
                    # The workload's own directory: the only host path it may write.
                    os.chown(workspace, WORKLOAD_UID, WORKLOAD_GID)
            except OSError as exc:
                raise HostError(
                    "CELLOS_STATE_DIR",
                    f"cannot hand the workspace to the workload: {exc.strerror}",
                ) from None
            plan = SandboxPlan(
                cell_id=spec.id,
                workspace=workspace,
                working_directory=spec.working_directory,
                rootfs=self.rootfs,
                user_namespace=self.user_namespace,
                landlock_abi=self.landlock_abi,
                workload_user=None if self.user_namespace else (WORKLOAD_UID, WORKLOAD_GID),
            )
            return _LiveCell(state=cell, plan=plan)

        live = self.open_cell(_LIVE, spec, {"cgroups": planned.paths} if planned else {}, make)
        try:
            if planned is not None:
                live.cgroup = planned
                planned.create(limits, pids_overhead=LAUNCHER_PROCESSES)
                live.plan = msgspec.structs.replace(live.plan, cgroup_procs=planned.procs_files())
        except OSError as exc:
            self._teardown(spec.id, live)
            raise HostError("cgroup", f"cannot create the cell's cgroup: {exc.strerror}") from None
        if spec.authority.egress_rules:
            create_network_or_undo(
                lambda: self._create_network(spec, live),
                lambda: self._teardown(spec.id, live)[1],
            )
        isolation = isolation_features(msgspec.structs.replace(live.plan, seccomp_fd=-1))
        resources: dict[str, str] = {"workspace": live.plan.workspace}
        if live.cgroup is not None:
            isolation.append(
                "cgroup:" + ",".join(f"{c}=v{v}" for c, v in sorted(live.cgroup.versions.items()))
            )
            resources["cgroup"] = live.cgroup.leaves["pids"]
            if limits is not None:
                isolation += iso.limit_features(
                    limits.memory_max_bytes, limits.pids_max, limits.cpu_max
                )
        if not self.landlock_abi:
            isolation.append("landlock:unavailable")
        return CellHandle(
            cell_id=spec.id, backend=self.name, isolation=tuple(isolation), resources=resources
        )

    def run(self, handle: CellHandle, request: WorkloadRequest) -> WorkloadResult:
        live = self._live(handle)
        # The seccomp program goes through a pipe (far smaller than a pipe's buffer, so the
        # write never blocks); the launcher reports setup and exec failures through another,
        # close-on-exec one, which a workload cannot write to or forge.
        # Secrets delivered as files travel in a sealed memfd that only the cell's pid 1
        # reads (never argv, env or a host file); it is checked before anything starts.
        secrets_fd = sealed_memfd(request.secret_files) if request.secret_files else -1
        seccomp_read, seccomp_write = os.pipe2(os.O_CLOEXEC)
        error_read, error_write = os.pipe2(os.O_CLOEXEC)
        try:
            os.write(seccomp_write, workload_filter_bpf())
            os.close(seccomp_write)
            seccomp_write = -1
            plan = msgspec.structs.replace(
                live.plan,
                seccomp_fd=seccomp_read,
                error_fd=error_write,
                secrets_fd=secrets_fd if secrets_fd >= 0 else None,
                secret_lease_seconds=request.secret_lease_seconds,
            )

            def on_spawn(pid: int) -> None:
                live.pid = pid
                # For the reaper: a supervisor killed while the cell is still starting leaves
                # a launcher that only this pid can name.
                live.state.write_pid(pid)

            options = SpawnOptions(
                cwd="/",
                on_spawn=on_spawn,
                pass_fds=(seccomp_read, error_write, *([secrets_fd] if secrets_fd >= 0 else [])),
                control=CellControl(live.cgroup),
            )
            # The launcher passes the declared environment on to the workload, and nothing
            # else; it dies with this supervisor (its --parent check and PDEATHSIG).
            if live.extra_env:
                request = msgspec.structs.replace(request, env={**request.env, **live.extra_env})
            command = HostCommand.for_workload(
                request, argv=launcher_argv(plan, request.argv, self.launcher)
            )
            result = run_host_command(command, options)
            os.close(error_write)
            error_write = -1
            setup_error = _read_all(error_read)
        finally:
            for fd in (seccomp_read, seccomp_write, error_read, error_write, secrets_fd):
                if fd >= 0:
                    os.close(fd)
        return self._explain(live, result, setup_error)

    def _explain(
        self, live: _LiveCell, result: WorkloadResult, setup_error: bytes
    ) -> WorkloadResult:
        """Turn launcher failures into spawn errors and limit kills into reasons."""
        if setup_error:
            return msgspec.structs.replace(
                result,
                exit_code=None,
                spawn_error="cannot start: " + setup_error.decode(errors="replace").strip(),
                reason="spawn_failed",
            )
        if live.cgroup is None:
            return result
        return with_limit_reason(result, live.cgroup.pressure())

    def inject_secrets(self, handle: CellHandle, secrets: Sequence[InjectedSecret]) -> None:
        """Arm the cell's L7 proxy with the resolved ``secretInjection`` secrets."""
        egress = self._live(handle).egress
        proxies = egress.proxies if egress is not None else None
        if proxies is None or not proxies.injects:
            raise PolicyRefused(
                "spec.authority.secretInjection",
                "the cell has no L7 proxy that injects secrets (declared at create?)",
            )
        proxies.arm(secrets)

    def open_artifact(self, handle: CellHandle, path: str) -> BinaryIO:
        live = self._live(handle)
        return open_in_workspace(live.plan.workspace, live.plan.working_directory, path)

    def destroy(self, handle: CellHandle) -> TeardownReport:
        live = _LIVE.get(handle.cell_id)
        killed, residue = self._teardown(handle.cell_id, live)
        peers = len(_LIVE)
        return TeardownReport(
            cell_id=handle.cell_id,
            destroyed=not residue,
            peers_tracked_after=peers,
            processes_killed=killed,
            residue=tuple(residue),
        )

    # -- helpers -----------------------------------------------------------------------------

    def secret_files_refusal(self, spec: CellSpec) -> str | None:
        """The launcher mounts the secrets' tmpfs on /run/secrets: a rootfs directory (read-only,
        never changed) must already have that mount point."""
        if self.rootfs and not os.path.isdir(
            os.path.join(self.rootfs, SECRETS_DIRECTORY.lstrip("/"))
        ):
            return f"CELLOS_ROOTFS {self.rootfs} has no {SECRETS_DIRECTORY} directory to mount on"
        return None

    def _check_working_directory(self, path: str) -> None:
        """The workspace is mounted at ``path``: not inside what the cell's root binds from
        the host (read-only; its mount point would have to be created in the host's tree),
        and not in /proc or /dev. (With a rootfs directory the launcher needs the directory
        to exist there and refuses otherwise: it never writes into the rootfs.)"""
        reserved = ["/proc", "/dev"]
        if not self.rootfs:
            reserved += [*host_binds(), *host_symlinks()]
        refuse_reserved_working_directory(path, reserved, "the cellos backend")

    def _live(self, handle: CellHandle) -> _LiveCell:
        return _LIVE.get(handle.cell_id)

    def _state_of(self, handle: CellHandle) -> CellState:
        return _LIVE.get(handle.cell_id).state

    def _create_network(self, spec: CellSpec, live: _LiveCell) -> None:
        """The cell's egress scope, recorded before it exists; the launcher joins its netns."""
        # Imported here: the proxies pull in asyncio and dnslib (~25 ms), which a cell without
        # egress authority, and every one-shot CLI run of one, never needs.
        from cellos.network.cell_egress import CellEgress

        ca, ca_bundle = self._injection_ca(spec, live)
        egress = CellEgress.open(
            spec,
            live,
            self.state_root,
            self.network_pool,
            injection_ca=ca,
            upstream_ca_file=self.injection_upstream_ca,
        )
        live.plan = msgspec.structs.replace(
            live.plan,
            netns_path=egress.netns_path,
            resolv_conf=egress.resolv_conf,
            ca_bundle=ca_bundle,
        )

    def _injection_ca(self, spec: CellSpec, live: _LiveCell) -> tuple[CellCA | None, str | None]:
        """The cell's own CA for secretInjection (its key stays in this process) and the CA
        bundle file the cell trusts (in the cell's state directory, gone with it)."""
        entries = spec.authority.secret_injection
        if not entries:
            return None, None
        from cellos.network.cell_ca import CellCA

        ca = CellCA(spec.id, [e.host for e in entries])
        bundle = live.state.path("ca-bundle.pem")
        try:
            fd = os.open(bundle, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as fh:
                fh.write(ca.bundle())
        except OSError as exc:
            raise HostError(
                "CELLOS_STATE_DIR", f"cannot write the cell's CA bundle: {exc.strerror}"
            ) from None
        live.extra_env = dict.fromkeys(INJECTION_TRUST_VARIABLES, CA_BUNDLE_PATH)
        return ca, bundle

    def network_events(self, handle: CellHandle) -> list[tuple[str, dict[str, Any]]]:
        egress = self._live(handle).egress
        return egress.events() if egress is not None else []

    def _teardown(self, cell_id: str, live: _LiveCell) -> tuple[int, list[str]]:
        killed = 0
        residue: list[str] = []
        if live.pid is not None:
            CellControl(live.cgroup).kill(live.pid)
        if live.cgroup is not None:
            killed, residue = live.cgroup.remove()
        if live.egress is not None:
            residue += live.egress.close()
        residue += self.store.release(live.state)
        _LIVE.remove(cell_id)
        return killed, residue


def _read_all(fd: int) -> bytes:
    """What the launcher wrote before it exited (every writer has closed by now)."""
    chunks = []
    with contextlib.suppress(BlockingIOError):
        os.set_blocking(fd, False)
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    return b"".join(chunks)[:4096]
