"""What the scope's netlink requests share (rtnetlink in :mod:`cellos.network.rtnl`, nf_tables
in :mod:`cellos.network.nft_netlink`): attributes (type, length, value; 4-byte aligned) and
reading the kernel's answers to one request."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from typing import Protocol

#: The netlink family of nf_tables (``linux/netlink.h``).
NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
NLMSG_DONE = 3
#: An attribute's type without its nested / byte-order flags.
NLA_TYPE_MASK = 0x3FFF


class NetlinkError(OSError):
    """The kernel refused a request: ``what`` names it, ``errno`` says why."""

    def __init__(self, err: int, what: str) -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.what = what


class Receiver(Protocol):
    def recv(self, size: int, /) -> bytes: ...


def attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("HH", length, kind) + payload + b"\0" * (-length % 4)


def attr_list(data: bytes) -> list[tuple[int, bytes]]:
    """The attributes of one nesting level, in order: (type, payload)."""
    items = []
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("HH", data, offset)
        if length < 4:
            break
        items.append((kind & NLA_TYPE_MASK, data[offset + 4 : offset + length]))
        offset += (length + 3) & ~3
    return items


def messages(data: bytes, what: str) -> Iterator[tuple[int, int, bytes]]:
    """The netlink messages of one datagram: (type, sequence number, payload after the
    netlink header); a malformed header raises :class:`NetlinkError` (``what`` names the
    request)."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _flags, seq, _pid = struct.unpack_from("IHHII", data, offset)
        if length < 16:
            raise NetlinkError(errno.EPROTO, what)
        yield kind, seq, data[offset + 16 : offset + length]
        offset += (length + 3) & ~3


def error_code(payload: bytes) -> int:
    """The errno of an ``NLMSG_ERROR`` message's payload (0: an acknowledgement)."""
    (code,) = struct.unpack_from("i", payload)
    return -int(code)


def answers(sock: Receiver, seq: int, what: str) -> Iterator[tuple[int, bytes]]:
    """The messages answering request ``seq``: (type, payload after the netlink header),
    until the kernel's acknowledgement or a dump's end; its error raised as
    :class:`NetlinkError` (``what`` names the request)."""
    while True:
        for kind, msg_seq, payload in messages(sock.recv(65536), what):
            if msg_seq != seq:
                continue
            if kind == NLMSG_ERROR:
                code = error_code(payload)
                if code:
                    raise NetlinkError(code, what)
                return
            if kind == NLMSG_DONE:
                return
            yield kind, payload
