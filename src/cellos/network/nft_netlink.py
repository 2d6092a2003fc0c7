"""nf_tables over a raw netlink socket: transactions (:func:`transaction`, what
:func:`cellos.network.nft.run` compiles), a table's rule counters and its deletion.

libnftables answered the counters only after fetching its whole cache (every table, chain,
set and rule of the host) and printing JSON for Python to parse again: ~0.6 ms warm, ~0.9 ms
in a cold cell, where a rule dump of the one table, read here, costs ~0.25 ms.

The host's socket is opened once, in the namespace of the first calling thread (the
host's), and kept: closing a netfilter socket shortly after a deletion waits for the kernel's
deferred destruction (see :mod:`cellos.network.link_release`, whose helper holds it on).
"""

from __future__ import annotations

import _socket  # the C module: ``socket`` costs ~2 ms to import
import errno
import struct
import threading

from cellos.network.netlink import (
    NETLINK_NETFILTER,
    NLMSG_ERROR,
    NetlinkError,
    answers,
    attr,
    attr_list,
    error_code,
    messages,
)

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_DELTABLE = 2
NFT_MSG_GETRULE = 7
NFTA_TABLE_NAME = 1
NFTA_RULE_TABLE = 1
NFTA_RULE_CHAIN = 2
NFTA_RULE_EXPRESSIONS = 4
NFTA_RULE_USERDATA = 7
NFTA_LIST_ELEM = 1
NFTA_EXPR_NAME = 1
NFTA_EXPR_DATA = 2
NFTA_COUNTER_BYTES = 1
NFTA_COUNTER_PACKETS = 2
#: libnftnl's user-data type of a rule's comment.
UDATA_RULE_COMMENT = 0
NFPROTO = {"inet": 1, "ip": 2, "ip6": 10}

NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300


class Message:
    """One request of a transaction: its type, family, flags, body, and what it does (for an
    error naming it)."""

    __slots__ = ("body", "family", "flags", "kind", "what")

    def __init__(self, kind: int, family: str, flags: int, body: bytes, what: str) -> None:
        self.kind = (NFNL_SUBSYS_NFTABLES << 8) | kind
        self.family = NFPROTO[family]
        self.flags = NLM_F_REQUEST | flags
        self.body = body
        self.what = what


class RuleCounter:
    """One counting rule's figures. (A plain class: a NamedTuple costs ~0.2 ms to create, on
    every one-shot supervisor of a cell with egress authority.)"""

    __slots__ = ("bytes", "chain", "comment", "packets")

    def __init__(self, chain: str, comment: str, packets: int, bytes: int) -> None:
        self.chain = chain
        self.comment = comment
        self.packets = packets
        self.bytes = bytes


def _attrs(data: bytes) -> dict[int, bytes]:
    """The attributes of one nesting level (the last of a repeated type)."""
    return dict(attr_list(data))


def _string(payload: bytes) -> str:
    return payload.split(b"\0", 1)[0].decode(errors="replace")


class _Socket:
    def __init__(self) -> None:
        self.sock = _socket.socket(
            _socket.AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, NETLINK_NETFILTER
        )
        self.sock.bind((0, 0))
        self._seq = 0
        self.lock = threading.Lock()

    def message(
        self, kind: int, flags: int, family: int, body: bytes, res_id: int = 0
    ) -> tuple[int, bytes]:
        """(sequence number, message): a netlink header, the netfilter one, ``body``."""
        self._seq += 1
        nfgen = struct.pack("BBH", family, 0, _socket.htons(res_id))
        header = struct.pack("IHHII", 20 + len(body), kind, flags, self._seq, 0)
        return self._seq, header + nfgen + body

    def replies(self, seq: int, what: str) -> list[tuple[int, bytes]]:
        """The messages answering ``seq``: (type, payload after the netfilter header)."""
        return [(kind, payload[4:]) for kind, payload in answers(self.sock, seq, what)]

    def transaction(self, messages: list[Message]) -> None:
        """Send ``messages`` as one batch (all applied, or none) and raise the first error.

        Like nft, without acknowledgements: the kernel processes a batch within the sending
        call, so its errors are queued by the time ``send`` returns, and a batch that
        succeeded leaves nothing to read."""
        subsys = NFNL_SUBSYS_NFTABLES
        with self.lock:
            _, begin = self.message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, b"", res_id=subsys)
            parts = [begin]
            what: dict[int, str] = {}
            for message in messages:
                seq, data = self.message(message.kind, message.flags, message.family, message.body)
                what[seq] = message.what
                parts.append(data)
            _, end = self.message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, b"", res_id=subsys)
            parts.append(end)
            self.sock.send(b"".join(parts))
            errors = self._queued_errors()
        if errors:
            seq, code = errors[0]
            raise NetlinkError(code, what.get(seq, "apply the nftables transaction"))

    def _queued_errors(self) -> list[tuple[int, int]]:
        """(sequence number, errno) of each error the kernel has queued on this socket."""
        errors: list[tuple[int, int]] = []
        while True:
            try:
                data = self.sock.recv(65536, _socket.MSG_DONTWAIT)
            except BlockingIOError:
                return errors
            for kind, seq, payload in messages(data, "read the nftables transaction's errors"):
                code = error_code(payload) if kind == NLMSG_ERROR else 0
                if code:
                    errors.append((seq, code))


