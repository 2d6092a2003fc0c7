"""The cell's DNS authority proxy (DESIGN.md §4 ``dns_query_*`` events, §9 domain egress).

The cell's resolver configuration points at this proxy and nowhere else. For every query it
decides, from ``spec.authority.dnsAuthority.hostnameAllowlist``, whether the name may be resolved
at all:

* A name outside the allowlist is answered at once with ``REFUSED`` (rcode 5) and never leaves
  the proxy, so the cell cannot use the declared resolver as an oracle or a covert channel for
  names it was not granted.
* An allowed name is forwarded to the declared resolver. The addresses in the answer are handed
  to ``on_answer`` *before* the answer goes back to the client: the caller adds them to the
  cell's nftables set, so by the time the workload can know an address it is also reachable —
  and no address is reachable that the cell's own proxy did not hand out (§9: names are pinned
  to the addresses the proxy answered).

Policy decisions (documented choices):

* **Name matching** (:class:`HostnameAllowlist`): exact entries match the name itself,
  ASCII-case-insensitively and ignoring one trailing dot. ``*.example.com`` matches any name
  strictly below ``example.com`` (``a.example.com``, ``a.b.example.com``) but not
  ``example.com`` itself; declare both if both are wanted. Query names whose labels are not plain
  ``[A-Za-z0-9_-]`` text (escaped dots, binary, non-ASCII) are refused with ``invalid_name``: they
  could otherwise look like an allowed name in text while being a different name on the wire.
* **Query types**: only ``A``, ``AAAA`` and ``CNAME`` (class ``IN``) are forwarded. Everything
  else is refused with ``qtype_not_allowed``, even for an allowed name. ``TXT``/``NULL``/... would
  give the workload a bulk data channel through the resolver, ``PTR``/``SRV``/``MX`` name other
  hosts than the allowed one, and ``HTTPS``/``SVCB`` carry ``ipv4hint``/``ipv6hint`` addresses and
  alternative target names that bypass the A/AAAA pinning. Clients (browsers, curl) treat a failed
  ``HTTPS`` lookup as "no record" and fall back to A/AAAA, which is pinned.
* **CNAME chains**: the chain in the upstream answer is followed from the query name (at most
  :data:`MAX_CNAME_HOPS` hops, loops stop it); only the A/AAAA records owned by the *final* name
  of the chain are given to ``on_answer``. CNAME targets outside the allowlist are accepted, but
  only as part of an allowed name's answer: the workload can connect to ``api.example.com``'s
  addresses even if it is a CNAME of ``cdn.other.net``, while a direct query for
  ``cdn.other.net`` is still refused. Address records that are not at the end of the chain are
  relayed (the answer is not rewritten) but never pinned, so they stay unreachable.
* **What goes upstream**: the query sent to the resolver is rebuilt from the parsed question
  (plus a fresh EDNS OPT record with the client's payload size and DO bit, no options), under a
  fresh random transaction id, from a fresh socket (random source port). Nothing else the
  workload put in its packet (extra records, EDNS options such as client-subnet or padding)
  reaches the resolver.
* **What comes back**: only a response carrying our transaction id and the same question
  (name case-insensitively, type, class) is accepted; over UDP a mismatching datagram is ignored
  and the proxy keeps waiting (as a stub resolver does against spoofing). The accepted response is
  relayed byte for byte, except that its transaction id is restored to the client's. A response
  too large for the client's UDP payload size is replaced by an empty truncated (TC) reply so the
  client retries over TCP.
* **Transport**: UDP clients are forwarded over UDP, TCP clients over TCP (``do53-tcp`` resolvers
  always over TCP). ``timeout`` applies to each upstream attempt; a failed attempt (timeout,
  unreachable, bad response) is retried once, so the worst case is ``2 * timeout``. When both
  fail the client gets ``SERVFAIL``.
* **Malformed input** (unparsable, a response instead of a query, an opcode other than QUERY, not
  exactly one question, longer than :data:`MAX_QUERY_BYTES`) is dropped silently and counted in
  :attr:`DnsProxy.stats`; nothing a client sends can stop the proxy.

Events: ``on_decision`` receives the ``data`` of a ``dns_query_permitted`` (``decision ==
"permitted"``) or ``dns_query_refused`` (``decision == "refused"``) event. ``decision`` is the
*policy* decision; whether the client got an answer is in ``responseCode``. So an allowed name
whose resolver timed out is ``permitted`` with ``reasonCode: "upstream_timeout"`` and
``responseCode: "SERVFAIL"`` — a refused event always means the allowlist said no.

Sockets: the proxy never creates its listening sockets. The caller binds them inside the cell's
network namespace and hands them to :meth:`DnsProxy.start_on`, which takes ownership (they are
closed by :meth:`DnsProxy.close`). The upstream sockets are created by the proxy in whatever
namespace it runs in (the host side), which is where the declared resolver is reachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import secrets
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

from dnslib import (  # type: ignore[import-untyped]
    EDNS0,
    QTYPE,
    RCODE,
    DNSHeader,
    DNSRecord,
    EDNSOption,
)

from cellos.core.log import get_logger
from cellos.network.allowlist import HostnameAllowlist, normalize_name

log = get_logger(__name__)

OnAnswer = Callable[[str, list[str]], None]
OnDecision = Callable[[dict[str, Any]], None]

# Wire constants (RFC 1035 / 3596 / 6891 / 8914), spelled out so the policy does not depend on
# dnslib's (untyped) lookup tables.
_TYPE_A: Final = 1
_TYPE_CNAME: Final = 5
_TYPE_AAAA: Final = 28
_TYPE_OPT: Final = 41
_CLASS_IN: Final = 1
_OPCODE_QUERY: Final = 0
_RCODE_SERVFAIL: Final = 2
_RCODE_REFUSED: Final = 5
_EDNS_OPTION_EDE: Final = 15
_EDE_OTHER: Final = 0
_EDE_BLOCKED: Final = 15
_EDE_PROHIBITED: Final = 18
_EDE_NO_REACHABLE_AUTHORITY: Final = 22
_EDE_NETWORK_ERROR: Final = 23

#: Query types forwarded to the resolver; everything else is refused (see module docstring).
FORWARDED_QTYPES: Final[frozenset[int]] = frozenset({_TYPE_A, _TYPE_AAAA, _TYPE_CNAME})
#: Longest CNAME chain followed in an answer (resolvers stop well before this).
MAX_CNAME_HOPS: Final = 16
#: Queries longer than this are dropped unparsed: a real query (one name, an OPT record) is far
#: smaller, and bounding the input bounds the work an attacker can make the parser do.
MAX_QUERY_BYTES: Final = 4096
#: Smallest UDP payload every DNS client accepts (RFC 1035 §4.2.1).
_MIN_UDP_PAYLOAD: Final = 512
#: Upper bound for the EDNS payload size we advertise upstream (DNS flag day 2020 value is 1232;
#: we keep the client's value but never beyond what fits a datagram comfortably).
_MAX_UDP_PAYLOAD: Final = 4096
_UPSTREAM_ATTEMPTS: Final = 2  # the first try plus one retry

_QUERY_LABEL_RE: Final = re.compile(rb"[A-Za-z0-9_-]{1,63}")
_ASCII_LOWER: Final = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")

# reasonCode values of the events.
REASON_EXACT: Final = "allowlist_exact"
REASON_WILDCARD: Final = "allowlist_wildcard"
REASON_NOT_ALLOWED: Final = "name_not_allowed"
REASON_INVALID_NAME: Final = "invalid_name"
REASON_QTYPE: Final = "qtype_not_allowed"
REASON_QCLASS: Final = "qclass_not_allowed"
REASON_UPSTREAM_TIMEOUT: Final = "upstream_timeout"
REASON_UPSTREAM_UNREACHABLE: Final = "upstream_unreachable"
REASON_UPSTREAM_BAD_RESPONSE: Final = "upstream_bad_response"
REASON_PIN_FAILED: Final = "pin_failed"
REASON_INTERNAL: Final = "internal_error"


# --------------------------------------------------------------------------------------------
# Allowlist matching


# --------------------------------------------------------------------------------------------
# Query parsing and reply building (dnslib is untyped: its objects stay ``Any`` in here)


@dataclass(frozen=True, slots=True)
class _Query:
    record: Any  # dnslib.DNSRecord of the client's query
    id: int
    labels: tuple[bytes, ...]  # lowercased wire labels of the question name
    name: str  # normalized name, or a presentation-format rendering when invalid
    name_ok: bool
    qtype: int
    qclass: int
    edns_payload: int | None  # the client's EDNS UDP payload size, None without EDNS
    edns_do: bool
    max_udp: int  # largest UDP reply the client accepts


def _presentation(labels: Sequence[bytes]) -> str:
    """RFC 1035 presentation form with ``\\DDD`` escapes: safe to put in an event."""
    out: list[str] = []
    for label in labels:
        chars = []
        for byte in label:
            if 0x21 <= byte <= 0x7E and byte not in b".\\":
                chars.append(chr(byte))
            else:
                chars.append(f"\\{byte:03d}")
        out.append("".join(chars))
    return ".".join(out)[:300] or "."


def _parse_query(data: bytes) -> _Query | None:
    """Parse a client query; None means "malformed, drop it"."""
    if len(data) > MAX_QUERY_BYTES or len(data) < 12:
        return None
    try:
        record = DNSRecord.parse(data)
    # dnslib raises DNSError for most garbage, but a crafted packet can also surface
    # RecursionError/ValueError/... from deep inside it; no client input may crash the proxy.
    except Exception:  # noqa: BLE001
        return None
    header = record.header
    if header.qr or header.opcode != _OPCODE_QUERY or len(record.questions) != 1:
        return None
    question = record.questions[0]
    raw_labels = tuple(bytes(label) for label in question.qname.label)
    name_ok = bool(raw_labels) and all(_QUERY_LABEL_RE.fullmatch(lbl) for lbl in raw_labels)
    labels = tuple(lbl.translate(_ASCII_LOWER) for lbl in raw_labels)
    name = b".".join(labels).decode("ascii") if name_ok else _presentation(raw_labels)
    opts = [rr for rr in record.ar if rr.rtype == _TYPE_OPT]
    payload = int(opts[0].rclass) if opts else None
    max_udp = max(_MIN_UDP_PAYLOAD, payload) if payload is not None else _MIN_UDP_PAYLOAD
    return _Query(
        record=record,
        id=int(header.id),
        labels=labels,
        name=name,
        name_ok=name_ok,
        qtype=int(question.qtype),
        qclass=int(question.qclass),
        edns_payload=payload,
        edns_do=bool(opts and opts[0].edns_do),
        max_udp=max_udp,
    )


def _qtype_name(qtype: int) -> str:
    return str(QTYPE.get(qtype, f"TYPE{qtype}"))


def _rcode_name(rcode: int) -> str:
    return str(RCODE.get(rcode, f"RCODE{rcode}"))


def _upstream_wire(query: _Query, upstream_id: int) -> bytes:
    """The query as sent upstream: only the question (+ a bare OPT record), under our own id."""
    client = query.record.header
    header = DNSHeader(id=upstream_id, bitmap=0)
    header.rd = client.rd
    header.cd = client.cd
    header.ad = client.ad
    record = DNSRecord(header, questions=[query.record.questions[0]])
    if query.edns_payload is not None:
        size = min(max(query.edns_payload, _MIN_UDP_PAYLOAD), _MAX_UDP_PAYLOAD)
        record.add_ar(EDNS0(udp_len=size, flags="do" if query.edns_do else ""))
    return bytes(record.pack())


def _error_reply(query: _Query, rcode: int, ede: tuple[int, str] | None) -> bytes:
    """A reply with the question and no records; an Extended DNS Error if the client has EDNS."""
    header = DNSHeader(id=query.id, bitmap=0, qr=1, opcode=_OPCODE_QUERY, ra=1, rcode=rcode)
    header.rd = query.record.header.rd
    record = DNSRecord(header, questions=[query.record.questions[0]])
    if query.edns_payload is not None:
        opts = []
        if ede is not None:
            opts.append(EDNSOption(_EDNS_OPTION_EDE, struct.pack("!H", ede[0]) + ede[1].encode()))
        record.add_ar(EDNS0(udp_len=1232, opts=opts))
    return bytes(record.pack())


def _truncated_reply(query: _Query, response: Any) -> bytes:
    """Empty TC reply: tells a UDP client to ask again over TCP."""
    header = DNSHeader(id=query.id, bitmap=int(response.header.bitmap))
    header.tc = 1
    return bytes(DNSRecord(header, questions=[query.record.questions[0]]).pack())


def _match_response(raw: bytes, query: _Query, upstream_id: int) -> Any | None:
    """The parsed upstream response if it answers *our* question under *our* id, else None."""
    try:
        parsed = DNSRecord.parse(raw)
    except Exception:  # noqa: BLE001 - see _parse_query: a bad response is "no response"
        return None
    header = parsed.header
    if header.id != upstream_id or not header.qr or header.opcode != _OPCODE_QUERY:
        return None
    if len(parsed.questions) != 1:
        return None
    question = parsed.questions[0]
    labels = tuple(bytes(label).translate(_ASCII_LOWER) for label in question.qname.label)
    if labels != query.labels or question.qtype != query.qtype or question.qclass != query.qclass:
        return None
    return parsed


def _final_addresses(query: _Query, response: Any) -> tuple[list[str], list[str]]:
    """(addresses owned by the end of the CNAME chain, the chain's names) of an answer."""
    cnames: dict[tuple[bytes, ...], tuple[bytes, ...]] = {}
    addresses: dict[tuple[bytes, ...], list[str]] = {}
    for rr in response.rr:
        if rr.rclass != _CLASS_IN:
            continue
        owner = tuple(bytes(lbl).translate(_ASCII_LOWER) for lbl in rr.rname.label)
        if rr.rtype == _TYPE_CNAME:
            target = rr.rdata.label.label  # CNAME rdata -> DNSLabel -> tuple of bytes
            cnames.setdefault(owner, tuple(bytes(lbl).translate(_ASCII_LOWER) for lbl in target))
        elif rr.rtype in (_TYPE_A, _TYPE_AAAA):
            try:
                addr = str(ipaddress.ip_address(str(rr.rdata)))
            except ValueError:
                continue
            addresses.setdefault(owner, []).append(addr)
    current = query.labels
    seen = {current}
    chain: list[str] = []
    while current in cnames and len(chain) < MAX_CNAME_HOPS:
        current = cnames[current]
        if current in seen:  # a loop: nothing at its "end" is trustworthy
            return [], chain
        seen.add(current)
        chain.append(_presentation(current))
    return list(dict.fromkeys(addresses.get(current, []))), chain


# --------------------------------------------------------------------------------------------
# The proxy


@dataclass
class DnsProxyStats:
    """Counters, for tests and the supervisor's health view."""

    received: int = 0
    malformed: int = 0
    permitted: int = 0
    refused: int = 0
    servfail: int = 0
    upstream_queries: int = 0
    upstream_mismatched: int = 0
    overload_dropped: int = 0


class _UpstreamFailure(Exception):
    def __init__(self, reason: str, ede: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.ede = ede


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(self, proxy: DnsProxy) -> None:
        self._proxy = proxy
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector transport is not a registered DatagramTransport subclass.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return

        def send(wire: bytes) -> None:
            transport.sendto(wire, addr)

        self._proxy._handle(data, send, "udp")

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for replies to clients that went away: nothing to do.
        log.debug("dns proxy: udp error %s", exc)


class DnsProxy:
    """Allowlist-enforcing DNS forwarder for one cell (see the module docstring)."""

    def __init__(
        self,
        allowlist: Sequence[str],
        upstream: tuple[str, int],
        on_answer: OnAnswer,
        on_decision: OnDecision,
        timeout: float = 2.0,
        *,
        resolver_id: str | None = None,
        upstream_protocol: Literal["do53-udp", "do53-tcp"] = "do53-udp",
        max_inflight: int = 256,
        max_tcp_clients: int = 64,
        tcp_idle_timeout: float = 10.0,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        host, port = upstream
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            raise ValueError(f"upstream {host!r} must be a literal IP address") from None
        if not 1 <= port <= 65535:
            raise ValueError(f"upstream port {port} out of range")
        self.allowlist = HostnameAllowlist(allowlist)
        self._upstream: tuple[str, int] = (str(ip), port)
        self._family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        self._on_answer = on_answer
        self._on_decision = on_decision
        self._timeout = timeout
        self._resolver_id = resolver_id
        self._upstream_tcp_only = upstream_protocol == "do53-tcp"
        self._max_inflight = max_inflight
        self._max_tcp_clients = max_tcp_clients
        self._tcp_idle_timeout = tcp_idle_timeout
        self.stats = DnsProxyStats()
        self._udp_transport: asyncio.DatagramTransport | None = None
        self._tcp_server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # in-flight UDP resolutions
        self._tcp_clients: set[asyncio.Task[Any]] = set()
        self._started = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start_on(self, udp_sock: socket.socket, tcp_sock: socket.socket | None) -> None:
        """Serve on sockets the caller already bound (inside the cell's network namespace).

        The proxy takes ownership of both sockets; :meth:`close` closes them. ``tcp_sock`` may be
        bound but not yet listening.
        """
        if self._started:
            raise RuntimeError("DnsProxy.start_on called twice")
        if udp_sock.type != socket.SOCK_DGRAM:
            raise ValueError("udp_sock must be a SOCK_DGRAM socket")
        if tcp_sock is not None and tcp_sock.type != socket.SOCK_STREAM:
            raise ValueError("tcp_sock must be a SOCK_STREAM socket")
        self._started = True
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _UdpServer(self), sock=udp_sock)
        self._udp_transport = transport
        if tcp_sock is not None:
            self._tcp_server = await asyncio.start_server(self._serve_tcp_client, sock=tcp_sock)

    async def close(self) -> None:
        """Stop serving, cancel in-flight work, close the listening sockets. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._udp_transport is not None:
            self._udp_transport.close()
        if self._tcp_server is not None:
            self._tcp_server.close()
        pending = [*self._tasks, *self._tcp_clients]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._tcp_server is not None:
            await self._tcp_server.wait_closed()

    # -- request handling --------------------------------------------------------------------

    def _handle(self, data: bytes, send: Callable[[bytes], None], transport: str) -> None:
        """Datagram path. Refusals are answered synchronously (no task, no await): cheap under a
        flood and "immediate" for the client. Allowed names get a task."""
        self.stats.received += 1
        query = _parse_query(data)
        if query is None:
            self.stats.malformed += 1
            return
        entry = self._check_policy(query, send, transport)
        if entry is None:
            return
        if len(self._tasks) >= self._max_inflight:
            # Dropping is what an overloaded resolver does; the client's retry comes later.
            self.stats.overload_dropped += 1
            return
        task = asyncio.get_running_loop().create_task(self._resolve(query, entry, send, transport))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _check_policy(
        self, query: _Query, send: Callable[[bytes], None], transport: str
    ) -> str | None:
        """The allowlist entry permitting the query; otherwise replies REFUSED and returns None."""
        entry: str | None = None
        if not query.name_ok:
            reason = REASON_INVALID_NAME
        else:
            entry = self.allowlist.match(query.name)
            if entry is None:
                reason = REASON_NOT_ALLOWED
            elif query.qclass != _CLASS_IN:
                reason = REASON_QCLASS
            elif query.qtype not in FORWARDED_QTYPES:
                reason = REASON_QTYPE
            else:
                return entry
        ede = (_EDE_PROHIBITED, f"cellos: {reason}")
        self.stats.refused += 1
        # Event first, reply second (everywhere): the evidence exists before the client can act.
        self._emit(query, "refused", reason, _RCODE_REFUSED, transport)
        self._send_safely(send, lambda: _error_reply(query, _RCODE_REFUSED, ede))
        return None

    async def _resolve(
        self, query: _Query, entry: str, send: Callable[[bytes], None], transport: str
    ) -> None:
        try:
            await self._resolve_allowed(query, entry, send, transport)
        except Exception:  # a bug or an answer dnslib chokes on: the client still gets a reply
            log.exception("dns proxy: failed to answer %s", query.name)
            self._servfail(query, entry, REASON_INTERNAL, _EDE_OTHER, send, transport)

    async def _resolve_allowed(
        self, query: _Query, entry: str, send: Callable[[bytes], None], transport: str
    ) -> None:
        reason = REASON_WILDCARD if entry.startswith("*.") else REASON_EXACT
        use_tcp = transport == "tcp" or self._upstream_tcp_only
        try:
            raw, response = await self._forward(query, use_tcp=use_tcp)
        except _UpstreamFailure as failure:
            self._servfail(query, entry, failure.reason, failure.ede, send, transport)
            return
        addresses, chain = _final_addresses(query, response)
        if addresses:
            try:
                # Before the reply: the address must be reachable by the time the client has it.
                self._on_answer(query.name, addresses)
            except Exception:  # an unpinned answer is useless to the client
                log.exception("dns proxy: on_answer failed for %s", query.name)
                self._servfail(query, entry, REASON_PIN_FAILED, _EDE_BLOCKED, send, transport)
                return
        reply = struct.pack("!H", query.id) + raw[2:]
        if transport == "udp" and len(reply) > query.max_udp:
            reply = _truncated_reply(query, response)
        self.stats.permitted += 1
        self._emit(
            query,
            "permitted",
            reason,
            int(response.header.rcode),
            transport,
            entry=entry,
            answers=addresses,
            chain=chain,
        )
        self._send_safely(send, lambda: reply)

    def _servfail(
        self,
        query: _Query,
        entry: str,
        reason: str,
        ede: int,
        send: Callable[[bytes], None],
        transport: str,
    ) -> None:
        self.stats.servfail += 1
        self._emit(query, "permitted", reason, _RCODE_SERVFAIL, transport, entry=entry, answers=[])
        self._send_safely(
            send, lambda: _error_reply(query, _RCODE_SERVFAIL, (ede, f"cellos: {reason}"))
        )

    # -- upstream ----------------------------------------------------------------------------

    async def _forward(self, query: _Query, *, use_tcp: bool) -> tuple[bytes, Any]:
        failure = _UpstreamFailure(REASON_UPSTREAM_UNREACHABLE, _EDE_NETWORK_ERROR)
        for _attempt in range(_UPSTREAM_ATTEMPTS):
            # A fresh id per attempt: a late answer to the first attempt cannot satisfy the retry.
            upstream_id = secrets.randbits(16)
            wire = _upstream_wire(query, upstream_id)
            self.stats.upstream_queries += 1
            try:
                if use_tcp:
                    return await self._exchange_tcp(wire, query, upstream_id)
                return await self._exchange_udp(wire, query, upstream_id)
            except _UpstreamFailure as exc:
                failure = exc
                log.debug("dns proxy: upstream attempt failed for %s: %s", query.name, exc)
        raise failure

    async def _exchange_udp(
        self, wire: bytes, query: _Query, upstream_id: int
    ) -> tuple[bytes, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        with socket.socket(self._family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            try:
                # connect(): the kernel then drops datagrams from any other source, and ICMP
                # port-unreachable surfaces as ConnectionRefusedError instead of a timeout.
                sock.connect(self._upstream)
                await loop.sock_sendall(sock, wire)
            except OSError as exc:
                raise _UpstreamFailure(REASON_UPSTREAM_UNREACHABLE, _EDE_NETWORK_ERROR) from exc
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise _UpstreamFailure(REASON_UPSTREAM_TIMEOUT, _EDE_NO_REACHABLE_AUTHORITY)
                try:
                    raw = await asyncio.wait_for(loop.sock_recv(sock, 65535), remaining)
                except TimeoutError as exc:
                    raise _UpstreamFailure(
                        REASON_UPSTREAM_TIMEOUT, _EDE_NO_REACHABLE_AUTHORITY
                    ) from exc
                except OSError as exc:
                    raise _UpstreamFailure(REASON_UPSTREAM_UNREACHABLE, _EDE_NETWORK_ERROR) from exc
                response = _match_response(raw, query, upstream_id)
                if response is not None:
                    return raw, response
                # Not ours (stale, spoofed, garbage): keep listening until the deadline.
                self.stats.upstream_mismatched += 1

    async def _exchange_tcp(
        self, wire: bytes, query: _Query, upstream_id: int
    ) -> tuple[bytes, Any]:
        async def exchange() -> bytes:
            reader, writer = await asyncio.open_connection(*self._upstream)
            try:
                writer.write(struct.pack("!H", len(wire)) + wire)
                await writer.drain()
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                return await reader.readexactly(length)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

        try:
            raw = await asyncio.wait_for(exchange(), self._timeout)
        except TimeoutError as exc:
            raise _UpstreamFailure(REASON_UPSTREAM_TIMEOUT, _EDE_NO_REACHABLE_AUTHORITY) from exc
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise _UpstreamFailure(REASON_UPSTREAM_UNREACHABLE, _EDE_NETWORK_ERROR) from exc
        response = _match_response(raw, query, upstream_id)
        if response is None:
            self.stats.upstream_mismatched += 1
            raise _UpstreamFailure(REASON_UPSTREAM_BAD_RESPONSE, _EDE_NETWORK_ERROR)
        return raw, response

    # -- TCP clients -------------------------------------------------------------------------

    async def _serve_tcp_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if self._closed or task is None or len(self._tcp_clients) >= self._max_tcp_clients:
            self.stats.overload_dropped += 1
            writer.close()
            return
        self._tcp_clients.add(task)
        try:
            await self._tcp_session(reader, writer)
        finally:
            self._tcp_clients.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _tcp_session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        def send(wire: bytes) -> None:
            writer.write(struct.pack("!H", len(wire)) + wire)

        # Messages on one connection are answered in order; an idle or broken connection ends.
        while True:
            try:
                (length,) = struct.unpack(
                    "!H", await asyncio.wait_for(reader.readexactly(2), self._tcp_idle_timeout)
                )
                data = await asyncio.wait_for(reader.readexactly(length), self._tcp_idle_timeout)
            except (TimeoutError, asyncio.IncompleteReadError, OSError):
                return
            self.stats.received += 1
            query = _parse_query(data)
            if query is None:
                self.stats.malformed += 1
                continue  # framing is intact, so the next message can still be served
            entry = self._check_policy(query, send, "tcp")
            if entry is not None:
                await self._resolve(query, entry, send, "tcp")
            try:
                await writer.drain()
            except OSError:
                return

    # -- helpers -----------------------------------------------------------------------------

    def _send_safely(self, send: Callable[[bytes], None], build: Callable[[], bytes]) -> None:
        try:
            send(build())
        except Exception:  # one unsendable reply must not take the proxy down
            log.warning("dns proxy: could not send a reply", exc_info=True)

    def _emit(
        self,
        query: _Query,
        decision: Literal["permitted", "refused"],
        reason: str,
        rcode: int,
        transport: str,
        *,
        entry: str | None = None,
        answers: list[str] | None = None,
        chain: list[str] | None = None,
    ) -> None:
        data: dict[str, Any] = {
            "queryName": query.name,
            "queryType": _qtype_name(query.qtype),
            "decision": decision,
            "reasonCode": reason,
            "responseCode": _rcode_name(rcode),
            "transport": transport,
        }
        if decision == "permitted":
            data["answers"] = list(answers or [])
            data["matchedEntry"] = entry
            if chain:
                data["cnameChain"] = chain
            if self._resolver_id is not None:
                data["resolverId"] = self._resolver_id
        try:
            self._on_decision(data)
        except Exception:  # a broken sink must not stop name resolution
            log.exception("dns proxy: on_decision failed")


__all__ = [
    "FORWARDED_QTYPES",
    "MAX_CNAME_HOPS",
    "MAX_QUERY_BYTES",
    "DnsProxy",
    "DnsProxyStats",
    "HostnameAllowlist",
    "OnAnswer",
    "OnDecision",
    "normalize_name",
]
