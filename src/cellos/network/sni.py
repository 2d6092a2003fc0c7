"""Pure parsers for the first bytes of an outbound connection: TLS SNI and HTTP ``Host``.

The L7 egress proxy (:mod:`cellos.network.l7_proxy`) peeks at what a cell sends before it
lets a connection through. These functions decide, from the bytes seen so far, whether more
bytes are needed or what name the client asked for. They do no I/O, keep no state between
calls (the caller passes the whole buffer every time) and never raise on arbitrary input:
anything they cannot make sense of is reported as "not TLS" / "not HTTP", which the proxy
turns into a denial.

Parsing is deliberately stricter than most servers are. The proxy and the upstream server
must not disagree about which name a connection is for, so every ambiguity that a server
might resolve differently (duplicate extensions or headers, folded headers, whitespace
before the colon, an absolute-form target that differs from ``Host``, names with odd
characters) is reported as malformed rather than guessed at.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass

__all__ = [
    "MAX_CLIENT_HELLO_BYTES",
    "MAX_HTTP_HEADER_BYTES",
    "MAX_TLS_PEEK_BYTES",
    "HostResult",
    "HostStatus",
    "SniResult",
    "SniStatus",
    "looks_like_tls",
    "normalize_host_name",
    "parse_client_hello_sni",
    "parse_http_host",
]

# Largest ClientHello handshake message (4-byte handshake header included) we reassemble.
# Real hellos are a few hundred bytes to ~2 KiB (post-quantum key shares); 16 KiB leaves
# room for padding extensions and large session tickets without letting a client make the
# proxy buffer without bound.
MAX_CLIENT_HELLO_BYTES = 16 * 1024

# Raw bytes (record headers included) after which an incomplete hello is given up on. A
# 16 KiB hello fragmented into records of at least 5 bytes still fits; a client that
# fragments harder than that is not a browser or library we need to support.
MAX_TLS_PEEK_BYTES = 32 * 1024

# Request line plus header fields, up to and including the blank line that ends them.
MAX_HTTP_HEADER_BYTES = 16 * 1024

_TLS_CONTENT_HANDSHAKE = 0x16
_TLS_MAX_RECORD_PAYLOAD = 1 << 14  # RFC 8446 §5.1: plaintext fragments are at most 2^14 bytes
_HANDSHAKE_CLIENT_HELLO = 0x01
_EXT_SERVER_NAME = 0x0000
_SNI_HOST_NAME = 0x00

# Longest method token we wait for before deciding the stream is not HTTP. Registered
# methods are at most 17 characters; waiting longer only delays a denial.
_MAX_METHOD_LEN = 32


class SniStatus(enum.Enum):
    """What :func:`parse_client_hello_sni` could tell from the bytes so far."""

    NEED_MORE = "need_more"  # a record or the hello is incomplete: read more and call again
    NOT_TLS = "not_tls"  # not a TLS ClientHello, malformed, or over the size limits
    NO_SNI = "no_sni"  # a well-formed ClientHello without a server_name extension
    SERVER_NAME = "server_name"  # a well-formed ClientHello naming a host


@dataclass(frozen=True, slots=True)
class SniResult:
    """Outcome of SNI parsing; ``server_name`` is set exactly when status is SERVER_NAME.

    The name is lowercased and has no trailing dot.
    """

    status: SniStatus
    server_name: str | None = None


class HostStatus(enum.Enum):
    """What :func:`parse_http_host` could tell from the bytes so far."""

    NEED_MORE = "need_more"  # the header block is incomplete: read more and call again
    NOT_HTTP = "not_http"  # not an HTTP/1.x request, malformed, or headers over the limit
    NO_HOST = "no_host"  # a well-formed request without a (non-empty) Host
    HOST = "host"  # a well-formed request naming a host


@dataclass(frozen=True, slots=True)
class HostResult:
    """Outcome of Host parsing; ``host`` is set exactly when status is HOST.

    The host is lowercased, without port or trailing dot; an IPv6 literal is given without
    brackets in its compressed form (``[0:0::1]:8080`` -> ``::1``).
    """

    status: HostStatus
    host: str | None = None


_NEED_MORE_SNI = SniResult(SniStatus.NEED_MORE)
_NOT_TLS = SniResult(SniStatus.NOT_TLS)
_NO_SNI = SniResult(SniStatus.NO_SNI)
_NEED_MORE_HOST = HostResult(HostStatus.NEED_MORE)
_NOT_HTTP = HostResult(HostStatus.NOT_HTTP)
_NO_HOST = HostResult(HostStatus.NO_HOST)


class _Malformed(Exception):
    """Internal: the bytes cannot be a valid message. Never escapes this module."""


class _Cursor:
    """Bounds-checked big-endian reader over a complete message."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int) -> bytes:
        if n < 0 or n > self.remaining:
            raise _Malformed
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def take_all(self) -> bytes:
        return self.take(self.remaining)

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def vector(self, length_bytes: int) -> _Cursor:
        """A length-prefixed sub-vector (TLS ``opaque x<..>``) as its own cursor."""
        length = int.from_bytes(self.take(length_bytes), "big")
        return _Cursor(self.take(length))


