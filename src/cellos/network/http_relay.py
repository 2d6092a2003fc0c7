"""The HTTP/1.1 request side of secret injection: reads the requests a client sends (plain
HTTP, or the decrypted stream of a TLS connection the L7 proxy terminated), substitutes the
placeholder where an entry of the cell's :class:`~cellos.network.injection.Injections` allows
it, and reports every placeholder seen anywhere else. Responses are not touched.

A request it does not understand (obsolete line folding, conflicting lengths, a head larger
than 64 KiB) is never substituted: the rest of the connection is relayed unchanged (still
watched for placeholders). So is everything after a ``CONNECT`` / ``Upgrade`` request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from cellos.network.allowlist import normalize_name
from cellos.network.injection import (
    REASON_ADDRESS_MISMATCH,
    REASON_INJECTED,
    REASON_OUTSIDE_HEADER,
    REASON_WRONG_HOST,
    ConnectionReport,
    Injections,
)
from cellos.network.sni import host_of_authority

__all__ = ["pump", "relay_requests", "stream_io"]

MAX_HEAD_BYTES: Final = 64 * 1024
MAX_CHUNK_LINE_BYTES: Final = 4096

Read = Callable[[], Awaitable[bytes]]
Write = Callable[[bytes], Awaitable[None]]


class _Scanner:
    """Finds placeholders in a byte stream, also across chunk boundaries."""

    def __init__(self, placeholders: dict[bytes, str]) -> None:
        self._placeholders = placeholders
        self._keep = max((len(p) for p in placeholders), default=1) - 1
        self._tail = b""

    def feed(self, data: bytes) -> set[str]:
        if not self._placeholders:
            return set()
        window = self._tail + data
        found = {ref for p, ref in self._placeholders.items() if p in window}
        self._tail = window[-self._keep :] if self._keep else b""
        return found


class _ProtocolError(Exception):
    pass


class _Input:
    """The client's bytes, buffered, with the few reads the request parser needs."""

    def __init__(self, read: Read, initial: bytes) -> None:
        self._read = read
        self.buf = bytearray(initial)
        self.eof = False

    async def _fill(self) -> bool:
        if self.eof:
            return False
        chunk = await self._read()
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    async def until(self, marker: bytes, limit: int) -> bytes | None:
        """Bytes up to and including ``marker``; None at EOF or past ``limit`` (nothing taken)."""
        start = 0
        while True:
            found = self.buf.find(marker, start)
            if found >= 0:
                end = found + len(marker)
                data = bytes(self.buf[:end])
                del self.buf[:end]
                return data
            if len(self.buf) > limit:
                return None
            start = max(0, len(self.buf) - len(marker) + 1)
            if not await self._fill():
                return None

    async def copy(self, count: int, write: Write, scan: Callable[[bytes], None]) -> None:
        while count > 0:
            if not self.buf and not await self._fill():
                raise _ProtocolError("the request body ended early")
            part = bytes(self.buf[:count])
            del self.buf[: len(part)]
            count -= len(part)
            scan(part)
            await write(part)

    async def copy_rest(self, write: Write, scan: Callable[[bytes], None]) -> None:
        while True:
            if self.buf:
                part = bytes(self.buf)
                self.buf.clear()
                scan(part)
                await write(part)
            if not await self._fill():
                return


@dataclass
class _Head:
    request_line: bytes
    headers: list[tuple[bytes, bytes]]
    host: str | None
    body: str  # "none" | "length" | "chunked" | "raw"
    length: int = 0


def _parse_head(head: bytes) -> _Head | None:
    lines = head[:-4].split(b"\r\n")
    request_line = lines[0]
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[2].startswith(b"HTTP/1."):
        return None
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
            return None  # obsolete line folding or not a header field
        headers.append((name, value))
    by_name: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        by_name.setdefault(name.lower(), []).append(value.strip())
    hosts = by_name.get(b"host", [])
    host = host_of_authority(hosts[0]) if len(hosts) == 1 else None
    connection = b",".join(by_name.get(b"connection", [])).lower()
    if parts[0].upper() == b"CONNECT" or b"upgrade" in connection:
        return _Head(request_line, headers, host, "raw")
    encodings = by_name.get(b"transfer-encoding", [])
    lengths = by_name.get(b"content-length", [])
    if encodings:
        codings = [c.strip().lower() for c in b",".join(encodings).split(b",")]
        if lengths or codings[-1] != b"chunked":
            return None
        return _Head(request_line, headers, host, "chunked")
    if lengths:
        values = {v for joined in lengths for v in joined.split(b",")}
        values = {v.strip() for v in values}
        if len(values) != 1:
            return None
        (value,) = values
        if not value.isdigit():
            return None
        return _Head(request_line, headers, host, "length", int(value))
    return _Head(request_line, headers, host, "none")


