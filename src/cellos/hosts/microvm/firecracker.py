"""Firecracker VMM driver: request builders, an API client and a process driver.

Firecracker is configured entirely through a REST API served on a Unix socket
(``firecracker --api-sock <path>``). This module is written against the API specification
(``firecracker-api.yaml``, Swagger 2.0) and keeps three layers apart so each can be tested
without a Firecracker binary:

* **request builders** — pure functions returning an :class:`ApiRequest` ``(method, path,
  body)``; the tests validate every body against the spec's ``definitions``;
* :class:`FirecrackerClient` — HTTP/1.1 over the API socket with the standard library only
  (no ``requests-unixsocket``), turning Firecracker's ``{"fault_message": ...}`` answers into a
  typed :class:`FirecrackerApiError` (a :class:`~cellos.core.errors.HostError`);
* :class:`FirecrackerDriver` — launches ``firecracker`` (optionally under the ``jailer``), waits
  for the socket, sends the pre-boot configuration in order, starts the instance, and kills and
  cleans up so that no socket is left behind.

CellOS limits map onto the machine configuration with :func:`vcpus_for` and
:func:`mem_mib_for` (see :func:`machine_config_for_limits`).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal, NamedTuple
from urllib.parse import quote

from cellos.core.errors import HostError
from cellos.core.spec import CpuMax, Limits
from cellos.hosts.microvm.unixsock import connect_unix

#: Environment variable naming the firecracker binary (takes precedence over ``PATH``).
FIRECRACKER_ENV: Final = "CELLOS_FIRECRACKER"
#: Environment variable naming the jailer binary (takes precedence over ``PATH``).
JAILER_ENV: Final = "CELLOS_JAILER"

#: The spec bounds ``vcpu_count`` to [1, 32] (``MachineConfiguration``).
MIN_VCPUS: Final = 1
MAX_VCPUS: Final = 32
#: Firecracker's own default guest memory; a smaller guest cannot boot a usual kernel + init.
MIN_MEM_MIB: Final = 128
#: The vsock CIDs 0-2 are reserved (hypervisor, local, host); the spec says ``minimum: 3``.
MIN_GUEST_CID: Final = 3

_MIB: Final = 1 << 20

# Firecracker accepts device ids made of ASCII alphanumerics and underscores, at most 64
# characters. Checking here keeps the id safe to splice into a URL path and turns a typo into a
# CellOS error before any process is started.
_DEVICE_ID_RE: Final = re.compile(r"[A-Za-z0-9_]{1,64}")
# The jailer's ``--id``: alphanumerics and hyphens, at most 64 characters.
_JAIL_ID_RE: Final = re.compile(r"[A-Za-z0-9-]{1,64}")

ActionType = Literal["InstanceStart", "SendCtrlAltDel"]
_ACTIONS: Final[frozenset[str]] = frozenset({"InstanceStart", "SendCtrlAltDel"})


class ApiRequest(NamedTuple):
    """One Firecracker API call: a plain tuple so builders stay pure and comparable."""

    method: str
    path: str
    body: dict[str, Any]


class FirecrackerApiError(HostError):
    """Firecracker answered a request with a non-2xx status.

    ``path`` is ``"<METHOD> <api path>"``; ``reason`` carries Firecracker's ``fault_message``
    (which names the offending field, never a secret: the API carries no secrets).
    """

    def __init__(self, method: str, api_path: str, status: int, fault_message: str) -> None:
        super().__init__(f"firecracker {method} {api_path}", f"{status}: {fault_message}")
        self.status = status
        self.fault_message = fault_message


# --------------------------------------------------------------------------- request builders


def machine_config(vcpu_count: int, mem_size_mib: int) -> ApiRequest:
    """``PUT /machine-config``: vCPUs and memory, SMT off.

    SMT is pinned off because with SMT on Firecracker only accepts 1 or an even vCPU count, and
    a CPU quota like 1.5 CPUs rounds up to 3.
    """
    if not MIN_VCPUS <= vcpu_count <= MAX_VCPUS:
        raise HostError("vcpu_count", f"must be in [{MIN_VCPUS}, {MAX_VCPUS}], got {vcpu_count}")
    if mem_size_mib < 1:
        raise HostError("mem_size_mib", f"must be positive, got {mem_size_mib}")
    body = {"vcpu_count": vcpu_count, "mem_size_mib": mem_size_mib, "smt": False}
    return ApiRequest("PUT", "/machine-config", body)


def boot_source(
    kernel_image_path: str, boot_args: str | None = None, initrd_path: str | None = None
) -> ApiRequest:
    """``PUT /boot-source``: the guest kernel, optional initrd and kernel command line.

    Optional fields are left out rather than sent as ``null``: the spec types them as strings.
    """
    body: dict[str, Any] = {"kernel_image_path": kernel_image_path}
    if initrd_path is not None:
        body["initrd_path"] = initrd_path
    if boot_args is not None:
        body["boot_args"] = boot_args
    return ApiRequest("PUT", "/boot-source", body)


def drive(
    drive_id: str, path_on_host: str, *, is_root_device: bool, is_read_only: bool
) -> ApiRequest:
    """``PUT /drives/{drive_id}``: a virtio-block drive backed by a host file."""
    _check_device_id("drive_id", drive_id)
    body = {
        "drive_id": drive_id,
        "path_on_host": path_on_host,
        "is_root_device": is_root_device,
        "is_read_only": is_read_only,
    }
    return ApiRequest("PUT", f"/drives/{quote(drive_id, safe='')}", body)


def vsock(guest_cid: int, uds_path: str) -> ApiRequest:
    """``PUT /vsock``: the guest's vsock device, proxied to the host Unix socket ``uds_path``."""
    if guest_cid < MIN_GUEST_CID:
        raise HostError("guest_cid", f"must be >= {MIN_GUEST_CID} (0-2 are reserved)")
    return ApiRequest("PUT", "/vsock", {"guest_cid": guest_cid, "uds_path": uds_path})


