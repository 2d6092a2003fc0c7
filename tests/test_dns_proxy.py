"""DNS authority proxy: real sockets on 127.0.0.1, a real (dnslib) upstream, no mocks.

The proxy runs on its own event loop in a background thread, exactly as it would next to other
supervisor work; the tests act as the workload with ordinary blocking client sockets, which also
lets them observe *when* a reply arrives relative to ``on_answer``.
"""

from __future__ import annotations

import asyncio
import select
import socket
import struct
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest
from dnslib import EDNS0, QTYPE, RCODE, RR, DNSRecord, EDNSOption
from dnslib.server import BaseResolver, DNSLogger, DNSServer
from hypothesis import given, settings
from hypothesis import strategies as st

from cellos.network.dns_proxy import DnsProxy, HostnameAllowlist, _parse_query

ZONE = """
example.com.        60 IN A     192.0.2.10
example.com.        60 IN AAAA  2001:db8:0:0::10
example.com.        60 IN TXT   "not for cells"
api.github.com.     60 IN A     192.0.2.20
a.b.github.com.     60 IN A     192.0.2.21
github.com.         60 IN A     192.0.2.22
www.example.com.    60 IN CNAME edge.cdn.test.
edge.cdn.test.      60 IN CNAME edge2.cdn.test.
edge2.cdn.test.     60 IN A     198.51.100.7
edge2.cdn.test.     60 IN A     198.51.100.8
"""
# Many records: the answer does not fit a 512-byte datagram.
BIG = "".join(f"big.example.com. 60 IN A 10.0.{i // 250}.{i % 250 + 1}\n" for i in range(60))
# An unrelated address record the upstream slips into www.example.com's answer.
STRAY = RR.fromZone("stray.test. 60 IN A 203.0.113.99")[0]


class FixedResolver(BaseResolver):  # type: ignore[misc]
    """A tiny recursive-looking resolver over ZONE that records every query it gets."""

    def __init__(self) -> None:
        self.records = RR.fromZone(ZONE + BIG)
        self.queries: list[tuple[str, str, str]] = []  # (name, qtype, protocol)
        self.requests: list[DNSRecord] = []
        self.lock = threading.Lock()

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        with self.lock:
            self.queries.append(
                (str(request.q.qname).lower(), QTYPE[request.q.qtype], handler.protocol)
            )
            self.requests.append(request)
        reply = request.reply()
        name = str(request.q.qname).lower()
        for _ in range(8):  # follow CNAMEs like a recursive resolver would
            at_name = [rr for rr in self.records if str(rr.rname).lower() == name]
            cname = [rr for rr in at_name if rr.rtype == QTYPE.CNAME]
            if cname and request.q.qtype != QTYPE.CNAME:
                reply.add_answer(*cname)
                name = str(cname[0].rdata.label).lower()
                continue
            reply.add_answer(*[rr for rr in at_name if rr.rtype == request.q.qtype])
            break
        if str(request.q.qname).lower() == "www.example.com.":
            reply.add_answer(STRAY)
        if not reply.rr:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply

    def count(self) -> int:
        with self.lock:
            return len(self.queries)


class Upstream:
    """UDP and TCP dnslib servers on the same free 127.0.0.1 port."""

    def __init__(self) -> None:
        self.resolver = FixedResolver()
        quiet = DNSLogger(logf=lambda _s: None)
        for _ in range(50):
            udp = DNSServer(self.resolver, address="127.0.0.1", port=0, logger=quiet)
            self.port = int(udp.server.server_address[1])
            try:
                tcp = DNSServer(
                    self.resolver, address="127.0.0.1", port=self.port, tcp=True, logger=quiet
                )
            except OSError:
                udp.server.server_close()
                continue
            break
        else:  # pragma: no cover - the machine is out of ports
            raise RuntimeError("no free port pair for the upstream")
        self.servers = [udp, tcp]
        self.threads = [
            # A short poll interval keeps shutdown() (and so every test's teardown) fast.
            threading.Thread(
                target=server.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
            )
            for server in self.servers
        ]
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
            server.server.server_close()