@dataclass
class _Request:
    """What one connection's relay needs to know, shared by its requests."""

    injections: Injections
    report: ConnectionReport
    #: The SNI of a terminated TLS connection (requests must name the same host); None: HTTP.
    server_name: str | None
    scanner: _Scanner
    #: Plain HTTP: the address the connection goes to (it must be one resolved for the host).
    destination_ip: str | None = None


def _refuse_found(req: _Request, refs: set[str], host: str | None) -> None:
    for ref in sorted(refs):
        injected_here = req.injections.injected_at(ref, host)
        reason = REASON_OUTSIDE_HEADER if injected_here else REASON_WRONG_HOST
        req.report.note(reason, secret_ref=ref, request_host=host)


def _rewrite(req: _Request, head: _Head) -> bytes:
    """The request head with placeholders substituted where an entry allows it."""
    host = head.host
    if req.server_name is not None and host != normalize_name(req.server_name):
        host_for_injection = None  # the request names another host than the TLS session
    else:
        host_for_injection = host
    out = [head.request_line]
    found = req.scanner.feed(head.request_line)
    for name, value in head.headers:
        header = name.decode("latin-1")
        handled = False
        for secret in req.injections.for_request(host_for_injection, header):
            if secret.placeholder.encode("ascii") not in value:
                continue
            handled = True
            if req.server_name is None and not req.injections.reaches(
                secret.host, req.destination_ip or ""
            ):
                req.report.note(
                    REASON_ADDRESS_MISMATCH,
                    secret_ref=secret.secret_ref,
                    header=header,
                    request_host=host,
                )
                break
            req.report.note(
                REASON_INJECTED, secret_ref=secret.secret_ref, header=header, request_host=host
            )
            value = b" " + secret.header_value().encode("latin-1")
            break
        if not handled:
            found |= _Scanner(req.injections.placeholders).feed(name + b":" + value)
        out.append(name + b":" + value)
    _refuse_found(req, found, host)
    return b"\r\n".join(out) + b"\r\n\r\n"


async def relay_requests(
    read: Read,
    write: Write,
    peeked: bytes,
    *,
    injections: Injections,
    report: ConnectionReport,
    server_name: str | None,
    destination_ip: str | None = None,
) -> None:
    """Relay one connection's requests from the client (``read``) to the upstream (``write``),
    substituting placeholders where an entry allows it. Returns at the client's EOF.

    ``server_name``: the verified SNI of a terminated TLS connection; None for plain HTTP,
    whose ``destination_ip`` must then be an address resolved for the injection host."""
    source = _Input(read, peeked)
    req = _Request(
        injections, report, server_name, _Scanner(injections.placeholders), destination_ip
    )
    current_host: list[str | None] = [None]

    def scan(data: bytes) -> None:
        _refuse_found(req, req.scanner.feed(data), current_host[0])

    while True:
        head_bytes = await source.until(b"\r\n\r\n", MAX_HEAD_BYTES)
        head = _parse_head(head_bytes) if head_bytes is not None else None
        if head is None:
            # Not a request we can read: pass the rest on unchanged, watched for placeholders.
            if head_bytes is not None:
                scan(head_bytes)
                await write(head_bytes)
            await source.copy_rest(write, scan)
            return
        current_host[0] = head.host
        await write(_rewrite(req, head))
        try:
            if head.body == "length":
                await source.copy(head.length, write, scan)
            elif head.body == "chunked":
                await _copy_chunked(source, write, scan)
            elif head.body == "raw":
                await source.copy_rest(write, scan)
                return
        except _ProtocolError:
            await source.copy_rest(write, scan)
            return


async def _copy_chunked(source: _Input, write: Write, scan: Callable[[bytes], None]) -> None:
    while True:
        line = await source.until(b"\r\n", MAX_CHUNK_LINE_BYTES)
        if line is None:
            raise _ProtocolError("bad chunk size line")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise _ProtocolError("bad chunk size") from None
        scan(line)
        await write(line)
        if size == 0:
            while True:  # trailer fields, then the empty line
                trailer = await source.until(b"\r\n", MAX_HEAD_BYTES)
                if trailer is None:
                    raise _ProtocolError("bad trailer")
                scan(trailer)
                await write(trailer)
                if trailer == b"\r\n":
                    return
        await source.copy(size + 2, write, scan)


async def pump(read: Read, write: Write, on_eof: Callable[[], Awaitable[None]]) -> None:
    """Copy ``read`` to ``write`` until EOF, then ``on_eof``."""
    while data := await read():
        await write(data)
    await on_eof()


def stream_io(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, read_size: int = 64 * 1024
) -> tuple[Read, Write, Callable[[], Awaitable[None]]]:
    """read / write / write-EOF callables of an asyncio stream pair."""

    async def read() -> bytes:
        return await reader.read(read_size)

    async def write(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    async def eof() -> None:
        if writer.can_write_eof():
            writer.write_eof()

    return read, write, eof
