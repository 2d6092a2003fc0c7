"""nftables commands as data (the JSON shape of ``nft -j``), compiled here into nf_tables
netlink messages and applied as one transaction (:mod:`cellos.network.nft_netlink`).

Why not libnftables, the library the ``nft`` tool is built on: a one-shot supervisor paid
~6 ms for it per cell with egress authority (ctypes ~2.5 ms, loading the library and its five
dependencies ~1.1 ms, and a first transaction of ~2-2.5 ms, which begins by fetching the
host's whole ruleset into its cache), where compiling the cell's table here costs ~0.3 ms.
Only the subset CellOS writes is understood: tables, base chains, named IPv4 address sets and
their elements, and rules of matches on ``meta``, ``ct`` and ``payload`` (with nft's implicit
protocol dependencies), anonymous sets, counters, verdicts, ``reject``, ``masquerade``,
``dnat`` and ``redirect``; anything else raises ``ValueError`` (a programming error: no user
text reaches a command unvalidated). ``tests/test_nft_compile.py`` proves that what this
compiles is, instruction for instruction, what ``nft`` itself compiles from the same commands
(``nft --debug=netlink`` listings of both).
"""

from __future__ import annotations

import os
import struct
from typing import Any

from cellos.core import cidr
from cellos.core.errors import HostError
from cellos.network import nft_netlink
from cellos.network.netlink import NetlinkError, attr
from cellos.network.nft_netlink import NFPROTO, Message

Json = dict[str, Any]

NFT_MSG_NEWTABLE = 0
NFT_MSG_NEWCHAIN = 3
NFT_MSG_NEWRULE = 6
NFT_MSG_NEWSET = 9
NFT_MSG_NEWSETELEM = 12
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
NLA_F_NESTED = 0x8000

_HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}
_VERDICTS = {"drop": 0, "accept": 1}
_META_KEYS = {"mark": 3, "iifname": 6, "oifname": 7, "nfproto": 15, "l4proto": 16}
_CT_KEYS = {"state": 0, "status": 2}
_CT_BITS = {
    "state": {"invalid": 1, "established": 2, "related": 4, "new": 8, "untracked": 64},
    "status": {"expected": 1, "seen-reply": 2, "assured": 4, "confirmed": 8, "snat": 16,
               "dnat": 32},
}  # fmt: skip
_L4 = {"tcp": 6, "udp": 17, "icmpv6": 58}
_ICMPV6_TYPES = {"nd-router-solicit": 133, "nd-router-advert": 134, "nd-neighbor-solicit": 135,
                 "nd-neighbor-advert": 136}  # fmt: skip
_NETWORK_HEADER, _TRANSPORT_HEADER = 1, 2
#: (protocol, field): header, offset, length, network protocol it implies, transport protocol.
_FIELDS: dict[tuple[str, str], tuple[int, int, int, int | None, int | None]] = {
    ("ip", "saddr"): (_NETWORK_HEADER, 12, 4, 2, None),
    ("ip", "daddr"): (_NETWORK_HEADER, 16, 4, 2, None),
    ("ip6", "saddr"): (_NETWORK_HEADER, 8, 16, 10, None),
    ("ip6", "daddr"): (_NETWORK_HEADER, 24, 16, 10, None),
    ("tcp", "dport"): (_TRANSPORT_HEADER, 2, 2, None, 6),
    ("udp", "dport"): (_TRANSPORT_HEADER, 2, 2, None, 17),
    ("icmpv6", "type"): (_TRANSPORT_HEADER, 0, 1, 10, 58),
}
#: An anonymous set's key per field: nft's data type id and, for its user data (how ``nft``
#: prints the set), the protocol's and the field's ids in nft's own tables.
_SET_KEYS = {
    ("tcp", "dport"): (13, 8, 2),
    ("udp", "dport"): (13, 6, 2),
    ("icmpv6", "type"): (29, 14, 1),
}
_TYPE_IPV4_ADDR = 7
_BYTEORDER_BIG_ENDIAN = 2
_IFNAMSIZ = 16
_REG_VERDICT, _REG_1, _REG_2 = 0, 1, 2
_CMP_OPS = {"==": 0, "!=": 1}


