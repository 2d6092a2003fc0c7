"""L7 egress check: SNI / HTTP Host parsers and the proxy over real loopback sockets.

ClientHellos come from Python's own ``ssl`` module (OpenSSL), so the parser is tested
against what a real client sends; hand-built hellos cover the malformed and edge cases a
real client does not produce. The end-to-end tests run a real upstream server, a real proxy
and a real client on 127.0.0.1. REDIRECT is not used here, so ``original_destination``
returns the address the test wants the client to have "dialled", and the test's
``connect_upstream`` records what the proxy asked for before connecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellos.network.l7_proxy import (
    REASON_HTTP_HOST_MATCH,
    REASON_HTTP_HOST_MISS,
    REASON_HTTP_HOST_MISSING,
    REASON_SNI_MATCH,
    REASON_SNI_MISS,
    REASON_SNI_MISSING,
    Allowlist,
    L7Proxy,
    so_original_dst,
)
from cellos.network.sni import (
    MAX_CLIENT_HELLO_BYTES,
    MAX_HTTP_HEADER_BYTES,
    MAX_TLS_PEEK_BYTES,
    HostResult,
    HostStatus,
    SniResult,
    SniStatus,
    looks_like_tls,
    parse_client_hello_sni,
    parse_http_host,
)

# --- building ClientHellos -----------------------------------------------------------------


def real_client_hello(server_hostname: str | None) -> bytes:
    """The first flight (TLS records) OpenSSL sends for ``server_hostname``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if server_hostname is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def handshake_bytes(records: bytes) -> bytes:
    """Concatenated payloads of the handshake records in ``records``."""
    out, pos = bytearray(), 0
    while pos < len(records):
        assert records[pos] == 0x16
        length = int.from_bytes(records[pos + 3 : pos + 5], "big")
        out += records[pos + 5 : pos + 5 + length]
        pos += 5 + length
    return bytes(out)


def as_records(handshake: bytes, sizes: list[int] | int = 16384) -> bytes:
    """Re-fragment handshake bytes into records of the given payload sizes (cycled)."""
    pattern = [sizes] if isinstance(sizes, int) else sizes
    out, pos, i = bytearray(), 0, 0
    while pos < len(handshake):
        chunk = handshake[pos : pos + pattern[i % len(pattern)]]
        out += b"\x16\x03\x01" + len(chunk).to_bytes(2, "big") + chunk
        pos += len(chunk)
        i += 1
    return bytes(out)


def vec(length_bytes: int, data: bytes) -> bytes:
    return len(data).to_bytes(length_bytes, "big") + data


def sni_extension(*names: bytes, name_type: int = 0) -> tuple[int, bytes]:
    entries = b"".join(bytes([name_type]) + vec(2, name) for name in names)
    return 0, vec(2, entries)


def built_hello(extensions: list[tuple[int, bytes]] | None) -> bytes:
    """A hand-built ClientHello handshake message (no record header)."""
    body = b"\x03\x03" + bytes(32) + vec(1, b"") + vec(2, b"\x13\x01") + vec(1, b"\x00")
    if extensions is not None:
        body += vec(2, b"".join(t.to_bytes(2, "big") + vec(2, d) for t, d in extensions))
    return b"\x01" + len(body).to_bytes(3, "big") + body


def sni(data: bytes) -> SniResult:
    return parse_client_hello_sni(data)


# --- SNI parser -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [
        ("allowed.example", "allowed.example"),
        ("Example.COM", "example.com"),  # OpenSSL sends the case it is given
        ("example.com.", "example.com"),  # and the trailing dot
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("bücher.example", "xn--bcher-kva.example"),  # Python IDNA-encodes before sending
    ],
)
def test_sni_from_real_client_hello(hostname: str, expected: str) -> None:
    assert sni(real_client_hello(hostname)) == SniResult(SniStatus.SERVER_NAME, expected)


@pytest.mark.parametrize("hostname", [None, "127.0.0.1"])  # no SNI is sent for IP literals
def test_real_client_hello_without_sni(hostname: str | None) -> None:
    assert sni(real_client_hello(hostname)) == SniResult(SniStatus.NO_SNI)


def test_every_proper_prefix_of_a_hello_needs_more() -> None:
    hello = real_client_hello("allowed.example")
    for end in range(len(hello)):
        assert sni(hello[:end]).status is SniStatus.NEED_MORE, end
    assert sni(hello).server_name == "allowed.example"


