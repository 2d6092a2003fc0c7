"""The workload's seccomp filter, compiled to BPF with libseccomp (through pyseccomp).

Default allow, with a deny list of syscalls a workload has no business making and that are the
usual first step of an escape or of host tampering: mounts, namespaces, tracing, kernel
modules and keyrings, BPF, kexec, clock and swap changes. Denied calls fail with EPERM (a
clear error for the workload) rather than killing it. ``clone``/``clone3`` with namespace flags
are refused too, so ``unshare(1)`` style tricks fail whichever call they use; ``clone3`` gets
ENOSYS so that libc falls back to ``clone``, whose flags a filter can inspect.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os

from cellos.hosts.cellos.cache_files import read_trusted, write_atomically

DENIED_SYSCALLS: tuple[str, ...] = (
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsmount",
    "fsconfig",
    "fspick",
    "mount_setattr",
    "unshare",
    "setns",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "syslog",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "open_by_handle_at",
    "name_to_handle_at",
    "lookup_dcookie",
    "iopl",
    "ioperm",
    "vhangup",
    "nfsservctl",
)

# Namespace flags of clone(2) (linux/sched.h).
CLONE_NAMESPACE_FLAGS: tuple[int, ...] = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
    0x00000080,  # CLONE_NEWTIME
)


@functools.cache
def workload_filter_bpf() -> bytes:
    """The BPF program: the same for every cell, so compiled once per process and, for
    one-shot supervisors (libseccomp through pyseccomp costs milliseconds per start), kept
    beside the launcher in the user's private cache directory (same owner and mode checks)."""
    path = _cache_path()
    if path is not None:
        cached = read_trusted(path)
        # A BPF program is a whole number of 8-byte instructions.
        if cached and len(cached) % 8 == 0:
            return cached
    program = _compile()
    if path is not None:
        write_atomically(path, program, prune_prefix="seccomp-")
    return program


def _cache_path() -> str | None:
    """Named by what the program depends on: this module's rules, the architecture, and the
    libseccomp binding's version (its syscall tables)."""
    from cellos.core.ids import sha256
    from cellos.hosts.cellos.launcher import default_cache_dir

    binding = _binding_identity()
    try:
        with open(__file__, "rb") as fh:
            rules = fh.read()
    except OSError:
        return None
    if binding is None:
        return None
    key = sha256(rules + f"\0{os.uname().machine}\0{binding}".encode()).hexdigest()[:16]
    return os.path.join(default_cache_dir(), f"seccomp-{key}.bpf")


def _binding_identity() -> str | None:
    """Where pyseccomp is installed and its file's size and mtime (importlib.metadata would
    cost more than the compile it saves)."""
    import sys

    for entry in sys.path:
        for candidate in (
            os.path.join(entry or ".", "pyseccomp.py"),
            os.path.join(entry or ".", "pyseccomp", "__init__.py"),
        ):
            with contextlib.suppress(OSError):
                info = os.stat(candidate)
                return f"{candidate}:{info.st_size}:{info.st_mtime_ns}"
    return None


def _compile() -> bytes:
    import tempfile  # only on a cache miss: ~5 ms of imports (shutil, random)

    import pyseccomp as seccomp

    flt = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in DENIED_SYSCALLS:
        try:
            flt.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except (RuntimeError, ValueError, OSError):
            continue  # not a syscall on this architecture
    for flag in CLONE_NAMESPACE_FLAGS:
        flt.add_rule(
            seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag)
        )
    flt.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    # libseccomp writes to a file descriptor, not a Python buffer.
    with tempfile.TemporaryFile() as fh:
        flt.export_bpf(fh)
        fh.seek(0)
        return fh.read()