_host: _Socket | None = None
_host_lock = threading.Lock()


def _host_socket() -> _Socket:
    global _host
    with _host_lock:
        if _host is None:
            _host = _Socket()
        return _host


def socket_fd() -> int:
    """This process's socket, opened now if it is not yet (in the calling thread's namespace,
    which must be the host's), for the link helper to hold on to."""
    return _host_socket().sock.fileno()


def rule_counters(family: str, table: str) -> list[RuleCounter]:
    """The counter of every rule of ``table`` that has one, in the table's order (chains as
    created, rules in order); [] when the table does not exist."""
    sock = _host_socket()
    with sock.lock:
        seq, request = sock.message(
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE,
            NLM_F_REQUEST | NLM_F_DUMP,
            NFPROTO[family],
            attr(NFTA_RULE_TABLE, table.encode() + b"\0"),
        )
        sock.sock.send(request)
        try:
            replies = sock.replies(seq, f"list rules of {family} {table}")
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                return []
            raise
    counters = []
    for _kind, payload in replies:
        rule = _attrs(payload)
        counter = _counter(rule.get(NFTA_RULE_EXPRESSIONS, b""))
        if counter is None:
            continue
        counters.append(
            RuleCounter(
                chain=_string(rule.get(NFTA_RULE_CHAIN, b"")),
                comment=_comment(rule.get(NFTA_RULE_USERDATA, b"")),
                packets=counter[0],
                bytes=counter[1],
            )
        )
    return counters


def _counter(expressions: bytes) -> tuple[int, int] | None:
    """(packets, bytes) of the rule's counter expression, if it has one."""
    for kind, element in attr_list(expressions):
        if kind != NFTA_LIST_ELEM:
            continue
        expr = _attrs(element)
        if _string(expr.get(NFTA_EXPR_NAME, b"")) != "counter":
            continue
        data = _attrs(expr.get(NFTA_EXPR_DATA, b""))
        (packets,) = struct.unpack(">Q", data.get(NFTA_COUNTER_PACKETS, bytes(8))[:8])
        (octets,) = struct.unpack(">Q", data.get(NFTA_COUNTER_BYTES, bytes(8))[:8])
        return int(packets), int(octets)
    return None


def _comment(userdata: bytes) -> str:
    """libnftnl's user data is type-length-value with one-byte type and length."""
    offset = 0
    while offset + 2 <= len(userdata):
        kind, length = userdata[offset], userdata[offset + 1]
        if kind == UDATA_RULE_COMMENT:
            return _string(userdata[offset + 2 : offset + 2 + length])
        offset += 2 + length
    return ""


def delete_table(family: str, table: str) -> bool:
    """Delete the table (one transaction); False when there was none."""
    name = attr(NFTA_TABLE_NAME, table.encode() + b"\0")
    message = Message(NFT_MSG_DELTABLE, family, 0, name, f"delete table {family} {table}")
    try:
        _host_socket().transaction([message])
    except NetlinkError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def transaction(messages: list[Message], netns: str | None = None) -> None:
    """Apply ``messages`` as one transaction: on this process's socket in the host's
    namespace, or on a socket opened for it in the namespace at ``netns``."""
    if netns is None:
        _host_socket().transaction(messages)
        return
    from cellos.network.rtnl import in_netns

    sock = in_netns(netns, _Socket)
    try:
        sock.transaction(messages)
    finally:
        sock.sock.close()
