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

import io
import os
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cellos.core.errors import ExportError, HostError, PolicyRefused
from cellos.core.ports import CellHandle, TeardownReport, WorkloadRequest, WorkloadResult
from cellos.core.spec import CellSpec
from cellos.hosts.live import LiveCells
from cellos.hosts.microvm.firecracker import mem_mib_for, vcpus_for
from cellos.hosts.microvm.image import MANIFEST_NAME
from cellos.hosts.microvm.manifest import Manifest, load_manifest, verify
from cellos.hosts.microvm.qemu_probe import kernel_append, parse_channel, qemu_command
from cellos.hosts.process import SpawnOptions, spawn_isolated_workload


@dataclass
class _LiveCell:
    spec: CellSpec
    cell_dir: str
    manifest: Manifest
    artifacts: dict[str, bytes | None] = field(default_factory=dict)


_LIVE: LiveCells[_LiveCell] = LiveCells()
#: The Debian cloud kernel does not get through unpacking its initramfs with less (it hangs
#: at 128 MiB): a smaller memoryMaxBytes still gives the guest this much.
MIN_GUEST_MIB = 256
_ACCEL: dict[str, str] = {}
_ACCEL_LOCK = threading.Lock()


class MicrovmBackend:
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
        self.state_root = state_root or os.path.join(tempfile.gettempdir(), "cellos-microvm")

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
            result, _ = self._boot(manifest, ["/bin/true"], {}, [], "kvm", work, 20.0, 1.0, None)
        return result.exit_code == 0 and not result.forced

    # -- lifecycle ---------------------------------------------------------------------------

    def create(self, spec: CellSpec) -> CellHandle:
        manifest = load_manifest(self.image_dir / MANIFEST_NAME)
        # Refused before boot: a tampered kernel, initrd or VMM never runs.
        digests = verify(manifest, self.image_dir)
        cell_dir = os.path.join(self.state_root, f"{spec.id}-{uuid.uuid4().hex[:12]}")

        def track() -> _LiveCell:
            os.makedirs(cell_dir, mode=0o700)
            return _LiveCell(spec=spec, cell_dir=cell_dir, manifest=manifest)

        os.makedirs(self.state_root, mode=0o700, exist_ok=True)
        _LIVE.add(spec.id, track)
        return CellHandle(
            cell_id=spec.id,
            backend=self.name,
            isolation=(
                "microvm:qemu",
                "guest-kernel",
                "manifest:verified",
                "workload:unprivileged-in-guest",
                "network:none",
            ),
            resources={"cellDir": cell_dir},
            digests={f"{name}Sha256": value for name, value in digests.items()},
        )

    def run(self, handle: CellHandle, request: WorkloadRequest) -> WorkloadResult:
        live = _LIVE.get(handle.cell_id)
        limits = live.spec.limits
        accel = self.accel(live.manifest)
        artifacts = sorted({a.path for a in live.spec.artifacts if a.path.startswith("/")})
        result, live.artifacts = self._boot(
            live.manifest,
            list(request.argv),
            dict(request.env),
            artifacts,
            accel,
            live.cell_dir,
            request.deadline_seconds,
            request.graceful_shutdown_seconds,
            limits,
        )
        return result

    def _boot(
        self,
        manifest: Manifest,
        argv: list[str],
        env: dict[str, str],
        artifacts: list[str],
        accel: str,
        work: str,
        deadline: float | None,
        grace: float,
        limits: object,
    ) -> tuple[WorkloadResult, dict[str, bytes | None]]:
        """Boot once; the result and the artifacts the guest sent (None: missing there)."""
        from cellos.core.spec import Limits

        lim = limits if isinstance(limits, Limits) else None
        append = kernel_append(argv, env, artifacts)
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
        vmm_request = WorkloadRequest(
            argv=argv,
            env={},
            working_directory="/",
            deadline_seconds=deadline,
            graceful_shutdown_seconds=grace,
        )
        raw = spawn_isolated_workload(
            vmm_request, SpawnOptions(cwd=work, log_dir=work, command=command)
        )
        if raw.spawn_error:
            return raw, {}
        log = Path(work, "stdout.log").read_bytes().decode("utf-8", "replace")
        try:
            channel = parse_channel([line.rstrip("\r") for line in log.split("\n")])
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
            stdout_bytes=len(channel["stdout"]),
            stderr_bytes=len(channel["stderr"]),
            truncated=raw.truncated,
        )
        return result, dict(channel.get("artifacts", {}))

    def open_artifact(self, handle: CellHandle, path: str) -> BinaryIO:
        live = _LIVE.get(handle.cell_id)
        if path not in live.artifacts or live.artifacts[path] is None:
            raise ExportError(path, "artifact does not exist in the guest")
        data = live.artifacts[path]
        assert data is not None
        return io.BytesIO(data)

    def destroy(self, handle: CellHandle) -> TeardownReport:
        live = _LIVE.get(handle.cell_id)
        shutil.rmtree(live.cell_dir, ignore_errors=True)
        residue = [live.cell_dir] if os.path.lexists(live.cell_dir) else []
        peers = _LIVE.remove(handle.cell_id)
        return TeardownReport(
            cell_id=handle.cell_id,
            destroyed=not residue,
            peers_tracked_after=peers,
            residue=tuple(residue),
        )


def _kvm_present() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True
