"""The read-only root a cell gets when it is built from the host (every isolating backend)."""

from __future__ import annotations

import os

#: Host paths bound read-only into the cell (when they exist): programs, libraries, the
#: dynamic linker's configuration and the CA certificates, nothing of the host's state.
HOST_BINDS: tuple[str, ...] = (
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
)


def host_binds() -> tuple[str, ...]:
    """The host paths this machine has that are real files or directories (bound read-only)."""
    return tuple(p for p in HOST_BINDS if os.path.exists(p) and not os.path.islink(p))


def host_symlinks() -> dict[str, str]:
    """Host paths that are symlinks (merged-/usr ``/bin -> usr/bin``), recreated in the cell."""
    return {p: os.readlink(p) for p in HOST_BINDS if os.path.islink(p)}