@pytest.mark.parametrize("sizes", [1, 2, 7, 100, [3, 200, 1, 50], 300])
def test_hello_split_across_records(sizes: list[int] | int) -> None:
    stream = as_records(handshake_bytes(real_client_hello("split.example")), sizes)
    # Each TCP-level prefix is incomplete until the last record has fully arrived.
    for end in range(0, len(stream), 13):
        if end < len(stream):
            assert sni(stream[:end]).status is SniStatus.NEED_MORE
    assert sni(stream) == SniResult(SniStatus.SERVER_NAME, "split.example")


def test_bytes_after_the_hello_are_ignored() -> None:
    hello = real_client_hello("allowed.example")
    ccs = b"\x14\x03\x03\x00\x01\x01"
    assert sni(hello + ccs + b"\x17\x03\x03\x00\x05hello").server_name == "allowed.example"


def test_hello_decided_before_its_record_ends() -> None:
    # A record holding the hello plus (not yet received) later handshake bytes.
    message = built_hello([sni_extension(b"early.example")])
    record = b"\x16\x03\x01" + (len(message) + 100).to_bytes(2, "big") + message
    assert sni(record).server_name == "early.example"


def test_hello_without_any_extensions_has_no_sni() -> None:
    assert sni(as_records(built_hello(None))) == SniResult(SniStatus.NO_SNI)


def test_unknown_name_types_are_skipped() -> None:
    ext = (0, vec(2, b"\x07" + vec(2, b"other") + b"\x00" + vec(2, b"real.example")))
    assert sni(as_records(built_hello([ext]))).server_name == "real.example"


def test_large_hello_up_to_the_limit() -> None:
    base = built_hello([sni_extension(b"big.example"), (21, b"")])
    padding = MAX_CLIENT_HELLO_BYTES - len(base)
    hello = built_hello([sni_extension(b"big.example"), (21, bytes(padding))])
    assert len(hello) == MAX_CLIENT_HELLO_BYTES
    stream = as_records(hello)  # needs two records: a record carries at most 16384 bytes
    assert sni(stream[:-1]).status is SniStatus.NEED_MORE
    assert sni(stream).server_name == "big.example"


def test_hello_over_the_limit_is_refused_from_its_header() -> None:
    hello = built_hello([sni_extension(b"big.example"), (21, bytes(MAX_CLIENT_HELLO_BYTES))])
    assert sni(as_records(hello)[:9]).status is SniStatus.NOT_TLS


def test_over_fragmented_hello_is_given_up_on() -> None:
    hello = built_hello([sni_extension(b"big.example"), (21, bytes(12000))])
    stream = as_records(hello, 1)  # 6x overhead: beyond MAX_TLS_PEEK_BYTES before complete
    assert sni(stream[: MAX_TLS_PEEK_BYTES - 1]).status is SniStatus.NEED_MORE
    assert sni(stream[:MAX_TLS_PEEK_BYTES]).status is SniStatus.NOT_TLS


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"G", id="http-first-byte"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", id="http"),
        pytest.param(b"\x16\x02", id="bad-major-version"),
        pytest.param(b"\x16\x03\x05", id="bad-minor-version"),
        pytest.param(b"\x80\x2e\x01\x03\x01", id="sslv2-hello"),
        pytest.param(b"\x17\x03\x03\x00\x10" + bytes(16), id="application-data"),
        pytest.param(b"\x16\x03\x01\x00\x00", id="zero-length-record"),
        pytest.param(b"\x16\x03\x01\x40\x01", id="oversized-record"),
        pytest.param(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", id="server-hello"),
        pytest.param(
            as_records(built_hello([sni_extension(b"a.example")]))[:-1]
            + b"\x15\x03\x03\x00\x02\x02\x28",
            id="alert-inside-hello",
        ),
    ],
)
def test_not_tls(data: bytes) -> None:
    assert sni(data) == SniResult(SniStatus.NOT_TLS)


@pytest.mark.parametrize(
    "extensions",
    [
        pytest.param([sni_extension(b"a.example"), sni_extension(b"b.example")], id="dup-ext"),
        pytest.param([sni_extension(b"a.example", b"b.example")], id="two-host-names"),
        pytest.param([sni_extension(b"allowed.example\x00.evil")], id="nul-in-name"),
        pytest.param([sni_extension("bü.example".encode())], id="non-ascii"),
        pytest.param([sni_extension(b"")], id="empty-name"),
        pytest.param([sni_extension(b"a..example")], id="empty-label"),
        pytest.param([sni_extension(b"a example")], id="space"),
        pytest.param([sni_extension(b"a" * 64 + b".example")], id="long-label"),
        pytest.param([(0, b"")], id="empty-extension"),
        pytest.param([(0, vec(2, b""))], id="empty-name-list"),
        pytest.param([(0, vec(2, b"\x00" + vec(2, b"a.example")) + b"x")], id="ext-trailer"),
    ],
)
def test_malformed_server_name_is_not_tls(extensions: list[tuple[int, bytes]]) -> None:
    assert sni(as_records(built_hello(extensions))).status is SniStatus.NOT_TLS


