"""Build the microVM guest boot image reproducibly from Debian packages (DESIGN.md §5).

Output (in ``out_dir``):

* ``vmlinuz`` - the kernel of the versioned ``linux-image-<abi>-cloud-amd64`` package that
  Debian's ``linux-image-cloud-amd64`` meta package depends on. Everything the guest needs is
  built in on that kernel (8250 serial + console, devtmpfs, tmpfs, gzip initramfs, ACPI), so
  the initramfs carries no modules and it boots on QEMU ``-M microvm`` as well as ``q35``.
* ``initrd.cpio.gz`` - a newc cpio written here in Python (sorted entries, mtime 0, uid/gid 0,
  gzip mtime 0): ``/init`` (``guest/init.c`` compiled ``gcc -static -Os``), ``/bin/busybox``
  from ``busybox-static`` plus applet symlinks, the mount-point directories and the
  ``/dev/console`` (5,1) and ``/dev/null`` (1,3) nodes the kernel wants before devtmpfs.
* ``vmlinux`` - with ``elf_kernel`` (an image for Firecracker, which boots only an ELF kernel on
  x86_64): the uncompressed kernel taken out of ``vmlinuz`` (``vmlinux.py``).
* ``manifest.json`` - sha256 of kernel, initrd and the VMM binary (and ``vmlinux``; see
  ``manifest.py``).

Two builds against the same apt state and toolchain are byte-identical. Every ``.deb`` is
checked against the SHA256 recorded in apt's (signed) package index before it is unpacked.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from cellos.core.errors import HostError
from cellos.hosts.microvm.manifest import Artifact, Manifest, sha256_file

KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"
INIT_SOURCE = Path(__file__).with_name("guest") / "init.c"
KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.cpio.gz"
VMLINUX_NAME = "vmlinux"
MANIFEST_NAME = "manifest.json"

#: busybox applets linked into /bin (enough for shell one-liners in workloads and tests).
APPLETS = (
    "sh", "ash", "cat", "cp", "dd", "echo", "env", "false", "find", "grep", "head", "hostname",
    "id", "kill", "ls", "mkdir", "mv", "printf", "pwd", "readlink", "rm", "sed", "seq",
    "sha256sum", "sleep", "tail", "test", "touch", "tr", "true", "uname", "wc",
    # For workloads of cells with egress authority (the guest then has a network device).
    "nc", "nslookup", "ssl_client", "wget",
)  # fmt: skip

#: The guest kernel's virtio-net driver and its dependencies, in load order (the cloud
#: kernel has them as modules). Copied into the initramfs as ``lib/modules/cellos-net/
#: NN-<name>.ko``; the guest init loads them only for a cell with a network device.
NET_MODULES = (
    "kernel/drivers/virtio/virtio_ring.ko",  # before virtio (virtio_break_device)
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",  # q35 (TCG)
    "kernel/drivers/virtio/virtio_mmio.ko",  # microvm (KVM)
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
)
NET_MODULES_DIR = "lib/modules/cellos-net"

#: Debian packages ensure_build_tools installs when missing.
BUILD_PACKAGES = ("gcc", "libc6-dev", "linux-libc-dev", "dpkg")

_S_IFDIR, _S_IFREG, _S_IFLNK, _S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000


def _run(cmd: list[str], cwd: str | None = None) -> str:
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C",
           "SOURCE_DATE_EPOCH": "0"}  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise HostError(cmd[0], f"cannot run: {exc.strerror}") from exc
    if proc.returncode != 0:
        raise HostError(
            cmd[0], f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}"
        )
    return proc.stdout


def ensure_build_tools() -> None:
    """Make sure the image can be built: gcc + static glibc (``gcc``, ``libc6-dev``), kernel UAPI
    headers for ``openat2`` (``linux-libc-dev``), ``dpkg-deb`` (``dpkg``) and ``apt-get``.

    Missing pieces are installed with ``apt-get install`` when running as root; otherwise a
    HostError names what is missing.
    """
    missing = []
    if not shutil.which("gcc"):
        missing.append("gcc")
    if not any(Path(p).exists() for p in ("/usr/lib/x86_64-linux-gnu/libc.a", "/usr/lib64/libc.a")):
        missing.append("libc6-dev")
    if not Path("/usr/include/linux/openat2.h").exists():
        missing.append("linux-libc-dev")
    if not shutil.which("dpkg-deb"):
        missing.append("dpkg")
    if not missing:
        return
    if not shutil.which("apt-get") or os.geteuid() != 0:
        raise HostError("microvm image", f"build tools missing (install {', '.join(missing)})")
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing])


def _apt_field(package: str, field: str) -> str:
    """A field of the candidate version of ``package`` in apt's index (``pkg`` or ``pkg=ver``)."""
    text = _run(["apt-cache", "show", "--no-all-versions", package])
    match = re.search(rf"^{field}: (.+)$", text, re.MULTILINE)
    if not match:
        raise HostError(package, f"apt-cache show has no {field} field")
    return str(match.group(1)).strip()