# A DNS label as it may appear in SNI or Host: letters, digits, hyphen, and underscore
# (which is not valid in host names but appears in real service names). Anything else,
# notably NUL, '%', spaces or non-ASCII, makes the name malformed: accepting it would let
# "allowed.example\x00.evil" style tricks depend on how the server truncates.
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def normalize_host_name(name: str) -> str | None:
    """Lowercase ``name``, drop one trailing dot, and validate it as a DNS name.

    Returns None when it is not a plausible host name (empty, too long, empty label,
    characters outside letters/digits/``-``/``_``). IPv4 literals pass (they are digits and
    dots); IPv6 literals are handled by the Host parser, never here.
    """
    if not name.isascii():
        return None
    lowered = name.lower()
    if lowered.endswith("."):
        lowered = lowered[:-1]
    if not lowered or len(lowered) > 253:
        return None
    for label in lowered.split("."):
        if _LABEL.fullmatch(label) is None:
            return None
    return lowered


def looks_like_tls(data: bytes) -> bool:
    """True when ``data`` starts like a TLS handshake record (used to sniff unknown ports).

    One byte is enough to commit: 0x16 is not a printable character, so no HTTP request
    starts with it.
    """
    return len(data) > 0 and data[0] == _TLS_CONTENT_HANDSHAKE


def _record_header_prefix_ok(header: bytes) -> bool:
    """Whether the first (up to 5) bytes of a record header are plausible for a hello.

    Checked on partial headers too, so a non-TLS stream is rejected after its first byte
    instead of after five.
    """
    if len(header) >= 1 and header[0] != _TLS_CONTENT_HANDSHAKE:
        return False
    if len(header) >= 2 and header[1] != 0x03:
        return False
    # Record versions 3.0 (SSL 3, used by some for the first record) up to 3.4.
    return not (len(header) >= 3 and header[2] > 0x04)


def parse_client_hello_sni(data: bytes) -> SniResult:
    """Find the SNI host name in the ClientHello at the start of ``data``.

    ``data`` is everything the client has sent so far. The hello may be fragmented across
    several TLS records, and the records across TCP segments; call again with the longer
    buffer whenever the result is NEED_MORE. Bytes after the hello are ignored.
    """
    data = bytes(data)
    fragments = bytearray()  # handshake-layer bytes reassembled from record payloads
    pos = 0
    while True:
        header = data[pos : pos + 5]
        if not _record_header_prefix_ok(header):
            return _NOT_TLS
        if len(header) < 5:
            return _need_more_tls(data)
        length = int.from_bytes(header[3:5], "big")
        # Zero-length handshake fragments are forbidden (RFC 8446 §5.1, RFC 5246 §6.2.1) and
        # would let a client stretch the hello over arbitrarily many records.
        if length == 0 or length > _TLS_MAX_RECORD_PAYLOAD:
            return _NOT_TLS
        payload = data[pos + 5 : pos + 5 + length]
        fragments += payload
        # Decide as soon as the hello itself is complete, even mid-record: the rest of the
        # record can only hold later handshake messages, which do not matter here.
        if len(fragments) >= 1 and fragments[0] != _HANDSHAKE_CLIENT_HELLO:
            return _NOT_TLS
        if len(fragments) >= 4:
            body_len = int.from_bytes(fragments[1:4], "big")
            if body_len + 4 > MAX_CLIENT_HELLO_BYTES:
                return _NOT_TLS
            if len(fragments) >= 4 + body_len:
                try:
                    return _parse_client_hello_body(bytes(fragments[4 : 4 + body_len]))
                except _Malformed:
                    return _NOT_TLS
        if len(payload) < length:
            return _need_more_tls(data)
        pos += 5 + length


