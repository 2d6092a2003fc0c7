"""Secret injection end to end: a real cell on the ``cellos`` backend, its DNS and L7 proxies,
and TLS / HTTP servers of our own in a test network namespace (no traffic leaves the machine).

The test servers' CA is given to the proxy as the upstream trust (CELLOS_INJECTION_UPSTREAM_CA);
the workload (Python's urllib and curl) trusts only what the cell's CA bundle says. The secret
comes from the env broker; the workload sees only its placeholder.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CliResult, base_env, doc, read_events, write_doc
from tests.test_network import _ready, network_residue
from tests.tls_test_ca import write_test_pki

Run = Callable[..., CliResult]
SECRET = "injected-Secret-9f3e1c77d2"

RECORDER = r"""
import socketserver, ssl, sys, threading
ip, port, cert, record = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
lock = threading.Lock()
class H(socketserver.StreamRequestHandler):
    def handle(self):
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = self.rfile.readline()
            if not line:
                return
            head += line
        with lock, open(record, "ab") as fh:
            fh.write(head + b"----\n")
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
class S(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    def get_request(self):
        sock, addr = super().get_request()
        if cert != "-":
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert)
            sock.settimeout(5)
            sock = ctx.wrap_socket(sock, server_side=True)
            sock.settimeout(None)
        return sock, addr
S((ip, port), H).serve_forever()
"""

WORKLOAD = r"""
import glob, os, subprocess, urllib.request
ph = os.environ["CELLOS_SECRET_PLACEHOLDER_API_TOKEN"]
print("has-secret-var", "API_TOKEN" in os.environ)
print("ca", os.environ.get("SSL_CERT_FILE"), os.environ.get("REQUESTS_CA_BUNDLE"),
      os.environ.get("NODE_EXTRA_CA_CERTS"))
def get(url):
    req = urllib.request.Request(url, headers={"Authorization": ph})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return f"{r.status} {r.read().decode()}"
    except Exception as e:
        return f"ERR {e!r}"
print("python", get("https://api.test/python"))
print("other", get("http://other.test/other"))
out = subprocess.run(
    ["curl", "-sS", "--max-time", "10", "-H", f"Authorization: Bearer {ph}",
     "https://api.test/curl"], capture_output=True, text=True)
print("curl", out.returncode, out.stdout, out.stderr.strip())
# Everything of the cell this process can read about itself and its peers.
with open("/workspace/seen.bin", "wb") as fh:
    paths = glob.glob("/proc/[0-9]*/environ") + glob.glob("/proc/[0-9]*/cmdline")
    paths += glob.glob("/etc/cellos/*") + glob.glob("/tmp/**", recursive=True)
    paths += glob.glob("/workspace/**", recursive=True)
    for path in paths:
        try:
            with open(path, "rb") as src:
                fh.write(path.encode() + b"\n" + src.read() + b"\n")
        except OSError as e:
            fh.write(f"{path}: {e!r}\n".encode())
