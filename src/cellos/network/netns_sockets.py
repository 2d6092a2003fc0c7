"""Creating sockets inside another network namespace, without another process.

A network namespace is a property of the socket, fixed when it is created. ``setns(2)``
changes the namespace of the calling *thread* only, so these run in a short-lived thread that
entered the cell's namespace (:func:`cellos.network.rtnl.in_netns`); the sockets stay in the
cell's namespace and are then served by the supervisor's own event loop.
"""

from __future__ import annotations

import socket


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
