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
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, BinaryIO

from cellos.core import isolation as iso
from cellos.core.errors import CellosError, HostError, PolicyRefused
from cellos.core.events import NETWORK_FLOW_DECISION
from cellos.core.ports import (
    CellHandle,
    TeardownReport,
    WorkloadRequest,
    WorkloadResult,
)
from cellos.core.spec import CellSpec
from cellos.hosts.artifacts import open_in_workspace
from cellos.hosts.cellos import cgroups
from cellos.hosts.cellos.control import CellControl
from cellos.hosts.cellos.launcher import landlock_abi, launcher_path
from cellos.hosts.cellos.sandbox import (
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
from cellos.hosts.live import LiveCells, StoredBackend
from cellos.hosts.process import HostCommand, SpawnOptions, run_host_command
from cellos.hosts.secret_files import SECRETS_DIRECTORY, sealed_memfd
from cellos.hosts.state import CellState, CellStore

if TYPE_CHECKING:
    from cellos.network import scope
    from cellos.network.proxies import CellProxies


@dataclass
class _LiveCell:
    state: CellState
    plan: SandboxPlan
    cgroup: cgroups.CellCgroup | None = None
    pid: int | None = None
    network: scope.CellNetwork | None = None
    proxies: CellProxies | None = None


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
    ) -> None:
        self.store = CellStore(state_root)
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
                live.plan = replace(live.plan, cgroup_procs=planned.procs_files())
        except OSError as exc:
            self._teardown(spec.id, live)
            raise HostError("cgroup", f"cannot create the cell's cgroup: {exc.strerror}") from None
        if spec.authority.egress_rules:
            try:
                self._create_network(spec, live)
            except CellosError:
                self._teardown(spec.id, live)
                raise
        isolation = isolation_features(replace(live.plan, seccomp_fd=-1))
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
            plan = replace(
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
                log_dir=live.state.cell_dir,
                on_spawn=on_spawn,
                pass_fds=(seccomp_read, error_write, *([secrets_fd] if secrets_fd >= 0 else [])),
                control=CellControl(live.cgroup),
            )
            # The launcher passes the declared environment on to the workload, and nothing
            # else; it dies with this supervisor (its --parent check and PDEATHSIG).
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
            return replace(
                result,
                exit_code=None,
                spawn_error="cannot start: " + setup_error.decode(errors="replace").strip(),
                reason="spawn_failed",
            )
        if live.cgroup is None:
            return result
        return with_limit_reason(result, live.cgroup.pressure())

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
        """The cell's egress scope: netns, veth, nft table (recorded before it exists)."""
        if os.geteuid() != 0:
            raise PolicyRefused(
                "spec.authority.egressRules",
                "network authority needs root on this host (netns, veth, nft)",
            )
        # Imported here: the proxies pull in asyncio and dnslib (~25 ms), which a cell without
        # egress authority, and every one-shot CLI run of one, never needs.
        from cellos.network.proxies import L7_PORTS, CellProxies

        dns = spec.authority.dns_authority
        from cellos.network import scope

        rules = scope.resolve_rules(list(spec.authority.egress_rules), pin_by_dns=dns is not None)
        net = scope.plan(spec.id, rules, self.state_root, self.network_pool or scope.DEFAULT_POOL)
        if dns is not None:
            net.dns_ports = sorted({(r.protocol, r.port) for r in spec.authority.egress_rules})
        live.network = net  # from here on, teardown releases the slot
        live.state.record["network"] = net.record()
        try:
            live.state.save()
        except OSError as exc:
            raise HostError(
                "CELLOS_STATE_DIR", f"cannot record the cell's network: {exc.strerror}"
            ) from None
        scope.create(net)
        resolv_conf = None
        if dns is not None:
            # The cell asks its own DNS proxy (bound inside its namespace), nobody else.
            resolv_conf = live.state.path("resolv.conf")
            with open(resolv_conf, "w", encoding="ascii") as fh:
                fh.write("nameserver 127.0.0.1\noptions timeout:2 attempts:2\n")
        # Ports 80/443 are checked at L7 against the names the cell may reach.
        names = sorted(
            {r.host for r in rules if r.host} | set(dns.hostname_allowlist if dns else [])
        )
        l7_ports = sorted(
            {r.port for r in spec.authority.egress_rules if r.protocol == "tcp"} & set(L7_PORTS)
        )
        live.proxies = CellProxies(net, dns, l7_names=names, l7_ports=l7_ports)
        live.proxies.start()
        live.plan = replace(live.plan, netns_path=net.netns_path, resolv_conf=resolv_conf)

    def network_events(self, handle: CellHandle) -> list[tuple[str, dict[str, Any]]]:
        """The proxies' decisions (DNS, L7) in order, then one network_flow_decision per
        counting nftables rule of the cell."""
        live = self._live(handle)
        if live.network is None:
            return []
        found = live.proxies.drain() if live.proxies is not None else []
        from cellos.network import scope

        found += [(NETWORK_FLOW_DECISION, d) for d in scope.flow_decisions(live.network)]
        return found

    def _teardown(self, cell_id: str, live: _LiveCell) -> tuple[int, list[str]]:
        killed = 0
        residue: list[str] = []
        if live.pid is not None:
            CellControl(live.cgroup).kill(live.pid)
        if live.cgroup is not None:
            killed, residue = live.cgroup.remove()
        if live.proxies is not None:
            live.proxies.stop()
        if live.network is not None:
            from cellos.network import scope

            residue += scope.destroy(live.network.record())
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
