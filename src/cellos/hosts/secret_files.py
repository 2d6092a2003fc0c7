"""Secrets delivered as files (``runtimeBroker``, ``runtimeLeasedBroker``), for every backend.

Each secret becomes ``/run/secrets/<key>`` inside the cell: mode 0400, owned by the workload's
uid, on a tmpfs that belongs to the cell alone; never an environment variable, never on a
command line, never in an event. How the bytes get there is the backend's:

* ``cellos``: a sealed memfd handed to the launcher (:func:`sealed_memfd`), read by the cell's
  pid 1 inside the cell's mount namespace; nothing is ever written to a host file system;
* ``gvisor``: a tmpfs mounted on the host under the cell's state directory (mode 0700, only
  root reaches it), bound read-only into the sandbox; unmounted at teardown
  (:func:`mount_host_tmpfs`, :func:`write_files`, :func:`unmount_host_tmpfs`);
* ``qemu``: inside the request sent over the guest channel (:func:`encode`).

Limits (refused with an error naming ``spec.authority.secretRefs``, never a value): at most
:data:`MAX_SECRETS` files and :data:`MAX_SECRET_BYTES` bytes in all.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from collections.abc import Mapping

from cellos.core.errors import HostError
from cellos.core.spec import SECRETS_DIRECTORY

__all__ = [
    "MAX_SECRETS",
    "MAX_SECRET_BYTES",
    "SECRETS_DIRECTORY",
    "HostLease",
    "check",
    "encode",
    "mount_host_tmpfs",
    "sealed_memfd",
    "unmount_host_tmpfs",
    "write_files",
]

#: The launcher and the guest init enforce the same bounds.
MAX_SECRETS = 64
MAX_SECRET_BYTES = 1 << 20
_PAGE = 4096


def check(files: Mapping[str, bytes]) -> None:
    if len(files) > MAX_SECRETS:
        raise HostError(
            "spec.authority.secretRefs",
            f"{len(files)} secrets cannot be delivered as files (at most {MAX_SECRETS})",
        )
    total = sum(len(v) for v in files.values())
    if total > MAX_SECRET_BYTES:
        raise HostError(
            "spec.authority.secretRefs",
            f"the secrets hold {total} bytes; file delivery takes at most {MAX_SECRET_BYTES}",
        )


def encode(files: Mapping[str, bytes]) -> bytes:
    """``KEY NUL`` + 8-byte big-endian length + value, per secret (the launcher's format)."""
    check(files)
    return b"".join(
        key.encode() + b"\0" + len(value).to_bytes(8, "big") + value for key, value in files.items()
    )


def tmpfs_size(files: Mapping[str, bytes]) -> int:
    """Bytes for a tmpfs that holds exactly these files (a page each, rounded up)."""
    return sum(-(-len(v) // _PAGE) * _PAGE for v in files.values()) + (len(files) + 1) * _PAGE


_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def sealed_memfd(files: Mapping[str, bytes]) -> int:
    """An anonymous, sealed in-memory file holding :func:`encode` of ``files`` (close-on-exec;
    the caller passes it on and closes it): it lives only as long as a descriptor to it."""
    data = encode(files)
    fd = os.memfd_create("cellos-secrets", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except OSError:
        os.close(fd)
        raise
    return fd


# -- host tmpfs (gvisor) --------------------------------------------------------------------


_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8
_MNT_DETACH = 2


def mount_host_tmpfs(path: str, files: Mapping[str, bytes]) -> None:
    """Create ``path`` (0700) and mount a tmpfs sized for ``files`` on it (root only)."""
    # Loaded here: the cellos backend (on every supervisor start) never needs it.
    from cellos.core import libc

    os.mkdir(path, 0o700)
    opts = f"mode=0700,size={tmpfs_size(files)},nr_inodes={MAX_SECRETS + 8}".encode()
    flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    if libc.mount(b"tmpfs", path.encode(), b"tmpfs", flags, opts) != 0:
        err = libc.errno()
        os.rmdir(path)
        raise HostError(
            "spec.run.secretDelivery", f"cannot mount a tmpfs for the secrets: {os.strerror(err)}"
        )


def unmount_host_tmpfs(path: str) -> list[str]:
    """Empty, unmount and remove ``path``; return what is left (residue names)."""
    if not os.path.lexists(path):
        return []
    from cellos.core import libc

    with contextlib.suppress(OSError):
        _wipe(path)
    if os.path.ismount(path) and libc.umount2(path.encode(), _MNT_DETACH) != 0:
        err = libc.errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            return [f"mount:{path}"]
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        return [f"dir:{path}"]
    return []


def _wipe(path: str) -> None:
    for name in os.listdir(path):
        target = os.path.join(path, name)
        with contextlib.suppress(OSError):
            os.truncate(target, 0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)


def write_files(path: str, files: Mapping[str, bytes], uid: int, gid: int) -> None:
    """One file per secret in ``path``: 0400, owned by ``uid``/``gid`` (the workload)."""
    check(files)
    for key, value in files.items():
        target = os.path.join(path, key)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
        try:
            view = memoryview(value)
            while view:
                view = view[os.write(fd, view) :]
            os.fchown(fd, uid, gid)
            os.fchmod(fd, 0o400)
        finally:
            os.close(fd)
    # The workload may list and read its secrets (and nobody else on the host may even look).
    os.chown(path, uid, gid)
    os.chmod(path, 0o500)


class HostLease:
    """Empties and removes the files of a host secrets directory after ``seconds``."""

    def __init__(self, path: str, seconds: float) -> None:
        self.path = path
        self._timer = threading.Timer(seconds, self.end)
        self._timer.daemon = True
        self._lock = threading.Lock()
        self.ended = False

    def start(self) -> None:
        self._timer.start()

    def end(self) -> None:
        with self._lock:
            if self.ended:
                return
            self.ended = True
            with contextlib.suppress(OSError):
                _wipe(self.path)

    def cancel(self) -> None:
        self._timer.cancel()
