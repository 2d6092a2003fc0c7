"""Creating sockets inside another network namespace, without another process.

A network namespace is a property of the socket, fixed when it is created. ``setns(2)``
changes the namespace of the calling *thread* only, so a short-lived thread enters the cell's
namespace, creates and binds the sockets, and ends; the sockets stay in the cell's namespace
and are then served by the supervisor's own event loop.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

CLONE_NEWNET = 0x40000000
T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(path: str, work: Callable[[], T]) -> T:
    """Run ``work`` in a fresh thread that has joined the network namespace at ``path``."""
    result: list[T] = []
    error: list[BaseException] = []

    def enter_and_work() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(work())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            error.append(exc)

    # The thread ends with the namespace it entered; nothing else ever runs in it.
    thread = threading.Thread(target=enter_and_work, name="cellos-netns")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def bound_socket(
    kind: socket.SocketKind,
    address: tuple[str, int],
    *,
    listen: bool = False,
    mark: int | None = None,
) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.bind(address)
        if listen:
            sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def unbound_socket(*, mark: int | None = None) -> socket.socket:
    """A TCP socket for an outgoing connection (connected later, from the event loop)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if mark is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    sock.setblocking(False)
    return sock
