"""``cellos doctor``: which isolation features this host supports, and what is missing."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cellos.hosts.microvm.accel import AccelDecision


@dataclass(frozen=True)
class Check:
    feature: str
    ok: bool
    detail: str


def _run(argv: list[str], timeout: float = 20) -> tuple[int, str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return -1, str(exc)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def check_sandbox() -> Check:
    """A real one-shot cell through the same launcher and command line the backend uses."""
    from cellos.core.errors import CellosError
    from cellos.hosts.cellos.launcher import landlock_abi, launcher_path
    from cellos.hosts.cellos.sandbox import SandboxPlan, launcher_argv

    try:
        launcher = launcher_path(os.environ.get("CELLOS_LAUNCHER") or None)
    except CellosError as exc:
        return Check("namespaces", False, exc.reason)
    with tempfile.TemporaryDirectory() as workspace:
        plan = SandboxPlan(
            cell_id="doctor",
            workspace=workspace,
            working_directory="/workspace",
            user_namespace=os.geteuid() != 0,
            landlock_abi=landlock_abi(),
        )
        code, out = _run(launcher_argv(plan, ["/bin/sh", "-c", "hostname; echo $$"], launcher))
    if code != 0 or out.split() != ["doctor", "2"]:
        return Check("namespaces", False, f"sandbox failed: {out[:200]}")
    kinds = (
        "user,pid,mount,net,uts,ipc,cgroup"
        if plan.user_namespace
        else "pid,mount,net,uts,ipc,cgroup"
    )
    return Check("namespaces", True, f"{kinds} via {launcher} (workload is pid 2)")


def check_user_namespaces() -> Check:
    try:
        with open("/proc/sys/user/max_user_namespaces", encoding="ascii") as fh:
            limit = int(fh.read())
    except (OSError, ValueError):
        return Check("user-namespaces", False, "cannot read user.max_user_namespaces")
    return Check(
        "user-namespaces",
        limit > 0,
        f"user.max_user_namespaces={limit}"
        + ("" if limit > 0 else ": unprivileged cells impossible"),
    )


def check_cgroups() -> list[Check]:
    from cellos.hosts.cellos import cgroups

    layout = cgroups.detect()
    checks = []
    for ctrl in cgroups.CONTROLLERS:
        hierarchy = layout.by_controller.get(ctrl)
        if hierarchy is None:
            checks.append(Check(f"cgroup:{ctrl}", False, "no hierarchy offers this controller"))
            continue
        writable = os.access(hierarchy.mount, os.W_OK)
        checks.append(
            Check(
                f"cgroup:{ctrl}",
                writable,
                f"v{hierarchy.version} at {hierarchy.mount}"
                + ("" if writable else " (not writable: limits cannot be enforced)"),
            )
        )
    mount, favored = cgroups.favordynmods()
    checks.append(
        Check(
            "cgroup:favordynmods",
            favored,
            f"on ({mount}): joining a cell's cgroup takes ~0.1 ms"
            if favored
            else "off: joining a cell's cgroup can wait for an RCU grace period (5-20 ms per "
            "cell); as root: mount -o remount,favordynmods "
            + (mount or "<a cgroup2 mount>")
            + " (scripts/setup.sh does it; see docs/isolation.md)",
        )
    )
    return checks


def check_seccomp() -> Check:
    try:
        from cellos.hosts.cellos.seccomp_filter import workload_filter_bpf

        size = len(workload_filter_bpf())
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"
        return Check("seccomp", False, f"libseccomp filter cannot be built: {exc}")
    return Check("seccomp", True, f"deny-list filter, {size // 8} BPF instructions")


def check_landlock() -> Check:
    from cellos.hosts.cellos.launcher import landlock_abi

    version = landlock_abi()
    if not version:
        return Check("landlock", False, "not available (kernel without Landlock or disabled)")
    return Check(
        "landlock",
        True,
        f"ABI {version}; applied to every cell (writes only in the workspace, /tmp, /dev)",
    )


def check_tool(name: str, version_args: list[str], feature: str) -> Check:
    path = shutil.which(name)
    if path is None:
        return Check(feature, False, f"{name} not installed")
    code, out = _run([path, *version_args])
    first = out.splitlines()[0] if out else ""
    return Check(feature, code == 0, f"{path}: {first}")


def check_nftables() -> Check:
    """What egress authority needs: the kernel's nf_tables answering this process (the
    supervisor writes a cell's table itself; the ``nft`` tool only shows it)."""
    from cellos.network import nft_netlink

    try:
        nft_netlink.rule_counters("inet", "cellos_doctor_probe")
    except OSError as exc:
        need = " (egress authority needs root)" if os.geteuid() != 0 else ""
        return Check("nftables", False, f"nf_tables netlink: {exc.strerror}{need}")
    nft = shutil.which("nft")
    shown = (
        f"{nft} shows a cell's table" if nft else "nft (to look at a cell's table) not installed"
    )
    return Check("nftables", True, f"nf_tables answers; {shown}")