def _nest(kind: int, payload: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, payload)


def _name(value: str) -> bytes:
    return value.encode() + b"\0"


def _be32(value: int) -> bytes:
    return struct.pack(">i" if value < 0 else ">I", value)


def _tlv(kind: int, value: bytes) -> bytes:
    """libnftnl's user data: one-byte type and length."""
    return bytes((kind, len(value))) + value


def _expr(name: str, *attrs: bytes) -> bytes:
    return _nest(1, attr(1, _name(name)) + _nest(2, b"".join(attrs)))


#: A rule's user data is at most 256 bytes (``NFT_USERDATA_MAXLEN``): its comment's type,
#: length, text and NUL.
_COMMENT_MAX = 256 - 3


def _comment(text: str) -> bytes:
    """A rule's comment as libnftnl stores it, cut to what the kernel keeps (a host rule's
    label carries its host name, up to 253 characters; nft itself aborted on such a one)."""
    data = text.encode()[:_COMMENT_MAX].decode(errors="ignore").encode()
    return _tlv(0, data + b"\0")


def _cmp(op: int, data: bytes) -> bytes:
    return _expr("cmp", attr(1, _be32(_REG_1)), attr(2, _be32(op)), _nest(3, attr(1, data)))


def _meta_load(key: str) -> bytes:
    return _expr("meta", attr(2, _be32(_META_KEYS[key])), attr(1, _be32(_REG_1)))


def _bitwise(mask: bytes, xor: bytes) -> bytes:
    """Register 1 = (register 1 & mask) ^ xor."""
    return _expr(
        "bitwise",
        attr(1, _be32(_REG_1)),
        attr(2, _be32(_REG_1)),
        attr(3, _be32(len(mask))),
        _nest(4, attr(1, mask)),
        _nest(5, attr(1, xor)),
    )


def _address(text: str) -> bytes:
    return cidr.packed(text)[1]


def _prefix_mask(length: int, size: int) -> bytes:
    bits = (1 << size * 8) - (1 << (size * 8 - length)) if length else 0
    return bits.to_bytes(size, "big")


