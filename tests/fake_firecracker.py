"""A fake ``firecracker`` for the firecracker backend's tests: no firecracker binary and no
KVM that boots an ordinary guest exist on the development host, so the backend's wiring is
tested against this program instead.

It serves Firecracker's API on ``--api-sock`` (relative to its cwd, as Firecracker does),
validates every request body against the vendored specification's ``definitions``
(``tests/data/firecracker-api.yaml``), enforces the order Firecracker enforces (pre-boot
configuration before ``InstanceStart``, ``PATCH /vm Paused`` before ``PUT /snapshot/create``,
``PUT /snapshot/load`` only into a fresh process) and records every call, with its pid, as a
JSON line in ``RECORD``. Its "guest" speaks the CellOS guest channel on stdin/stdout, where
Firecracker's serial port is: it runs the request's argv on the host (the guest's
``/workspace`` is a temporary directory in its cwd), and never exits by itself (a Firecracker guest
cannot power the VMM off; the backend kills it).

The test writes an executable wrapper that calls :func:`main` with the record file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socketserver
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any

import jsonschema

from tests.test_firecracker_driver import (
    ApiRequest,
    body_definition,
    load_spec,
    operation,
    validator_for,
)

PRE_BOOT = ("/machine-config", "/boot-source", "/drives/", "/vsock")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _params(line: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in line.split() if p.startswith("cellos.") and "=" in p)


def _send(kind: str, payload: str | None = None) -> None:
    os.write(1, f"CELLOS:{kind}{'' if payload is None else ':' + payload}\n".encode())


class Guest:
    """The CellOS guest init's side of the channel, enough for the backend's tests."""

    def __init__(self, record: Any) -> None:
        self.record = record
        self.stdin = os.fdopen(0, "rb", buffering=0)
        self.buf = b""

    def _line(self) -> bytes | None:
        while b"\n" not in self.buf:
            data = self.stdin.read(65536)
            if not data:
                return None
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def boot(self, boot_args: str) -> None:
        _send("READY")  # as guest init: first thing, before it reads its request
        if "cellos.pool=1" in boot_args:
            _send("IDLE")
            self.idle()
        else:
            self.run(_params(boot_args))

    def idle(self) -> None:
        """A pool guest: pings answered until the request line."""
        while True:
            line = self._line()
            if line is None:
                return
            if not line.strip():
                _send("PONG")
                continue
            params = _params(line.decode())
            self.record({"guest": "request", "params": sorted(params)})
            _send("READY")
            self.run(params)
            return

    def run(self, params: dict[str, str]) -> None:
        secrets: list[str] = []
        if "cellos.secrets" in params:
            line = self._line() or b""
            raw = base64.b64decode(line.removeprefix(b"CELLOS:SECRETS:"))
            secrets = [f"{len(raw)} bytes"]
        argv = json.loads(_unb64(params["cellos.argv"]))
        env = json.loads(_unb64(params["cellos.env"])) if "cellos.env" in params else {}
        arts = (
            json.loads(_unb64(params["cellos.artifacts"])) if "cellos.artifacts" in params else []
        )
        self.record(
            {
                "guest": "run",
                "argv": argv,
                "secrets": secrets,
                "cgroup": json.loads(_unb64(params["cellos.cgroup"]))
                if "cellos.cgroup" in params
                else {},
            }
        )
        # In the VMM's directory (the cell's or pool guest's), which the backend removes even
        # when this process is killed mid-workload.
        with tempfile.TemporaryDirectory(prefix="fake-ws-", dir=os.getcwd()) as ws:
            proc = subprocess.run(
                argv, cwd=ws, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True
            )
            if proc.stdout:
                _send("OUT", base64.b64encode(proc.stdout).decode())
            if proc.stderr:
                _send("ERR", base64.b64encode(proc.stderr).decode())
            _send("LIMITS", "0:0")
            for path in arts:
                tag = base64.urlsafe_b64encode(path.encode()).decode().rstrip("=")
                host = path.replace("/workspace", ws, 1)
                if not os.path.isfile(host):
                    _send("ARTEND", f"{tag}:MISSING")
                    continue
                with open(host, "rb") as fh:
                    data = fh.read()
                _send("ART", f"{tag}:{base64.b64encode(data).decode()}")
                _send("ARTEND", f"{tag}:{hashlib.sha256(data).hexdigest()}")
        _send("UNAME", "fake-firecracker-guest")
        _send("EXIT", str(proc.returncode))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length)) if length else None
        status, answer = self.server.answer(self.command, self.path, body)
        self.server.record(
            {"method": self.command, "path": self.path, "body": body, "status": status}
        )
        payload = b"" if answer is None else json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, record_file: str) -> None:
        super().__init__(path, Handler)
        self.spec = load_spec()
        self.record_file = record_file
        self.lock = threading.Lock()
        self.state = "Not started"
        self.configured: dict[str, Any] = {}
        self.guest = Guest(self.record)

    def record(self, entry: dict[str, Any]) -> None:
        with self.lock, open(self.record_file, "a") as fh:
            fh.write(json.dumps({"pid": os.getpid(), **entry}) + "\n")

    def answer(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if method == "GET" and path == "/":
            return 200, {"id": "fake", "state": self.state, "vmm_version": "1.17.0-fake"}
        try:
            op, _ = operation(self.spec, ApiRequest(method, path, body or {}))
            validator_for(self.spec, body_definition(op)).validate(body)
        except (AssertionError, jsonschema.ValidationError) as exc:
            return 400, {"fault_message": f"bad request: {str(exc).splitlines()[0]}"}
        if path.startswith(PRE_BOOT):
            if self.state != "Not started":
                return 400, {"fault_message": "not supported after starting the microVM"}
            if path == "/boot-source":
                with open(body["kernel_image_path"], "rb") as fh:
                    if fh.read(4) != b"\x7fELF":
                        return 400, {"fault_message": "Invalid Elf magic number"}
            self.configured[path] = body
            return 204, None
        if path == "/actions" and body["action_type"] == "InstanceStart":
            if not {"/machine-config", "/boot-source"} <= set(self.configured):
                return 400, {"fault_message": "Cannot start microvm without kernel configuration."}
            self.state = "Running"
            args = self.configured["/boot-source"].get("boot_args", "")
            threading.Thread(target=self.guest.boot, args=(args,), daemon=True).start()
            return 204, None
        if path == "/vm":
            self.state = "Paused" if body["state"] == "Paused" else "Running"
            return 204, None
        if path == "/snapshot/create":
            if self.state != "Paused":
                return 400, {"fault_message": "Cannot save microvm state: VM is not paused."}
            for name in (body["snapshot_path"], body["mem_file_path"]):
                with open(name, "w") as fh:
                    json.dump({"idleGuest": True, "boot": self.configured["/boot-source"]}, fh)
            return 204, None
        if path == "/snapshot/load":
            if self.state != "Not started" or self.configured:
                return 400, {"fault_message": "snapshot load only into a fresh microVM"}
            with open(body["snapshot_path"]) as fh:
                json.load(fh)
            with open(body["mem_backend"]["backend_path"]) as fh:
                json.load(fh)
            self.state = "Running" if body.get("resume_vm") else "Paused"
            # Restored as it was snapshotted: an idle pool guest waiting for its request.
            threading.Thread(target=self.guest.idle, daemon=True).start()
            return 204, None
        return 400, {"fault_message": f"the fake does not implement {method} {path}"}


def main(argv: list[str], record_file: str) -> None:
    api_sock = argv[argv.index("--api-sock") + 1]
    Server(api_sock, record_file).serve_forever()


if __name__ == "__main__":
    main(sys.argv, sys.argv[-1])
