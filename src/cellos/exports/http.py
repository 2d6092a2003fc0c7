"""``CELLOS_EXPORT_URL``: one HTTP PUT per artifact to ``<url>/<cellId>/<name>``.

Each PUT carries ``Content-Length`` and the artifact's sha256 (``x-amz-checksum-sha256``, and
``Digest``/``Repr-Digest`` for servers that follow RFC 3230/9530), computed before the first
byte is sent, so the server can refuse bytes that are not the artifact. An artifact counts as
exported only when the whole body was sent and the server answered 2xx: a connection cut
mid-body, a timeout or a 5xx is retried (bounded attempts, exponential backoff) and otherwise
reported as failed, never as exported.

The bearer token (``CELLOS_EXPORT_TOKEN_SECRET`` names a broker key) is resolved per export and
goes only into the ``Authorization`` header: no error, event or log line carries it. This module
imports ``http.client`` (and so ``socket``): the composition imports it only when the variable
is set, to keep a plain run's cold start small.
"""

from __future__ import annotations

import http.client
import ipaddress
import time
import urllib.parse
from dataclasses import dataclass
from typing import BinaryIO

from cellos.core.errors import ExportError, PolicyRefused, SecretBrokerError
from cellos.core.ports import ExportReceipt, SecretBroker
from cellos.exports.names import check_export_target
from cellos.exports.staging import Staged, stage

