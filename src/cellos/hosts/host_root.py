"""The read-only root a cell gets when it is built from the host (every isolating backend)."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from types import MappingProxyType

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


#: The kernel's limit on a hostname (a cell id may be up to 128 characters): isolating backends
#: name the cell's host by the id's first 64.
HOSTNAME_MAX = 64


# Looked up once per process: which of these paths exist (and which are symlinks) does not
# change under a running supervisor, and a dozen stats per cell are measurable.
@functools.cache
def host_binds() -> tuple[str, ...]:
    """The host paths this machine has that are real files or directories (bound read-only)."""
    return tuple(p for p in HOST_BINDS if os.path.exists(p) and not os.path.islink(p))


@functools.cache
def host_symlinks() -> Mapping[str, str]:
    """Host paths that are symlinks (merged-/usr ``/bin -> usr/bin``), recreated in the cell."""
    return MappingProxyType({p: os.readlink(p) for p in HOST_BINDS if os.path.islink(p)})


def refuse_reserved_working_directory(path: str, reserved: list[str], provider: str) -> None:
    """PolicyRefused naming ``spec.run.workingDirectory`` when ``path`` lies in (or is) one of
    the ``reserved`` directories, which ``provider`` (the backend, the guest) supplies itself."""
    from cellos.core.errors import PolicyRefused

    normal = os.path.normpath(path)
    for prefix in reserved:
        if normal == prefix or normal.startswith(prefix.rstrip("/") + "/"):
            raise PolicyRefused(
                "spec.run.workingDirectory",
                f"{path} is inside {prefix}, which {provider} provides read-only or itself; "
                "choose a path such as /workspace",
            )
