"""A cell's namespace and link through rtnetlink, in this process (no ``ip``, no pyroute2).

What a network scope needs from the kernel is a handful of netlink requests; doing them here
costs tens of microseconds each, where pyroute2 costs ~200 ms to import (every one-shot
``cellos-supervisor``) and forks a helper process per namespace. Only the requests the scope
makes are implemented: a named network namespace (``unshare(CLONE_NEWNET)`` in a short-lived
thread, bind-mounted under ``/run/netns`` like ``ip netns add``), a veth pair with one end in
each namespace, addresses, a default route, links up, link deletion, and the IPv6 sysctls of
a namespace.

Every request asks for an acknowledgement; a kernel error is raised as :class:`NetlinkError`
with the request it answers and the errno's text.
"""

from __future__ import annotations

# The C module: ``socket`` itself costs ~2 ms to import (its enum conversions), on the path of
# every one-shot supervisor of a cell with egress authority.
import _socket
import contextlib
import errno
import os
import struct
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from cellos.core import cidr, libc
from cellos.network.netlink import NetlinkError, answers, attr

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
MNT_DETACH = 2
NETNS_RUN_DIR = "/run/netns"

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400

RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_NEWROUTE = 24

IFLA_IFNAME = 3
IFLA_LINKINFO = 18
IFLA_NET_NS_FD = 28
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
VETH_INFO_PEER = 1
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_F_NODAD = 0x02
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
IFF_UP = 0x1

RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RTN_UNICAST = 1

_unshare = libc.function("unshare", libc.Int, [libc.Int])
_setns = libc.function("setns", libc.Int, [libc.Int, libc.Int])
_run_dir_ready = threading.Lock()
_run_dir_done = False


def _check(result: int, what: str) -> None:
    if result != 0:
        err = libc.errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _name(value: str) -> bytes:
    return value.encode() + b"\0"


def _ifinfo(index: int = 0, up: bool = False) -> bytes:
    flags = IFF_UP if up else 0
    change = IFF_UP if up else 0
    # family, pad, type, index, flags, change
    return struct.pack("BxHiII", _socket.AF_UNSPEC, 0, index, flags, change)


class Rtnl:
    """One rtnetlink socket, bound to the network namespace of the thread that opened it
    (a socket keeps its namespace for life, whichever thread uses it later)."""

    def __init__(self) -> None:
        self.sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, 0)
        self.sock.bind((0, 0))
        self._seq = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def request(self, kind: int, flags: int, body: bytes, what: str) -> bytes:
        """Send one request with an acknowledgement asked for; return the first non-ack
        answer (for a GET), or b"" once acknowledged; raise the kernel's error."""
        with self._lock:
            self._seq += 1
            seq = self._seq
            header = struct.pack("IHHII", 16 + len(body), kind, flags | NLM_F_REQUEST, seq, 0)
            self.sock.send(header + body)
            answer = b""
            for _kind, payload in answers(self.sock, seq, what):
                if not flags & NLM_F_ACK:
                    return payload  # a GET without acknowledgement: one answer
                answer = answer or payload
            return answer

    # -- links ----------------------------------------------------------------------------

    def link_index(self, name: str) -> int | None:
        """The index of the link called ``name`` in this socket's namespace (None: none)."""
        try:
            body = self.request(
                RTM_GETLINK, 0, _ifinfo() + attr(IFLA_IFNAME, _name(name)), f"get link {name}"
            )
        except NetlinkError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        (index,) = struct.unpack_from("i", body, 4)
        return int(index)

    def add_veth(self, name: str, peer: str, peer_netns_fd: int) -> None:
        """A veth pair: ``name`` here (up), ``peer`` in the namespace of the fd (down: the
        kernel cannot open an end before both exist; :meth:`set_up` it from there)."""
        peer_info = (
            _ifinfo()
            + attr(IFLA_IFNAME, _name(peer))
            + attr(IFLA_NET_NS_FD, struct.pack("I", peer_netns_fd))
        )
        linkinfo = attr(IFLA_INFO_KIND, b"veth\0") + attr(
            IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer_info)
        )
        body = _ifinfo(up=True) + attr(IFLA_IFNAME, _name(name)) + attr(IFLA_LINKINFO, linkinfo)
        self.request(
            RTM_NEWLINK,
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            body,
            f"create veth {name}/{peer}",
        )

    def set_up(self, index: int, what: str) -> None:
        self.request(RTM_NEWLINK, NLM_F_ACK, _ifinfo(index, up=True), f"set {what} up")

    def delete_link(self, index: int, what: str) -> None:
        self.request(RTM_DELLINK, NLM_F_ACK, _ifinfo(index), f"delete link {what}")

    # -- addresses and routes -------------------------------------------------------------

    def add_address(self, index: int, address: str, prefixlen: int, what: str) -> None:
        family, packed = cidr.packed(address)
        flags = IFA_F_NODAD if family == _socket.AF_INET6 else 0
        body = struct.pack("BBBBI", family, prefixlen, flags, RT_SCOPE_UNIVERSE, index)
        body += attr(IFA_LOCAL, packed) + attr(IFA_ADDRESS, packed)
        self.request(
            RTM_NEWADDR,
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            body,
            f"add address {address}/{prefixlen} to {what}",
        )

    def add_default_route(self, gateway: str, index: int) -> None:
        family, packed = cidr.packed(gateway)
        body = struct.pack(
            "BBBBBBBBI",
            family,
            0,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_BOOT,
            RT_SCOPE_UNIVERSE,
            RTN_UNICAST,
            0,
        )
        body += attr(RTA_GATEWAY, packed) + attr(RTA_OIF, struct.pack("i", index))
        self.request(
            RTM_NEWROUTE,
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            body,
            f"add default route via {gateway}",
        )


