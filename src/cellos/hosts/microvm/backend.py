"""The microVM backends: each cell boots its own guest kernel.

:class:`MicrovmCellBackend` is the VMM-agnostic cell runner (image and manifest, acceleration,
warm pool claims, cell lifecycle and state record, the guest channel); a subclass per VMM
says how a guest is launched: :class:`MicrovmBackend` (``qemu``, here) and
:class:`~cellos.hosts.microvm.fc_backend.FirecrackerBackend` (``firecracker``).

Before every boot the image's manifest is verified (kernel, initrd and VMM binary, sha256);
a mismatch refuses the cell before anything starts, and the verified digests are stamped on
the ``CellHandle``. The request travels on the kernel command line (``cellos.argv=`` etc.),
the guest init reports output, artifacts and the exit code on the serial port, which the
guest's workload (run as an unprivileged user) cannot open. Timeout and TTL kill the VMM.

The machine is ``microvm`` under KVM; under TCG it is ``q35``, because the microvm machine
(no HPET or ACPI PM timer) hangs at random while the guest calibrates its TSC under
software emulation.

Without ``CELLOS_MICROVM_IMAGE`` the per-user cached image is used, built on first use
(``image_cache.py``). Acceleration is detected, not assumed: KVM is used when a bounded probe
boot with ``-accel kvm`` succeeds; otherwise TCG, and only where the operator allows it
(``CELLOS_MICROVM_ALLOW_TCG=1``). The probe's answer is cached per host boot, kernel, VMM and
``/dev/kvm`` (``accel.py``), so only the first cell pays for it.

A cell with egress authority gets the same network scope as on the other backends
(``CellEgress``) and its guest one virtio-net device on a tap inside the cell's namespace
(``network/guest_link.py``), whose descriptor the VMM inherits; a cell without has no network
device at all. Such a cell never takes a warm pool guest (booted without a device): it boots
cold and says why (``poolMiss``).
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import select
import shlex
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

import msgspec

from cellos.core import isolation as iso
from cellos.core.errors import ExportError, HostError, InvalidSpec, PolicyRefused
from cellos.core.ports import CellHandle, TeardownReport, WorkloadRequest, WorkloadResult
from cellos.core.spec import CellSpec, Limits
from cellos.hosts import secret_files
from cellos.hosts.live import LiveCells, StoredBackend, create_network_or_undo
from cellos.hosts.microvm import image_cache
from cellos.hosts.microvm.accel import (
    KVM_DEVICE,
    PROBE_TIMEOUT_SECONDS,
    AccelCache,
    AccelDecision,
    host_key,
    kvm_identity,
)
from cellos.hosts.microvm.channel import GuestChannel
from cellos.hosts.microvm.firecracker import mem_mib_for, vcpus_for
from cellos.hosts.microvm.image import MANIFEST_NAME
from cellos.hosts.microvm.image_cache import ensure_image
from cellos.hosts.microvm.manifest import Manifest, ManifestMismatch, load_manifest, verify
from cellos.hosts.microvm.pool import (
    ClaimedGuest,
    Qmp,
    Shape,
    claim,
    live_pool,
    log_tail,
    start_detached,
    start_vmm,
)
from cellos.hosts.microvm.qemu_probe import (
    POOL_APPEND,
    kernel_append,
    qemu_command,
    request_line,
    request_params,
)
from cellos.hosts.microvm.request import (
    cgroup_settings,
    check_working_directory,
    explain,
    guest_artifact_path,
    guest_hostname,
)
from cellos.hosts.process import HostCommand, SpawnOptions, run_host_command
from cellos.hosts.state import CellState, CellStore

if TYPE_CHECKING:
    from cellos.network.cell_egress import CellEgress
    from cellos.network.guest_link import GuestLink


@dataclass
class _LiveCell:
    spec: CellSpec
    state: CellState
    manifest: Manifest
    accel: str
    artifacts: dict[str, bytes | None] = field(default_factory=dict)
    #: The warm pool's guest this cell runs in (None: a cold boot).
    guest: ClaimedGuest | None = None
    #: The cell's network scope and the guest's tap in it (egress authority only).
    egress: CellEgress | None = None
    link: GuestLink | None = None

    @property
    def cell_dir(self) -> str:
        return self.state.cell_dir


_LIVE: LiveCells[_LiveCell] = LiveCells()
#: The Debian cloud kernel does not get through unpacking its initramfs with less (it hangs
#: at 128 MiB): a smaller memoryMaxBytes still gives the guest this much.
MIN_GUEST_MIB = 256
#: Seconds between two attempts of one backend to start the pool (CELLOS_MICROVM_POOL).
POOL_START_INTERVAL = 30.0
#: Why a cell with egress authority never takes a warm guest (``poolMiss``).
POOL_MISS_NETWORK = (
    "egress authority: a pool guest boots without a network device (its tap is created in "
    "the cell's namespace, which exists only once the cell does), so the cell boots cold"
)


class GuestRequest(msgspec.Struct, frozen=True):
    """What one guest is asked to do (a cold boot's kernel command line or a pool guest's
    request line) and the guest shape its limits need. ``workload`` is what the guest runs,
    with the deadline and stop of the VMM; with ``link`` the guest gets a network device (a
    tap in the cell's netns) and configures its side."""

    workload: HostCommand
    artifacts: list[str] = msgspec.field(default_factory=list)
    limits: Limits | None = None
    hostname: str | None = None
    workdir: str | None = None
    secret_files: Mapping[str, bytes] = msgspec.field(default_factory=dict)
    secret_lease: int | None = None
    link: GuestLink | None = None

    def __repr__(self) -> str:
        # Secret values never reach a log line or a traceback.
        return f"GuestRequest(argv={list(self.workload.argv)!r})"

    def params(self) -> list[str]:
        return request_params(
            list(self.workload.argv),
            dict(self.workload.env),
            self.artifacts,
            hostname=self.hostname,
            workdir=self.workdir,
            cgroup=cgroup_settings(self.limits),
            secrets=bool(self.secret_files),
            secret_lease=self.secret_lease if self.secret_files else None,
            net=self.link.request() if self.link is not None else None,
        )

    def shape(self) -> Shape:
        return MicrovmCellBackend.shape_of(self.limits)


class MicrovmCellBackend(StoredBackend):
    """A cell per guest, whatever the VMM; subclasses implement ``_boot`` (a cold boot),
    ``pool_start``/``pool_snapshot`` (the warm pool) and may restrict acceleration."""

    name = "microvm"
    #: The isolation feature naming the VMM (``lifecycle.v1.started.isolation``).
    vmm_feature = iso.MICROVM_QEMU
    #: PoolVmm: how a pool guest's channel is reached (pool.py).
    pool_channel = "listen"
    snapshot_files: tuple[str, ...] = ()
    #: Whether the VMM can give the guest a network device in the cell's netns (egress).
    supports_egress = False

    def __init__(
        self,
        *,
        image_dir: str | None,
        state_root: str | None = None,
        allow_tcg: bool = False,
        accel: str | None = None,
        pool_size: int = 0,
        network_pool: str | None = None,
    ) -> None:
        #: None: the per-user cached image (image_cache.py), resolved (built) at first create.
        self.configured_image = image_dir
        self.image_dir = Path(image_dir) if image_dir else None
        if image_dir and not (Path(image_dir) / MANIFEST_NAME).is_file():
            raise PolicyRefused(
                "CELLOS_MICROVM_IMAGE",
                f"{image_dir}: no {MANIFEST_NAME} (the manifest is required)",
            )
        if accel not in (None, "kvm", "tcg"):
            raise PolicyRefused("CELLOS_MICROVM_ACCEL", "must be kvm or tcg")
        self.allow_tcg = allow_tcg
        self.forced_accel = accel
        self.store = CellStore(state_root)
        #: CELLOS_MICROVM_POOL: cells take a warm guest of the pool (started when missing).
        self.pool_size = pool_size
        #: CELLOS_NETWORK_POOL (None: the default), for cells with egress authority.
        self.network_pool = network_pool
        self._pool_started = -POOL_START_INTERVAL
        self.accel_cache = AccelCache(self.store.root)
        self._vmm_known: dict[str, str] = {}
        self._default_known: tuple[object, tuple[str, str, str]] | None = None
        #: The manifest and accelerator of the pool guests ``pool_prepare`` verified last.
        self.pool_manifest: tuple[Manifest, str] | None = None

    # -- image -------------------------------------------------------------------------------

    def load_image(
        self, *, build: bool = True, verify_files: bool = True
    ) -> tuple[Manifest, dict[str, str]]:
        """The image's manifest and its verified digests (refused before any boot on a
        mismatch). Without CELLOS_MICROVM_IMAGE the per-user cached image is used, built
        first when missing (unless ``build`` is False: HostError then). With
        ``verify_files`` False the digests are the manifest's, not yet checked against the
        files (a pool guest's were checked before it booted: see ``create``)."""
        if self.configured_image is None:
            found = self._default_image(build, reuse=not verify_files)
            if found is None:
                raise HostError(
                    image_cache.cache_dir(),
                    "the default microVM image is not built yet "
                    "(the first qemu cell builds it, or: cellos microvm build-image)",
                )
            path, vmm_path, vmm_sha = found
            self.image_dir = Path(path)
            self._vmm_known = {vmm_path: vmm_sha}
        assert self.image_dir is not None
        try:
            manifest = load_manifest(self.image_dir / MANIFEST_NAME)
            self.check_manifest(manifest)
            if not verify_files:
                return manifest, {role: art.sha256 for role, art in manifest.roles()}
            return manifest, verify(manifest, self.image_dir, self._vmm_known)
        except ManifestMismatch as exc:
            if self.configured_image is not None:
                raise
            # The cached image was changed after it was built: refuse, never rebuild silently.
            raise ManifestMismatch(
                exc.path,
                exc.expected,
                exc.actual,
                f"; the cached microVM image is corrupted and is not rebuilt automatically "
                f"(rebuild it with: {image_cache.REFRESH_HINT})",
            ) from exc
        except InvalidSpec as exc:
            if self.configured_image is not None:
                raise
            raise HostError(
                exc.path, f"{exc.reason}; rebuild the cached image with: {image_cache.REFRESH_HINT}"
            ) from exc

    def check_manifest(self, manifest: Manifest) -> None:
        """Refuse an image this VMM cannot boot (before its files are even hashed)."""

    def _default_image(self, build: bool, *, reuse: bool) -> tuple[str, str, str] | None:
        """``ensure_image``; with ``reuse`` (a pool cell, whose guest's files the pool's
        manager verified) the last answer while the VMM binary is the same file, unchanged
        (its sha256 chooses the image: not hashed again on a pool hit)."""
        vmm = image_cache.find_vmm(None)
        try:
            st = os.stat(vmm)
            identity = (vmm, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except OSError:
            identity = None
        known = self._default_known
        if reuse and known is not None and identity is not None and known[0] == identity:
            image_cache.check_image_dir(known[1][0])
            return known[1]
        found = ensure_image(build=build)
        self._default_known = (identity, found) if found is not None else None
        return found

    # -- acceleration ------------------------------------------------------------------------

    def decide_accel(self, manifest: Manifest, *, refresh: bool = False) -> AccelDecision:
        """KVM or TCG, and what decided it (before the TCG policy is applied)."""
        if self.forced_accel is not None:
            return AccelDecision(self.forced_accel, "CELLOS_MICROVM_ACCEL", "set by the operator")
        kvm = kvm_identity()
        if kvm is None:
            return AccelDecision("tcg", "no-kvm", f"{KVM_DEVICE} cannot be opened")
        key = host_key(manifest.vmm.sha256, kvm)
        return self.accel_cache.decide(key, lambda: self._probe_kvm(manifest), refresh=refresh)

    def accel(self, manifest: Manifest) -> str:
        return self.allowed_accel(self.decide_accel(manifest))

    def allowed_accel(self, decision: AccelDecision) -> str:
        """The accelerator a cell gets from ``decision``: KVM, or TCG when allowed (else the
        PolicyRefused a cell would get)."""
        if decision.accel == "kvm":
            return "kvm"
        why = decision.detail if decision.decided_by == "no-kvm" else "KVM cannot boot the guest"
        return self._tcg_or_refuse(why)

    def _tcg_or_refuse(self, why: str) -> str:
        if not self.allow_tcg and self.forced_accel != "tcg":
            raise PolicyRefused(
                "CELLOS_MICROVM_ALLOW_TCG",
                f"{why}; software emulation (TCG) "
                "is slow and must be allowed explicitly (set it to 1)",
            )
        return "tcg"

    def _probe_kvm(self, manifest: Manifest) -> tuple[bool, str]:
        """/dev/kvm can exist and still be unable to boot an ordinary guest (e.g. hosts that
        only run paravirtualised guests): a short real boot decides, killed when it hangs."""
        with tempfile.TemporaryDirectory() as work:
            result = self.boot_true(manifest, "kvm", work, PROBE_TIMEOUT_SECONDS, grace=0.2)
        if result.exit_code == 0 and not result.forced:
            return True, f"a KVM guest booted and exited in {result.duration_ms} ms"
        if result.forced:
            return False, f"a KVM guest did not finish within {PROBE_TIMEOUT_SECONDS:g} s"
        return False, (
            f"a KVM guest failed: {result.spawn_error or f'exit {result.exit_code}'}"[:300]
        )

    def boot_true(
        self, manifest: Manifest, accel: str, work: str, timeout: float, grace: float = 1.0
    ) -> WorkloadResult:
        """Boot a guest that runs ``/bin/true`` (a probe: can this host boot the image?)."""
        probe = HostCommand(["/bin/true"], {}, timeout, grace)
        return self._boot(manifest, GuestRequest(probe), accel, work)[0]

    # -- lifecycle ---------------------------------------------------------------------------

    def create(self, spec: CellSpec) -> CellHandle:
        check_working_directory(spec)
        egress_wanted = bool(spec.authority.egress_rules)
        if egress_wanted and not self.supports_egress:
            # Refused, never ignored: this VMM's guest gets no network device in this build.
            raise PolicyRefused(
                "spec.authority.egressRules",
                f"egress authority is not available on the {self.name} backend in this build "
                "(the guest has no network device); use the cellos, gvisor or qemu backend",
            )
        # Refused before boot: a tampered kernel, initrd or VMM never runs. A pool guest's
        # files were verified by the pool's manager right before it booted them (its record
        # holds those digests); they must be the manifest's, and the cell gets them. A cold
        # boot verifies the files now.
        # A pool guest booted without a network device: a cell with egress authority boots
        # cold (said in the started event), never in a guest that cannot carry its scope.
        pooling = self.pool_size > 0 and not egress_wanted
        manifest, digests = self.load_image(verify_files=not pooling)
        # Decided before anything exists (a probe, at most once per host boot and VMM).
        decision = self.decide_accel(manifest)
        accel = self.allowed_accel(decision)
        pool: dict[str, str] = {}
        if self.pool_size > 0 and egress_wanted:
            pool = {"pool": "miss", "poolMiss": POOL_MISS_NETWORK}
        guest: ClaimedGuest | None = None
        if pooling:
            guest, why = self._claim(spec, accel, digests)
            if guest is not None:
                pool = {
                    "pool": "hit",
                    "poolGuest": os.path.basename(guest.path),
                    # "boot" or "snapshot": how the guest came to be idle.
                    "poolGuestFrom": str(guest.record.get("from", "boot")),
                }
            else:
                pool = {"pool": "miss", "poolMiss": why}
                manifest, digests = self.load_image()
        # The record names the VMM and the directory it runs in (its cwd), so that a reaper
        # kills exactly this cell's VMM if the supervisor dies (a pool guest's runs in its
        # directory of the pool).
        record = {"vmm": manifest.vmm.path, "cellDir": self.store.cell_dir(spec.id)}
        if guest is not None:
            record["vmmDir"] = guest.path
        try:
            live = self.open_cell(
                _LIVE,
                spec,
                record,
                lambda cell: _LiveCell(
                    spec=spec, state=cell, manifest=manifest, accel=accel, guest=guest
                ),
            )
            if guest is not None:
                live.state.write_pid(guest.pid)
        except BaseException:
            if guest is not None:
                guest.release()
            raise
        if egress_wanted:
            create_network_or_undo(
                lambda: self._create_network(spec, live), lambda: self._teardown(live)
            )
        return CellHandle(
            cell_id=spec.id,
            backend=self.name,
            isolation=(
                self.vmm_feature,
                iso.GUEST_KERNEL,
                iso.MANIFEST_VERIFIED,
                iso.WORKLOAD_UNPRIVILEGED_IN_GUEST,
                *(
                    (iso.NETWORK_EGRESS_ALLOWLIST, iso.MICROVM_NETWORK_TAP_IN_CELL_NETNS)
                    if live.egress is not None
                    # No egress authority: the guest has no network device at all.
                    else (iso.NETWORK_LOOPBACK_ONLY,)
                ),
            ),
            resources={
                "cellDir": live.cell_dir,
                "image": str(self.image_dir),
                "accel": accel,
                "accelDecidedBy": decision.decided_by,
                **pool,
            },
            digests={f"{name}Sha256": value for name, value in digests.items()},
        )

    def _create_network(self, spec: CellSpec, live: _LiveCell) -> None:
        """The cell's egress scope (the same as the cellos and gvisor backends', recorded
        before it exists) and the guest's tap inside it (``network/guest_link.py``)."""
        from cellos.network.cell_egress import CellEgress
        from cellos.network.guest_link import open_link

        egress = CellEgress.open(spec, live, self.store.root, self.network_pool)
        live.link = open_link(egress)

    def network_events(self, handle: CellHandle) -> list[tuple[str, dict[str, Any]]]:
        egress = _LIVE.get(handle.cell_id).egress
        return egress.events() if egress is not None else []

    def secret_files_refusal(self, spec: CellSpec) -> str | None:
        """Secrets travel on the guest channel (the serial line, after ``CELLOS:READY``),
        never on the kernel command line; the guest init writes them to a tmpfs."""
        return None

    # -- the warm pool ------------------------------------------------------------------------

    @staticmethod
    def shape_of(limits: object) -> Shape:
        """The guest a cell's limits need (a pool guest of another shape does not fit)."""
        lim = limits if isinstance(limits, Limits) else None
        return Shape(
            memory_mib=max(MIN_GUEST_MIB, mem_mib_for(lim.memory_max_bytes if lim else None)),
            vcpus=vcpus_for(lim.cpu_max if lim else None),
        )

    def _claim(
        self, spec: CellSpec, accel: str, digests: dict[str, str]
    ) -> tuple[ClaimedGuest | None, str]:
        """A warm guest for this cell, or None and why not (a cold boot then)."""
        assert self.image_dir is not None
        guest, why = claim(
            self.store.root, self.shape_of(spec.limits), accel, str(self.image_dir), digests
        )
        # At most one start every POOL_START_INTERVAL (one that fails, e.g. TCG not allowed,
        # says why in its log, not on every cell).
        if (
            guest is None
            and time.monotonic() >= self._pool_started + POOL_START_INTERVAL
            and live_pool(self.store.root) is None
        ):
            self._pool_started = time.monotonic()
            self._start_pool()
        return guest, why

    def _start_pool(self) -> None:
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LANG": "C.UTF-8",
        }
        for name in ("HOME", "XDG_CACHE_HOME", "CELLOS_MICROVM_CACHE", "PYTHONPATH"):
            if os.environ.get(name):
                env[name] = os.environ[name]
        for name in ("CELLOS_FIRECRACKER", "CELLOS_JAILER"):
            if os.environ.get(name):
                env[name] = os.environ[name]
        # The pool's manager runs guests of this backend's VMM.
        env["CELLOS_CELL_BACKEND"] = self.name
        if self.configured_image:
            env["CELLOS_MICROVM_IMAGE"] = self.configured_image
        if self.allow_tcg:
            env["CELLOS_MICROVM_ALLOW_TCG"] = "1"
        if self.forced_accel:
            env["CELLOS_MICROVM_ACCEL"] = self.forced_accel
        start_detached(self.store.root, self.pool_size, env)

    def pool_prepare(self, shape: Shape) -> dict[str, object]:
        """PoolVmm: the image verified (as before every boot) and the fields a pool guest's
        record carries (what a supervisor checks before using it); the manifest is kept for
        ``pool_start``."""
        manifest, digests = self.load_image()
        accel = self.accel(manifest)
        self.pool_manifest = (manifest, accel)
        return {
            "accel": accel,
            "image": str(self.image_dir),
            "digests": digests,
            # How a claimer reaches the guest's channel (pool._take).
            "channel": self.pool_channel,
        }

    def pool_start(
        self, shape: Shape, guest_dir: str, *, restore: str | None, snapshottable: bool
    ) -> tuple[subprocess.Popen[bytes], socket.socket | None]:
        raise NotImplementedError

    def pool_snapshot(self, guest_dir: str, deadline: float) -> None:
        raise NotImplementedError

    def _run_on_channel(
        self,
        sock: socket.socket,
        kill: Callable[[], None],
        workload: HostCommand,
        line: bytes | None,
        secret_files: Mapping[str, bytes] | None = None,
        *,
        log: str | None = None,
    ) -> tuple[WorkloadResult, dict[str, bytes | None]]:
        """Send the request (a pool guest's ``line``; None: it is on the kernel command line)
        on a guest's channel and read its results until its exit code (or the deadline / a
        stop). ``kill`` ends the VMM at the end: nothing else ever runs in that guest.

        Secrets follow on the same channel once the guest said ``CELLOS:READY``, as on a
        QEMU cold boot's serial line (never in the request). ``log``: the VMM's log, whose
        tail explains a guest that reported no exit code."""

        def send_secrets() -> None:
            if secret_files:
                with contextlib.suppress(OSError):
                    sock.sendall(SecretSender.line_for(secret_files))

        channel = GuestChannel(workload.output, on_ready=send_secrets if secret_files else None)
        started = time.monotonic()
        deadline = (
            started + workload.deadline_seconds if workload.deadline_seconds is not None else None
        )
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

        def wake() -> None:
            with contextlib.suppress(OSError):
                os.write(wake_w, b"x")

        stop = workload.stop
        if stop is not None:
            stop.add_waker(wake)
        stopped_by: str | None = None
        eof = False
        try:
            try:
                if line is not None:
                    sock.sendall(line)
            except OSError as exc:
                return WorkloadResult(
                    exit_code=None,
                    duration_ms=0,
                    spawn_error=f"pool guest channel: {exc.strerror or exc}",
                    reason="spawn_failed",
                ), {}
            while not channel.exited:
                if stop is not None and stop.reason is not None:
                    stopped_by = stop.reason
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    stopped_by = "timeout"
                    break
                readable, _, _ = select.select([sock.fileno(), wake_r], [], [], left)
                if sock.fileno() in readable:
                    try:
                        data = sock.recv(1 << 16)
                    except OSError:
                        data = b""
                    if not data:
                        eof = True
                        break
                    channel.write("stdout", data)
        finally:
            if stop is not None:
                stop.remove_waker(wake)
            os.close(wake_r)
            os.close(wake_w)
            kill()  # single use: nothing else ever runs in this guest
        duration_ms = int((time.monotonic() - started) * 1000)
        forced = stopped_by is not None
        status = "the guest's channel closed" if eof else "no exit code"
        if log is not None and (tail := log_tail(log)):
            status += f"; VMM log: {tail}"
        return self._result(channel, duration_ms, forced, stopped_by, status, truncated=False)

    def _result(
        self,
        guest: GuestChannel,
        duration_ms: int,
        forced: bool,
        reason: str | None,
        vmm_status: str,
        truncated: bool,
    ) -> tuple[WorkloadResult, dict[str, bytes | None]]:
        try:
            channel = guest.finish()
        except HostError as exc:
            return WorkloadResult(
                exit_code=None,
                duration_ms=duration_ms,
                spawn_error=f"guest channel: {exc.reason}",
                reason="spawn_failed",
            ), {}
        exit_code = None if forced else channel.get("exit_code")
        result = WorkloadResult(
            exit_code=exit_code,
            duration_ms=duration_ms,
            forced=forced,
            reason=reason if forced else None,
            spawn_error=channel.get("spawn_error")
            or (
                None
                if forced or exit_code is not None
                else f"the guest reported no exit code ({vmm_status})"
            ),
            stdout=channel["stdout"],
            stderr=channel["stderr"],
            stdout_bytes=channel["stdout_bytes"],
            stderr_bytes=channel["stderr_bytes"],
            truncated=truncated,
        )
        return explain(result, channel.get("limits")), dict(channel.get("artifacts", {}))

    def run(self, handle: CellHandle, request: WorkloadRequest) -> WorkloadResult:
        live = _LIVE.get(handle.cell_id)
        limits = live.spec.limits
        accel = live.accel
        guest_paths = {guest_artifact_path(live.spec, a.path) for a in live.spec.artifacts}
        artifacts = sorted(p for p in guest_paths if p is not None)
        guest_request = GuestRequest(
            HostCommand.for_workload(request),
            artifacts,
            limits,
            hostname=guest_hostname(live.spec),
            workdir=live.spec.working_directory,
            secret_files=request.secret_files,
            secret_lease=request.secret_lease_seconds,
            link=live.link,
        )
        if live.guest is not None:
            guest = live.guest
            result, live.artifacts = self._run_on_channel(
                guest.sock,
                guest.kill,
                guest_request.workload,
                request_line(guest_request.params()),
                request.secret_files,
            )
            return result
        result, live.artifacts = self._boot(
            live.manifest, guest_request, accel, live.cell_dir, on_spawn=live.state.write_pid
        )
        return result

    def _boot(
        self,
        manifest: Manifest,
        request: GuestRequest,
        accel: str,
        work: str,
        on_spawn: Callable[[int], None] | None = None,
    ) -> tuple[WorkloadResult, dict[str, bytes | None]]:
        """Boot once for ``request``; the result and the artifacts the guest sent (None:
        missing there)."""
        raise NotImplementedError

    def open_artifact(self, handle: CellHandle, path: str) -> BinaryIO:
        live = _LIVE.get(handle.cell_id)
        guest_path = guest_artifact_path(live.spec, path)
        if guest_path is None:
            raise ExportError(path, "artifact path must name a file inside the cell without '..'")
        if live.artifacts.get(guest_path) is None:
            raise ExportError(path, "artifact does not exist in the guest")
        data = live.artifacts[guest_path]
        assert data is not None
        return io.BytesIO(data)

    def destroy(self, handle: CellHandle) -> TeardownReport:
        live = _LIVE.get(handle.cell_id)
        residue = self._teardown(live)
        return TeardownReport(
            cell_id=handle.cell_id,
            destroyed=not residue,
            peers_tracked_after=len(_LIVE),
            residue=tuple(residue),
        )

    def _teardown(self, live: _LiveCell) -> list[str]:
        """After the VMM is gone: the pool guest, the tap (our descriptor: the last one, so
        the tap goes), the scope, the record."""
        if live.guest is not None:
            live.guest.release()  # killed; the pool's manager removes it and boots another
        residue: list[str] = []
        if live.link is not None:
            live.link.close()
            live.link = None
        if live.egress is not None:
            residue += live.egress.close()
            live.egress = None
        residue += self.store.release(live.state)
        _LIVE.remove(live.spec.id)
        return residue

    def _state_of(self, handle: CellHandle) -> CellState:
        return _LIVE.get(handle.cell_id).state


class MicrovmBackend(MicrovmCellBackend):
    """The ``qemu`` backend: the request on ``-append``, the serial port on the VMM's stdio
    (a pool guest's on ``qemu.sock``), snapshots by migration to a file (QMP)."""

    name = "qemu"
    snapshot_files = ("snapshot.bin",)
    #: A tap in the cell's netns (``-netdev tap,fd=``): see cellos.network.guest_link.
    supports_egress = True

    def _boot(
        self,
        manifest: Manifest,
        request: GuestRequest,
        accel: str,
        work: str,
        on_spawn: Callable[[int], None] | None = None,
    ) -> tuple[WorkloadResult, dict[str, bytes | None]]:
        assert self.image_dir is not None  # load_image ran first
        workload, secret_files, link = request.workload, request.secret_files, request.link
        params, shape = request.params(), request.shape()
        append = kernel_append(params)
        sender = SecretSender(secret_files) if secret_files else None
        command = qemu_command(
            manifest.vmm.path,
            self.image_dir,
            append,
            accel,
            manifest.kernel.path,
            manifest.initrd.path,
            memory_mib=shape.memory_mib,
            vcpus=shape.vcpus,
            tap_fd=link.fd if link is not None else None,
            mac=link.mac if link is not None else None,
        )
        # The guest channel is decoded as it arrives: the workload's output is live.
        guest = GuestChannel(workload.output, on_ready=sender.send if sender else None)
        # The VMM needs no environment (the workload's travels on the command line).
        vmm = HostCommand(
            command,
            {},
            workload.deadline_seconds,
            workload.graceful_shutdown_seconds,
            workload.stop,
            output=guest,
        )
        try:
            raw = run_host_command(
                vmm,
                SpawnOptions(
                    cwd=work,
                    on_spawn=on_spawn,
                    die_with_parent=True,
                    on_stdin=sender.take if sender else None,
                    pass_fds=(link.fd,) if link is not None else (),
                ),
            )
        finally:
            if sender is not None:
                sender.close()
        if raw.spawn_error:
            return raw, {}
        return self._result(
            guest,
            raw.duration_ms,
            raw.forced,
            raw.reason,
            f"VMM status {raw.exit_code}",
            truncated=raw.truncated,
        )

    def pool_start(
        self, shape: Shape, guest_dir: str, *, restore: str | None, snapshottable: bool
    ) -> tuple[subprocess.Popen[bytes], socket.socket | None]:
        """PoolVmm: QEMU with its serial port on ``qemu.sock``; restored by an incoming
        migration from the snapshot file, or with a QMP socket to make one."""
        assert self.pool_manifest is not None and self.image_dir is not None
        manifest, accel = self.pool_manifest
        command = qemu_command(
            manifest.vmm.path,
            self.image_dir,
            POOL_APPEND,
            accel,
            manifest.kernel.path,
            manifest.initrd.path,
            memory_mib=shape.memory_mib,
            vcpus=shape.vcpus,
            channel_socket="qemu.sock",  # relative to the guest's directory (its cwd)
        )
        if restore is not None:
            snap = os.path.join(restore, self.snapshot_files[0])
            command += ["-incoming", f"exec:/bin/cat {shlex.quote(snap)}"]
        if snapshottable:
            command += ["-qmp", "unix:qmp.sock,server=on,wait=off"]
        return start_vmm(command, guest_dir), None

    def pool_snapshot(self, guest_dir: str, deadline: float) -> None:
        """Migrate the idle guest to ``snapshot.bin`` while it runs (an idle guest converges
        at once): a guest paused first would be restored paused."""
        with Qmp(os.path.join(guest_dir, "qmp.sock"), deadline) as qmp:
            qmp.call("migrate", {"uri": f"exec:/bin/cat > {self.snapshot_files[0]}"})
            while True:
                status = qmp.call("query-migrate").get("status")
                if status == "completed":
                    return
                if status in ("failed", "cancelled") or time.monotonic() > deadline:
                    raise HostError("microvm pool snapshot", f"migration {status}")
                time.sleep(0.05)


class SecretSender:
    """Sends the guest its secrets on the serial line (the VMM's stdin) once the guest init
    said ``CELLOS:READY``: the line is then in raw mode (nothing is echoed back), and init
    waits for exactly one ``CELLOS:SECRETS:<base64>`` line. A thread writes it, so that a
    slow guest never stalls the loop that drains the VMM's output; stdin is closed after."""

    def __init__(self, files: Mapping[str, bytes]) -> None:
        self._line: bytes | None = self.line_for(files)
        self._stdin: IO[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @staticmethod
    def line_for(files: Mapping[str, bytes]) -> bytes:
        """The one line that carries the secrets to the guest init."""
        return b"CELLOS:SECRETS:" + base64.b64encode(secret_files.encode(files)) + b"\n"

    def take(self, stdin: IO[bytes]) -> None:
        self._stdin = stdin

    def send(self) -> None:
        with self._lock:
            if self._stdin is None or self._line is None or self._thread is not None:
                return
            self._thread = threading.Thread(target=self._write, daemon=True)
            self._thread.start()

    def _write(self) -> None:
        stdin, line = self._stdin, self._line
        self._line = None
        if stdin is None or line is None:
            return
        with contextlib.suppress(OSError, ValueError):
            stdin.write(line)
            stdin.flush()
        with contextlib.suppress(OSError, ValueError):
            stdin.close()

    def close(self) -> None:
        """After the VMM exited: the writer is done (or fails on the closed pipe); nothing
        of the secrets stays referenced here."""
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._line = None
        with self._lock:
            if self._stdin is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._stdin.close()
                self._stdin = None
