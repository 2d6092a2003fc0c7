"""Unix stream sockets whose path may exceed ``sun_path`` (108 bytes).

A cell's or pool guest's directory lives under the state directory, whose path is the
operator's to choose; the sockets in it (a guest channel, Firecracker's API) are reached
through ``/proc/self/fd/<dir fd>/<name>`` when the full path is too long.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

#: Paths shorter than this are used as they are (sun_path is 108 bytes with its NUL).
SHORT = 100


def _via_dir(path: str, use: Callable[[str], None]) -> None:
    if len(path.encode()) < SHORT:
        use(path)
        return
    fd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        use(f"/proc/self/fd/{fd}/{os.path.basename(path)}")
    finally:
        os.close(fd)


def connect_unix(sock: socket.socket, path: str) -> None:
    """``sock.connect(path)``, however long ``path`` is (OSError as connect raises it)."""
    _via_dir(path, sock.connect)


def bind_unix(sock: socket.socket, path: str) -> None:
    """``sock.bind(path)``, however long ``path`` is."""
    _via_dir(path, sock.bind)
