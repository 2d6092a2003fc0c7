"""Local export: ``<CELLOS_EXPORT_DIR>/<cellId>/<name>``.

No path escape is possible: the cell directory is opened with O_NOFOLLOW|O_DIRECTORY beneath
the root, the name is re-checked as a single safe file name, a symlink (or anything but a
regular file) already at the destination is refused, and the bytes are written to a temporary
file in the same directory, fsynced and renamed into place, so a reader never sees a partial
artifact and a failed export leaves no empty file behind (nor the cell's directory, when that
export created it and nothing else is in it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import BinaryIO

from cellos.core.errors import ExportError
from cellos.core.ids import sha256, uuid4
from cellos.core.ports import ExportReceipt
from cellos.exports.names import check_export_target

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20


class LocalExportSink:
    name = "local"

    def __init__(self, root: str) -> None:
        self.root = root

    def _open_cell_dir(self, cell_id: str) -> tuple[int, bool]:
        """The cell's directory, opened; and whether this call created it."""
        try:
            os.makedirs(self.root, mode=0o755, exist_ok=True)
            root_fd = os.open(self.root, _DIR_FLAGS)
        except OSError as exc:
            if isinstance(exc, FileExistsError) or exc.errno == errno.ENOTDIR:
                raise ExportError("CELLOS_EXPORT_DIR", f"{self.root} is not a directory") from None
            raise ExportError(
                "CELLOS_EXPORT_DIR", f"cannot open {self.root!r}: {exc.strerror}"
            ) from None
        created = False
        try:
            try:
                os.mkdir(cell_id, 0o755, dir_fd=root_fd)
                created = True
            except FileExistsError:
                pass
            return os.open(cell_id, _DIR_FLAGS, dir_fd=root_fd), created
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise ExportError(
                    cell_id, "export directory is a symlink or not a directory"
                ) from None
            raise ExportError(cell_id, f"cannot create export directory: {exc.strerror}") from None
        finally:
            os.close(root_fd)

    def _remove_if_empty(self, cell_id: str) -> None:
        """Undo the cell's directory this export created, unless something is in it now."""
        with contextlib.suppress(OSError):
            root_fd = os.open(self.root, _DIR_FLAGS)
            try:
                os.rmdir(cell_id, dir_fd=root_fd)  # fails unless empty: nothing is lost
            except OSError:
                pass
            finally:
                os.close(root_fd)

    def export(self, cell_id: str, name: str, source: BinaryIO) -> ExportReceipt:
        check_export_target(cell_id, name)
        dir_fd, created = self._open_cell_dir(cell_id)
        tmp = f".{name[:200]}.{uuid4().replace('-', '')}.partial"
        exported = False
        try:
            try:
                existing = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                existing = None
            if existing is not None and not stat.S_ISREG(existing.st_mode):
                kind = "a symlink" if stat.S_ISLNK(existing.st_mode) else "not a regular file"
                raise ExportError(name, f"export destination is {kind}; refusing to replace it")
            digest = sha256()
            size = 0
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
                dir_fd=dir_fd,
            )
            try:
                with os.fdopen(fd, "wb") as out:
                    while chunk := source.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                exported = True
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
                raise
        except OSError as exc:
            raise ExportError(name, f"cannot write artifact: {exc.strerror}") from None
        finally:
            os.close(dir_fd)
            if created and not exported:
                # A failed export leaves no empty <root>/<cellId>/ behind.
                self._remove_if_empty(cell_id)
        return ExportReceipt(
            name=name,
            destination=os.path.join(self.root, cell_id, name),
            size_bytes=size,
            sha256=digest.hexdigest(),
        )