def test_malformed_hello_bodies() -> None:
    good = built_hello([sni_extension(b"a.example")])
    # Extensions block shorter than declared: the hello length no longer adds up.
    truncated = b"\x01" + (len(good) - 5).to_bytes(3, "big") + good[4:-1]
    assert sni(as_records(truncated)).status is SniStatus.NOT_TLS
    # Trailing byte after the extensions block.
    trailing = b"\x01" + (len(good) - 3).to_bytes(3, "big") + good[4:] + b"\x00"
    assert sni(as_records(trailing)).status is SniStatus.NOT_TLS
    # A session id longer than 32 bytes.
    body = b"\x03\x03" + bytes(32) + vec(1, bytes(33)) + vec(2, b"\x13\x01") + vec(1, b"\x00")
    assert sni(as_records(b"\x01" + vec(3, body))).status is SniStatus.NOT_TLS


def test_looks_like_tls() -> None:
    assert looks_like_tls(real_client_hello("a.example"))
    assert looks_like_tls(b"\x16")
    assert not looks_like_tls(b"")
    assert not looks_like_tls(b"GET / HTTP/1.1\r\n")


# --- HTTP Host parser -----------------------------------------------------------------------


def host(data: bytes) -> HostResult:
    return parse_http_host(data)


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (b"GET / HTTP/1.1\r\nHost: allowed.example\r\n\r\n", "allowed.example"),
        (b"GET / HTTP/1.1\r\nHost: Allowed.EXAMPLE:8080\r\n\r\n", "allowed.example"),
        (b"GET / HTTP/1.1\r\nhOsT:allowed.example.  \r\n\r\n", "allowed.example"),
        (b"GET / HTTP/1.1\r\nHost: allowed.example:\r\n\r\n", "allowed.example"),
        (b"GET / HTTP/1.1\r\nUser-Agent: x\r\nHost: \tb.example\t\r\nA: b\r\n\r\n", "b.example"),
        (b"GET / HTTP/1.1\nHost: lf.example\n\n", "lf.example"),  # bare LF line ends
        (b"GET / HTTP/1.1\r\nHost: 10.0.0.1:80\r\n\r\n", "10.0.0.1"),
        (b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n", "::1"),
        (b"GET / HTTP/1.1\r\nHost: [2001:DB8:0::1]:8443\r\n\r\n", "2001:db8::1"),
        (b"POST /x HTTP/1.0\r\nHost: old.example\r\n\r\nHost: body.example\r\n", "old.example"),
        (b"GET http://abs.example/p HTTP/1.1\r\nHost: abs.example\r\n\r\n", "abs.example"),
        (b"GET HTTP://abs.example:80?q HTTP/1.1\r\n\r\n", "abs.example"),
        (
            b"CONNECT tunnel.example:443 HTTP/1.1\r\nHost: tunnel.example:443\r\n\r\n",
            "tunnel.example",
        ),
        (b"OPTIONS * HTTP/1.1\r\nHost: star.example\r\n\r\n", "star.example"),
    ],
)
def test_http_host(request_bytes: bytes, expected: str) -> None:
    assert host(request_bytes) == HostResult(HostStatus.HOST, expected)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost:   \r\n\r\n",
    ],
)
def test_http_without_host(request_bytes: bytes) -> None:
    assert host(request_bytes) == HostResult(HostStatus.NO_HOST)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"",
        b"G",
        b"GET",
        b"GET ",
        b"GET /index.html HT",
        b"GET / HTTP/1.1\r",
        b"GET / HTTP/1.1\r\n",
        b"GET / HTTP/1.1\r\nHost: allowed.example\r\n",  # a second Host may still follow
        b"GET / HTTP/1.1\r\nHost: allowed.example\r\n\r",
    ],
)
def test_http_needs_more(request_bytes: bytes) -> None:
    assert host(request_bytes) == HostResult(HostStatus.NEED_MORE)


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(real_client_hello("a.example"), id="tls"),
        pytest.param(b"\x00\x01", id="binary"),
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", id="ssh"),
        pytest.param(b"get/ HTTP/1.1", id="no-space"),
        pytest.param(b"GET / HTTP/1.1 extra\r\n\r\n", id="extra-token"),
        pytest.param(b"GET  / HTTP/1.1\r\n", id="double-space"),
        pytest.param(b"GET / HTTP/2.0\r\n\r\n", id="http2-version"),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", id="h2-preface"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n", id="dup"),
        pytest.param(b"GET / HTTP/1.1\r\nHost : a.example\r\n\r\n", id="space-before-colon"),
        pytest.param(b"GET / HTTP/1.1\r\nX: y\r\n  folded\r\nHost: a\r\n\r\n", id="obs-fold"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a.example\rX: y\r\n\r\n", id="bare-cr"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a.example\x00.evil\r\n\r\n", id="nul"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: user@a.example\r\n\r\n", id="userinfo"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a.example:http\r\n\r\n", id="bad-port"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a.example:123456\r\n\r\n", id="long-port"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: ::1\r\n\r\n", id="unbracketed-v6"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", id="unclosed-bracket"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: [fe80::1%25eth0]\r\n\r\n", id="zone-id"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: [::1]x\r\n\r\n", id="junk-after-bracket"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: [not-v6]\r\n\r\n", id="bad-v6"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a_%41.example\r\n\r\n", id="percent"),
        pytest.param("GET / HTTP/1.1\r\nHost: bü.example\r\n\r\n".encode(), id="non-ascii"),
        pytest.param(
            b"GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n",
            id="absolute-form-disagrees",
        ),
        pytest.param(
            b"CONNECT evil.example:443 HTTP/1.1\r\nHost: a.example\r\n\r\n", id="connect-disagrees"
        ),
        pytest.param(b"GET ftp://a.example/ HTTP/1.1\r\n\r\n", id="other-scheme"),
        pytest.param(b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", id="asterisk-not-options"),
        pytest.param(b"GET / HTTP/1.1\r\nBad\x01Name: x\r\n\r\n", id="bad-header-name"),
        pytest.param(b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", id="no-colon"),
        pytest.param(b"ABCDEFGHIJKLMNOPQRSTUVWXYZABCDEFGHIJ", id="method-too-long"),
    ],
)
def test_not_http(request_bytes: bytes) -> None:
    assert host(request_bytes) == HostResult(HostStatus.NOT_HTTP)


def test_http_header_limit() -> None:
    head = b"GET / HTTP/1.1\r\nHost: big.example\r\n"
    filler = b"X-Pad: " + b"a" * 1000 + b"\r\n"
    block = head + filler * ((MAX_HTTP_HEADER_BYTES - len(head) - 2) // len(filler))
    # Just under the limit with the blank line: decided.
    assert len(block) + 2 <= MAX_HTTP_HEADER_BYTES
    assert host(block + b"\r\n").host == "big.example"
    # No blank line within the limit: refused, however much more is buffered.
    endless = block + b"X-More: " + b"b" * MAX_HTTP_HEADER_BYTES
    assert host(endless[: MAX_HTTP_HEADER_BYTES - 1]).status is HostStatus.NEED_MORE
    assert host(endless).status is HostStatus.NOT_HTTP


# --- properties: the parsers never raise ---------------------------------------------------

_REAL_HELLO = real_client_hello("prop.example")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=4096))
def test_parsers_never_raise_on_random_bytes(data: bytes) -> None:
    tls = parse_client_hello_sni(data)
    assert isinstance(tls, SniResult)
    assert (tls.server_name is not None) == (tls.status is SniStatus.SERVER_NAME)
    http = parse_http_host(data)
    assert isinstance(http, HostResult)
    assert (http.host is not None) == (http.status is HostStatus.HOST)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048), st.sampled_from([b"\x16\x03\x01", b"GET / HTTP/1.1\r\n"]))
