"""The ``firecracker`` backend: the microVM cell runner with Firecracker as the VMM.

Everything but the launch is the shared runner's (:class:`~.backend.MicrovmCellBackend`): the
manifest verified before every boot, the state record and reaping, the guest channel, limits
as the machine's shape, the warm pool and its claims. Firecracker's specifics:

* **Kernel**: on x86_64 Firecracker boots only an uncompressed ELF kernel, so the image must
  have been built with ``cellos microvm build-image --firecracker DIR`` (its manifest pins
  ``vmlinux`` too, verified before every boot with the initrd and the firecracker binary);
  another image is refused naming what is missing.
* **Guest channel**: Firecracker emulates the 8250 serial port (the guest's ``ttyS0``) on its
  own stdin/stdout, so the guest init is the same as under QEMU. Its stdin/stdout are one end
  of a socket pair; the runner reads the other end. No vsock: Firecracker's virtio devices
  are virtio-mmio devices announced on the kernel command line, and Debian's cloud kernel has
  neither ``CONFIG_VIRTIO_MMIO`` nor ``CONFIG_VIRTIO_VSOCKETS`` built in (modules only), so
  the guest could not see them.
* **Launch**: ``firecracker --api-sock fc.sock`` in the cell's directory (its cwd: a reaper
  recognises it there), configured over the API in the specification's order
  (machine-config, boot-source, ``InstanceStart``); the request is on the kernel command line
  (``boot_args``), secrets follow on the channel after ``CELLOS:READY``. The guest cannot
  power Firecracker off (no ACPI power button), so the VMM is killed once the guest sent its
  exit code, as a pool guest's always is.
* **Acceleration**: KVM only (Firecracker has no software emulation). Without a firecracker
  binary (``CELLOS_FIRECRACKER`` or PATH) or an openable ``/dev/kvm`` the backend is refused
  when it is chosen, before anything runs; a KVM that cannot boot the guest (the shared,
  cached probe boot of ``/bin/true``) refuses the cell before it is created.
* **Pool and snapshots**: a pool guest's channel is its socket pair, which the pool's manager
  hands to the claiming supervisor (pool.py); a snapshot is ``PATCH /vm Paused`` then ``PUT
  /snapshot/create`` (``snapshot.vmstate`` and ``snapshot.mem``, both digests in the
  snapshot's manifest, verified before every restore), a restore is ``PUT /snapshot/load``
  with ``resume_vm`` into a fresh firecracker, and the request line reseeds the guest's RNG
  and sets its clock, as under QEMU.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from cellos.core import isolation as iso
from cellos.core.errors import CellosError, HostError, PolicyRefused
from cellos.core.ports import WorkloadResult
from cellos.hosts.microvm.accel import KVM_DEVICE, kvm_identity
from cellos.hosts.microvm.backend import GuestRequest, MicrovmCellBackend
from cellos.hosts.microvm.firecracker import (
    FIRECRACKER_ENV,
    FirecrackerClient,
    FirecrackerDriver,
    Launch,
    snapshot_create,
    vm_state,
)
from cellos.hosts.microvm.image import MANIFEST_NAME
from cellos.hosts.microvm.manifest import Manifest
from cellos.hosts.microvm.pool import STDIO, Shape, log_tail
from cellos.hosts.microvm.qemu_probe import kernel_append
from cellos.hosts.process import die_with_parent

#: Kernel arguments of every Firecracker guest: the serial console, a reset (``reboot=k``,
#: which ends Firecracker) rather than a hang on panic, no PCI probing (there is none).
FC_APPEND = "console=ttyS0 quiet loglevel=0 panic=-1 reboot=k pci=off"
FC_POOL_APPEND = f"{FC_APPEND} cellos.pool=1"
#: Firecracker's API socket, relative to the VMM's directory (its cwd).
API_SOCKET = "fc.sock"
SNAPSHOT_STATE = "snapshot.vmstate"
SNAPSHOT_MEM = "snapshot.mem"
BUILD_HINT = "cellos microvm build-image --firecracker DIR, then CELLOS_MICROVM_IMAGE=DIR"


class FirecrackerBackend(MicrovmCellBackend):
    name = "firecracker"
    vmm_feature = iso.MICROVM_FIRECRACKER
    pool_channel = STDIO
    snapshot_files = (SNAPSHOT_STATE, SNAPSHOT_MEM)

    def __init__(
        self,
        *,
        image_dir: str | None,
        state_root: str | None = None,
        accel: str | None = None,
        pool_size: int = 0,
        firecracker: str | None = None,
    ) -> None:
        # What this host lacks is said before anything else is looked at: the binary, KVM.
        found = shutil.which(firecracker or "firecracker")
        if found is None:
            raise HostError(
                FIRECRACKER_ENV,
                f"{firecracker or 'firecracker'} not found: the firecracker backend needs the "
                "firecracker binary (set CELLOS_FIRECRACKER to it or put it on PATH)",
            )
        if accel == "tcg":
            raise PolicyRefused(
                "CELLOS_MICROVM_ACCEL", "Firecracker runs guests under KVM only (no TCG)"
            )
        if kvm_identity() is None:
            raise HostError(
                KVM_DEVICE,
                "cannot be opened: Firecracker runs guests under KVM only (it has no software "
                "emulation); use the qemu backend here",
            )
        if not image_dir:
            raise PolicyRefused(
                "CELLOS_MICROVM_IMAGE",
                f"the firecracker backend boots an image built for it (an ELF vmlinux): "
                f"{BUILD_HINT}",
            )
        super().__init__(
            image_dir=image_dir, state_root=state_root, accel=accel, pool_size=pool_size
        )
        self.firecracker = os.path.realpath(found)

    def check_manifest(self, manifest: Manifest) -> None:
        where = str(Path(str(self.image_dir)) / MANIFEST_NAME)
        if manifest.vmlinux is None:
            raise HostError(
                where,
                "no vmlinux: Firecracker boots only an uncompressed ELF kernel on x86_64 and "
                f"this image has the bzImage only (build one with: {BUILD_HINT})",
            )
        if manifest.vmm.path != self.firecracker:
            raise HostError(
                FIRECRACKER_ENV,
                f"{self.firecracker} is not the VMM this image was built for "
                f"({manifest.vmm.path}); rebuild it with: {BUILD_HINT}",
            )

    def _tcg_or_refuse(self, why: str) -> str:
        raise HostError(
            KVM_DEVICE,
            f"{why}; Firecracker has no software emulation, so the firecracker backend cannot "
            "run here (the qemu backend can, with CELLOS_MICROVM_ALLOW_TCG=1)",
        )

    # -- launching ----------------------------------------------------------------------------

    def _launch(
        self,
        manifest: Manifest,
        shape: Shape,
        work: str,
        serial: socket.socket,
        *,
        append: str,
        restore: str | None = None,
    ) -> FirecrackerDriver:
        """Start firecracker in ``work`` with ``serial`` as the guest's serial port: booted
        with ``append``, or restored from the snapshot in the directory ``restore``. The VMM
        dies with this process; its own log is ``work/vmm.log``. On failure it is killed and
        the error raised."""
        assert self.image_dir is not None and manifest.vmlinux is not None
        log_fd = os.open(
            os.path.join(work, "vmm.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
            0o600,
        )  # fmt: skip
        launch = Launch(
            serial=serial.fileno(),
            stderr=log_fd,
            cwd=work,
            env={},
            preexec_fn=die_with_parent(),
            # Firecracker's own log goes to stdout unless told otherwise: that is the guest's
            # serial port here, so it goes to the log file (warnings and worse).
            extra_args=("--log-path", "vmm.log", "--level", "Warning"),
        )
        # Firecracker answers on its API within milliseconds; the bound is for a loaded host.
        driver = FirecrackerDriver(manifest.vmm.path, socket_timeout=10.0)
        try:
            if restore is not None:
                driver.restore(
                    os.path.join(restore, SNAPSHOT_STATE),
                    os.path.join(restore, SNAPSHOT_MEM),
                    API_SOCKET,
                    launch=launch,
                )
            else:
                driver.boot(
                    str(self.image_dir / manifest.vmlinux.path),
                    str(self.image_dir / manifest.initrd.path),
                    append,
                    shape.vcpus,
                    shape.memory_mib,
                    API_SOCKET,
                    launch=launch,
                )
        finally:
            os.close(log_fd)
        return driver

    def _boot(
        self,
        manifest: Manifest,
        request: GuestRequest,
        accel: str,
        work: str,
        on_spawn: Callable[[int], None] | None = None,
    ) -> tuple[WorkloadResult, dict[str, bytes | None]]:
        assert request.link is None  # egress is refused at create (supports_egress is False)
        workload, secret_files = request.workload, request.secret_files
        params, shape = request.params(), request.shape()
        append = kernel_append(params, FC_APPEND)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        started = time.monotonic()
        with ours:
            try:
                driver = self._launch(manifest, shape, work, theirs, append=append)
            except CellosError as exc:
                log = log_tail(os.path.join(work, "vmm.log"))
                return WorkloadResult(
                    exit_code=None,
                    duration_ms=int((time.monotonic() - started) * 1000),
                    spawn_error=f"{exc.path}: {exc.reason}" + (f"; VMM log: {log}" if log else ""),
                    reason="spawn_failed",
                ), {}
            finally:
                theirs.close()  # the VMM has its own copy: EOF here when it is gone
            assert driver.process is not None
            if on_spawn is not None:
                on_spawn(driver.process.pid)
            return self._run_on_channel(
                ours,
                driver.cleanup,
                workload,
                None,
                secret_files,
                log=os.path.join(work, "vmm.log"),
            )

    # -- the warm pool (pool.PoolVmm) ---------------------------------------------------------

    def pool_start(
        self, shape: Shape, guest_dir: str, *, restore: str | None, snapshottable: bool
    ) -> tuple[subprocess.Popen[bytes], socket.socket | None]:
        assert self.pool_manifest is not None
        manifest, _accel = self.pool_manifest
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            driver = self._launch(
                manifest, shape, guest_dir, theirs, append=FC_POOL_APPEND, restore=restore
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        assert driver.process is not None
        return driver.process, ours

    def pool_snapshot(self, guest_dir: str, deadline: float) -> None:
        """Pause the idle guest and write its full snapshot beside it (relative paths: the
        VMM's cwd is ``guest_dir``)."""
        client = FirecrackerClient(
            os.path.join(guest_dir, API_SOCKET), timeout=max(1.0, deadline - time.monotonic())
        )
        for request in (vm_state("Paused"), snapshot_create(SNAPSHOT_STATE, SNAPSHOT_MEM)):
            client.send(request)