def kernel_package() -> str:
    """The versioned ``linux-image-*-cloud-amd64`` package the meta package depends on."""
    text = _run(["apt-cache", "depends", "--important", KERNEL_META])
    for name in re.findall(r"Depends: (linux-image-\S+-cloud-amd64)\b", text):
        if not name.endswith("-unsigned"):
            return str(name)
    raise HostError(KERNEL_META, "cannot find the versioned kernel package it depends on")


def _fetch(package: str, into: Path) -> tuple[Path, str]:
    """``apt-get download`` the candidate of ``package`` and check it against apt's index sha256.

    Returns (path of the .deb, "name=version").
    """
    version = _apt_field(package, "Version")
    expected = _apt_field(f"{package}={version}", "SHA256")
    before = set(into.iterdir())
    _run(["apt-get", "download", "-q", f"{package}={version}"], cwd=str(into))
    debs = [p for p in set(into.iterdir()) - before if p.suffix == ".deb"]
    if len(debs) != 1:
        raise HostError(package, "apt-get download did not produce exactly one .deb")
    actual = sha256_file(debs[0])
    if actual != expected:
        raise HostError(str(debs[0]), f"sha256 {actual} differs from apt index {expected}")
    return debs[0], f"{package}={version}"


def _extract(deb: Path, into: Path) -> Path:
    into.mkdir()
    _run(["dpkg-deb", "-x", str(deb), str(into)])
    return into


def compile_init(work: Path) -> bytes:
    """Compile guest/init.c statically with flags that make the binary independent of paths/time."""
    src = work / "init.c"
    shutil.copyfile(INIT_SOURCE, src)
    out = work / "init"
    _run(
        [
            "gcc", "-static", "-Os", "-Wall", "-Wextra",
            f"-ffile-prefix-map={work}=.", "-frandom-seed=cellos-init",
            "-fno-ident", "-Wl,--build-id=none", "-s",
            "-o", str(out), str(src),
        ],
        cwd=str(work),
    )  # fmt: skip
    return out.read_bytes()


def _cpio_entry(
    name: str, mode: int, data: bytes = b"", ino: int = 0, rdev: tuple[int, int] = (0, 0)
) -> bytes:
    """One newc ("070701") record: uid/gid 0, mtime 0, nlink 1 (2 for directories)."""
    nlink = 2 if mode & 0o170000 == _S_IFDIR else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def build_cpio(entries: dict[str, tuple[int, bytes, tuple[int, int]]]) -> bytes:
    """newc archive of ``{path: (mode, data, (rdev major, minor))}``, parents before children."""
    out = io.BytesIO()
    for ino, name in enumerate(sorted(entries, key=lambda p: p.split("/")), start=1):
        mode, data, rdev = entries[name]
        out.write(_cpio_entry(name, mode, data, ino, rdev))
    out.write(_cpio_entry("TRAILER!!!", 0))
    raw = out.getvalue()
    return raw + b"\0" * (-len(raw) % 512)


