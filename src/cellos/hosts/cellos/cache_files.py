"""Small facts a one-shot supervisor would otherwise recompute on every start, kept in the
user's private launcher cache directory (the seccomp program, the kernel's Landlock ABI).

What a cache file says weakens or strengthens every later cell, so a file is used only when it
is ours (or root's), not writable by others, in a directory only its owner can write; anything
else reads as a miss and is recomputed.
"""

from __future__ import annotations

import contextlib
import os
import stat


def read_trusted(path: str, max_bytes: int = 1 << 16) -> bytes | None:
    """The file's bytes, or None when it is missing, empty or not trustworthy."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        try:
            parent = os.stat(os.path.dirname(path))
        except OSError:
            return None
        if (
            not stat.S_ISREG(info.st_mode)
            or info.st_uid not in (0, os.geteuid())
            or info.st_mode & 0o022
            or parent.st_uid != os.geteuid()
            or parent.st_mode & 0o022
        ):
            return None
        data = fh.read(max_bytes)
    return data or None


def write_atomically(path: str, data: bytes, prune_prefix: str) -> None:
    """Best effort (a cache): write ``path`` whole or not at all, then remove the directory's
    other files starting with ``prune_prefix`` (what older rules, bindings or boots left)."""
    directory = os.path.dirname(path)
    partial = f"{path}.{os.getpid()}.partial"
    with contextlib.suppress(OSError):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(partial, path)
        for name in os.listdir(directory):
            if name.startswith(prune_prefix) and name != os.path.basename(path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(partial)
