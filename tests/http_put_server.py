"""A small threaded HTTP server that accepts PUTs, for the export tests and benchmark.

It stores a body only when it arrived whole (``Content-Length`` bytes) and, when the request
carries ``x-amz-checksum-sha256``, only when the bytes match it (else 400): what a real object
store does, so a partial or corrupted upload can never look exported. ``faults`` is a queue
of failure modes, one consumed per request: ``"500"`` (answer 500 after reading the body),
``"slow"`` (wait ``slow_seconds`` before answering), ``"reset"`` (read part of the body, then
reset the connection).
"""

from __future__ import annotations

import base64
import hashlib
import socket
import struct
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class PutServer:
    def __init__(self, token: str | None = None, keep_bodies: bool = True) -> None:
        self.token = token
        self.keep_bodies = keep_bodies
        self.faults: deque[str] = deque()
        self.slow_seconds = 3.0
        #: path -> body (or, without keep_bodies, path -> sha256 hex of the body).
        self.objects: dict[str, bytes | str] = {}
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> PutServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> PutServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def _answer(self, status: int, body: bytes = b"") -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:
                with server._lock:
                    fault = server.faults.popleft() if server.faults else None
                    server.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "fault": fault}
                    )
                if server.token is not None and (
                    self.headers.get("Authorization") != f"Bearer {server.token}"
                ):
                    self.close_connection = True
                    self._answer(401, b"unauthorized")
                    return
                length = int(self.headers.get("Content-Length", "-1"))
                if length < 0:
                    self._answer(411)
                    return
                if fault == "reset":
                    self.rfile.read(min(length, 64 << 10))
                    # SO_LINGER 0: close() sends RST, the client sees "connection reset".
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.connection.close()
                    self.close_connection = True
                    return
                digest = hashlib.sha256()
                chunks = []
                remaining = length
                while remaining > 0:
                    chunk = self.rfile.read(min(1 << 20, remaining))
                    if not chunk:
                        return  # the client gave up mid-body: nothing is stored
                    digest.update(chunk)
                    if server.keep_bodies:
                        chunks.append(chunk)
                    remaining -= len(chunk)
                if fault == "slow":
                    time.sleep(server.slow_seconds)
                if fault == "500":
                    self._answer(500, b"injected")
                    return
                claimed = self.headers.get("x-amz-checksum-sha256")
                if claimed is not None and base64.b64decode(claimed) != digest.digest():
                    self._answer(400, b"BadDigest")
                    return
                with server._lock:
                    server.objects[self.path] = (
                        b"".join(chunks) if server.keep_bodies else digest.hexdigest()
                    )
                self._answer(201)

        return Handler


def main() -> None:
    """``python -m tests.http_put_server``: serve (hashing, not keeping, bodies) in its own
    process, so a benchmark's client and server do not share one interpreter lock; prints the
    URL, stops when stdin closes."""
    import sys

    with PutServer(keep_bodies=False) as server:
        print(server.url, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
