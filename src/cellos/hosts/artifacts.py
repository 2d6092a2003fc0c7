"""Opening an artifact's source without following symlinks out of where it is allowed to be."""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from typing import BinaryIO

from cellos.core.errors import ExportError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _fail(path: str, exc: OSError) -> ExportError:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return ExportError(path, "is or passes through a symlink or non-directory; refusing it")
    if exc.errno == errno.ENOENT:
        return ExportError(path, "artifact does not exist")
    return ExportError(path, f"cannot open artifact: {exc.strerror}")


def _checked_file(fd: int, path: str) -> BinaryIO:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ExportError(path, "artifact is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def open_regular_file(path: str) -> BinaryIO:
    """Open a host path; the last component must not be a symlink, the file must be regular."""
    try:
        fd = os.open(path, _FILE_FLAGS)
    except OSError as exc:
        raise _fail(path, exc) from None
    return _checked_file(fd, path)


def open_beneath(root: str, relative: str, shown_as: str) -> BinaryIO:
    """Open ``root/relative`` walking one component at a time with ``O_NOFOLLOW``.

    A workload controls everything under its workspace, including symlinks such as
    ``out/report.json -> /etc/shadow``; no component may be a symlink and ``..`` is refused, so
    the opened file is always inside ``root``.
    """
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ExportError(shown_as, "artifact path must name a file inside the cell without '..'")
    try:
        dir_fd = os.open(root, _DIR_FLAGS)
    except OSError as exc:
        raise _fail(shown_as, exc) from None
    try:
        for part in parts[:-1]:
            try:
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=dir_fd)
            except OSError as exc:
                raise _fail(shown_as, exc) from None
            os.close(dir_fd)
            dir_fd = next_fd
        try:
            fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            raise _fail(shown_as, exc) from None
    finally:
        os.close(dir_fd)
    return _checked_file(fd, shown_as)


def open_in_workspace(workspace: str, working_directory: str, path: str) -> BinaryIO:
    """Open an artifact of an isolating backend: ``path`` is relative to the cell's working
    directory or absolute under it (the only writable, persistent place of the cell); the host
    directory behind it is ``workspace``."""
    if posixpath.isabs(path):
        norm = posixpath.normpath(path)
        if norm != working_directory and not norm.startswith(working_directory.rstrip("/") + "/"):
            raise ExportError(
                path,
                f"is outside the cell's workspace {working_directory} (the "
                "rest of the cell's filesystem is read-only or discarded)",
            )
        relative = posixpath.relpath(norm, working_directory)
    else:
        relative = path
    return open_beneath(workspace, relative, path)