def test_parsers_never_raise_on_plausible_prefixes(data: bytes, prefix: bytes) -> None:
    parse_client_hello_sni(prefix + data)
    parse_http_host(prefix + data)
    parse_http_host(prefix + b"Host: " + data + b"\r\n\r\n")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, len(_REAL_HELLO) - 1), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    )
)
def test_sni_parser_never_raises_on_mutated_hellos(edits: list[tuple[int, int]]) -> None:
    mutated = bytearray(_REAL_HELLO)
    for index, value in edits:
        mutated[index] = value
    result = parse_client_hello_sni(bytes(mutated))
    assert (result.server_name is not None) == (result.status is SniStatus.SERVER_NAME)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 600), min_size=1, max_size=8))
def test_any_record_fragmentation_yields_the_name(sizes: list[int]) -> None:
    stream = as_records(handshake_bytes(_REAL_HELLO), sizes)
    assert parse_client_hello_sni(stream).server_name == "prop.example"


# --- allowlist ------------------------------------------------------------------------------


def test_allowlist_matching() -> None:
    allow = Allowlist(["Exact.Example.", "*.wild.example", "[2001:db8::1]", "10.0.0.1"])
    assert allow.matches("exact.example")
    assert allow.matches("EXACT.example.")
    assert not allow.matches("sub.exact.example")  # exact entries do not cover subdomains
    assert allow.matches("a.wild.example")
    assert allow.matches("a.b.wild.example")
    assert not allow.matches("wild.example")  # *.x is not x
    assert not allow.matches("notwild.example")
    assert not allow.matches("wild.example.evil")
    assert allow.matches("2001:db8::1")
    assert allow.matches("10.0.0.1")
    assert not Allowlist([]).matches("exact.example")