# -- namespaces -------------------------------------------------------------------------------


def netns_path(name: str) -> str:
    return os.path.join(NETNS_RUN_DIR, name)


def _prepare_run_dir() -> None:
    """``/run/netns`` as ``ip netns`` keeps it: a shared mount point, so that a namespace
    bound there is seen by every mount namespace (once per process)."""
    global _run_dir_done
    with _run_dir_ready:
        if _run_dir_done:
            return
        os.makedirs(NETNS_RUN_DIR, mode=0o755, exist_ok=True)
        target = NETNS_RUN_DIR.encode()
        if libc.mount(b"none", target, None, MS_SHARED | MS_REC, None) != 0:
            if libc.errno() != errno.EINVAL:
                _check(-1, f"make {NETNS_RUN_DIR} a shared mount")
            # Not a mount point yet: bind it onto itself, then share it.
            _check(libc.mount(target, target, b"none", MS_BIND | MS_REC, None), "bind")
            _check(
                libc.mount(b"none", target, None, MS_SHARED | MS_REC, None),
                f"make {NETNS_RUN_DIR} a shared mount",
            )
        _run_dir_done = True


def in_netns(path: str, work: Callable[[], T]) -> T:
    """Run ``work`` in a fresh thread that has joined the network namespace at ``path``, and
    return its result (or raise its error). ``setns`` moves only the calling thread, and the
    thread ends with the namespace it entered, so nothing else ever runs there; what ``work``
    makes there (sockets, a tap, a netlink or nftables context) stays in that namespace."""
    result: list[T] = []
    error: list[BaseException] = []

    def enter_and_work() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _check(_setns(fd, CLONE_NEWNET), f"setns({path})")
            finally:
                os.close(fd)
            result.append(work())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=enter_and_work, name="cellos-netns")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def create_netns_here(name: str) -> str:
    """In the calling thread: a new network namespace, bound at ``/run/netns/<name>``; the
    thread is left inside it (see :func:`new_netns`). Returns the path."""
    _prepare_run_dir()
    path = netns_path(name)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    os.close(fd)
    try:
        _check(_unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        own = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
        _check(libc.mount(own, path.encode(), b"none", MS_BIND, None), f"bind {path}")
    except BaseException:
        os.unlink(path)
        raise
    return path


@contextlib.contextmanager
def new_netns(name: str) -> Iterator[str]:
    """A new network namespace bound at ``/run/netns/<name>``, with the calling thread inside
    it for the ``with`` block and back in its own namespace after it, whatever happens (a
    thread switches namespaces in microseconds; a throwaway thread costs milliseconds on a
    loaded machine). The block must not start threads or run foreign code."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            yield create_netns_here(name)
        finally:
            if _setns(own, CLONE_NEWNET) != 0:
                # Unreachable in practice (root, our own namespace): a supervisor thread left
                # in a cell's namespace must not go on.
                err = os.strerror(libc.errno())
                os.write(2, f"cellos: cannot return to the host namespace: {err}\n".encode())
                os.abort()
    finally:
        os.close(own)


def remove_netns(name: str) -> bool:
    """Unbind and remove ``/run/netns/<name>`` (the kernel frees the namespace, and the links
    in it, once nothing uses it any more). False when there was nothing to remove."""
    path = netns_path(name)
    if not os.path.lexists(path):
        return False
    if libc.umount2(path.encode(), MNT_DETACH) != 0 and libc.errno() not in (
        errno.EINVAL,
        errno.ENOENT,
    ):
        _check(-1, f"unmount {path}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def write_sysctl(name: str, value: str) -> None:
    """Write ``/proc/sys/<name>`` (in the calling thread's network namespace for net.*)."""
    with open("/proc/sys/" + name.replace(".", "/"), "wb") as fh:
        fh.write(value.encode())
