"""L7 egress check: let a cell's TCP connection out only if its SNI / Host is allowlisted.

The cell's outbound TCP is redirected (nftables ``redirect``) to a socket this proxy serves.
For each connection the proxy reads just enough of what the client sends to learn the name
it wants (the TLS ClientHello's SNI, or the HTTP ``Host``), decides against the allowlist,
reports an ``l7_egress_decision`` event, and then either cuts the connection or connects to
the connection's *original destination address* and splices bytes both ways.

Why the original address and never the name: the name is chosen by the workload. Connecting
to it would turn the proxy into a forward proxy for any host the workload can name, bypassing
the address-level policy. Connecting to the original address keeps the two layers
independent: the firewall and DNS pinning decide which addresses are reachable at all, this
proxy additionally checks which name is being asked for there.

The proxy never creates listening sockets: the caller creates and binds one inside the
cell's network namespace and passes it to :meth:`L7Proxy.start_on`; likewise the caller's
``connect_upstream`` creates upstream sockets where (namespace, firewall mark) it must.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from cellos.core.log import get_logger
from cellos.network.allowlist import HostnameAllowlist
from cellos.network.http_relay import pump, relay_requests, stream_io
from cellos.network.injection import REASON_UPSTREAM_UNVERIFIED, ConnectionReport, Injections
from cellos.network.sni import (
    MAX_HTTP_HEADER_BYTES,
    MAX_TLS_PEEK_BYTES,
    HostStatus,
    SniStatus,
    looks_like_tls,
    parse_client_hello_sni,
    parse_http_host,
)
from cellos.network.tls_server import TlsServerStream

if TYPE_CHECKING:
    # Only secretInjection cells have a CA (cryptography's x509: ~90 ms of imports).
    from cellos.network.cell_ca import CellCA

__all__ = [
    "REASON_HTTP_HOST_MATCH",
    "REASON_HTTP_HOST_MISS",
    "REASON_HTTP_HOST_MISSING",
    "REASON_SNI_MATCH",
    "REASON_SNI_MISS",
    "REASON_SNI_MISSING",
    "SO_ORIGINAL_DST",
    "Allowlist",
    "InjectionSetup",
    "L7Proxy",
    "OriginalDestination",
    "UpstreamConnector",
    "open_upstream",
    "so_original_dst",
]

logger = get_logger(__name__)

# reasonCode values of the l7_egress_decision event (DESIGN §4); keep exactly.
REASON_SNI_MATCH: Final = "l7_sni_allowlist_match"
REASON_SNI_MISS: Final = "l7_sni_allowlist_miss"
REASON_SNI_MISSING: Final = "l7_sni_missing"
REASON_HTTP_HOST_MATCH: Final = "l7_http_host_allowlist_match"
REASON_HTTP_HOST_MISS: Final = "l7_http_host_allowlist_miss"
REASON_HTTP_HOST_MISSING: Final = "l7_http_host_missing"

# <linux/netfilter_ipv4.h> SO_ORIGINAL_DST; <linux/netfilter_ipv6/ip6_tables.h>
# IP6T_SO_ORIGINAL_DST has the same value at level SOL_IPV6.
SO_ORIGINAL_DST: Final = 80
_SOCKADDR_IN_LEN: Final = 16
_SOCKADDR_IN6_LEN: Final = 28

_READ_SIZE: Final = 64 * 1024
# The parsers decide on their own once their limits are reached; this is a backstop so a
# parser bug can never make the proxy buffer without bound.
_MAX_PEEK_BYTES: Final = max(MAX_TLS_PEEK_BYTES, MAX_HTTP_HEADER_BYTES)
_FORBIDDEN: Final = (
    b"HTTP/1.1 403 Forbidden\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 33\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b"egress denied by cell L7 policy\r\n"
)
# accept() errors that mean "out of resources right now": back off instead of spinning.
_ACCEPT_BACKOFF_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_BACKOFF_SECONDS: Final = 0.1

OriginalDestination = Callable[[socket.socket], tuple[str, int]]
UpstreamConnector = Callable[
    [str, int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
]


def so_original_dst(sock: socket.socket) -> tuple[str, int]:
    """The pre-NAT destination ``(ip, port)`` of a connection accepted after ``REDIRECT``.

    Asks conntrack via ``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` (or the IPv6 equivalent).
    Raises OSError when the connection has no conntrack entry (ENOENT) or conntrack is not
    available (ENOPROTOOPT).
    """
    ipv6 = sock.family == socket.AF_INET6
    if ipv6:
        # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; their conntrack entry
        # is an IPv4 one and must be asked for at the IPv4 level.
        local = ipaddress.IPv6Address(sock.getsockname()[0].split("%", 1)[0])
        ipv6 = local.ipv4_mapped is None
    if ipv6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, _SOCKADDR_IN6_LEN)
        # struct sockaddr_in6: family(2, host order), port(2, network), flowinfo(4), addr(16)
        port = struct.unpack_from("!H", raw, 2)[0]
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), int(port)
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_LEN)
    # struct sockaddr_in: family(2, host order), port(2, network), addr(4), zero(8)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), int(port)


async def open_upstream(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Default upstream connector: a plain connection from the current network namespace."""
    return await asyncio.open_connection(host, port)


class Allowlist:
    """Names a connection may ask for: the ``hostnameAllowlist`` semantics shared with the DNS
    proxy (:class:`cellos.network.allowlist.HostnameAllowlist`), plus IPv6 literals, compared
    in compressed form since that is how the Host parser reports them."""

    __slots__ = ("_names", "_v6")

    def __init__(self, entries: Sequence[str]) -> None:
        # A bare str is a Sequence[str] too; iterating it would allow single letters.
        if isinstance(entries, str):
            raise TypeError("allowlist must be a sequence of names, not a single string")
        names: list[str] = []
        v6: set[str] = set()
        for entry in entries:
            literal = _ipv6_literal(entry) if ":" in entry else None
            if literal is not None:
                v6.add(literal)
            else:
                names.append(entry)
        try:
            self._names = HostnameAllowlist(names)
        except ValueError as exc:
            raise ValueError(f"invalid allowlist entry: {exc}") from None
        self._v6 = frozenset(v6)

    def matches(self, name: str) -> bool:
        """Whether ``name`` is allowed. Expects a name as the parsers report it."""
        return name in self._v6 or self._names.match(name) is not None


def _ipv6_literal(entry: str) -> str | None:
    try:
        return ipaddress.IPv6Address(entry.removeprefix("[").removesuffix("]")).compressed
    except ValueError:
        return None


@dataclass(frozen=True)
class InjectionSetup:
    """What the proxy needs for ``secretInjection``: the table, the cell's CA (TLS to the
    injection hosts is terminated with leaves it issues), the context that verifies the real
    upstream, and where ``l7_secret_injection`` event data goes."""

    injections: Injections
    ca: CellCA
    upstream_context: ssl.SSLContext
    on_event: Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class _Verdict:
    allowed: bool
    reason_code: str
    server_name: str | None
    # Only a client that spoke HTTP is answered with a 403; anything else is just closed.
    send_forbidden: bool = False


class L7Proxy:
    """SNI / HTTP Host allowlist check in front of a cell's outbound TCP connections.

    ``allowlist``: names and ``*.suffix`` patterns (see :class:`Allowlist`).
    ``on_decision``: called synchronously with the data of one ``l7_egress_decision`` event
    per connection, before the connection is cut or forwarded. If it raises, the connection
    is cut: egress that cannot be recorded does not happen.
    ``original_destination``: learns where the client wanted to go from the accepted socket.
    ``connect_upstream``: opens the upstream connection to that ``(ip, port)``.
    ``peek_timeout``: seconds the client has to send enough bytes for a decision.
    ``connect_timeout``: seconds allowed for ``connect_upstream``.

    Port 443 destinations follow the SNI rules and port 80 the Host rules; any other port is
    sniffed (a TLS handshake record means SNI rules, anything else Host rules). A client that
    sends nothing within ``peek_timeout`` is denied as "missing", which means protocols where
    the server speaks first cannot pass this proxy.
    """

    def __init__(
        self,
        allowlist: Sequence[str],
        on_decision: Callable[[dict[str, Any]], None],
        *,
        original_destination: OriginalDestination = so_original_dst,
        connect_upstream: UpstreamConnector = open_upstream,
        peek_timeout: float = 5.0,
        connect_timeout: float = 10.0,
        injection: InjectionSetup | None = None,
    ) -> None:
        if not peek_timeout > 0:
            raise ValueError("peek_timeout must be positive")
        if not connect_timeout > 0:
            raise ValueError("connect_timeout must be positive")
        self._allowlist = Allowlist(allowlist)
        self._on_decision = on_decision
        self._original_destination = original_destination
        self._connect_upstream = connect_upstream
        self._peek_timeout = peek_timeout
        self._connect_timeout = connect_timeout
        self._injection = injection
        self._listen_sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start_on(self, listen_sock: socket.socket) -> None:
        """Start serving connections accepted on ``listen_sock`` and return.

        The socket must already be bound and listening (the caller creates it in the cell's
        network namespace). The proxy takes ownership of it and closes it in :meth:`close`.
        """
        if self._closed or self._listen_sock is not None:
            raise RuntimeError("L7Proxy.start_on may be called once, before close()")
        if listen_sock.type != socket.SOCK_STREAM or not listen_sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            raise ValueError("listen_sock must be a bound TCP socket in the listening state")
        listen_sock.setblocking(False)
        self._listen_sock = listen_sock
        self._accept_task = asyncio.create_task(self._accept_loop(listen_sock))

    async def close(self) -> None:
        """Stop accepting, close the listening socket, and cut every open connection."""
        self._closed = True
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
            self._accept_task = None
        if self._listen_sock is not None:
            self._listen_sock.close()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)

    # --- accepting ---------------------------------------------------------------------

    async def _accept_loop(self, listen_sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listen_sock)
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.EINVAL, errno.ENOTSOCK):
                    # The listening socket was closed or shut down under us: nothing more
                    # can be accepted, and retrying would spin.
                    logger.error("l7 proxy: listening socket unusable, stopping: %s", exc)
                    return
                if exc.errno in _ACCEPT_BACKOFF_ERRNOS:
                    logger.warning("l7 proxy: accept failed, backing off: %s", exc)
                    await asyncio.sleep(_ACCEPT_BACKOFF_SECONDS)
                # Anything else (ECONNABORTED, EPROTO, ...) concerns one client only.
                continue
            task = asyncio.create_task(self._serve_connection(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve_connection(self, conn: socket.socket) -> None:
        client: asyncio.StreamWriter | None = None
        try:
            conn.setblocking(False)
            try:
                destination = self._original_destination(conn)
            except Exception:
                # Without a destination there is nothing to decide about or connect to.
                logger.exception("l7 proxy: cannot determine original destination; closing")
                return
            reader, client = await asyncio.open_connection(sock=conn)
            await self._handle(conn, reader, client, destination)
        except Exception:
            logger.exception("l7 proxy: connection handling failed")
        finally:
            if client is not None:
                await _close_writer(client)
            else:
                conn.close()

    # --- one connection ----------------------------------------------------------------

    async def _handle(
        self,
        conn: socket.socket,
        reader: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        destination: tuple[str, int],
    ) -> None:
        host, port = destination
        verdict, peeked = await self._peek(reader, port)
        event: dict[str, Any] = {
            "destination": _format_destination(host, port),
            "serverName": verdict.server_name,
            "decision": "allowed" if verdict.allowed else "denied",
            "reasonCode": verdict.reason_code,
        }
        # Report before acting, so the decision is on record by the time the client or the
        # upstream observes its effect.
        recorded = self._emit(event)
        if not verdict.allowed or not recorded:
            if verdict.send_forbidden and recorded:
                client.write(_FORBIDDEN)
                with suppress(OSError, TimeoutError):
                    await asyncio.wait_for(client.drain(), self._peek_timeout)
                    client.write_eof()
            else:
                # RST rather than FIN: the client sees "connection reset" immediately
                # instead of a truncated handshake it may retry (DESIGN §9: visible refusal).
                _reset(conn)
            return
        injection = self._injection
        if injection is not None and injection.injections.active:
            if verdict.reason_code == REASON_SNI_MATCH and injection.injections.terminates(
                verdict.server_name
            ):
                assert verdict.server_name is not None
                await self._terminate(
                    conn, reader, client, host, port, verdict.server_name, peeked, injection
                )
                return
            if verdict.reason_code == REASON_HTTP_HOST_MATCH:
                report = ConnectionReport(
                    injection.on_event, event["destination"], verdict.server_name
                )
                if not await self._forward(
                    reader, client, host, port, peeked, (injection.injections, report)
                ):
                    _reset(conn)
                return
        if not await self._forward(reader, client, host, port, peeked):
            _reset(conn)

    async def _peek(self, reader: asyncio.StreamReader, port: int) -> tuple[_Verdict, bytes]:
        """Read until a verdict is possible or the peek timeout / size limit hits."""
        is_tls: bool | None = True if port == 443 else False if port == 80 else None
        buffer = bytearray()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._peek_timeout
        while True:
            if is_tls is None and buffer:
                is_tls = looks_like_tls(bytes(buffer))
            if is_tls is not None:
                verdict = self._judge(is_tls, bytes(buffer), final=len(buffer) >= _MAX_PEEK_BYTES)
                if verdict is not None:
                    return verdict, bytes(buffer)
            chunk = b""
            remaining = deadline - loop.time()
            if remaining > 0:
                # A reset or timeout ends the peek like EOF does: what was read is judged
                # as final, which for an incomplete hello / header block means "missing".
                with suppress(OSError, TimeoutError):
                    chunk = await asyncio.wait_for(reader.read(_READ_SIZE), remaining)
            if not chunk:
                final = self._judge(bool(is_tls), bytes(buffer), final=True)
                assert final is not None  # final=True always yields a verdict
                return final, bytes(buffer)
            buffer += chunk

    def _judge(self, is_tls: bool, data: bytes, *, final: bool) -> _Verdict | None:
        """The verdict for ``data``, or None if more bytes could change it (and not final)."""
        if is_tls:
            sni = parse_client_hello_sni(data)
            if sni.status is SniStatus.SERVER_NAME and sni.server_name is not None:
                if self._allowlist.matches(sni.server_name):
                    return _Verdict(True, REASON_SNI_MATCH, sni.server_name)
                return _Verdict(False, REASON_SNI_MISS, sni.server_name)
            if sni.status is SniStatus.NEED_MORE and not final:
                return None
            return _Verdict(False, REASON_SNI_MISSING, None)
        http = parse_http_host(data)
        if http.status is HostStatus.HOST and http.host is not None:
            if self._allowlist.matches(http.host):
                return _Verdict(True, REASON_HTTP_HOST_MATCH, http.host)
            return _Verdict(False, REASON_HTTP_HOST_MISS, http.host, send_forbidden=True)
        if http.status is HostStatus.NEED_MORE and not final:
            return None
        return _Verdict(
            False,
            REASON_HTTP_HOST_MISSING,
            None,
            send_forbidden=http.status is HostStatus.NO_HOST,
        )

    def _emit(self, event: dict[str, Any]) -> bool:
        try:
            self._on_decision(event)
        except Exception:
            logger.exception("l7 proxy: on_decision failed; cutting the connection")
            return False
        return True

    async def _forward(
        self,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        host: str,
        port: int,
        peeked: bytes,
        http_injection: tuple[Injections, ConnectionReport] | None = None,
    ) -> bool:
        """Connect upstream and splice; False if the upstream could not be reached.

        ``http_injection``: the client speaks plain HTTP and the cell injects secrets: its
        requests go through :func:`relay_requests` instead of a plain copy."""
        connected = await self._open_upstream(host, port)
        if connected is None:
            return False
        upstream_reader, upstream_writer = connected
        try:
            outbound: Coroutine[Any, Any, None]
            if http_injection is None:
                upstream_writer.write(peeked)
                outbound = pump(*stream_io(client_reader, upstream_writer, _READ_SIZE))
            else:
                injections, report = http_injection
                client_read, _, _ = stream_io(client_reader, client_writer)
                _, upstream_write, upstream_eof = stream_io(upstream_reader, upstream_writer)
                outbound = _then(
                    relay_requests(
                        client_read,
                        upstream_write,
                        peeked,
                        injections=injections,
                        report=report,
                        server_name=None,
                        destination_ip=host,
                    ),
                    upstream_eof,
                )
            await _splice(outbound, pump(*stream_io(upstream_reader, client_writer, _READ_SIZE)))
        finally:
            await _close_writer(upstream_writer)
        return True

    async def _open_upstream(
        self, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.wait_for(self._connect_upstream(host, port), self._connect_timeout)
        except (OSError, TimeoutError) as exc:
            logger.info(
                "l7 proxy: upstream %s unreachable: %r", _format_destination(host, port), exc
            )
            return None

    async def _terminate(
        self,
        conn: socket.socket,
        reader: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        host: str,
        port: int,
        server_name: str,
        peeked: bytes,
        injection: InjectionSetup,
    ) -> None:
        """TLS to an injection host: verify the real upstream first (against the host's trust
        store), then finish the client's handshake with a leaf of the cell's CA and relay
        the decrypted requests through :func:`relay_requests`."""
        destination = _format_destination(host, port)
        report = ConnectionReport(injection.on_event, destination, server_name)
        connected = await self._open_upstream(host, port)
        if connected is None:
            _reset(conn)
            return
        upstream_reader, upstream_writer = connected
        try:
            try:
                await upstream_writer.start_tls(
                    injection.upstream_context,
                    server_hostname=server_name,
                    ssl_handshake_timeout=self._connect_timeout,
                )
            except ssl.SSLError as exc:
                # An upstream that cannot prove it is the host never sees a secret.
                logger.info(
                    "l7 proxy: upstream %s (%s) not verified: %s", destination, server_name, exc
                )
                report.note(REASON_UPSTREAM_UNVERIFIED, request_host=server_name)
                _reset(conn)
                return
            except (OSError, TimeoutError):
                _reset(conn)
                return
            tls = TlsServerStream(injection.ca.server_context(server_name), reader, client)
            try:
                await tls.handshake(peeked, self._peek_timeout)
            except (ssl.SSLError, OSError, TimeoutError):
                _reset(conn)
                return
            upstream_read, upstream_write, _ = stream_io(upstream_reader, upstream_writer)

            async def client_done() -> None:
                # TLS has no half-close: the client's end ends the upstream session too.
                await _close_writer(upstream_writer)

            await _splice(
                _then(
                    relay_requests(
                        tls.read,
                        upstream_write,
                        b"",
                        injections=injection.injections,
                        report=report,
                        server_name=server_name,
                    ),
                    client_done,
                ),
                pump(upstream_read, tls.write, tls.close),
            )
        finally:
            await _close_writer(upstream_writer)


async def _splice(outbound: Coroutine[Any, Any, None], inbound: Coroutine[Any, Any, None]) -> None:
    """Run both directions until their EOF (half-closes are passed on); an error in either
    one ends the whole connection."""
    pumps = [asyncio.create_task(outbound), asyncio.create_task(inbound)]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in pumps:
            task.cancel()
        results = await asyncio.gather(*pumps, return_exceptions=True)
    for result in results:
        if isinstance(result, Exception) and not isinstance(result, OSError | ssl.SSLError):
            raise result


async def _then(first: Awaitable[None], after: Callable[[], Awaitable[None]]) -> None:
    await first
    await after()


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with suppress(OSError):
        await writer.wait_closed()


def _reset(conn: socket.socket) -> None:
    """Make the next close of ``conn`` send RST (SO_LINGER with zero timeout)."""
    with suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _format_destination(host: str, port: int) -> str:
    # Brackets keep "ip:port" unambiguous for IPv6 ("[2001:db8::1]:443").
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
