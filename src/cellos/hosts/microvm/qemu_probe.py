"""Boot a CellOS guest image once under QEMU and decode the guest channel.

A building block for the ``qemu`` backend: verify the manifest, start QEMU with the serial
port on stdio, parse the ``CELLOS:`` lines the guest init (``guest/init.c``) writes, and
return what the workload produced. Command line used (``accel="tcg"``)::

    qemu-system-x86_64 -M q35 -accel tcg -m 256 -nodefaults -no-user-config \
        -nographic -serial stdio -no-reboot -kernel vmlinuz -initrd initrd.cpio.gz \
        -append "console=ttyS0 quiet loglevel=0 panic=-1 cellos.argv=<b64url JSON> ..."

With ``accel="kvm"`` the default machine is ``microvm`` and ``-cpu host`` is added. The guest
powers off after ``CELLOS:EXIT``.

Why not ``microvm`` under TCG: microvm has no HPET and no ACPI PM timer, so the kernel can only
calibrate the TSC against the PIT; under TCG on a loaded host that calibration fails
("tsc: Unable to calibrate against PIT ... Marking TSC unstable") and the guest hangs before
init runs (measured: 6/6 hangs under load, ~1 in 4 idle). ``q35`` has HPET + PM timer and boots
just as fast (~2 s). Under KVM, kvm-clock removes the calibration, so microvm is fine there.

"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Any

from cellos.core.errors import HostError, InvalidSpec
from cellos.hosts.microvm.image import MANIFEST_NAME
from cellos.hosts.microvm.manifest import load_manifest, verify

#: x86 COMMAND_LINE_SIZE is 2048 bytes including the terminating NUL.
MAX_CMDLINE = 2047
BASE_APPEND = "console=ttyS0 quiet loglevel=0 panic=-1"


def b64url_json(value: object) -> str:
    raw = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def b64url_text(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def request_params(
    argv: list[str],
    env: dict[str, str] | None,
    artifacts: list[str] | None,
    *,
    hostname: str | None = None,
    workdir: str | None = None,
    cgroup: dict[str, str] | None = None,
    secrets: bool = False,
    secret_lease: int | None = None,
    net: dict[str, str] | None = None,
) -> list[str]:
    """The request as ``cellos.<name>=<base64url>`` parameters (the guest init's syntax on the
    kernel command line and on a pool guest's channel).

    ``secrets`` only says that secrets follow on the channel (``cellos.secrets``), and
    ``secret_lease`` for how long the guest keeps them: a secret value is never put here.

    ``hostname`` becomes the guest's hostname, ``workdir`` the workload's working directory
    (created in the guest when missing), ``cgroup`` the settings of the workload's cgroup in
    the guest (``memory.max``, ``pids.max``), ``net`` the guest's network device
    (``address`` CIDR, ``gateway``, ``mac``, optional ``nameserver``: a cell with egress
    authority only; without it the guest has no network device at all).
    """
    if not argv or not all(isinstance(a, str) and "\0" not in a for a in argv):
        raise InvalidSpec("argv", "must be a non-empty list of strings without NUL")
    parts = [f"cellos.argv={b64url_json(argv)}"]
    if env:
        parts.append(f"cellos.env={b64url_json(env)}")
    if artifacts:
        if not all(a.startswith("/") for a in artifacts):
            raise InvalidSpec("artifacts", "paths must be absolute")
        parts.append(f"cellos.artifacts={b64url_json(artifacts)}")
    if hostname:
        parts.append(f"cellos.hostname={b64url_text(hostname)}")
    if workdir and workdir != "/workspace":
        parts.append(f"cellos.workdir={b64url_text(workdir)}")
    if cgroup:
        parts.append(f"cellos.cgroup={b64url_json(cgroup)}")
    if net:
        parts.append(f"cellos.net={b64url_json(net)}")
    if secrets:
        parts.append(f"cellos.secrets={b64url_text('1')}")
        if secret_lease is not None:
            parts.append(f"cellos.secretlease={b64url_text(str(secret_lease))}")
    return parts


def kernel_append(params: list[str], base: str = BASE_APPEND) -> str:
    """The kernel command line carrying the request (:func:`request_params`) after the VMM's
    ``base`` arguments; InvalidSpec when it does not fit."""
    append = " ".join([base, *params])
    if len(append.encode()) > MAX_CMDLINE:
        raise InvalidSpec(
            "argv", f"request does not fit the kernel command line ({MAX_CMDLINE} bytes)"
        )
    return append


#: Longest request line a pool guest accepts on its channel (guest/init.c MAX_REQUEST).
MAX_REQUEST_LINE = 1 << 20
#: A pool guest's kernel command line: no request, it arrives on the channel.
POOL_APPEND = f"{BASE_APPEND} cellos.pool=1"


def request_line(params: list[str]) -> bytes:
    """A pool guest's request (:func:`request_params`): one line on its channel;
    InvalidSpec when it is too long.

    It also carries 32 fresh random bytes (``cellos.seed``: the guest mixes them into its
    RNG and reseeds it) and the host's clock (``cellos.time``): guests restored from one
    snapshot would otherwise share their RNG state and the snapshot's time."""
    params = [
        *params,
        f"cellos.seed={base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip('=')}",
        f"cellos.time={b64url_text(str(time.time_ns()))}",
    ]
    line = (" ".join(params) + "\n").encode()
    if len(line) > MAX_REQUEST_LINE:
        raise InvalidSpec(
            "argv", f"request does not fit a pool guest's channel ({MAX_REQUEST_LINE} bytes)"
        )
    return line


def default_machine(accel: str) -> str:
    """``microvm`` with KVM; ``q35`` under TCG (see the module docstring for why)."""
    return "microvm" if accel == "kvm" else "q35"


def qemu_command(
    vmm: str,
    image_dir: Path,
    append: str,
    accel: str,
    kernel: str,
    initrd: str,
    machine: str | None = None,
    *,
    memory_mib: int = 256,
    vcpus: int = 1,
    channel_socket: str | None = None,
    tap_fd: int | None = None,
    mac: str | None = None,
) -> list[str]:
    """The one QEMU command line of a CellOS guest (the backend, the probe and the benchmark).
    The serial port (the channel) is the VMM's stdio, or with ``channel_socket`` a Unix socket
    QEMU listens on (a pool guest). With ``tap_fd`` (an open tap the VMM inherits: see
    ``network/guest_link.py``) the guest gets one virtio-net device on it; without, none
    (``-nodefaults``: no network device at all)."""
    serial = ["-serial", "stdio"]
    if channel_socket is not None:
        serial = [
            "-chardev", f"socket,id=cellos,path={channel_socket},server=on,wait=off",
            "-serial", "chardev:cellos",
        ]  # fmt: skip
    cmd = [
        vmm, "-M", machine or default_machine(accel), "-accel", accel, "-m", str(memory_mib),
        "-smp", str(vcpus), "-nodefaults", "-no-user-config", "-nographic",
        *serial, "-no-reboot",
        "-kernel", str(image_dir / kernel), "-initrd", str(image_dir / initrd), "-append", append,
    ]  # fmt: skip
    if tap_fd is not None:
        # virtio-mmio on microvm, PCI on q35; no option ROM (the guest never boots from it).
        on_pci = (machine or default_machine(accel)) != "microvm"
        device = "virtio-net-pci" if on_pci else "virtio-net-device"
        cmd += [
            "-netdev", f"tap,id=n0,fd={tap_fd}",
            "-device", f"{device},netdev=n0" + (f",mac={mac}" if mac else "")
            + (",romfile=" if on_pci else ""),
        ]  # fmt: skip
    if accel == "kvm":
        cmd[5:5] = ["-cpu", "host"]
    return cmd


def _unb64url(text: str) -> str:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode(
        "utf-8", "surrogateescape"
    )


def parse_channel(lines: list[str]) -> dict[str, Any]:
    """Decode channel lines (non-``CELLOS:`` lines are ignored) into the boot_once result fields."""
    out, err = bytearray(), bytearray()
    arts: dict[str, bytearray] = {}
    done: dict[str, bytes | None] = {}
    result: dict[str, Any] = {"exit_code": None, "uname": None, "spawn_error": None, "ready": False}
    for line in lines:
        if not line.startswith("CELLOS:"):
            continue
        kind, _, rest = line[7:].partition(":")
        try:
            if kind == "READY":
                result["ready"] = True
            elif kind == "OUT":
                out += base64.b64decode(rest, validate=True)
            elif kind == "ERR":
                err += base64.b64decode(rest, validate=True)
            elif kind == "ART":
                tag, _, chunk = rest.partition(":")
                arts.setdefault(_unb64url(tag), bytearray()).extend(
                    base64.b64decode(chunk, validate=True)
                )
            elif kind == "ARTEND":
                tag, _, digest = rest.partition(":")
                path = _unb64url(tag)
                data = bytes(arts.pop(path, b""))
                if digest == "MISSING":
                    done[path] = None
                elif hashlib.sha256(data).hexdigest() != digest:
                    raise HostError(
                        path, "artifact digest from the guest does not match its content"
                    )
                else:
                    done[path] = data
            elif kind == "LIMITS":
                oom, _, pids = rest.partition(":")
                result["limits"] = {"oomKills": int(oom), "pidsLimitHits": int(pids)}
            elif kind == "UNAME":
                result["uname"] = rest
            elif kind == "SPAWNERR":
                result["spawn_error"] = rest
            elif kind == "EXIT":
                result["exit_code"] = int(rest)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HostError("guest channel", f"malformed {kind} line: {exc}") from exc
    result.update(stdout=bytes(out), stderr=bytes(err), artifacts=done)
    return result


def boot_once(
    image_dir: str,
    argv: list[str],
    env: dict[str, str] | None = None,
    artifacts: list[str] | None = None,
    timeout: float = 60.0,
    accel: str = "tcg",
    machine: str | None = None,
) -> dict[str, Any]:
    """Verify the image manifest, boot it once, run ``argv`` and return the decoded results.

    Returns ``{stdout, stderr, exit_code, uname, artifacts: {path: bytes | None}, boot_ms,
    raw_log, spawn_error, digests, command}``; ``boot_ms`` is QEMU start to the ``CELLOS:EXIT``
    line. ``machine`` overrides :func:`default_machine`.
    Raises HostError when QEMU fails or no EXIT arrives within ``timeout`` seconds.
    """
    if accel not in ("tcg", "kvm"):
        raise InvalidSpec("accel", "must be 'tcg' or 'kvm'")
    base = Path(image_dir)
    manifest = load_manifest(base / MANIFEST_NAME)
    digests = verify(manifest, base)
    append = kernel_append(request_params(argv, env, artifacts))
    cmd = qemu_command(
        manifest.vmm.path, base, append, accel, manifest.kernel.path, manifest.initrd.path, machine
    )
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    raw = bytearray()
    boot_ms: float | None = None
    deadline = start + timeout
    try:
        fd = proc.stdout.fileno()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HostError(
                    "qemu", f"no CELLOS:EXIT within {timeout}s; log tail: {raw[-400:]!r}"
                )
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            raw += chunk
            if boot_ms is None and b"CELLOS:EXIT:" in raw and raw.rstrip(b"\r").endswith(b"\n"):
                boot_ms = (time.monotonic() - start) * 1000
        # EOF: QEMU exited (guest powered off).
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired as exc:
        raise HostError("qemu", f"did not exit within {timeout}s") from exc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    log = raw.decode("utf-8", "replace")
    result = parse_channel([line.rstrip("\r") for line in log.split("\n")])
    if result["exit_code"] is None:
        raise HostError(
            "qemu",
            f"guest sent no CELLOS:EXIT (qemu status {proc.returncode}); log tail: {log[-400:]!r}",
        )
    if boot_ms is None:
        boot_ms = (time.monotonic() - start) * 1000
    result.update(boot_ms=round(boot_ms, 1), raw_log=log, digests=digests, command=cmd)
    return result
