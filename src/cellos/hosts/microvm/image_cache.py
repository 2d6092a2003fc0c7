"""The default microVM guest image: one per user, cached, built on first use.

When ``CELLOS_MICROVM_IMAGE`` is unset the ``qemu`` backend boots the image in::

    /var/cache/cellos/microvm/<key>                           (root)
    ${XDG_CACHE_HOME:-~/.cache}/cellos/microvm/<key>          (everyone else)

``CELLOS_MICROVM_CACHE`` names another directory to hold the ``<key>`` images. ``<key>`` is
the first 32 hex digits of the sha256 of the build inputs: the builder (``image.py``,
``manifest.py``), the guest init source (``guest/init.c``) and the VMM's resolved path and
sha256, so a changed builder, init or QEMU gets a new image and an old one is never booted.

Trust: the cache directory (and, for the default location, its ``cellos`` parent) must be a
directory owned by the current user and writable by no one else, and so must the image
directory and its files; anything else is refused with the path and the reason. A missing
image is built under an exclusive lock (``.<key>.lock``): into a temporary directory beside
it, renamed into place when complete, so a concurrent first use waits and then boots the
finished image, and a crash leaves only a ``.build-*`` directory the next builder removes.

A cached image that fails its manifest check is **not** rebuilt silently: the cell is refused
with the file and both digests, and ``cellos microvm build-image --refresh`` rebuilds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from cellos.core.errors import HostError
from cellos.hosts.microvm import image, manifest
from cellos.hosts.microvm.manifest import sha256_file
from cellos.hosts.state import default_cache_root, lock_now

CACHE_ENV = "CELLOS_MICROVM_CACHE"
REFRESH_HINT = "cellos microvm build-image --refresh"
VMM_NAME = "qemu-system-x86_64"

Progress = Callable[[str], None]


def stderr_progress(message: str) -> None:
    print(f"cellos: {message}", file=sys.stderr, flush=True)


def cache_dir(env: Mapping[str, str] | None = None) -> str:
    """Where the ``<key>`` images live (``CELLOS_MICROVM_CACHE`` or the per-user default)."""
    env = os.environ if env is None else env
    return env.get(CACHE_ENV) or os.path.join(default_cache_root(), "microvm")


def find_vmm(vmm: str | None = None) -> str:
    """The resolved path of the VMM binary (``qemu-system-x86_64`` on PATH by default)."""
    name = vmm or VMM_NAME
    found = name if os.path.isabs(name) else shutil.which(name)
    if not found or not os.path.isfile(found):
        raise HostError(
            "CELLOS_MICROVM_IMAGE",
            f"no image configured and {name} was not found to build the default one "
            "(apt-get install qemu-system-x86)",
        )
    return os.path.realpath(found)


def image_key(vmm_path: str, vmm_sha256: str) -> str:
    """The digest of the build inputs that names the cached image."""
    digest = hashlib.sha256()
    for source in (Path(image.__file__), Path(manifest.__file__), image.INIT_SOURCE):
        digest.update(hashlib.sha256(source.read_bytes()).digest())
    digest.update(f"{vmm_path}\0{vmm_sha256}".encode())
    return digest.hexdigest()[:32]


def _check_owned(path: str, *, kind: str) -> os.stat_result:
    """``path`` is a ``kind`` (dir/file), not a symlink, ours, and writable by no one else."""
    try:
        info = os.stat(path, follow_symlinks=False)
    except OSError as exc:
        raise HostError(path, f"cannot inspect the microVM image cache: {exc.strerror}") from exc
    is_kind = stat.S_ISDIR(info.st_mode) if kind == "directory" else stat.S_ISREG(info.st_mode)
    if not is_kind or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        mode = stat.filemode(info.st_mode)
        raise HostError(
            path,
            f"refusing the microVM image cache: must be a {kind} owned by uid {os.geteuid()} "
            f"and not writable by group or others (found {mode}, uid {info.st_uid}); "
            f"fix or remove it, or set {CACHE_ENV} to another directory",
        )
    return info


def _private_dirs(cache: str, env: Mapping[str, str]) -> None:
    """Create the cache directory (0700) and check it (and the default ``cellos`` parent)."""
    try:
        os.makedirs(cache, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise HostError(cache, f"cannot create the microVM image cache: {exc.strerror}") from exc
    if not env.get(CACHE_ENV):
        _check_owned(os.path.dirname(cache), kind="directory")
    _check_owned(cache, kind="directory")


def check_image_dir(path: str) -> None:
    """A cached image directory and every file in it are ours and writable by no one else."""
    _check_owned(path, kind="directory")
    for name in sorted(os.listdir(path)):
        _check_owned(os.path.join(path, name), kind="file")
    if not os.path.isfile(os.path.join(path, image.MANIFEST_NAME)):
        raise HostError(
            path, f"cached microVM image has no {image.MANIFEST_NAME}; rebuild it: {REFRESH_HINT}"
        )


@contextlib.contextmanager
def _build_lock(cache: str, key: str, progress: Progress) -> Iterator[None]:
    path = os.path.join(cache, f".{key}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if not lock_now(fd):
            progress(f"waiting for another process building the microVM image {key}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_stale_builds(cache: str, key: str) -> None:
    """Builds of ``key`` a killed builder left (we hold the key's lock: none is running)."""
    for name in os.listdir(cache):
        if name.startswith((f".build-{key}-", f".old-{key}-")):
            shutil.rmtree(os.path.join(cache, name), ignore_errors=True)


def _build_into(cache: str, key: str, vmm_path: str, target: str, progress: Progress) -> None:
    progress(f"building the microVM guest image into {target} (first use; takes a while)")
    started = time.monotonic()
    work = tempfile.mkdtemp(prefix=f".build-{key}-", dir=cache)
    try:
        try:
            image.build_image(work, vmm=vmm_path)
            os.chmod(work, 0o700)
            if os.path.lexists(target):  # --refresh: move the old one aside, then swap
                old = tempfile.mkdtemp(prefix=f".old-{key}-", dir=cache)
                os.rename(target, os.path.join(old, "image"))
                os.rename(work, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(work, target)
        except OSError as exc:
            where = exc.filename or work
            raise HostError(
                str(where), f"building the microVM image failed: {exc.strerror}"
            ) from exc
    finally:
        if os.path.lexists(work):
            shutil.rmtree(work, ignore_errors=True)
    progress(f"microVM guest image ready in {time.monotonic() - started:.0f} s: {target}")


def ensure_image(
    vmm: str | None = None,
    *,
    refresh: bool = False,
    build: bool = True,
    progress: Progress = stderr_progress,
    env: Mapping[str, str] | None = None,
) -> tuple[str, str, str] | None:
    """The default image directory, built first when missing (or when ``refresh``).

    Returns ``(image dir, VMM path, VMM sha256)``; None when the image is missing and
    ``build`` is False. Raises HostError naming the path on a cache that is not trusted or a
    build that fails (the partial build is removed).
    """
    env = os.environ if env is None else env
    vmm_path = find_vmm(vmm)
    vmm_sha = sha256_file(vmm_path)
    cache = cache_dir(env)
    _private_dirs(cache, env)
    key = image_key(vmm_path, vmm_sha)
    target = os.path.join(cache, key)
    if not refresh and os.path.lexists(target):
        check_image_dir(target)
        return target, vmm_path, vmm_sha
    if not build:
        return None
    with _build_lock(cache, key, progress):
        if not refresh and os.path.lexists(target):  # another process built it meanwhile
            check_image_dir(target)
            return target, vmm_path, vmm_sha
        _remove_stale_builds(cache, key)
        _build_into(cache, key, vmm_path, target, progress)
    check_image_dir(target)
    return target, vmm_path, vmm_sha