class Harness:
    """A DnsProxy on sockets bound by the test (as the supervisor binds them in the netns)."""

    def __init__(
        self,
        upstream: tuple[str, int],
        allowlist: list[str],
        *,
        timeout: float = 1.0,
        answer_delay: float = 0.0,
        fail_pin: bool = False,
        **kwargs: Any,
    ) -> None:
        self.happenings: list[tuple[Any, ...]] = []
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.watched_client: socket.socket | None = None
        self.answer_delay = answer_delay
        self.fail_pin = fail_pin
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.bind(("127.0.0.1", 0))
        self.udp_addr = self.udp.getsockname()
        self.tcp_addr = self.tcp.getsockname()
        self.proxy = DnsProxy(
            allowlist,
            upstream,
            self.on_answer,
            self.on_decision,
            timeout,
            resolver_id="test-resolver",
            **kwargs,
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.proxy.start_on(self.udp, self.tcp))

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def on_answer(self, name: str, addresses: list[str]) -> None:
        if self.fail_pin:
            raise RuntimeError("nft set is gone")
        # Give a reply that was (wrongly) sent before on_answer the time to reach the client.
        time.sleep(self.answer_delay)
        client_had_reply = False
        if self.watched_client is not None:
            # select, not recv(MSG_DONTWAIT): a socket with a timeout would wait in recv.
            readable, _, _ = select.select([self.watched_client], [], [], 0)
            client_had_reply = bool(readable)
        with self.lock:
            self.happenings.append(("on_answer", name, list(addresses), client_had_reply))

    def on_decision(self, data: dict[str, Any]) -> None:
        with self.lock:
            self.events.append(data)

    def client_received(self) -> None:
        with self.lock:
            self.happenings.append(("client_received",))

    def close(self) -> None:
        self.call(self.proxy.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


def make_query(name: str, qtype: str = "A", *, edns: bool = False) -> DNSRecord:
    query = DNSRecord.question(name, qtype)
    if edns:
        query.add_ar(EDNS0(udp_len=1232))
    return query


def udp_ask(
    harness: Harness,
    query: DNSRecord,
    *,
    sock: socket.socket | None = None,
    timeout: float = 5.0,
) -> DNSRecord:
    own = sock is None
    client = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        client.settimeout(timeout)
        client.sendto(query.pack(), harness.udp_addr)
        data = client.recv(65535)
        harness.client_received()
        reply = DNSRecord.parse(data)
        assert reply.header.id == query.header.id
        return reply
    finally:
        if own:
            client.close()


def tcp_send(sock: socket.socket, wire: bytes) -> None:
    sock.sendall(struct.pack("!H", len(wire)) + wire)


def tcp_recv(sock: socket.socket) -> DNSRecord:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            assert chunk, "proxy closed the TCP connection"
            buf += chunk
        return buf

    (length,) = struct.unpack("!H", exactly(2))
    return DNSRecord.parse(exactly(length))


def addresses(reply: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr if rr.rtype in (QTYPE.A, QTYPE.AAAA)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.stop()


@pytest.fixture
def harness(upstream: Upstream) -> Iterator[Harness]:
    h = Harness(
        ("127.0.0.1", upstream.port),
        ["Example.COM.", "*.github.com", "www.example.com", "big.example.com"],
    )
    yield h
    h.close()


# ---------------------------------------------------------------------------------------------
# Allowed names


def test_allowed_name_answered_after_on_answer(upstream: Upstream) -> None:
    h = Harness(("127.0.0.1", upstream.port), ["example.com"], answer_delay=0.1)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            h.watched_client = client
            reply = udp_ask(h, make_query("ExAmPlE.CoM."), sock=client)
        assert reply.header.rcode == RCODE.NOERROR
        assert addresses(reply) == ["192.0.2.10"]
        # The address was handed to the pinning callback while the client still had nothing.
        assert h.happenings == [
            ("on_answer", "example.com", ["192.0.2.10"], False),
            ("client_received",),
        ]
        assert h.events == [
            {
                "queryName": "example.com",
                "queryType": "A",
                "decision": "permitted",
                "reasonCode": "allowlist_exact",
                "responseCode": "NOERROR",
                "transport": "udp",
                "answers": ["192.0.2.10"],
                "matchedEntry": "example.com",
                "resolverId": "test-resolver",
            }
        ]
        assert upstream.resolver.queries == [("example.com.", "A", "udp")]
    finally:
        h.close()


def test_aaaa_and_case_insensitive_allowlist_entry(harness: Harness) -> None:
    reply = udp_ask(harness, make_query("example.com", "AAAA"))
    assert addresses(reply) == ["2001:db8::10"]
    assert harness.happenings[0][:3] == ("on_answer", "example.com", ["2001:db8::10"])
    assert harness.events[-1]["queryType"] == "AAAA"


def test_wildcard_allows_subdomains_not_apex(harness: Harness, upstream: Upstream) -> None:
    assert addresses(udp_ask(harness, make_query("api.github.com"))) == ["192.0.2.20"]
    assert addresses(udp_ask(harness, make_query("A.B.GitHub.com"))) == ["192.0.2.21"]
    assert [e["reasonCode"] for e in harness.events] == ["allowlist_wildcard"] * 2
    assert harness.events[0]["matchedEntry"] == "*.github.com"

    before = upstream.resolver.count()
    reply = udp_ask(harness, make_query("github.com"))
    assert reply.header.rcode == RCODE.REFUSED
    assert not reply.rr
    assert upstream.resolver.count() == before
    assert harness.events[-1]["decision"] == "refused"
    assert harness.events[-1]["reasonCode"] == "name_not_allowed"


def test_cname_chain_pins_only_the_final_addresses(harness: Harness) -> None:
    reply = udp_ask(harness, make_query("www.example.com"))
    # Relayed unchanged: the whole chain and even the stray record reach the client ...
    assert [str(rr.rname) for rr in reply.rr] == [
        "www.example.com.",
        "edge.cdn.test.",
        "edge2.cdn.test.",
        "edge2.cdn.test.",
        "stray.test.",
    ]
    # ... but only the end of the chain is pinned, so the stray address stays unreachable.
    on_answer = [h for h in harness.happenings if h[0] == "on_answer"]
    assert on_answer == [("on_answer", "www.example.com", ["198.51.100.7", "198.51.100.8"], False)]
    assert harness.events[-1]["cnameChain"] == ["edge.cdn.test", "edge2.cdn.test"]
    # The CNAME target is no allowlist entry of its own.
    assert udp_ask(harness, make_query("edge2.cdn.test")).header.rcode == RCODE.REFUSED


def test_nxdomain_is_relayed_without_pinning(harness: Harness) -> None:
    reply = udp_ask(harness, make_query("nope.github.com"))
    assert reply.header.rcode == RCODE.NXDOMAIN
    assert not [h for h in harness.happenings if h[0] == "on_answer"]
    assert harness.events[-1]["responseCode"] == "NXDOMAIN"
    assert harness.events[-1]["decision"] == "permitted"


# ---------------------------------------------------------------------------------------------
# Refusals


def test_not_allowed_is_refused_at_once_and_never_forwarded(
    harness: Harness, upstream: Upstream
) -> None:
    start = time.monotonic()
    reply = udp_ask(harness, make_query("exfil.attacker.test", edns=True))
    elapsed = time.monotonic() - start
    assert reply.header.rcode == RCODE.REFUSED
    assert elapsed < 0.5
    assert upstream.resolver.count() == 0
    assert not [h for h in harness.happenings if h[0] == "on_answer"]
    assert harness.events == [
        {
            "queryName": "exfil.attacker.test",
            "queryType": "A",
            "decision": "refused",
            "reasonCode": "name_not_allowed",
            "responseCode": "REFUSED",
            "transport": "udp",
        }
    ]
    # The client learns why (RFC 8914 Extended DNS Error 18 "Prohibited").
    (opt,) = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
    (ede,) = [o for o in opt.rdata if o.code == 15]
    assert struct.unpack("!H", ede.data[:2])[0] == 18
    assert b"name_not_allowed" in ede.data


@pytest.mark.parametrize("qtype", ["TXT", "HTTPS", "MX", "ANY", "PTR"])
def test_unlisted_qtype_refused_even_for_allowed_name(
    harness: Harness, upstream: Upstream, qtype: str
) -> None:
    reply = udp_ask(harness, make_query("example.com", qtype))
    assert reply.header.rcode == RCODE.REFUSED
    assert upstream.resolver.count() == 0
    assert harness.events[-1]["reasonCode"] == "qtype_not_allowed"
    assert harness.events[-1]["queryType"] == qtype


def test_name_with_escaped_dot_is_refused(harness: Harness, upstream: Upstream) -> None:
    # One wire label "api.github" + "com": looks like api.github.com in text, is another name.
    query = make_query("x.com")
    query.q.qname.label = (b"api.github", b"com")
    reply = udp_ask(harness, query)
    assert reply.header.rcode == RCODE.REFUSED
    assert harness.events[-1]["reasonCode"] == "invalid_name"
    assert harness.events[-1]["queryName"] == "api\\046github.com"
    assert upstream.resolver.count() == 0


# ---------------------------------------------------------------------------------------------
# Upstream trouble


def test_upstream_unreachable_gives_servfail() -> None:
    h = Harness(("127.0.0.1", free_port()), ["example.com"], timeout=0.5)
    try:
        reply = udp_ask(h, make_query("example.com", edns=True))
        assert reply.header.rcode == RCODE.SERVFAIL
        event = h.events[-1]
        assert event["decision"] == "permitted"
        assert event["responseCode"] == "SERVFAIL"
        assert event["reasonCode"] in {"upstream_unreachable", "upstream_timeout"}
        assert event["answers"] == []
        assert not [x for x in h.happenings if x[0] == "on_answer"]
        assert h.proxy.stats.upstream_queries == 2  # one retry
    finally:
        h.close()


def test_silent_upstream_times_out_after_one_retry() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        h = Harness(silent.getsockname(), ["example.com"], timeout=0.2)
        try:
            start = time.monotonic()
            reply = udp_ask(h, make_query("example.com"))
            elapsed = time.monotonic() - start
            assert reply.header.rcode == RCODE.SERVFAIL
            assert 0.35 < elapsed < 2.0
            assert h.events[-1]["reasonCode"] == "upstream_timeout"
            silent.settimeout(1)
            seen = [DNSRecord.parse(silent.recv(4096)) for _ in range(2)]
            assert {str(q.q.qname) for q in seen} == {"example.com."}
            assert seen[0].header.id != seen[1].header.id  # fresh id for the retry
        finally:
            h.close()


def test_only_the_matching_upstream_response_is_relayed() -> None:
    """Wrong id or wrong question from the upstream address: ignored, never pinned."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as fake:
        fake.bind(("127.0.0.1", 0))
        fake.settimeout(5)

        def serve() -> None:
            data, peer = fake.recvfrom(4096)
            query = DNSRecord.parse(data)
            wrong_id = query.reply()
            wrong_id.header.id = (query.header.id + 1) % 65536
            wrong_id.add_answer(*RR.fromZone("example.com. 60 IN A 6.6.6.1"))
            wrong_q = DNSRecord.question("evil.test")
            wrong_q.header.id = query.header.id
            wrong_q = wrong_q.reply()
            wrong_q.add_answer(*RR.fromZone("evil.test. 60 IN A 6.6.6.2"))
            right = query.reply()
            right.add_answer(*RR.fromZone("example.com. 60 IN A 192.0.2.10"))
            for bad in (b"\xff" * 7, wrong_id.pack(), wrong_q.pack(), right.pack()):
                fake.sendto(bad, peer)

        server = threading.Thread(target=serve)
        server.start()
        h = Harness(fake.getsockname(), ["example.com"], timeout=2.0)
        try:
            query = make_query("example.com")
            reply = udp_ask(h, query)
            server.join(timeout=5)
            assert reply.header.id == query.header.id
            assert addresses(reply) == ["192.0.2.10"]
            assert h.happenings[0][:3] == ("on_answer", "example.com", ["192.0.2.10"])
            assert h.proxy.stats.upstream_mismatched == 3
        finally:
            h.close()


def test_query_is_rebuilt_before_it_goes_upstream(harness: Harness, upstream: Upstream) -> None:
    query = make_query("example.com")
    query.add_ar(EDNS0(udp_len=1400, opts=[EDNSOption(8, b"\x00\x01\x18\x00\x0a\x00\x00")]))
    query.add_answer(*RR.fromZone("smuggled.test. 60 IN TXT secret"))
    reply = udp_ask(harness, query)
    assert addresses(reply) == ["192.0.2.10"]
    (seen,) = upstream.resolver.requests
    assert not seen.rr
    (opt,) = seen.ar
    assert opt.rtype == QTYPE.OPT
    assert opt.rdata == []  # no client-subnet (code 8) or other option leaves the cell
    assert opt.edns_len == 1400
    assert seen.header.id != query.header.id


def test_failed_pinning_gives_servfail(upstream: Upstream) -> None:
    h = Harness(("127.0.0.1", upstream.port), ["example.com"], fail_pin=True)
    try:
        reply = udp_ask(h, make_query("example.com"))
        assert reply.header.rcode == RCODE.SERVFAIL
        assert not reply.rr  # an address that is not reachable is not handed out
        assert h.events[-1]["reasonCode"] == "pin_failed"
    finally:
        h.close()


# ---------------------------------------------------------------------------------------------
# Robustness and transports


def test_garbage_is_dropped_and_the_proxy_keeps_serving(harness: Harness) -> None:
    valid = make_query("example.com").pack()
    junk = [b"", b"\x00", b"\xff" * 11, b"\x12" * 600, make_query("example.com").reply().pack()]
    # Every single-bit flip of a real query: reaches deep into the parser.
    junk += [
        bytes(b ^ (1 << bit) if i == pos else b for i, b in enumerate(valid))
        for pos in range(len(valid))
        for bit in range(8)
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        for datagram in junk:
            client.sendto(datagram, harness.udp_addr)
    time.sleep(0.3)  # replies to flipped-but-valid queries arrive on that closed socket
    reply = udp_ask(harness, make_query("example.com"))
    assert addresses(reply) == ["192.0.2.10"]
    assert harness.proxy.stats.malformed >= 4
    assert harness.proxy.stats.received >= len(junk)


def test_tcp_path(harness: Harness, upstream: Upstream) -> None:
    with socket.create_connection(harness.tcp_addr, timeout=5) as conn:
        tcp_send(conn, make_query("api.github.com").pack())
        reply = tcp_recv(conn)
        assert addresses(reply) == ["192.0.2.20"]
        # A garbage message does not end the session; the framing is still intact.
        tcp_send(conn, b"\x00\x01garbage")
        tcp_send(conn, make_query("evil.test").pack())
        assert tcp_recv(conn).header.rcode == RCODE.REFUSED
        tcp_send(conn, make_query("example.com", "AAAA").pack())
        assert addresses(tcp_recv(conn)) == ["2001:db8::10"]
    assert upstream.resolver.queries == [
        ("api.github.com.", "A", "tcp"),
        ("example.com.", "AAAA", "tcp"),
    ]
    assert [e["transport"] for e in harness.events] == ["tcp"] * 3
    assert harness.proxy.stats.malformed == 1


def test_oversized_udp_answer_is_truncated_then_served_over_tcp(harness: Harness) -> None:
    reply = udp_ask(harness, make_query("big.example.com"))
    assert reply.header.tc == 1
    assert not reply.rr
    with socket.create_connection(harness.tcp_addr, timeout=5) as conn:
        tcp_send(conn, make_query("big.example.com").pack())
        full = tcp_recv(conn)
    assert full.header.tc == 0
    assert len(addresses(full)) == 60
    assert len(harness.happenings[-1][2]) == 60


def test_tcp_only_resolver(upstream: Upstream) -> None:
    h = Harness(("127.0.0.1", upstream.port), ["example.com"], upstream_protocol="do53-tcp")
    try:
        assert addresses(udp_ask(h, make_query("example.com"))) == ["192.0.2.10"]
        assert upstream.resolver.queries == [("example.com.", "A", "tcp")]
    finally:
        h.close()


def test_close_releases_the_callers_sockets(upstream: Upstream) -> None:
    h = Harness(("127.0.0.1", upstream.port), ["example.com"])
    h.close()
    assert h.udp.fileno() == -1
    assert h.tcp.fileno() == -1


def test_constructor_and_start_on_validate() -> None:
    def nothing(*_args: Any) -> None:
        return None

    with pytest.raises(ValueError, match="literal IP"):
        DnsProxy(["a.test"], ("dns.example", 53), nothing, nothing, 1.0)
    with pytest.raises(ValueError):
        DnsProxy(["a.*.test"], ("127.0.0.1", 53), nothing, nothing, 1.0)
    proxy = DnsProxy(["a.test"], ("127.0.0.1", 53), nothing, nothing, 1.0)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as stream,
        pytest.raises(ValueError, match="SOCK_DGRAM"),
    ):
        asyncio.run(proxy.start_on(stream, None))


# ---------------------------------------------------------------------------------------------
# Properties (pure, fast)

ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
# Short labels on purpose: collisions between generated names are what the oracle test needs.
LABEL = st.text(ALNUM, min_size=1, max_size=3) | st.tuples(
    st.sampled_from(ALNUM), st.text(ALNUM + "-", max_size=6), st.sampled_from(ALNUM)
).map("".join)
NAME = st.lists(LABEL, min_size=1, max_size=4).map(".".join)


def shuffle_case(name: str, data: st.DataObject) -> str:
    flips = data.draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(c.upper() if f else c for c, f in zip(name, flips, strict=True))


@settings(max_examples=150, deadline=None)
@given(name=NAME, data=st.data())
def test_exact_entry_matches_itself_in_any_case(name: str, data: st.DataObject) -> None:
    allow = HostnameAllowlist([shuffle_case(name, data)])
    assert allow.match(shuffle_case(name, data)) == name
    assert allow.match(name + ".") == name
    child = data.draw(LABEL)
    assert allow.match(f"{child}.{name}") is None  # an exact entry covers no subdomain


@settings(max_examples=150, deadline=None)
@given(domain=NAME, prefix=st.lists(LABEL, min_size=1, max_size=3), data=st.data())
def test_wildcard_matches_strict_subdomains_only(
    domain: str, prefix: list[str], data: st.DataObject
) -> None:
    allow = HostnameAllowlist([f"*.{domain}"])
    sub = ".".join([*prefix, domain])
    assert allow.match(shuffle_case(sub, data)) == f"*.{domain}"
    assert allow.match(domain) is None
    assert allow.match(domain + ".") is None
    # Glued onto the last label ("evilgithub.com"): not a subdomain.
    assert allow.match(prefix[0] + domain) is None


@settings(max_examples=200, deadline=None)
@given(
    entries=st.lists(st.tuples(st.booleans(), NAME), max_size=5),
    name=NAME,
    data=st.data(),
)
def test_matcher_agrees_with_label_oracle(
    entries: list[tuple[bool, str]], name: str, data: st.DataObject
) -> None:
    texts = [("*." if wild else "") + base for wild, base in entries]
    allow = HostnameAllowlist([shuffle_case(t, data) for t in texts])
    labels = name.split(".")

    def oracle() -> bool:
        for wild, base in entries:
            base_labels = base.split(".")
            if not wild and labels == base_labels:
                return True
            n = len(base_labels)
            if wild and len(labels) > n and labels[-n:] == base_labels:
                return True
        return False

    assert (allow.match(shuffle_case(name, data)) is not None) == oracle()
    # Adding entries never takes a match away.
    if oracle():
        assert HostnameAllowlist([*texts, "*.other.test"]).match(name) is not None


def test_matcher_edge_cases() -> None:
    allow = HostnameAllowlist(["kk.example", "*.github.com"])
    assert allow.match("\u212ak.example") is None  # KELVIN SIGN lowercases to "k" in Unicode
    assert allow.match("") is None
    assert allow.match(".") is None
    assert allow.match("a..github.com") is None
    assert allow.match("github.com") is None
    assert "API.GITHUB.COM." in allow
    assert HostnameAllowlist([]).match("example.com") is None
    for bad in ["*", "*.", "a.*.b", "", "-a.com"]:
        with pytest.raises(ValueError):
            HostnameAllowlist([bad])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_query_parser_never_raises(data: bytes) -> None:
    _parse_query(data)


@settings(max_examples=300, deadline=None)
@given(pos=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255))
def test_query_parser_survives_corrupted_queries(pos: int, value: int) -> None:
    wire = bytearray(make_query("a.b.github.com", "AAAA", edns=True).pack())
    wire[pos % len(wire)] = value
    parsed = _parse_query(bytes(wire))
    assert parsed is None or parsed.name