URL_VAR = "CELLOS_EXPORT_URL"
TOKEN_VAR = "CELLOS_EXPORT_TOKEN_SECRET"
_CHUNK = 1 << 20
#: Statuses worth another attempt: the server (or a proxy) may succeed next time.
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    #: Backoff before attempt n+1 is ``base * 2**(n-1)``, and all waits together are capped.
    backoff_seconds: float = 0.5
    backoff_cap_seconds: float = 4.0
    #: Socket timeout of one operation (connect, one send, waiting for the answer).
    timeout_seconds: float = 60.0

    def delays(self) -> list[float]:
        delays, total = [], 0.0
        for n in range(self.attempts - 1):
            delay = min(self.backoff_seconds * 2**n, max(0.0, self.backoff_cap_seconds - total))
            delays.append(delay)
            total += delay
        return delays


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_export_url(raw: str, with_token: bool) -> urllib.parse.SplitResult:
    """Validate ``CELLOS_EXPORT_URL``; every refusal is a PolicyRefused naming it (exit 2)."""
    try:
        url = urllib.parse.urlsplit(raw)
        url.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise PolicyRefused(URL_VAR, f"not a valid URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise PolicyRefused(URL_VAR, "must be an http:// or https:// URL with a host")
    if url.username is not None or url.password is not None:
        # A password in the URL would end up in every export.v2.completed destination.
        raise PolicyRefused(URL_VAR, f"must not carry credentials (use {TOKEN_VAR})")
    if url.query or url.fragment:
        raise PolicyRefused(URL_VAR, "must not have a query or fragment")
    if with_token and url.scheme == "http" and not _is_loopback(url.hostname):
        raise PolicyRefused(
            URL_VAR,
            f"refusing to send the bearer token ({TOKEN_VAR}) over plain http to "
            f"non-loopback host {url.hostname!r}; use https://",
        )
    return url


class _Retryable(Exception):
    """One attempt failed in a way another attempt may fix."""


class HttpExportSink:
    name = "http"

    def __init__(
        self,
        url: str,
        *,
        broker: SecretBroker | None = None,
        token_key: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._url = parse_export_url(url, with_token=token_key is not None)
        if token_key is not None and broker is None:
            raise PolicyRefused(TOKEN_VAR, "a token needs a secret broker")
        self._broker = broker
        self._token_key = token_key
        self.retry = retry or RetryPolicy()

    def destination(self, cell_id: str, name: str) -> str:
        base = self._url.path.rstrip("/")
        path = f"{base}/{urllib.parse.quote(cell_id, safe='')}/{urllib.parse.quote(name, safe='')}"
        return urllib.parse.urlunsplit((self._url.scheme, self._url.netloc, path, "", ""))

    def _token(self, cell_id: str) -> str | None:
        if self._token_key is None or self._broker is None:
            return None
        try:
            return self._broker.resolve(cell_id, self._token_key)
        except SecretBrokerError as exc:
            # The key is a name, never the value: it may be shown.
            raise ExportError(TOKEN_VAR, f"{self._token_key!r}: {exc.reason}") from None

    def export(self, cell_id: str, name: str, source: BinaryIO) -> ExportReceipt:
        check_export_target(cell_id, name)
        token = self._token(cell_id)
        try:
            staged = stage(source)
        except OSError as exc:
            raise ExportError(name, f"cannot read artifact: {exc.strerror or exc}") from None
        destination = self.destination(cell_id, name)
        try:
            self._put_with_retries(destination, staged, token)
        finally:
            staged.close()
        return ExportReceipt(
            name=name, destination=destination, size_bytes=staged.size, sha256=staged.sha256_hex
        )

    def _put_with_retries(self, destination: str, staged: Staged, token: str | None) -> None:
        delays = self.retry.delays()
        last = ""
        for attempt in range(self.retry.attempts):
            try:
                self._put_once(destination, staged, token)
                return
            except _Retryable as exc:
                last = str(exc)
            if attempt < len(delays):
                time.sleep(delays[attempt])
        raise ExportError(
            URL_VAR, f"PUT {destination} failed after {self.retry.attempts} attempts: {last}"
        )

    def _put_once(self, destination: str, staged: Staged, token: str | None) -> None:
        url = urllib.parse.urlsplit(destination)
        conn_type = (
            http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        )
        conn = conn_type(url.netloc, timeout=self.retry.timeout_seconds)
        try:
            staged.rewind()
            conn.putrequest("PUT", url.path, skip_accept_encoding=True)
            conn.putheader("Content-Length", str(staged.size))
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("x-amz-checksum-sha256", staged.sha256_b64)
            conn.putheader("Digest", f"SHA-256={staged.sha256_b64}")
            conn.putheader("Repr-Digest", f"sha-256=:{staged.sha256_b64}:")
            if token is not None:
                conn.putheader("Authorization", f"Bearer {token}")
            conn.endheaders()
            self._send_body(conn, staged)
            response = conn.getresponse()
            status, reason = response.status, response.reason
            response.read(1 << 16)  # drain a little; the body is never shown (it may echo)
        except (OSError, http.client.HTTPException) as exc:
            # Never str(exc) of arbitrary depth: it may quote the request. Name the kind only.
            raise _Retryable(_describe(exc)) from None
        finally:
            conn.close()
        if 200 <= status < 300:
            return
        message = f"HTTP {status} {reason}".strip()
        if status in _RETRY_STATUSES:
            raise _Retryable(message)
        raise ExportError(URL_VAR, f"PUT {destination}: {message}")

    @staticmethod
    def _send_body(conn: http.client.HTTPConnection, staged: Staged) -> None:
        sock = conn.sock
        if sock is None:
            raise OSError("not connected")
        if not isinstance(conn, http.client.HTTPSConnection):
            # Plain TCP: the kernel copies the file to the socket (sendfile), as curl does.
            sent = sock.sendfile(staged.file, 0, staged.size)
            if sent != staged.size:
                raise OSError(f"sent {sent} of {staged.size} bytes (artifact changed?)")
            return
        remaining = staged.size
        while remaining > 0:
            chunk = staged.file.read(min(_CHUNK, remaining))
            if not chunk:
                raise OSError("artifact shrank while it was sent")
            sock.sendall(chunk)
            remaining -= len(chunk)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by the server"
    if isinstance(exc, BrokenPipeError):
        return "connection closed by the server while sending"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
