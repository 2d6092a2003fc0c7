"""Test hosts of our own in network namespaces (no traffic leaves the machine).

A ``TestHost`` is a network namespace ``ctest-<n>`` joined to the host by a veth pair on
``10.214.<n>.0/29`` (host ``.1``, test host ``.2`` and ``.3``) and ``fd74:6573:74:<n>::/64``
(host ``::1``, test host ``::2`` and ``::3``), with servers started inside it through
``nsenter``. Everything is removed by ``close()``.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

from pyroute2 import IPRoute, NetNS, netns


class TestHost:
    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        self.n = uuid.uuid4().int % 250 + 1
        self.name = f"ctest-{uuid.uuid4().hex[:8]}"
        self.host_if = f"cth{self.n}{uuid.uuid4().hex[:4]}"[:15]
        self.peer_if = f"ctp{self.n}{uuid.uuid4().hex[:4]}"[:15]
        self.host_ip = f"10.214.{self.n}.1"
        self.ip = f"10.214.{self.n}.2"
        #: A second address of the same test host (a /29 link), for "another destination".
        self.ip2 = f"10.214.{self.n}.3"
        #: The same test host over IPv6 (unique local addresses of its own /64).
        self.host_ip6 = f"fd74:6573:74:{self.n:x}::1"
        self.ip6 = f"fd74:6573:74:{self.n:x}::2"
        self.ip6_2 = f"fd74:6573:74:{self.n:x}::3"
        self.procs: list[subprocess.Popen[bytes]] = []
        netns.create(self.name)
        with IPRoute() as ipr:
            ipr.link(
                "add",
                ifname=self.host_if,
                kind="veth",
                peer={"ifname": self.peer_if, "net_ns_fd": self.name},
            )
            index = ipr.link_lookup(ifname=self.host_if)[0]
            ipr.addr("add", index=index, address=self.host_ip, prefixlen=29)
            ipr.link("set", index=index, state="up")
        with NetNS(self.name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            index = ns.link_lookup(ifname=self.peer_if)[0]
            ns.addr("add", index=index, address=self.ip, prefixlen=29)
            ns.addr("add", index=index, address=self.ip2, prefixlen=29)
            ns.link("set", index=index, state="up")
            ns.route("add", dst="default", gateway=self.host_ip)
        self._add_ipv6()

    def _add_ipv6(self) -> None:
        """IPv6 addresses without duplicate address detection (usable at once)."""
        from cellos.network import rtnl

        with rtnl.Rtnl() as host:
            index = host.link_index(self.host_if)
            assert index is not None
            host.add_address(index, self.host_ip6, 64, self.host_if)

        def inside() -> None:
            with rtnl.Rtnl() as ns:
                index = ns.link_index(self.peer_if)
                assert index is not None
                ns.add_address(index, self.ip6, 64, self.peer_if)
                ns.add_address(index, self.ip6_2, 64, self.peer_if)
                ns.add_default_route(self.host_ip6, index)

        rtnl.in_netns(f"/run/netns/{self.name}", inside)

    def run(self, argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.name}", "--", *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        return proc

    def http_server(self, port: int, body: str, address: str | None = None) -> None:
        """A tiny HTTP/1.0 responder (http.server would block on a reverse-DNS lookup of its
        own address in a namespace without DNS), on ``address`` (default: :attr:`ip`)."""
        address = address or self.ip
        script = (
            "import socketserver, sys\n"
            "body = sys.argv[3].encode()\n"
            "class H(socketserver.StreamRequestHandler):\n"
            "    def handle(self):\n"
            "        self.rfile.readline()\n"
            "        head = b'HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n' % len(body)\n"
            "        self.wfile.write(head + body)\n"
            "socketserver.TCPServer.allow_reuse_address = True\n"
            "import socket\n"
            "if ':' in sys.argv[1]:\n"
            "    socketserver.TCPServer.address_family = socket.AF_INET6\n"
            "socketserver.ThreadingTCPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()\n"
        )
        self.run([sys.executable, "-c", script, address, str(port), body])
        self.wait_port(port, address)

    def greeter(self, port: int, reply: str) -> None:
        """Answers ``reply`` to the first bytes of any connection (e.g. a ClientHello)."""
        script = (
            "import socketserver, sys\n"
            "class H(socketserver.BaseRequestHandler):\n"
            "    def handle(self):\n"
            "        if self.request.recv(65536):\n"
            "            self.request.sendall(sys.argv[3].encode())\n"
            "socketserver.TCPServer.allow_reuse_address = True\n"
            "socketserver.ThreadingTCPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()\n"
        )
        self.run([sys.executable, "-c", script, self.ip, str(port), reply])
        self.wait_port(port)

    def dns_server(self, records: dict[str, str]) -> None:
        """An authoritative test DNS server (dnslib) answering A records for ``records``."""
        script = (
            "import sys, json, time\n"
            "from dnslib import RR, QTYPE, A\n"
            "from dnslib.server import DNSServer, BaseResolver\n"
            "records = json.loads(sys.argv[2])\n"
            "class R(BaseResolver):\n"
            "    def resolve(self, request, handler):\n"
            "        reply = request.reply()\n"
            "        name = str(request.q.qname).rstrip('.').lower()\n"
            "        if name in records and request.q.qtype == QTYPE.A:\n"
            "            answer = A(records[name])\n"
            "            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=answer, ttl=5))\n"
            "        return reply\n"
            "DNSServer(R(), address=sys.argv[1], port=53).start_thread()\n"
            "DNSServer(R(), address=sys.argv[1], port=53, tcp=True).start_thread()\n"
            "while True: time.sleep(60)\n"
        )
        import json

        self.run([sys.executable, "-c", script, self.ip, json.dumps(records)])
        self.wait_port(53)

    def wait_port(self, port: int, address: str | None = None, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        probe = [
            sys.executable,
            "-c",
            f"import socket; socket.create_connection(('{address or self.ip}', {port}), 1)",
        ]
        while time.monotonic() < deadline:
            if (
                subprocess.run(
                    ["nsenter", f"--net=/run/netns/{self.name}", "--", *probe],
                    capture_output=True,
                    check=False,
                ).returncode
                == 0
            ):
                return
            time.sleep(0.05)
        raise RuntimeError(f"test host port {port} never opened")

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=self.host_if)
            if found:
                ipr.link("del", index=found[0])
        netns.remove(self.name)
