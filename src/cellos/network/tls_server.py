"""The server side of TLS over an already-accepted asyncio connection whose first bytes (the
ClientHello the L7 proxy peeked at) were already read.

``asyncio``'s ``start_tls`` cannot be told about bytes it did not read itself, so this drives an
``ssl.SSLObject`` over memory BIOs: the peeked bytes go in first, then whatever the client sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Final

_READ_SIZE: Final = 64 * 1024


class TlsServerStream:
    """Decrypted reads and encrypted writes on one client connection."""

    def __init__(
        self,
        context: ssl.SSLContext,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._reader = reader
        self._writer = writer

    async def handshake(self, peeked: bytes, timeout: float) -> None:
        """Complete the handshake (raises ``ssl.SSLError``, ``OSError`` or ``TimeoutError``)."""
        self._incoming.write(peeked)
        await asyncio.wait_for(self._handshake(), timeout)

    async def _handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionError(
                        "client closed the connection during the handshake"
                    ) from None
        await self._flush()

    async def read(self) -> bytes:
        """Decrypted bytes from the client; ``b""`` at its end (close_notify or EOF)."""
        while True:
            try:
                return self._tls.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                await self._flush()  # e.g. TLS 1.3 session tickets
                if not await self._fill():
                    return b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self._tls.write(view)
            view = view[written:]
            await self._flush()

    async def close(self) -> None:
        """Send close_notify (best effort)."""
        with contextlib.suppress(ssl.SSLError, OSError):
            self._tls.unwrap()
        with contextlib.suppress(OSError):
            await self._flush()

    async def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            self._writer.write(data)
            await self._writer.drain()

    async def _fill(self) -> bool:
        chunk = await self._reader.read(_READ_SIZE)
        if not chunk:
            self._incoming.write_eof()
            return False
        self._incoming.write(chunk)
        return True