# The workload's own writable memory, after it made the requests.
with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb") as mem, \
        open("/workspace/mem.bin", "wb") as out:
    for line in maps:
        fields = line.split()
        if fields[1].startswith("rw"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                out.write(mem.read(end - start))
            except (OSError, ValueError, OverflowError):
                pass
print("placeholder-length", len(ph))
"""


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Any]:
    _ready()
    require_curl()
    from tests.netns_hosts import TestHost

    before = network_residue()
    host = TestHost()
    try:
        pki = tmp_path / "pki"
        pki.mkdir()
        write_test_pki(pki, ["api.test"])
        host.dns_server({"api.test": host.ip, "other.test": host.ip})
        for port, cert, record in (
            (443, str(pki / "api.test.pem"), tmp_path / "api.log"),
            (80, "-", tmp_path / "other.log"),
        ):
            record.touch()
            host.run([sys.executable, "-c", RECORDER, host.ip, str(port), cert, str(record)])
            host.wait_port(port)
        yield host
    finally:
        host.close()
    assert network_residue() == before, "network residue left behind"


def require_curl() -> None:
    from tests.conftest import require_host

    require_host(shutil.which("curl") is not None, "curl")


def injection_doc(host_ip: str) -> dict[str, Any]:
    return doc(
        "inject-1",
        argv=["/usr/bin/python3", "-c", WORKLOAD],
        authority={
            "secretRefs": ["api-token"],
            "egressRules": [
                {"host": "api.test", "port": 443, "protocol": "tcp"},
                {"host": "other.test", "port": 80, "protocol": "tcp"},
            ],
            "dnsAuthority": {
                "hostnameAllowlist": ["api.test", "other.test"],
                "resolvers": [{"resolverId": "test", "address": f"{host_ip}:53"}],
            },
            "secretInjection": [
                {
                    "secretRef": "api-token",
                    "host": "api.test",
                    "header": "Authorization",
                    "format": "Bearer {value}",
                }
            ],
        },
        export={
            "artifacts": [
                {"name": "seen.bin", "path": "/workspace/seen.bin"},
                {"name": "mem.bin", "path": "/workspace/mem.bin"},
            ]
        },
    )


def test_the_proxy_injects_the_secret_and_the_cell_never_holds_it(
    servers: Any, tmp_path: Path, supervisor_cli: Run
) -> None:
    events_file = tmp_path / "events.jsonl"
    exports = tmp_path / "exports"
    spec = write_doc(tmp_path / "c.yaml", injection_doc(servers.ip))
    result = supervisor_cli(
        str(spec),
        base_env(
            tmp_path,
            CELL_OS_JSONL_EVENTS=str(events_file),
            CELLOS_BROKER="env",
            CELLOS_SECRET_API_TOKEN=SECRET,
            CELLOS_INJECTION_UPSTREAM_CA=str(tmp_path / "pki" / "ca.pem"),
            CELLOS_EXPORT_DIR=str(exports),
        ),
    )
    assert result.code == 0, result
    seen = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert seen["has-secret-var"] == "False"
    bundle = "/etc/cellos/ca-bundle.pem"
    assert seen["ca"] == f"{bundle} {bundle} {bundle}"
    assert seen["python"] == "200 ok", seen
    assert seen["other"] == "200 ok", seen
    assert seen["curl"].startswith("0 ok"), seen

    # The test server behind the proxy got the real secret, in the named header only.
    api = (tmp_path / "api.log").read_bytes().decode()
    assert api.count(f"Authorization: Bearer {SECRET}\r\n") == 2, api
    assert "cellos-placeholder-" not in api
    assert "GET /python" in api and "GET /curl" in api
    # The other host got the placeholder, never the secret.
    other = (tmp_path / "other.log").read_bytes().decode()
    assert "Authorization: cellos-placeholder-" in other
    assert SECRET not in other

    events = read_events(events_file)
    started = next(e["data"] for e in events if e["type"].endswith("lifecycle.v1.started"))
    assert started["secrets"]["injected"] == ["api-token"]
    assert started["secrets"]["variables"] == []  # only a placeholder reaches the cell
    injection = [e["data"] for e in events if e["type"].endswith("l7_secret_injection")]
    assert {
        (d["secretRef"], d["decision"], d["reasonCode"], d["requestHost"]) for d in injection
    } == {
        ("api-token", "injected", "l7_secret_injected", "api.test"),
        ("api-token", "refused", "l7_secret_placeholder_wrong_host", "other.test"),
    }
    decisions = [e["data"] for e in events if e["type"].endswith("l7_egress_decision")]
    assert {d["serverName"] for d in decisions} == {"api.test", "other.test"}

    # The secret is nowhere the cell or its records could show it.
    assert SECRET not in events_file.read_text()
    assert SECRET not in result.stdout + result.stderr
    exported = (exports / "inject-1" / "seen.bin").read_bytes()
    assert b"/proc/self/environ" in exported or b"/environ" in exported
    assert b"cellos-placeholder-" in exported  # the placeholder is what the cell holds
    assert SECRET.encode() not in exported
    assert b"PRIVATE KEY" not in exported
    memory = (exports / "inject-1" / "mem.bin").read_bytes()
    assert b"cellos-placeholder-" in memory  # the dump does cover what the workload holds
    assert SECRET.encode() not in memory
    for root, _, files in os.walk(tmp_path / "logs"):
        for name in files:
            assert SECRET.encode() not in (Path(root) / name).read_bytes()

    # No residue: the CA bundle went with the cell's state directory.
    for _, _, files in os.walk(tmp_path / "state"):
        assert "ca-bundle.pem" not in files


def test_injection_on_a_backend_without_an_egress_proxy_is_refused(
    tmp_path: Path, supervisor_cli: Run
) -> None:
    spec = write_doc(tmp_path / "c.yaml", injection_doc("10.0.0.53"))
    result = supervisor_cli(
        str(spec),
        base_env(
            tmp_path,
            CELLOS_CELL_BACKEND="stub",
            CELL_OS_USE_NOOP_SINK="1",
            CELLOS_BROKER="env",
            CELLOS_SECRET_API_TOKEN=SECRET,
        ),
    )
    assert result.code != 0, result
    assert "spec.authority.secretInjection" in result.stderr
    assert "cellos backend" in result.stderr
    assert "Traceback" not in result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_a_killed_supervisors_injection_cell_is_reaped_with_its_ca_bundle(tmp_path: Path) -> None:
    import subprocess
    import time

    from cellos.hosts.cellos import CellosBackend

    _ready()
    before = network_residue()
    state = tmp_path / "state"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nfrom cellos.hosts.cellos import CellosBackend\n"
            "from cellos.core.loading import validate_document\n"
            "from tests.test_secret_injection import injection_doc\n"
            "spec = validate_document(injection_doc('10.214.0.53')).spec\n"
            f"CellosBackend(state_root={str(state)!r}).create(spec)\n"
            "print('ready', flush=True)\ntime.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        bundles = list(state.rglob("ca-bundle.pem"))
        assert len(bundles) == 1
        assert b"PRIVATE KEY" not in bundles[0].read_bytes()
        assert "cellos-inject-1" in network_residue()["netns"]
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    reaped = CellosBackend(state_root=str(state)).reap()
    assert [r.cell_id for r in reaped] == ["inject-1"]
    assert list(state.rglob("ca-bundle.pem")) == []
    assert network_residue() == before


def test_an_upstream_ca_file_that_is_not_pem_fails_the_cell_clearly(
    tmp_path: Path, supervisor_cli: Run
) -> None:
    _ready()
    before = network_residue()
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("this is not a certificate\n")
    spec = write_doc(tmp_path / "c.yaml", injection_doc("10.214.0.53"))
    result = supervisor_cli(
        str(spec),
        base_env(
            tmp_path,
            CELL_OS_USE_NOOP_SINK="1",
            CELLOS_BROKER="env",
            CELLOS_SECRET_API_TOKEN=SECRET,
            CELLOS_INJECTION_UPSTREAM_CA=str(bad),
        ),
    )
    assert result.code == 2, result  # a configuration the operator must fix
    assert "error: CELLOS_INJECTION_UPSTREAM_CA: cannot load CA certificates" in result.stderr
    assert "Traceback" not in result.stderr and SECRET not in result.stderr + result.stdout
    assert network_residue() == before