@pytest.mark.parametrize("entry", ["", "*", "*.", "a..b", "bad name", "*.*.x", "x\x00y"])
def test_allowlist_rejects_invalid_entries(entry: str) -> None:
    with pytest.raises(ValueError, match="invalid allowlist entry"):
        Allowlist([entry])


def test_allowlist_rejects_a_bare_string() -> None:
    with pytest.raises(TypeError):
        Allowlist("allowed.example")


# --- SO_ORIGINAL_DST --------------------------------------------------------------------------


def test_so_original_dst_without_redirect() -> None:
    # Without REDIRECT, conntrack either reports the (unchanged) local address, has no entry
    # (ENOENT) or is not loaded (ENOPROTOOPT). Any of these is correct; the call must not
    # return anything else.
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        with client, accepted:
            try:
                result = so_original_dst(accepted)
            except OSError:
                return
            assert result == accepted.getsockname()


# --- end to end -----------------------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Upstream:
    port: int
    connections: int = 0


@contextlib.asynccontextmanager
async def upstream_server(
    handler: Handler, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[Upstream]:
    info = Upstream(port=0)

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info.connections += 1
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(counted, "127.0.0.1", 0, ssl=ssl_context)
    info.port = server.sockets[0].getsockname()[1]
    try:
        yield info
    finally:
        server.close()
        await server.wait_closed()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


async def echo_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers only once the client half-closed: needs the proxy to pass the FIN on."""
    data = await reader.read()
    writer.write(b"got:" + data)
    await writer.drain()


async def http_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(head)).encode())
    writer.write(b"\r\nConnection: close\r\n\r\n" + head)
    await writer.drain()


@dataclass
class Harness:
    port: int
    proxy: L7Proxy
    events: list[dict[str, Any]] = field(default_factory=list)
    connects: list[tuple[str, int]] = field(default_factory=list)
    accepted_peers: list[tuple[str, int]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def running_proxy(
    allowlist: list[str],
    destination: tuple[str, int],
    *,
    really_connect_to: int | None = None,
    peek_timeout: float = 3.0,
    on_decision: Callable[[dict[str, Any]], None] | None = None,
) -> AsyncIterator[Harness]:
    """A proxy on a listening socket the test creates, as the cell runner would.

    ``destination`` is what the client supposedly dialled; ``really_connect_to`` maps it to
    the test server's port (ports 80/443 cannot be bound unprivileged).
    """
    listener = socket.create_server(("127.0.0.1", 0))
    events: list[dict[str, Any]] = []
    connects: list[tuple[str, int]] = []
    peers: list[tuple[str, int]] = []

    def original_destination(sock: socket.socket) -> tuple[str, int]:
        peers.append(sock.getpeername())
        return destination

    async def connect_upstream(
        ip: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        connects.append((ip, port))
        return await asyncio.open_connection("127.0.0.1", really_connect_to or port)

    proxy = L7Proxy(
        allowlist,
        on_decision or events.append,
        original_destination=original_destination,
        connect_upstream=connect_upstream,
        peek_timeout=peek_timeout,
    )
    await proxy.start_on(listener)
    try:
        yield Harness(listener.getsockname()[1], proxy, events, connects, peers)
    finally:
        await proxy.close()


async def read_until_closed(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """Everything the peer sent before closing, and whether it closed with a reset."""
    received = bytearray()
    try:
        while chunk := await reader.read(65536):
            received += chunk
    except ConnectionResetError:
        return bytes(received), True
    return bytes(received), False


def run(coro: Coroutine[Any, Any, None]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro, 30)

    asyncio.run(bounded())


def decision(
    destination: str, server_name: str | None, allowed: bool, reason: str
) -> dict[str, Any]:
    return {
        "destination": destination,
        "serverName": server_name,
        "decision": "allowed" if allowed else "denied",
        "reasonCode": reason,
    }


def test_allowed_sni_passes_bytes_both_ways() -> None:
    async def scenario() -> None:
        async with upstream_server(echo) as up:
            dest = ("127.0.0.1", up.port)  # not 443: the proxy must sniff the TLS record
            async with running_proxy(["allowed.example"], dest) as h:
                reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
                hello = real_client_hello("Allowed.Example")
                writer.write(hello)
                assert await reader.readexactly(len(hello)) == hello
                writer.write(b"more bytes after the decision")
                assert await reader.readexactly(29) == b"more bytes after the decision"
                assert h.accepted_peers == [writer.get_extra_info("sockname")]
                writer.close()
                await writer.wait_closed()
            assert up.connections == 1
            assert h.connects == [dest]
            assert h.events == [
                decision(f"127.0.0.1:{up.port}", "allowed.example", True, REASON_SNI_MATCH)
            ]

    run(scenario())


def make_certificate(tmp_path: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_real_tls_session_through_the_proxy_to_the_original_destination(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path, "api.allowed.example")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    async def pong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"pong:" + await reader.readexactly(4))
        await writer.drain()

    async def scenario() -> None:
        async with upstream_server(pong, server_ctx) as up:
            # The client "dialled" 127.0.0.1:443; SNI names something else entirely. The
            # proxy must connect to the dialled address, never to the SNI name.
            dest = ("127.0.0.1", 443)
            async with running_proxy(["*.allowed.example"], dest, really_connect_to=up.port) as h:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", h.port, ssl=client_ctx, server_hostname="api.allowed.example"
                )
                writer.write(b"ping")
                assert await reader.read() == b"pong:ping"
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
            assert h.connects == [("127.0.0.1", 443)]
            assert h.events == [
                decision("127.0.0.1:443", "api.allowed.example", True, REASON_SNI_MATCH)
            ]

    run(scenario())


@pytest.mark.parametrize(
    ("hostname", "reason", "reported"),
    [
        ("evil.example", REASON_SNI_MISS, "evil.example"),
        ("allowed.example", REASON_SNI_MISS, "allowed.example"),  # *.x does not cover x
        (None, REASON_SNI_MISSING, None),
    ],
)
def test_denied_sni_is_cut_and_upstream_never_contacted(
    hostname: str | None, reason: str, reported: str | None
) -> None:
    async def scenario() -> None:
        async with upstream_server(echo) as up:
            async with running_proxy(
                ["*.allowed.example"], ("127.0.0.1", 443), really_connect_to=up.port
            ) as h:
                reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
                writer.write(real_client_hello(hostname))
                received, _reset = await read_until_closed(reader)
                assert received == b""
                writer.close()
                await asyncio.sleep(0.05)
            assert up.connections == 0
            assert h.connects == []
            assert h.events == [decision("127.0.0.1:443", reported, False, reason)]

    run(scenario())


def test_denied_tls_connection_is_reset() -> None:
    async def scenario() -> None:
        async with running_proxy(["allowed.example"], ("127.0.0.1", 443)) as h:
            reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
            writer.write(real_client_hello("evil.example"))
            _, reset = await read_until_closed(reader)
            assert reset  # RST, a visible refusal, not a quiet FIN
            writer.close()

    run(scenario())


def test_real_tls_client_sees_the_denial(tmp_path: Path) -> None:
    client_ctx = ssl.create_default_context()

    async def scenario() -> None:
        async with running_proxy(["allowed.example"], ("127.0.0.1", 443)) as h:
            with pytest.raises((ConnectionError, ssl.SSLError)):
                await asyncio.open_connection(
                    "127.0.0.1", h.port, ssl=client_ctx, server_hostname="evil.example"
                )
            assert h.connects == []
            assert [e["reasonCode"] for e in h.events] == [REASON_SNI_MISS]

    run(scenario())


def test_hello_trickled_in_fragmented_records_and_segments() -> None:
    async def scenario() -> None:
        async with upstream_server(echo) as up:
            async with running_proxy(
                ["allowed.example"], ("127.0.0.1", 443), really_connect_to=up.port
            ) as h:
                reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
                stream = as_records(handshake_bytes(real_client_hello("allowed.example")), 40)
                for start in range(0, len(stream), 97):
                    writer.write(stream[start : start + 97])
                    await writer.drain()
                    await asyncio.sleep(0.01)  # separate TCP segments
                assert await reader.readexactly(len(stream)) == stream
                writer.close()
            assert [e["reasonCode"] for e in h.events] == [REASON_SNI_MATCH]

    run(scenario())


def test_half_close_is_passed_on() -> None:
    async def scenario() -> None:
        async with (
            upstream_server(echo_after_eof) as up,
            running_proxy(["allowed.example"], ("127.0.0.1", up.port)) as h,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
            hello = real_client_hello("allowed.example")
            writer.write(hello)
            writer.write_eof()
            received, reset = await read_until_closed(reader)
            assert (received, reset) == (b"got:" + hello, False)
            writer.close()

    run(scenario())


def test_http_host_allowed() -> None:
    async def scenario() -> None:
        async with upstream_server(http_server) as up:
            async with running_proxy(
                ["www.allowed.example"], ("127.0.0.1", 80), really_connect_to=up.port
            ) as h:
                reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
                request = b"GET /x HTTP/1.1\r\nHost: WWW.allowed.example:80\r\n\r\n"
                writer.write(request[:20])
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(request[20:])
                response, _ = await read_until_closed(reader)
                assert response.startswith(b"HTTP/1.1 200 OK\r\n")
                assert response.endswith(request)  # the upstream saw the exact bytes
                writer.close()
            assert h.connects == [("127.0.0.1", 80)]
            assert h.events == [
                decision("127.0.0.1:80", "www.allowed.example", True, REASON_HTTP_HOST_MATCH)
            ]

    run(scenario())


@pytest.mark.parametrize(
    ("request_bytes", "reason", "reported", "answered"),
    [
        (
            b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n",
            REASON_HTTP_HOST_MISS,
            "evil.example",
            True,
        ),
        (b"GET / HTTP/1.0\r\nAccept: */*\r\n\r\n", REASON_HTTP_HOST_MISSING, None, True),
        (
            b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: allowed.example\r\n\r\n",
            REASON_HTTP_HOST_MISSING,
            None,
            False,
        ),
        (b"\x00\x01garbage", REASON_HTTP_HOST_MISSING, None, False),
        (real_client_hello("allowed.example"), REASON_HTTP_HOST_MISSING, None, False),
    ],
)
def test_http_denied(
    request_bytes: bytes, reason: str, reported: str | None, answered: bool
) -> None:
    async def scenario() -> None:
        async with upstream_server(http_server) as up:
            async with running_proxy(
                ["allowed.example"], ("127.0.0.1", 80), really_connect_to=up.port
            ) as h:
                reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
                writer.write(request_bytes)
                response, _ = await read_until_closed(reader)
                if answered:
                    assert response.startswith(b"HTTP/1.1 403 Forbidden\r\n")
                else:
                    assert response == b""
                writer.close()
                await asyncio.sleep(0.05)
            assert up.connections == 0
            assert h.connects == []
            assert h.events == [decision("127.0.0.1:80", reported, False, reason)]

    run(scenario())


def test_http_on_an_unusual_port_is_sniffed() -> None:
    async def scenario() -> None:
        async with upstream_server(http_server) as up:
            async with running_proxy(["allowed.example"], ("127.0.0.1", up.port)) as h:
                reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
                writer.write(b"GET / HTTP/1.1\r\nHost: allowed.example\r\n\r\n")
                response, _ = await read_until_closed(reader)
                assert response.startswith(b"HTTP/1.1 200 OK")
                writer.close()
            assert [e["reasonCode"] for e in h.events] == [REASON_HTTP_HOST_MATCH]

    run(scenario())


def test_plain_http_to_port_443_is_judged_by_sni_rules() -> None:
    async def scenario() -> None:
        async with running_proxy(["allowed.example"], ("127.0.0.1", 443)) as h:
            reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: allowed.example\r\n\r\n")
            assert (await read_until_closed(reader))[0] == b""
            writer.close()
            assert h.connects == []
            assert h.events == [decision("127.0.0.1:443", None, False, REASON_SNI_MISSING)]

    run(scenario())


@pytest.mark.parametrize(
    ("port", "sent", "reason"),
    [
        (443, b"", REASON_SNI_MISSING),
        (443, real_client_hello("allowed.example")[:50], REASON_SNI_MISSING),  # stalls
        (80, b"GET / HTTP/1.1\r\nHost: allowed.example\r\n", REASON_HTTP_HOST_MISSING),
        (5432, b"", REASON_HTTP_HOST_MISSING),  # server-speaks-first protocols cannot pass
    ],
)
def test_peek_timeout_denies(port: int, sent: bytes, reason: str) -> None:
    async def scenario() -> None:
        async with running_proxy(["allowed.example"], ("127.0.0.1", port), peek_timeout=0.3) as h:
            reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
            writer.write(sent)
            loop = asyncio.get_running_loop()
            started = loop.time()
            await read_until_closed(reader)
            assert 0.2 < loop.time() - started < 5
            writer.close()
            assert h.connects == []
            assert h.events == [decision(f"127.0.0.1:{port}", None, False, reason)]

    run(scenario())


def test_client_closing_before_deciding_is_denied_as_missing() -> None:
    async def scenario() -> None:
        async with running_proxy(["allowed.example"], ("127.0.0.1", 443)) as h:
            reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
            writer.write(real_client_hello("allowed.example")[:10])
            writer.write_eof()
            await read_until_closed(reader)
            writer.close()
            assert h.connects == []
            assert h.events == [decision("127.0.0.1:443", None, False, REASON_SNI_MISSING)]

    run(scenario())


def test_ipv6_destination_is_bracketed_in_the_event() -> None:
    async def scenario() -> None:
        async with upstream_server(echo) as up:
            async with running_proxy(
                ["allowed.example"], ("2001:db8::7", 443), really_connect_to=up.port
            ) as h:
                reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
                hello = real_client_hello("allowed.example")
                writer.write(hello)
                assert await reader.readexactly(len(hello)) == hello
                writer.close()
            assert h.connects == [("2001:db8::7", 443)]
            assert h.events[0]["destination"] == "[2001:db8::7]:443"

    run(scenario())


def test_failing_event_sink_cuts_the_connection() -> None:
    def broken_sink(event: dict[str, Any]) -> None:
        raise RuntimeError("event sink down")

    async def scenario() -> None:
        async with upstream_server(echo) as up:
            async with running_proxy(
                ["allowed.example"], ("127.0.0.1", up.port), on_decision=broken_sink
            ) as h:
                reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
                writer.write(real_client_hello("allowed.example"))
                assert (await read_until_closed(reader))[0] == b""
                writer.close()
                await asyncio.sleep(0.05)
            assert up.connections == 0
            assert h.connects == []

    run(scenario())


def test_unreachable_upstream_cuts_the_client() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        dead_port = placeholder.getsockname()[1]  # closed below: nothing listens there

    async def scenario() -> None:
        async with running_proxy(["allowed.example"], ("127.0.0.1", dead_port)) as h:
            reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
            writer.write(real_client_hello("allowed.example"))
            received, reset = await read_until_closed(reader)
            assert (received, reset) == (b"", True)
            writer.close()
            assert h.connects == [("127.0.0.1", dead_port)]
            assert [e["decision"] for e in h.events] == ["allowed"]

    run(scenario())


def test_concurrent_connections_are_judged_independently() -> None:
    async def one(port: int, name: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        hello = real_client_hello(name)
        writer.write(hello)
        writer.write_eof()
        received, _ = await read_until_closed(reader)
        writer.close()
        return received

    async def scenario() -> None:
        async with upstream_server(echo) as up:
            async with running_proxy(["*.ok.example"], ("127.0.0.1", up.port)) as h:
                names = [f"n{i}.ok.example" if i % 2 else f"n{i}.bad.example" for i in range(20)]
                results = await asyncio.gather(*(one(h.port, n) for n in names))
            for name, received in zip(names, results, strict=True):
                assert (received != b"") == name.endswith(".ok.example")
            assert up.connections == 10
            assert sorted((e["serverName"], e["decision"]) for e in h.events) == sorted(
                (n, "allowed" if n.endswith(".ok.example") else "denied") for n in names
            )

    run(scenario())


def test_close_stops_accepting_and_cuts_open_connections() -> None:
    async def scenario() -> None:
        async with (
            upstream_server(echo) as up,
            running_proxy(["allowed.example"], ("127.0.0.1", up.port)) as h,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
            hello = real_client_hello("allowed.example")
            writer.write(hello)
            await reader.readexactly(len(hello))
            await h.proxy.close()
            # The spliced connection is gone, and so is the listening socket.
            assert (await read_until_closed(reader))[0] == b""
            writer.close()
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", h.port)

    run(scenario())


def test_start_on_needs_a_listening_socket() -> None:
    async def scenario() -> None:
        proxy = L7Proxy(["allowed.example"], lambda event: None)
        with socket.socket() as unbound, pytest.raises(ValueError, match="listening"):
            await proxy.start_on(unbound)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            with pytest.raises(ValueError, match="listening"):
                await proxy.start_on(udp)
        await proxy.close()
        with socket.create_server(("127.0.0.1", 0)) as listener, pytest.raises(RuntimeError):
            await proxy.start_on(listener)

    run(scenario())


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="peek_timeout"):
        L7Proxy([], lambda event: None, peek_timeout=0)
    with pytest.raises(ValueError, match="invalid allowlist entry"):
        L7Proxy(["bad name"], lambda event: None)