def _need_more_tls(data: bytes) -> SniResult:
    # The size cap is enforced here, not up front: a complete hello in a long buffer (for
    # example followed by early data) must still be parsed.
    return _NOT_TLS if len(data) >= MAX_TLS_PEEK_BYTES else _NEED_MORE_SNI


def _parse_client_hello_body(body: bytes) -> SniResult:
    """Parse a complete ClientHello body (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2)."""
    c = _Cursor(body)
    c.take(2)  # legacy_version: not checked, servers negotiate via supported_versions
    c.take(32)  # random
    if c.vector(1).remaining > 32:  # legacy_session_id
        raise _Malformed
    suites = c.vector(2)
    if suites.remaining < 2 or suites.remaining % 2:
        raise _Malformed
    if c.vector(1).remaining < 1:  # legacy_compression_methods
        raise _Malformed
    if c.remaining == 0:
        return _NO_SNI  # TLS <= 1.2 hello without any extensions
    extensions = c.vector(2)
    if c.remaining:
        raise _Malformed  # trailing bytes after the extensions block
    seen: set[int] = set()
    server_name: str | None = None
    while extensions.remaining:
        ext_type = extensions.u16()
        ext_data = extensions.vector(2)
        # RFC 8446 §4.2: at most one extension of each type. A duplicate server_name could
        # otherwise be read as the first by us and the last by the server.
        if ext_type in seen:
            raise _Malformed
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            server_name = _parse_server_name_extension(ext_data)
    if server_name is None:
        return _NO_SNI
    return SniResult(SniStatus.SERVER_NAME, server_name)


def _parse_server_name_extension(ext: _Cursor) -> str | None:
    """The host_name entry of a server_name extension (RFC 6066 §3)."""
    names = ext.vector(2)
    if ext.remaining or names.remaining == 0:
        raise _Malformed
    host: str | None = None
    while names.remaining:
        name_type = names.u8()
        name = names.vector(2).take_all()
        if name_type != _SNI_HOST_NAME:
            continue  # no other name types are defined; skip them as servers do
        if host is not None:
            raise _Malformed  # RFC 6066: at most one name of each type
        try:
            decoded = name.decode("ascii")
        except UnicodeDecodeError:
            raise _Malformed from None
        normalized = normalize_host_name(decoded)
        if normalized is None:
            raise _Malformed
        host = normalized
    return host


# --- HTTP/1.x ----------------------------------------------------------------------------