def _runsc_default_platform(runsc: str) -> str:
    code, out = _run([runsc, "flags"])
    match = re.search(r'-platform string\s.*?\(default "([a-z]+)"\)', out, re.DOTALL)
    return match.group(1) if code == 0 and match else "unknown"


def check_gvisor() -> Check:
    """A real one-shot runsc container through the gvisor backend."""
    runsc = shutil.which("runsc")
    if runsc is None:
        return Check("gvisor", False, "runsc not installed (apt-get install runsc)")
    if os.geteuid() != 0:
        return Check("gvisor", False, "runsc is installed but this build runs it as root only")
    from cellos.core.loading import validate_document
    from cellos.core.ports import WorkloadRequest
    from cellos.hosts.gvisor import GvisorBackend

    platform = os.environ.get("CELLOS_GVISOR_PLATFORM") or _runsc_default_platform(runsc)
    spec = validate_document(
        {
            "apiVersion": "cellos.io/v1",
            "kind": "ExecutionCell",
            "spec": {"id": "doctor", "run": {"argv": ["/bin/uname", "-r"]}},
        }
    ).spec
    with tempfile.TemporaryDirectory() as state:
        backend = GvisorBackend(state_root=state, platform=os.environ.get("CELLOS_GVISOR_PLATFORM"))
        handle = backend.create(spec)
        try:
            result = backend.run(
                handle,
                WorkloadRequest(
                    argv=["/bin/uname", "-r"],
                    env={},
                    working_directory="/workspace",
                    deadline_seconds=60,
                    graceful_shutdown_seconds=1,
                ),
            )
        finally:
            backend.destroy(handle)
    kernel = result.stdout.decode(errors="replace").strip()
    if result.exit_code != 0 or not kernel:
        return Check(
            "gvisor",
            False,
            f"runsc one-shot container failed: "
            f"{result.spawn_error or result.stderr.decode(errors='replace')[:200]}",
        )
    return Check(
        "gvisor",
        True,
        f"{runsc}: one-shot container ran, guest kernel {kernel}, platform {platform}",
    )


def check_kvm() -> Check:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return Check("kvm", False, f"/dev/kvm: {exc.strerror}")
    try:
        kvm_get_api_version = 0xAE00
        api = fcntl.ioctl(fd, kvm_get_api_version)
    finally:
        os.close(fd)
    return Check(
        "kvm",
        api == 12,
        f"/dev/kvm API {api} (whether a guest boots: see microvm:qemu)",
    )


def run_checks(*, refresh_microvm_probe: bool = False) -> list[Check]:
    return [
        check_sandbox(),
        check_user_namespaces(),
        *check_cgroups(),
        check_seccomp(),
        check_landlock(),
        check_nftables(),
        check_gvisor(),
        check_kvm(),
        *check_microvm(refresh_probe=refresh_microvm_probe),
    ]


def check_microvm(*, refresh_probe: bool = False) -> list[Check]:
    """Which microVM drivers can boot here, with which acceleration (the cached KVM probe,
    probed again with ``refresh_probe``), and the image the qemu backend would boot."""
    checks: list[Check] = []
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        checks.append(Check("microvm:qemu", False, "qemu-system-x86_64 not installed"))
    else:
        checks.extend(_check_qemu(qemu, refresh_probe))
    checks.append(check_microvm_pool())
    checks.append(_check_firecracker(refresh_probe))
    return checks


