"""The microVM backend: each cell boots its own guest kernel (QEMU driver).

Before every boot the image's manifest is verified (kernel, initrd and VMM binary, sha256);
a mismatch refuses the cell before anything starts, and the verified digests are stamped on
the ``CellHandle``. The request travels on the kernel command line (``cellos.argv=`` etc.),
the guest init reports output, artifacts and the exit code on the serial port, which the
guest's workload (run as an unprivileged user) cannot open. Timeout and TTL kill the VMM.

The machine is ``microvm`` under KVM; under TCG it is ``q35``, because the microvm machine
(no HPET or ACPI PM timer) hangs at random while the guest calibrates its TSC under
software emulation.

Acceleration is detected, not assumed: KVM is used when a probe boot with ``-accel kvm``
succeeds; otherwise TCG, and only where the operator allows it
(``CELLOS_MICROVM_ALLOW_TCG=1``).
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO

from cellos.core import isolation as iso
from cellos.core.errors import ExportError, HostError, PolicyRefused
from cellos.core.ports import CellHandle, TeardownReport, WorkloadRequest, WorkloadResult
from cellos.core.spec import CellSpec
from cellos.hosts import secret_files
from cellos.hosts.live import LiveCells, StoredBackend
from cellos.hosts.microvm.channel import GuestChannel
from cellos.hosts.microvm.firecracker import mem_mib_for, vcpus_for
from cellos.hosts.microvm.image import MANIFEST_NAME
from cellos.hosts.microvm.manifest import Manifest, load_manifest, verify
from cellos.hosts.microvm.qemu_probe import kernel_append, qemu_command
from cellos.hosts.microvm.request import (
    cgroup_settings,
    check_working_directory,
    explain,
    guest_artifact_path,
    guest_hostname,
)
from cellos.hosts.process import HostCommand, SpawnOptions, run_host_command
from cellos.hosts.state import CellState, CellStore


@dataclass
class _LiveCell:
    spec: CellSpec
    state: CellState
    manifest: Manifest
    artifacts: dict[str, bytes | None] = field(default_factory=dict)

    @property
    def cell_dir(self) -> str:
        return self.state.cell_dir


_LIVE: LiveCells[_LiveCell] = LiveCells()
#: The Debian cloud kernel does not get through unpacking its initramfs with less (it hangs
#: at 128 MiB): a smaller memoryMaxBytes still gives the guest this much.
MIN_GUEST_MIB = 256
_ACCEL: dict[str, str] = {}
_ACCEL_LOCK = threading.Lock()


class MicrovmBackend(StoredBackend):
    name = "qemu"

    def __init__(
        self,
        *,
        image_dir: str | None,
        state_root: str | None = None,
        allow_tcg: bool = False,
        accel: str | None = None,
    ) -> None:
        if not image_dir:
            raise PolicyRefused(
                "CELLOS_MICROVM_IMAGE",
                "the qemu backend needs an image "
                "directory (build one with: cellos microvm build-image DIR)",
            )
        self.image_dir = Path(image_dir)
        if not (self.image_dir / MANIFEST_NAME).is_file():
            raise PolicyRefused(
                "CELLOS_MICROVM_IMAGE",
                f"{image_dir}: no {MANIFEST_NAME} (the manifest is required)",
            )
        if accel not in (None, "kvm", "tcg"):
            raise PolicyRefused("CELLOS_MICROVM_ACCEL", "must be kvm or tcg")
        self.allow_tcg = allow_tcg
        self.forced_accel = accel
        self.store = CellStore(state_root)

    # -- acceleration ------------------------------------------------------------------------

    def accel(self, manifest: Manifest) -> str:
        if self.forced_accel == "kvm":
            return "kvm"
        if self.forced_accel == "tcg" or not _kvm_present():
            return self._tcg_or_refuse("no usable /dev/kvm")
        key = str(self.image_dir)
        with _ACCEL_LOCK:
            if key not in _ACCEL:
                _ACCEL[key] = "kvm" if self._probe_kvm(manifest) else "tcg"
        return "kvm" if _ACCEL[key] == "kvm" else self._tcg_or_refuse("KVM cannot boot the guest")

    def _tcg_or_refuse(self, why: str) -> str:
        if not self.allow_tcg:
            raise PolicyRefused(
                "CELLOS_MICROVM_ALLOW_TCG",
                f"{why}; software emulation (TCG) "
                "is slow and must be allowed explicitly (set it to 1)",
            )
        return "tcg"

    def _probe_kvm(self, manifest: Manifest) -> bool:
        """/dev/kvm can exist and still be unable to boot an ordinary guest (e.g. hosts that
        only run paravirtualised guests): a short real boot decides."""
        with tempfile.TemporaryDirectory() as work:
            result = self.boot_true(manifest, "kvm", work, 20.0)
        return result.exit_code == 0 and not result.forced

    def boot_true(
        self, manifest: Manifest, accel: str, work: str, timeout: float
    ) -> WorkloadResult:
        """Boot a guest that runs ``/bin/true`` (a probe: can this host boot the image?)."""
        probe = HostCommand(["/bin/true"], {}, timeout, 1.0)
        return self._boot(manifest, probe, [], accel, work, None)[0]

    # -- lifecycle ---------------------------------------------------------------------------

    def create(self, spec: CellSpec) -> CellHandle:
        check_working_directory(spec)
        manifest = load_manifest(self.image_dir / MANIFEST_NAME)
        # Refused before boot: a tampered kernel, initrd or VMM never runs.
        digests = verify(manifest, self.image_dir)
        # The record names the VMM and the directory it runs in (its cwd), so that a reaper
        # kills exactly this cell's VMM if the supervisor dies.
        record = {"vmm": manifest.vmm.path, "cellDir": self.store.cell_dir(spec.id)}
        live = self.open_cell(
            _LIVE, spec, record, lambda cell: _LiveCell(spec=spec, state=cell, manifest=manifest)
        )
        return CellHandle(
            cell_id=spec.id,
            backend=self.name,
            isolation=(
                iso.MICROVM_QEMU,
                iso.GUEST_KERNEL,
                iso.MANIFEST_VERIFIED,
                iso.WORKLOAD_UNPRIVILEGED_IN_GUEST,
                # The guest has no network device: its loopback is all there is.
                iso.NETWORK_LOOPBACK_ONLY,
            ),
            resources={"cellDir": live.cell_dir},
            digests={f"{name}Sha256": value for name, value in digests.items()},
        )

    def secret_files_refusal(self, spec: CellSpec) -> str | None:
        """Secrets travel on the guest channel (the serial line, after ``CELLOS:READY``),
        never on the kernel command line; the guest init writes them to a tmpfs."""
        return None

    def run(self, handle: CellHandle, request: WorkloadRequest) -> WorkloadResult:
        live = _LIVE.get(handle.cell_id)
        limits = live.spec.limits
        accel = self.accel(live.manifest)
        guest_paths = {guest_artifact_path(live.spec, a.path) for a in live.spec.artifacts}
        artifacts = sorted(p for p in guest_paths if p is not None)
        result, live.artifacts = self._boot(
            live.manifest,
            HostCommand.for_workload(request),
            artifacts,
            accel,
            live.cell_dir,
            limits,
            on_spawn=live.state.write_pid,
            hostname=guest_hostname(live.spec),
            workdir=live.spec.working_directory,
            secret_files=request.secret_files,
            secret_lease=request.secret_lease_seconds,
        )
        return result

    def _boot(
        self,
        manifest: Manifest,
        workload: HostCommand,
        artifacts: list[str],
        accel: str,
        work: str,
        limits: object,
        on_spawn: Callable[[int], None] | None = None,
        *,
        hostname: str | None = None,
        workdir: str | None = None,
        secret_files: Mapping[str, bytes] | None = None,
        secret_lease: int | None = None,
    ) -> tuple[WorkloadResult, dict[str, bytes | None]]:
        """Boot once; the result and the artifacts the guest sent (None: missing there).
        ``workload`` is what the guest runs, with the deadline and stop of the VMM."""
        from cellos.core.spec import Limits

        lim = limits if isinstance(limits, Limits) else None
        append = kernel_append(
            list(workload.argv),
            dict(workload.env),
            artifacts,
            hostname=hostname,
            workdir=workdir,
            cgroup=cgroup_settings(lim),
            secrets=bool(secret_files),
            secret_lease=secret_lease if secret_files else None,
        )
        sender = SecretSender(secret_files) if secret_files else None
        command = qemu_command(
            manifest.vmm.path,
            self.image_dir,
            append,
            accel,
            manifest.kernel.path,
            manifest.initrd.path,
            memory_mib=max(MIN_GUEST_MIB, mem_mib_for(lim.memory_max_bytes if lim else None)),
            vcpus=vcpus_for(lim.cpu_max if lim else None),
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
                    log_dir=work,
                    on_spawn=on_spawn,
                    die_with_parent=True,
                    on_stdin=sender.take if sender else None,
                ),
            )
        finally:
            if sender is not None:
                sender.close()
        if raw.spawn_error:
            return raw, {}
        try:
            channel = guest.finish()
        except HostError as exc:
            return WorkloadResult(
                exit_code=None,
                duration_ms=raw.duration_ms,
                spawn_error=f"guest channel: {exc.reason}",
                reason="spawn_failed",
            ), {}
        exit_code = None if raw.forced else channel.get("exit_code")
        result = WorkloadResult(
            exit_code=exit_code,
            duration_ms=raw.duration_ms,
            forced=raw.forced,
            reason=raw.reason if raw.forced else None,
            spawn_error=channel.get("spawn_error")
            or (
                None
                if raw.forced or exit_code is not None
                else f"the guest reported no exit code (VMM status {raw.exit_code})"
            ),
            stdout=channel["stdout"],
            stderr=channel["stderr"],
            stdout_bytes=channel["stdout_bytes"],
            stderr_bytes=channel["stderr_bytes"],
            truncated=raw.truncated,
        )
        return explain(result, channel.get("limits")), dict(channel.get("artifacts", {}))

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
        residue = self.store.release(live.state)
        peers = _LIVE.remove(handle.cell_id)
        return TeardownReport(
            cell_id=handle.cell_id,
            destroyed=not residue,
            peers_tracked_after=peers,
            residue=tuple(residue),
        )

    def _state_of(self, handle: CellHandle) -> CellState:
        return _LIVE.get(handle.cell_id).state


class SecretSender:
    """Sends the guest its secrets on the serial line (the VMM's stdin) once the guest init
    said ``CELLOS:READY``: the line is then in raw mode (nothing is echoed back), and init
    waits for exactly one ``CELLOS:SECRETS:<base64>`` line. A thread writes it, so that a
    slow guest never stalls the loop that drains the VMM's output; stdin is closed after."""

    def __init__(self, files: Mapping[str, bytes]) -> None:
        self._line: bytes | None = (
            b"CELLOS:SECRETS:" + base64.b64encode(secret_files.encode(files)) + b"\n"
        )
        self._stdin: IO[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

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


def _kvm_present() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True