def gzip_deterministic(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


def _initrd(init: bytes, busybox: bytes, modules: list[tuple[str, bytes]]) -> bytes:
    entries: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    dirs = ("bin", "dev", "proc", "sys", "tmp", "workspace", "usr", "usr/bin", "lib",
            "lib/modules", NET_MODULES_DIR)  # fmt: skip
    for d in dirs:
        entries[d] = (_S_IFDIR | (0o1777 if d == "tmp" else 0o755), b"", (0, 0))
    for order, (name, data) in enumerate(modules):
        entries[f"{NET_MODULES_DIR}/{order:02d}-{name}"] = (_S_IFREG | 0o644, data, (0, 0))
    entries["init"] = (_S_IFREG | 0o755, init, (0, 0))
    entries["bin/busybox"] = (_S_IFREG | 0o755, busybox, (0, 0))
    for applet in APPLETS:
        entries[f"bin/{applet}"] = (_S_IFLNK | 0o777, b"busybox", (0, 0))
    entries["usr/bin/env"] = (_S_IFLNK | 0o777, b"../../bin/busybox", (0, 0))
    entries["dev/console"] = (_S_IFCHR | 0o600, b"", (5, 1))
    entries["dev/null"] = (_S_IFCHR | 0o666, b"", (1, 3))
    return gzip_deterministic(build_cpio(entries))


def _net_modules(kroot: Path) -> list[tuple[str, bytes]]:
    """:data:`NET_MODULES` of the unpacked kernel package, in load order."""
    trees = sorted((kroot / "lib" / "modules").glob("*/kernel"))
    if len(trees) != 1:
        raise HostError(str(kroot), "expected exactly one lib/modules/<version> in the package")
    found = []
    for module in NET_MODULES:
        path = trees[0].parent / module
        if not path.is_file():
            raise HostError(str(path), "the kernel package lacks this network driver module")
        found.append((path.name, path.read_bytes()))
    return found


def _write(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (a full disk leaves no partial file)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise HostError(str(path), f"cannot write the image file: {exc.strerror}") from exc


def build_image(out_dir: str, *, vmm: str, elf_kernel: bool = False) -> Manifest:
    """Build ``vmlinuz``, ``initrd.cpio.gz`` and ``manifest.json`` into ``out_dir`` (and
    ``vmlinux`` with ``elf_kernel``, for Firecracker).

    ``vmm`` is the VMM binary (a path or a name looked up on PATH); its absolute, resolved path
    and sha256 go into the manifest so the backend can verify it before every boot.
    """
    found = vmm if os.path.isabs(vmm) else shutil.which(vmm)
    if not found or not os.path.isfile(found):
        raise HostError(vmm, "VMM binary not found")
    vmm_path = os.path.realpath(found)
    ensure_build_tools()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        return _build(out, vmm_path, elf_kernel)
    except OSError as exc:  # e.g. ENOSPC while unpacking the packages
        raise HostError(
            str(exc.filename or out), f"building the image failed: {exc.strerror}"
        ) from exc


def _build(out: Path, vmm_path: str, elf_kernel: bool) -> Manifest:
    with tempfile.TemporaryDirectory(prefix="cellos-image-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # noqa: S103 - lets apt's unprivileged _apt user write the download
        kdeb, kernel_src = _fetch(kernel_package(), work)
        bdeb, busybox_src = _fetch(BUSYBOX, work)
        kroot = _extract(kdeb, work / "kernel")
        broot = _extract(bdeb, work / "busybox")
        kernels = sorted((kroot / "boot").glob("vmlinuz-*"))
        if len(kernels) != 1:
            raise HostError(kernel_src, "expected exactly one boot/vmlinuz-* in the package")
        busybox = broot / "bin" / "busybox"
        if not busybox.is_file():
            raise HostError(busybox_src, "package has no /bin/busybox")
        build = work / "init-build"
        build.mkdir()
        init = compile_init(build)
        _write(out / KERNEL_NAME, kernels[0].read_bytes())
        _write(out / INITRD_NAME, _initrd(init, busybox.read_bytes(), _net_modules(kroot)))
    vmlinux = None
    if elf_kernel:
        from cellos.hosts.microvm.vmlinux import extract_vmlinux

        _write(
            out / VMLINUX_NAME,
            extract_vmlinux((out / KERNEL_NAME).read_bytes(), str(out / KERNEL_NAME)),
        )
        vmlinux = Artifact(VMLINUX_NAME, sha256_file(out / VMLINUX_NAME))
    manifest = Manifest(
        kernel=Artifact(KERNEL_NAME, sha256_file(out / KERNEL_NAME)),
        initrd=Artifact(INITRD_NAME, sha256_file(out / INITRD_NAME)),
        vmm=Artifact(vmm_path, sha256_file(vmm_path)),
        source={"kernelPackage": kernel_src, "busyboxPackage": busybox_src},
        vmlinux=vmlinux,
    )
    _write(out / MANIFEST_NAME, (json.dumps(manifest.to_json(), indent=2) + "\n").encode())
    return manifest


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