def action(action_type: ActionType) -> ApiRequest:
    """``PUT /actions``: ``InstanceStart`` boots the guest; ``SendCtrlAltDel`` asks it to stop."""
    if action_type not in _ACTIONS:
        raise HostError("action_type", f"unsupported action {action_type!r}")
    return ApiRequest("PUT", "/actions", {"action_type": action_type})


def instance_start() -> ApiRequest:
    """``PUT /actions`` with ``InstanceStart``."""
    return action("InstanceStart")


def send_ctrl_alt_del() -> ApiRequest:
    """``PUT /actions`` with ``SendCtrlAltDel`` (x86 only: the guest's keyboard controller)."""
    return action("SendCtrlAltDel")


def vm_state(state: Literal["Paused", "Resumed"]) -> ApiRequest:
    """``PATCH /vm``: pause a running guest (before a snapshot) or resume it."""
    if state not in ("Paused", "Resumed"):
        raise HostError("state", f"must be Paused or Resumed, got {state!r}")
    return ApiRequest("PATCH", "/vm", {"state": state})


def snapshot_create(snapshot_path: str, mem_file_path: str) -> ApiRequest:
    """``PUT /snapshot/create``: a full snapshot of a paused guest, its device state in
    ``snapshot_path`` and its memory in ``mem_file_path``."""
    body = {"snapshot_path": snapshot_path, "mem_file_path": mem_file_path, "snapshot_type": "Full"}
    return ApiRequest("PUT", "/snapshot/create", body)


def snapshot_load(snapshot_path: str, mem_file_path: str) -> ApiRequest:
    """``PUT /snapshot/load`` into a fresh firecracker process, resumed at once. The memory
    file is mapped privately: every guest restored from it shares the file, none writes it."""
    body = {
        "snapshot_path": snapshot_path,
        "mem_backend": {"backend_type": "File", "backend_path": mem_file_path},
        "resume_vm": True,
    }
    return ApiRequest("PUT", "/snapshot/load", body)