class _Compiler:
    """The messages of one transaction; sets created in it are referred to by their id."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._set_ids: dict[tuple[str, str, str], int] = {}
        self._last_set_id = 0

    def _new_set_id(self) -> int:
        self._last_set_id += 1
        return self._last_set_id

    def command(self, command: Json) -> None:
        ((verb, body),) = command.items()
        ((kind, spec),) = body.items()
        if verb != "add":
            raise ValueError(f"nft: unsupported command {verb!r}")
        handler = {
            "table": self.table,
            "chain": self.chain,
            "set": self.set,
            "element": self.element,
            "rule": self.rule,
        }.get(kind)
        if handler is None:
            raise ValueError(f"nft: unsupported object {kind!r}")
        handler(spec)

    def table(self, spec: Json) -> None:
        body = attr(1, _name(spec["name"])) + attr(2, _be32(0))
        what = f"add table {spec['family']} {spec['name']}"
        self.messages.append(Message(NFT_MSG_NEWTABLE, spec["family"], 0, body, what))

    def chain(self, spec: Json) -> None:
        hook = attr(1, _be32(_HOOKS[spec["hook"]])) + attr(2, _be32(int(spec["prio"])))
        body = (
            attr(1, _name(spec["table"]))
            + attr(3, _name(spec["name"]))
            + attr(7, _name(spec["type"]))
            + attr(5, _be32(_VERDICTS[spec["policy"]]))
            + _nest(4, hook)
        )
        what = f"add chain {spec['family']} {spec['table']} {spec['name']}"
        self.messages.append(Message(NFT_MSG_NEWCHAIN, spec["family"], NLM_F_CREATE, body, what))

    def set(self, spec: Json) -> None:
        if spec["type"] != "ipv4_addr":
            raise ValueError(f"nft: unsupported set type {spec['type']!r}")
        family, table, name = spec["family"], spec["table"], spec["name"]
        set_id = self._new_set_id()
        self._set_ids[(family, table, name)] = set_id
        self._new_set(family, table, name, set_id, 0, _TYPE_IPV4_ADDR, 4, None)
        elements = [_address(e) for e in spec.get("elem", [])]
        if elements:
            self._elements(family, table, name, set_id, elements)

    def _new_set(
        self,
        family: str,
        table: str,
        name: str,
        set_id: int,
        flags: int,
        key_type: int,
        key_len: int,
        typeof: tuple[int, int] | None,
        size: int = 0,
    ) -> None:
        userdata = _tlv(0, struct.pack("=I", _BYTEORDER_BIG_ENDIAN))
        if typeof is not None:
            protocol, field = typeof
            template = _tlv(0, struct.pack("=I", protocol)) + _tlv(1, struct.pack("=I", field))
            userdata += _tlv(3, _tlv(0, struct.pack("=I", 7)) + _tlv(1, template))
        body = (
            attr(1, _name(table))
            + attr(2, _name(name))
            + attr(3, _be32(flags))
            + attr(4, _be32(key_type))
            + attr(5, _be32(key_len))
            + attr(10, _be32(set_id))
            + (_nest(9, attr(1, _be32(size))) if size else b"")
            + attr(13, userdata)
        )
        what = f"add set {family} {table} {name}"
        self.messages.append(Message(NFT_MSG_NEWSET, family, NLM_F_CREATE, body, what))

    def _elements(
        self, family: str, table: str, name: str, set_id: int | None, keys: list[bytes]
    ) -> None:
        elements = b"".join(_nest(1, _nest(1, attr(1, key))) for key in keys)
        body = (
            attr(1, _name(table))
            + attr(2, _name(name))
            + (attr(4, _be32(set_id)) if set_id is not None else b"")
            + _nest(3, elements)
        )
        what = f"add element {family} {table} {name}"
        self.messages.append(Message(NFT_MSG_NEWSETELEM, family, NLM_F_CREATE, body, what))

    def element(self, spec: Json) -> None:
        family, table, name = spec["family"], spec["table"], spec["name"]
        set_id = self._set_ids.get((family, table, name))
        self._elements(family, table, name, set_id, [_address(e) for e in spec["elem"]])

    def rule(self, spec: Json) -> None:
        family, table, chain = spec["family"], spec["table"], spec["chain"]
        rule = _Rule(self, family, table)
        for expression in spec["expr"]:
            rule.add(expression)
        body = attr(1, _name(table)) + attr(2, _name(chain)) + _nest(4, b"".join(rule.exprs))
        comment = spec.get("comment")
        if comment:
            body += attr(7, _comment(comment))
        what = f"add rule {family} {table} {chain}" + (f" ({comment})" if comment else "")
        flags = NLM_F_CREATE | NLM_F_APPEND
        self.messages.append(Message(NFT_MSG_NEWRULE, family, flags, body, what))

    def anonymous_set(
        self, family: str, table: str, key: tuple[str, str], values: list[Any]
    ) -> int:
        key_type, protocol, field = _SET_KEYS[key]
        size = _FIELDS[key][2]
        set_id = self._new_set_id()
        self._new_set(
            family, table, "__set%d", set_id, 3, key_type, size, (protocol, field), len(values)
        )
        keys = [_constant(key, v) for v in values]
        self._elements(family, table, "__set%d", set_id, keys)
        return set_id

    def set_id(self, family: str, table: str, name: str) -> int | None:
        return self._set_ids.get((family, table, name))


def _constant(key: tuple[str, str], value: Any) -> bytes:
    """A payload field's value in the packet's byte order."""
    size = _FIELDS[key][2]
    if key == ("icmpv6", "type"):
        return bytes((_ICMPV6_TYPES[value] if isinstance(value, str) else int(value),))
    if key[1] in ("saddr", "daddr"):
        return _address(value)
    return int(value).to_bytes(size, "big")


class _Rule:
    """One rule's instructions. Like nft, a match on a protocol's field is preceded by the
    match on that protocol (``meta nfproto`` in the inet family, ``meta l4proto``) unless an
    earlier match of the rule established it."""

    def __init__(self, batch: _Compiler, family: str, table: str) -> None:
        self.batch = batch
        self.family = family
        self.table = table
        self.exprs: list[bytes] = []
        self.nfproto: int | None = None
        self.l4proto: int | None = None

    def add(self, expression: Json) -> None:
        ((kind, spec),) = expression.items()
        if kind == "match":
            self.match(spec["left"], spec["right"], _CMP_OPS.get(spec["op"]), spec["op"])
        elif kind == "counter":
            self.exprs.append(_expr("counter"))
        elif kind in _VERDICTS:
            verdict = _nest(2, _nest(2, attr(1, _be32(_VERDICTS[kind]))))
            self.exprs.append(_expr("immediate", attr(1, _be32(_REG_VERDICT)), verdict))
        elif kind == "reject":
            self.exprs.append(_reject(spec))
        elif kind == "masquerade":
            self.exprs.append(_expr("masq"))
        elif kind == "dnat":
            if spec.get("family") != "ip":
                raise ValueError("nft: dnat is supported to an IPv4 address only")
            self._immediate(_REG_1, _address(spec["addr"]))
            self._immediate(_REG_2, int(spec["port"]).to_bytes(2, "big"))
            nat = (
                attr(1, _be32(1))  # NFT_NAT_DNAT
                + attr(2, _be32(NFPROTO["ip"]))
                + attr(3, _be32(_REG_1))
                + attr(5, _be32(_REG_2))
                + attr(7, _be32(2))  # NF_NAT_RANGE_PROTO_SPECIFIED
            )
            self.exprs.append(_expr("nat", nat))
        elif kind == "redirect":
            self._immediate(_REG_1, int(spec["port"]).to_bytes(2, "big"))
            self.exprs.append(_expr("redir", attr(1, _be32(_REG_1)), attr(3, _be32(2))))
        else:
            raise ValueError(f"nft: unsupported statement {kind!r}")

    def _immediate(self, register: int, data: bytes) -> None:
        data_value = _nest(2, attr(1, data))
        self.exprs.append(_expr("immediate", attr(1, _be32(register)), data_value))

    def _require(self, key: str, value: int) -> None:
        self.exprs.append(_meta_load(key))
        self.exprs.append(_cmp(0, bytes((value,))))

    def match(self, left: Json, right: Any, op: int | None, op_text: str) -> None:
        ((kind, spec),) = left.items()
        if kind == "meta":
            if op is None:
                raise ValueError(f"nft: unsupported operator {op_text!r} for meta")
            self._meta(spec["key"], right, op)
        elif kind == "ct":
            if op_text != "in":
                raise ValueError(f"nft: unsupported operator {op_text!r} for ct")
            self._ct(spec["key"], right)
        elif kind == "payload":
            self._payload((spec["protocol"], spec["field"]), right, op, op_text)
        else:
            raise ValueError(f"nft: unsupported match on {kind!r}")

    def _meta(self, key: str, right: Any, op: int) -> None:
        self.exprs.append(_meta_load(key))
        if key in ("iifname", "oifname"):
            name = right.encode()
            if len(name) >= _IFNAMSIZ:
                raise ValueError(f"nft: interface name {right!r} is too long")
            data = name.ljust(_IFNAMSIZ, b"\0")
        elif key == "l4proto":
            data = bytes((_L4[right],))
            if op == 0:
                self.l4proto = _L4[right]
        elif key == "mark":
            data = struct.pack("=I", int(right))
        else:
            raise ValueError(f"nft: unsupported meta key {key!r}")
        self.exprs.append(_cmp(op, data))

    def _ct(self, key: str, right: Any) -> None:
        names = right if isinstance(right, list) else [right]
        mask = 0
        for name in names:
            mask |= _CT_BITS[key][name]
        self.exprs.append(_expr("ct", attr(2, _be32(_CT_KEYS[key])), attr(1, _be32(_REG_1))))
        self.exprs.append(_bitwise(struct.pack("=I", mask), bytes(4)))
        self.exprs.append(_cmp(_CMP_OPS["!="], bytes(4)))

    def _payload(self, key: tuple[str, str], right: Any, op: int | None, op_text: str) -> None:
        if key not in _FIELDS:
            raise ValueError(f"nft: unsupported payload field {key!r}")
        base, offset, size, network, transport = _FIELDS[key]
        if network is not None and self.family == "inet" and self.nfproto != network:
            self._require("nfproto", network)
            self.nfproto = network
        if transport is not None and self.l4proto != transport:
            self._require("l4proto", transport)
            self.l4proto = transport
        in_set = (isinstance(right, dict) and "set" in right) or str(right).startswith("@")
        if in_set and op_text not in ("==", "in"):
            raise ValueError(f"nft: unsupported operator {op_text!r} for a set")
        if not in_set and op is None:
            raise ValueError(f"nft: unsupported operator {op_text!r} for a payload")
        length, mask, value = size, None, b""
        if isinstance(right, dict) and "prefix" in right:
            bits = int(right["prefix"]["len"])
            value = _address(right["prefix"]["addr"])
            if bits % 8 == 0 and bits:
                length = bits // 8  # like nft: load and compare only the prefix's bytes
                value = value[:length]
            else:
                mask = _prefix_mask(bits, size)
                value = bytes(a & b for a, b in zip(value, mask, strict=True))
        elif not in_set:
            value = _constant(key, right)
        load = attr(1, _be32(_REG_1)) + attr(2, _be32(base)) + attr(3, _be32(offset))
        self.exprs.append(_expr("payload", load + attr(4, _be32(length))))
        if in_set:
            self._lookup(key, right)
            return
        if mask is not None:
            self.exprs.append(_bitwise(mask, bytes(size)))
        self.exprs.append(_cmp(op or 0, value))

    def _lookup(self, key: tuple[str, str], right: Any) -> None:
        if isinstance(right, dict):
            set_id: int | None = self.batch.anonymous_set(
                self.family, self.table, key, right["set"]
            )
            name = "__set%d"
        else:
            name = right[1:]
            set_id = self.batch.set_id(self.family, self.table, name)
        lookup = attr(2, _be32(_REG_1)) + attr(1, _name(name))
        if set_id is not None:
            lookup += attr(4, _be32(set_id))
        self.exprs.append(_expr("lookup", lookup))


def _reject(spec: Json) -> bytes:
    if spec == {"type": "tcp reset"}:
        return _expr("reject", attr(1, _be32(1)), attr(2, b"\0"))  # NFT_REJECT_TCP_RST
    if spec == {"type": "icmpx", "expr": "admin-prohibited"}:
        return _expr("reject", attr(1, _be32(2)), attr(2, b"\x03"))  # NFT_REJECT_ICMPX_UNREACH
    raise ValueError(f"nft: unsupported reject {spec!r}")


def compile_commands(commands: list[Json]) -> list[Message]:
    """The messages of one transaction that applies ``commands``."""
    compiler = _Compiler()
    for command in commands:
        compiler.command(command)
    return compiler.messages


def run(commands: list[Json], netns: str | None = None) -> None:
    """Apply a batch atomically (one transaction), in the network namespace at ``netns``
    when given (else the calling thread's, which must be the host's)."""
    try:
        nft_netlink.transaction(compile_commands(commands), netns=netns)
    except NetlinkError as exc:
        raise HostError("nftables", f"cannot {exc.what}: {os.strerror(exc.errno or 0)}") from None


def match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def meta(key: str) -> Json:
    return {"meta": {"key": key}}


def payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}