_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"  # RFC 9110 §5.6.2 token characters
_METHOD = _TCHAR + b"{1,%d}" % _MAX_METHOD_LEN
_REQUEST_LINE = re.compile(b"(" + _METHOD + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
# A request line that has not been terminated yet must still be a prefix of the above;
# checking that lets the proxy give up on a non-HTTP stream after a few bytes.
_REQUEST_LINE_PREFIX = re.compile(
    b"|".join(
        [
            _TCHAR + b"{0,%d}" % _MAX_METHOD_LEN,
            _METHOD + rb" [\x21-\x7e]*",
            _METHOD
            + rb" [\x21-\x7e]+ (?:H(?:T(?:T(?:P(?:/(?:[0-9](?:\.(?:[0-9]\r?)?)?)?)?)?)?)?)?",
        ]
    )
)
_HEADER_NAME = re.compile(_TCHAR + rb"+")
# Field values: visible ASCII, obs-text, space and tab; no other control characters.
_FIELD_VALUE = re.compile(rb"[\x20-\x7e\x80-\xff\t]*")
_ABSOLUTE_HTTP = re.compile(rb"(?i:https?)://([^/?#]*)")
_PORT = re.compile(rb"[0-9]{0,5}")


def parse_http_host(data: bytes) -> HostResult:
    """Find the host an HTTP/1.x request at the start of ``data`` is for.

    ``data`` is everything the client has sent so far; call again with the longer buffer
    whenever the result is NEED_MORE. Only the first request's header block is examined
    (bytes after the blank line are ignored); the proxy pins the upstream to the original
    destination address, so later requests on the same connection cannot reach elsewhere.

    The effective host is the authority of an absolute-form or CONNECT target if there is
    one (servers must prefer it over Host, RFC 9112 §3.2.2), else the Host header. If both
    are present they must agree, or the request is malformed.
    """
    data = bytes(data[:MAX_HTTP_HEADER_BYTES])
    lines = data.split(b"\n")
    # The last element has no terminating LF yet: it is an incomplete line (or empty).
    complete, partial = lines[:-1], lines[-1]
    if not complete:
        if _REQUEST_LINE_PREFIX.fullmatch(partial) is None:
            return _NOT_HTTP
        return _need_more_http(data)
    try:
        target_host = _parse_request_line(_strip_cr(complete[0]))
        host_header: bytes | None = None
        for raw in complete[1:]:
            line = _strip_cr(raw)
            if not line:
                return _finish_http(target_host, host_header)
            name, value = _parse_header_line(line)
            if name.lower() == b"host":
                if host_header is not None:
                    raise _Malformed  # RFC 9112 §3.2: more than one Host is a 400
                host_header = value
    except _Malformed:
        return _NOT_HTTP
    return _need_more_http(data)


def _need_more_http(data: bytes) -> HostResult:
    # ``data`` was already cut at the limit: reaching it without the blank line is final.
    return _NOT_HTTP if len(data) >= MAX_HTTP_HEADER_BYTES else _NEED_MORE_HOST


def _strip_cr(line: bytes) -> bytes:
    stripped = line[:-1] if line.endswith(b"\r") else line
    if b"\r" in stripped:
        raise _Malformed  # a bare CR is a line break to some parsers and not to others
    return stripped


def _parse_request_line(line: bytes) -> str | None:
    """Validate the request line; return the host named by its target, if any."""
    match = _REQUEST_LINE.fullmatch(line)
    if match is None or match.group(3) != b"1":
        # HTTP/2's prior-knowledge preface ("PRI * HTTP/2.0") lands here too: its host is
        # inside HPACK-compressed frames, which we do not decode.
        raise _Malformed
    method, target = match.group(1), match.group(2)
    if method == b"CONNECT":
        return _parse_authority(target)  # authority-form: host:port
    if target.startswith(b"/"):
        return None  # origin-form
    if target == b"*" and method == b"OPTIONS":
        return None  # asterisk-form
    absolute = _ABSOLUTE_HTTP.match(target)
    if absolute is None:
        raise _Malformed  # another scheme, or not a URI at all
    return _parse_authority(absolute.group(1))


def _parse_header_line(line: bytes) -> tuple[bytes, bytes]:
    if line[:1] in (b" ", b"\t"):
        raise _Malformed  # obs-fold: RFC 9112 §5.2 lets servers reject it, and we do
    name, colon, value = line.partition(b":")
    # No whitespace is allowed between name and colon (RFC 9112 §5.1); "Host : x" would be
    # a Host header to some servers and an unknown header to others.
    if not colon or _HEADER_NAME.fullmatch(name) is None:
        raise _Malformed
    if _FIELD_VALUE.fullmatch(value) is None:
        raise _Malformed
    return name, value.strip(b" \t")


def _finish_http(target_host: str | None, host_header: bytes | None) -> HostResult:
    header_host = _parse_authority(host_header) if host_header else None
    if target_host is not None and header_host is not None and target_host != header_host:
        raise _Malformed
    host = target_host if target_host is not None else header_host
    if host is None:
        return _NO_HOST
    return HostResult(HostStatus.HOST, host)


def host_of_authority(authority: bytes) -> str | None:
    """The normalized host of ``host[:port]`` or ``[v6]:port`` (a Host header's value, a
    request target's authority); None when it is malformed."""
    try:
        return _parse_authority(authority)
    except _Malformed:
        return None


def _parse_authority(authority: bytes) -> str:
    """``host[:port]`` or ``[v6]:port`` -> normalized host. Userinfo is not accepted."""
    try:
        text = authority.decode("ascii")
    except UnicodeDecodeError:
        raise _Malformed from None
    if text.startswith("["):
        inner, bracket, rest = text[1:].partition("]")
        if not bracket or "%" in inner:  # zone ids have no meaning off the local link
            raise _Malformed
        try:
            address = ipaddress.IPv6Address(inner)
        except ValueError:
            raise _Malformed from None
        if rest and not (rest.startswith(":") and _PORT.fullmatch(rest[1:].encode())):
            raise _Malformed
        return address.compressed
    name, colon, port = text.rpartition(":") if ":" in text else (text, "", "")
    if colon and (":" in name or _PORT.fullmatch(port.encode()) is None):
        raise _Malformed  # an unbracketed IPv6 literal or a bad port
    normalized = normalize_host_name(name)
    if normalized is None:
        raise _Malformed
    return normalized