def _check_device_id(field: str, value: str) -> None:
    if not _DEVICE_ID_RE.fullmatch(value):
        raise HostError(field, f"{value!r} must be 1-64 ASCII letters, digits or underscores")


# ------------------------------------------------------------------------ CellOS limits mapping


def vcpus_for(cpu_max: CpuMax | None) -> int:
    """vCPUs for a ``cpuMax``: ``ceil(quota / period)``, at least 1, at most 32.

    Rounding up means a fractional quota still gets a vCPU to run on; the cgroup around the
    VMM process remains what enforces the exact quota.
    """
    if cpu_max is None:
        return MIN_VCPUS
    wanted = math.ceil(cpu_max.quota_micros / cpu_max.period_micros)
    return max(MIN_VCPUS, min(MAX_VCPUS, wanted))


def mem_mib_for(memory_max_bytes: int | None) -> int:
    """Guest memory for a ``memoryMaxBytes``: whole MiB (rounded down), at least 128.

    Rounding down keeps the guest within the limit; the floor of 128 MiB is what a guest needs
    to boot at all, so tighter limits are enforced by the cgroup around the VMM instead.
    """
    if memory_max_bytes is None:
        return MIN_MEM_MIB
    return max(MIN_MEM_MIB, memory_max_bytes // _MIB)


def machine_config_for_limits(limits: Limits | None) -> ApiRequest:
    """``PUT /machine-config`` sized from a cell's ``limits`` (defaults: 1 vCPU, 128 MiB)."""
    if limits is None:
        return machine_config(MIN_VCPUS, MIN_MEM_MIB)
    return machine_config(vcpus_for(limits.cpu_max), mem_mib_for(limits.memory_max_bytes))


# ------------------------------------------------------------------------------------ client


class _UnixHTTPConnection(http.client.HTTPConnection):
    """``HTTPConnection`` whose transport is a Unix stream socket instead of TCP.

    The host name only feeds the ``Host:`` header (Firecracker ignores it); ``connect`` is the
    one method ``http.client`` uses to open the transport, so overriding it is sufficient.
    """

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            connect_unix(sock, self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class FirecrackerClient:
    """Speaks Firecracker's REST API over its Unix socket.

    One connection per request: the API is called a handful of times per VM, and a fresh
    connection never trips over a keep-alive connection that Firecracker has already closed.
    """

    def __init__(self, socket_path: str | os.PathLike[str], *, timeout: float = 10.0) -> None:
        self.socket_path = os.fspath(socket_path)
        self.timeout = timeout

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Send one request; return the decoded JSON answer (``None`` for 204 No Content).

        Raises :class:`FirecrackerApiError` on a non-2xx answer and
        :class:`~cellos.core.errors.HostError` when the socket cannot be reached.
        """
        payload = b"" if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn = _UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            conn.request(method, path, body=payload if body is not None else None, headers=headers)
            response = conn.getresponse()
            status, raw = response.status, response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise HostError(
                f"firecracker {method} {path}",
                f"API socket {self.socket_path} unreachable: {exc.__class__.__name__}: {exc}",
            ) from exc
        finally:
            conn.close()
        decoded = _decode(raw)
        if 200 <= status < 300:
            return decoded if isinstance(decoded, dict) else None
        fault = decoded.get("fault_message") if isinstance(decoded, dict) else None
        if not isinstance(fault, str):
            fault = raw.decode(errors="replace").strip() or http.client.responses.get(status, "")
        raise FirecrackerApiError(method, path, status, fault)

    def send(self, req: ApiRequest) -> dict[str, Any] | None:
        """Send a request made by one of the builders."""
        return self.request(req.method, req.path, req.body)

    def describe_instance(self) -> dict[str, Any]:
        """``GET /``: the ``InstanceInfo`` (``state`` is ``Not started``, ``Running`` ...)."""
        info = self.request("GET", "/")
        return info or {}


def _decode(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


# ------------------------------------------------------------------------------------ driver


def find_firecracker() -> str | None:
    """The firecracker binary: ``$CELLOS_FIRECRACKER`` if set, else ``firecracker`` on PATH."""
    return _find(FIRECRACKER_ENV, "firecracker")


def find_jailer() -> str | None:
    """The jailer binary: ``$CELLOS_JAILER`` if set, else ``jailer`` on PATH."""
    return _find(JAILER_ENV, "jailer")


def _find(env: str, name: str) -> str | None:
    configured = os.environ.get(env)
    # shutil.which also checks an explicit path is an executable file, so a stale setting
    # reads as "absent" rather than failing later at exec time.
    return shutil.which(configured) if configured else shutil.which(name)


@dataclass(frozen=True)
class JailerConfig:
    """Run firecracker under Firecracker's ``jailer`` (chroot, cgroups, uid/gid drop; needs root).

    The jailer builds ``<chroot_base_dir>/<exec file name>/<id>/root``, copies the firecracker
    binary in, chroots there, drops to ``uid``/``gid`` and execs firecracker. Every path given to
    the API (the socket, kernel, initrd, drives, vsock) is therefore resolved *inside* that
    root: the caller stages (hard-links) the guest files into :meth:`chroot_root` first and
    passes chroot-relative paths to :meth:`FirecrackerDriver.boot`.
    """

    id: str
    uid: int
    gid: int
    chroot_base_dir: str = "/srv/jailer"
    jailer: str | None = None

    def chroot_root(self, firecracker: str) -> Path:
        """The directory the jailed firecracker sees as ``/``."""
        return Path(self.chroot_base_dir) / Path(firecracker).name / self.id / "root"


def jailer_argv(config: JailerConfig, jailer: str, firecracker: str, api_sock: str) -> list[str]:
    """``jailer --id --exec-file --uid --gid --chroot-base-dir -- --api-sock <path>``.

    Everything after ``--`` is handed to firecracker; ``api_sock`` is a path inside the chroot.
    """
    if not _JAIL_ID_RE.fullmatch(config.id):
        raise HostError("jailer.id", f"{config.id!r} must be 1-64 ASCII letters, digits or '-'")
    return [
        jailer,
        "--id",
        config.id,
        "--exec-file",
        firecracker,
        "--uid",
        str(config.uid),
        "--gid",
        str(config.gid),
        "--chroot-base-dir",
        config.chroot_base_dir,
        "--",
        "--api-sock",
        api_sock,
    ]


@dataclass(frozen=True)
class DriveSpec:
    """One extra block device for :meth:`FirecrackerDriver.boot`."""

    drive_id: str
    path_on_host: str
    is_root_device: bool = False
    is_read_only: bool = True


@dataclass(frozen=True)
class Launch:
    """How the VMM process is started (defaults: as :meth:`FirecrackerDriver.boot` always did).

    ``serial``: a file descriptor (one end of a socket pair) that becomes the VMM's stdin and
    stdout, i.e. the guest's serial port; ``cwd``: the VMM's working directory (relative API
    socket and snapshot paths resolve there, and a reaper recognises the VMM by it);
    ``preexec_fn``: e.g. ``PR_SET_PDEATHSIG`` so that the VMM dies with its owner."""

    serial: int | None = None
    stderr: int | None = None
    cwd: str | None = None
    env: dict[str, str] | None = None
    preexec_fn: Callable[[], None] | None = None
    extra_args: tuple[str, ...] = ()


class FirecrackerDriver:
    """Launches one Firecracker microVM and tears it down without residue.

    Usage::

        driver = FirecrackerDriver()
        try:
            driver.boot(kernel, initrd, "console=ttyS0 reboot=k panic=1", 2, 256, "/run/fc.sock")
            ...
        finally:
            driver.cleanup()
    """

    def __init__(self, firecracker: str | None = None, *, socket_timeout: float = 5.0) -> None:
        found = shutil.which(firecracker) if firecracker else find_firecracker()
        if found is None:
            raise HostError(
                FIRECRACKER_ENV,
                "firecracker is not installed (set CELLOS_FIRECRACKER or put it on PATH)",
            )
        self.firecracker = found
        self.socket_timeout = socket_timeout
        self.process: subprocess.Popen[bytes] | None = None
        #: Host-side path of the API socket (inside the chroot when jailed).
        self.api_socket: Path | None = None
        #: Every request sent, in order (for evidence and debugging).
        self.sent: list[ApiRequest] = []
        self._residue: list[Path] = []
        self._jail_dir: Path | None = None
        self._log: BinaryIO | None = None

    def boot(
        self,
        kernel: str,
        initrd: str | None,
        boot_args: str,
        vcpus: int,
        mem_mib: int,
        api_socket: str,
        *,
        drives: Sequence[DriveSpec] = (),
        vsock_cid: int | None = None,
        vsock_uds: str | None = None,
        jailer: JailerConfig | None = None,
        console_log: str | None = None,
        launch: Launch | None = None,
    ) -> FirecrackerClient:
        """Start firecracker, configure the VM in spec order and start the instance.

        The order is machine-config, boot-source, drives, vsock, then ``InstanceStart``: all but
        the last are pre-boot only. With ``jailer`` set, ``api_socket`` and every guest path are
        paths inside the jail (see :class:`JailerConfig`). Guest console output and the VMM log
        go to ``console_log`` (or are discarded), unless ``launch`` gives the serial port a
        socket. Returns the client for further calls; on any failure the VMM is killed and its
        socket removed before the error propagates.
        """
        # Build every request first: a bad argument then fails before a process exists.
        requests = [machine_config(vcpus, mem_mib), boot_source(kernel, boot_args, initrd)]
        for d in drives:
            requests.append(
                drive(
                    d.drive_id,
                    d.path_on_host,
                    is_root_device=d.is_root_device,
                    is_read_only=d.is_read_only,
                )
            )
        if (vsock_cid is None) != (vsock_uds is None):
            raise HostError("vsock", "vsock_cid and vsock_uds go together")
        if vsock_cid is not None and vsock_uds is not None:
            requests.append(vsock(vsock_cid, vsock_uds))
        requests.append(instance_start())
        return self._run(
            requests, api_socket, jailer=jailer, console_log=console_log, launch=launch,
            vsock_uds=vsock_uds,
        )  # fmt: skip

    def restore(
        self, snapshot_path: str, mem_file_path: str, api_socket: str, *, launch: Launch
    ) -> FirecrackerClient:
        """Start a fresh firecracker and load a snapshot into it, resumed (``PUT
        /snapshot/load``: nothing is configured before it, as the API requires)."""
        return self._run([snapshot_load(snapshot_path, mem_file_path)], api_socket, launch=launch)

    def _run(
        self,
        requests: list[ApiRequest],
        api_socket: str,
        *,
        jailer: JailerConfig | None = None,
        console_log: str | None = None,
        launch: Launch | None = None,
        vsock_uds: str | None = None,
    ) -> FirecrackerClient:
        """Start the VMM, wait for its API and send ``requests`` in order."""
        if self.process is not None:
            raise HostError("firecracker", "this driver has already booted a VM")
        launch = launch or Launch()
        argv, host_socket, host_root = self._argv(api_socket, jailer)
        argv += launch.extra_args
        if launch.cwd is not None and not host_socket.is_absolute():
            host_socket = Path(launch.cwd) / host_socket
        if host_socket.exists() or host_socket.is_symlink():
            # Firecracker refuses an existing socket path, and it may belong to a live VM:
            # never unlink what this driver did not create.
            raise HostError("api_socket", f"{host_socket} already exists")
        self.api_socket = host_socket
        self._residue = [host_socket]
        if jailer is not None:
            # Only now is the jail ours to remove: a refused boot must not rmtree a jail that
            # belongs to another VM using the same id.
            self._jail_dir = host_root.parent
        if vsock_uds is not None:
            self._residue.append(host_root / vsock_uds.lstrip("/") if jailer else Path(vsock_uds))

        # Guest console and VMM log share one file; an unread pipe could fill and stall the VMM.
        self._log = open(console_log, "ab") if console_log else None  # noqa: SIM115
        output: BinaryIO | int = self._log if self._log is not None else subprocess.DEVNULL
        # The serial port is the VMM's stdin/stdout: a socket when the caller talks to the
        # guest (the CellOS guest channel), else nothing (a tty would be switched to raw mode).
        serial_in: BinaryIO | int = subprocess.DEVNULL if launch.serial is None else launch.serial
        serial_out = output if launch.serial is None else launch.serial
        try:
            self.process = subprocess.Popen(
                argv,
                stdin=serial_in,
                stdout=serial_out,
                stderr=output if launch.stderr is None else launch.stderr,
                cwd=launch.cwd,
                env=launch.env,
                # Own session: a Ctrl-C aimed at CellOS must not reach the guest VMM directly;
                # CellOS decides how the VM stops.
                start_new_session=True,
                preexec_fn=launch.preexec_fn,
            )
            client = FirecrackerClient(host_socket)
            self._wait_for_socket(host_socket)
            for req in requests:
                client.send(req)
                self.sent.append(req)
        except BaseException:
            self.cleanup()
            raise
        return client

    def _argv(self, api_socket: str, jailer: JailerConfig | None) -> tuple[list[str], Path, Path]:
        if jailer is None:
            return [self.firecracker, "--api-sock", api_socket], Path(api_socket), Path("/")
        binary = shutil.which(jailer.jailer) if jailer.jailer else find_jailer()
        if binary is None:
            raise HostError(JAILER_ENV, "the jailer binary is not installed")
        root = jailer.chroot_root(self.firecracker)
        host_socket = root / api_socket.lstrip("/")
        return jailer_argv(jailer, binary, self.firecracker, api_socket), host_socket, root

    def _wait_for_socket(self, path: Path) -> None:
        """Poll until the API socket accepts a connection, the VMM exits, or time runs out.

        Existence alone is not enough: firecracker creates the file at ``bind`` and only
        answers after ``listen``, so a connect attempt is the real readiness probe.
        """
        deadline = time.monotonic() + self.socket_timeout
        while True:
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                raise HostError("firecracker", f"exited with status {code} before its API was up")
            if path.exists():
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.settimeout(0.5)
                    try:
                        connect_unix(probe, os.fspath(path))
                        return
                    except OSError:
                        pass
            if time.monotonic() >= deadline:
                raise HostError(
                    "firecracker", f"API socket {path} not ready after {self.socket_timeout}s"
                )
            time.sleep(0.02)

    def shutdown(self, client: FirecrackerClient | None = None, grace: float = 5.0) -> None:
        """Ask the guest to stop (``SendCtrlAltDel``), then kill after ``grace`` seconds."""
        if self.process is not None and self.process.poll() is None and self.api_socket:
            with contextlib.suppress(HostError):
                (client or FirecrackerClient(self.api_socket)).send(send_ctrl_alt_del())
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=grace)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the VMM and reap it. A microVM holds no host state worth a graceful stop."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def cleanup(self) -> None:
        """Kill the VMM and remove what it left on the host: sockets and the jail directory."""
        self.kill()
        for path in self._residue:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if self._jail_dir is not None:
            # The jailer never removes its chroot (its documentation leaves that to the caller).
            shutil.rmtree(self._jail_dir, ignore_errors=True)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> FirecrackerDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
