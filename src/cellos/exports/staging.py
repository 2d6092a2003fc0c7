"""Staging an artifact before a remote upload: its size and sha256 must be known up front.

A remote destination verifies the digest we send with the bytes (``x-amz-checksum-sha256``,
``Digest``), so the digest has to exist before the first byte leaves. A seekable regular file
(what every backend's ``open_artifact`` returns today) is hashed in a first pass and rewound:
no copy. Anything else is spooled to an anonymous temporary file while it is hashed, so that a
retry can send the same bytes again.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import tempfile
from dataclasses import dataclass
from typing import BinaryIO

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Staged:
    """A rewindable artifact with its size and digest, computed before any upload."""

    file: BinaryIO
    size: int
    sha256_hex: str
    #: True when ``file`` is our spool (the caller closes it), False when it is the source.
    spooled: bool

    @property
    def sha256_b64(self) -> str:
        """The digest as S3 and RFC 3230/9530 headers want it: base64 of the raw bytes."""
        return base64.b64encode(bytes.fromhex(self.sha256_hex)).decode("ascii")

    def rewind(self) -> None:
        self.file.seek(0)

    def close(self) -> None:
        if self.spooled:
            self.file.close()


def _rereadable(source: BinaryIO) -> bool:
    """A regular file read from its start: re-reading it from 0 gives the same bytes."""
    try:
        return (
            stat.S_ISREG(os.fstat(source.fileno()).st_mode)
            and source.seekable()
            and source.tell() == 0
        )
    except (OSError, ValueError, AttributeError):
        return False


def stage(source: BinaryIO) -> Staged:
    """Hash ``source`` (spooling it when it cannot be re-read); raise OSError on read errors."""
    # OpenSSL's sha256 (hashlib), not cellos.core.ids': the builtin one avoids loading
    # OpenSSL for a plain run's cold start but is ~5x slower, and here the first pass over a
    # large artifact is on the export's critical path (remote sinks are imported lazily).
    digest = hashlib.sha256()
    size = 0
    if _rereadable(source):
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        source.seek(0)
        return Staged(source, size, digest.hexdigest(), spooled=False)
    # An anonymous file (O_TMPFILE where available): nothing named is left if we die.
    spool = tempfile.TemporaryFile(prefix="export-")  # noqa: SIM115 - closed by Staged.close
    try:
        while chunk := source.read(_CHUNK):
            spool.write(chunk)
            digest.update(chunk)
            size += len(chunk)
        spool.flush()
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return Staged(spool, size, digest.hexdigest(), spooled=True)