def _check_firecracker(refresh_probe: bool) -> Check:
    """Whether ``CELLOS_CELL_BACKEND=firecracker`` would run here, and if not, why: the
    binary, KVM, an image built for it, and whether KVM boots its guest (the backend's
    cached probe). The refusal is the one a cell would get."""
    from cellos.core.errors import CellosError
    from cellos.hosts.registry import make_microvm_backend

    env = {**os.environ, "CELLOS_MICROVM_POOL": "0"}
    try:
        backend = make_microvm_backend("firecracker", env)
        manifest, _ = backend.load_image(build=False)
        decision = backend.decide_accel(manifest, refresh=refresh_probe)
        backend.allowed_accel(decision)  # the refusal a cell would get
    except CellosError as exc:
        return Check("microvm:firecracker", False, f"{exc.path}: {exc.reason}")
    firecracker = getattr(backend, "firecracker", manifest.vmm.path)
    return Check(
        "microvm:firecracker",
        True,
        f"{firecracker}: boots {backend.image_dir} under KVM ({_describe(decision)})",
    )


def check_microvm_pool() -> Check:
    """The warm pool of the state directory (``cellos microvm pool``), if one runs."""
    from cellos.hosts.microvm.pool import live_pool, wait_ready
    from cellos.hosts.state import default_state_root

    root = os.environ.get("CELLOS_STATE_DIR") or default_state_root()
    settings = live_pool(root)
    if settings is None:
        wanted = os.environ.get("CELLOS_MICROVM_POOL") or "unset"
        return Check(
            "microvm:pool",
            True,
            f"no pool running for {root} (CELLOS_MICROVM_POOL={wanted}; qemu cells boot cold "
            "until one runs: cellos microvm pool)",
        )
    error = settings.get("error")
    return Check(
        "microvm:pool",
        not error,
        f"pool of {settings.get('size')} ({settings.get('memoryMiB')} MiB, "
        f"{settings.get('vcpus')} vCPU, {settings.get('accel')}), "
        f"{wait_ready(root, 0, 0)} idle, manager pid {settings.get('pid')}"
        + (f"; cannot boot guests: {error}" if error else ""),
    )


def _describe(decision: AccelDecision) -> str:
    if decision.decided_by in ("probe", "cache"):
        how = "probed now" if decision.decided_by == "probe" else "cached probe"
        return (
            f"{decision.accel} ({how} of {decision.probed_at}, {decision.probe_ms} ms: "
            f"{decision.detail}; re-probe: cellos doctor --refresh-microvm-probe)"
        )
    return f"{decision.accel} ({decision.decided_by}: {decision.detail})"


def _check_qemu(qemu: str, refresh_probe: bool) -> list[Check]:
    from cellos.core.errors import CellosError
    from cellos.hosts.microvm.backend import MicrovmBackend

    image = os.environ.get("CELLOS_MICROVM_IMAGE") or None
    try:
        backend = MicrovmBackend(
            image_dir=image,
            state_root=os.environ.get("CELLOS_STATE_DIR") or None,
            allow_tcg=True,
            accel=os.environ.get("CELLOS_MICROVM_ACCEL") or None,
        )
        # Doctor reports; it does not build the default image (the first cell or
        # `cellos microvm build-image` does).
        manifest, _ = backend.load_image(build=False)
        decision = backend.decide_accel(manifest, refresh=refresh_probe)
    except CellosError as exc:
        return [Check("microvm:qemu", False, f"{exc.path}: {exc.reason}")]
    accel_check = Check("microvm:accel", True, _describe(decision))
    try:
        with tempfile.TemporaryDirectory() as work:
            result = backend.boot_true(manifest, decision.accel, work, 60.0)
    except CellosError as exc:
        return [Check("microvm:qemu", False, f"{exc.path}: {exc.reason}"), accel_check]
    booted = result.exit_code == 0
    note = " (KVM cannot boot this guest here)" if decision.accel == "tcg" else ""
    source = image or f"{backend.image_dir} (cached default image)"
    return [
        Check(
            "microvm:qemu",
            booted,
            f"{qemu}: a one-shot guest of {source} "
            f"{'booted' if booted else 'failed'} with {decision.accel}{note}",
        ),
        accel_check,
    ]
