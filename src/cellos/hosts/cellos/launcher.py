"""The sandbox launcher binary (``cellos-sandbox.c``): found, or built once and cached.

The launcher is C because it runs between ``fork`` and the workload's ``exec`` in namespaces
of its own, where an interpreter cannot run; it is built from the source shipped in this
package the first time a cell needs it (a C compiler and libc headers, installed by
``scripts/setup.sh``), into a cache directory only the current user can write, named by the
digest of the source and the compiler flags, so an upgraded source gets a new binary and a
stale one is never used. ``CELLOS_LAUNCHER`` names a prebuilt binary instead (hosts without a
compiler).
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
import threading

from cellos.core.errors import HostError
from cellos.core.ids import sha256  # no OpenSSL load at every supervisor start

# os.path, not pathlib: this module is on every cellos-supervisor start (pathlib costs ms).
SOURCE = os.path.join(os.path.dirname(__file__), "cellos-sandbox.c")
CFLAGS = ("-O2", "-Wall", "-Wextra")
_lock = threading.Lock()
_built: dict[str, str] = {}


def default_cache_dir() -> str:
    from cellos.hosts.state import default_cache_root

    return default_cache_root()


def _private_dir(path: str) -> None:
    """Create ``path`` (0700) or check that an existing one is ours and not writable by others:
    a binary that root executes must not be replaceable by anyone else."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.stat(path, follow_symlinks=False)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise HostError(
            "CELLOS_CACHE_DIR",
            f"{path} must be a directory owned by uid {os.geteuid()} and not writable by others",
        )


def _trusted_binary(path: str) -> bool:
    try:
        info = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (
        stat.S_ISREG(info.st_mode)
        and info.st_uid in (0, os.geteuid())
        and not info.st_mode & 0o022
        and bool(info.st_mode & 0o100)
    )


def _build(cache_dir: str) -> str:
    with open(SOURCE, "rb") as fh:
        source = fh.read()
    digest = sha256(source + "\0".join(CFLAGS).encode()).hexdigest()[:16]
    target = os.path.join(cache_dir, f"cellos-sandbox-{digest}")
    # The directory is checked even when the binary is there: in a directory others can
    # write, the file could be swapped between this check and every later exec.
    _private_dir(cache_dir)
    if _trusted_binary(target):
        # Marks the build as in use: only builds nobody used for STALE_SECONDS are pruned.
        with contextlib.suppress(OSError):
            os.utime(target)
        return target
    # Only a build needs these (a one-shot supervisor start finds the cached binary).
    import shutil
    import subprocess
    import tempfile

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise HostError(
            "CELLOS_LAUNCHER",
            "the sandbox launcher must be built once and no C compiler was found; run "
            "scripts/setup.sh (apt-get install gcc libc6-dev) or set CELLOS_LAUNCHER to a "
            "prebuilt cellos-sandbox binary",
        )
    fd, partial = tempfile.mkstemp(dir=cache_dir, prefix=".build-")
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *CFLAGS, "-o", partial, SOURCE],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise HostError(
                "CELLOS_LAUNCHER",
                f"building the sandbox launcher failed: {done.stderr.strip()[-2000:]}",
            )
        os.chmod(partial, 0o755)  # noqa: S103 - a program, in a directory only we can write
        os.replace(partial, target)  # atomic: concurrent builders end with one good binary
        _remove_older_builds(cache_dir, keep=target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


#: A build of another source unused (not started from) for this long is pruned.
STALE_SECONDS = 30 * 24 * 3600


def _remove_older_builds(cache_dir: str, keep: str) -> None:
    """Builds of other sources that nobody has used for :data:`STALE_SECONDS`. Not every
    other build: two CellOS versions on one host (an upgrade rolling through workers) share
    the cache, and removing the other version's binary made its next cell fail to start."""
    import time

    stale_before = time.time() - STALE_SECONDS
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        if not name.startswith("cellos-sandbox-") or path == keep:
            continue
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_mtime < stale_before:
                os.unlink(path)


def launcher_path(configured: str | None = None, cache_dir: str | None = None) -> str:
    """The launcher to run: ``configured`` when given (it must be a trusted executable), else
    the cached build of the shipped source (built now if missing)."""
    if configured:
        if not _trusted_binary(configured):
            raise HostError(
                "CELLOS_LAUNCHER",
                f"{configured} is not an executable file owned by root or uid {os.geteuid()} "
                "and writable only by its owner",
            )
        return configured
    where = cache_dir or default_cache_dir()
    with _lock:
        if where not in _built or not os.path.exists(_built[where]):
            _built[where] = _build(where)
        return _built[where]


@functools.cache
def landlock_abi(cache_dir: str | None = None) -> int:
    """The Landlock ABI version this kernel offers (0 when it has none or it is disabled).

    Asking costs ~0.9 ms of a one-shot supervisor's start (loading :mod:`cellos.core.libc`;
    ~2.3 ms through ctypes) and the answer can change only with a reboot (the kernel and its
    ``lsm=`` command line), so it is kept in the cache directory under this boot's id and
    kernel release."""
    from cellos.hosts.cellos.cache_files import read_trusted, write_atomically

    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as fh:
            boot = fh.read().strip().decode()  # bytes: no codec module to load
    except OSError:
        return _probe_landlock_abi()
    key = sha256(f"{boot}\0{os.uname().release}".encode()).hexdigest()[:16]
    path = os.path.join(cache_dir or default_cache_dir(), f"landlock-{key}")
    cached = read_trusted(path, max_bytes=8)
    if cached is not None and cached.isdigit():
        return int(cached)
    version = _probe_landlock_abi()
    write_atomically(path, str(version).encode(), prune_prefix="landlock-")
    return version


def _probe_landlock_abi() -> int:
    from cellos.core import libc

    # syscall(2) takes its arguments as longs.
    syscall = libc.function("syscall", libc.Long, [libc.Long, libc.VoidP, libc.Long, libc.Long])
    # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION); the syscall number is
    # the same on x86_64 and aarch64 (unified numbering from 424 on).
    version: int = syscall(444, None, 0, 1)
    return max(version, 0)
