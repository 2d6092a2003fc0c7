"""The cell's in-namespace proxies (DNS authority now; L7 next), served by one event loop.

The listening sockets are created inside the cell's network namespace (see
:mod:`cellos.network.netns_sockets`); the proxies themselves run on a single asyncio loop in a
daemon thread of the supervisor, shared by all its cells. Their decisions are buffered as
``(event type, data)`` pairs and emitted by the supervisor after the run, in order.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from cellos.core import events as ev
from cellos.core.errors import CellosError, HostError, PolicyRefused
from cellos.core.ports import InjectedSecret
from cellos.core.spec import DnsAuthority
from cellos.network import nft, scope
from cellos.network.dns_proxy import DnsProxy
from cellos.network.injection import Injections
from cellos.network.l7_proxy import InjectionSetup, L7Proxy
from cellos.network.netns_sockets import bound_socket, unbound_socket
from cellos.network.rtnl import in_netns

if TYPE_CHECKING:
    # Only secretInjection cells have a CA (cryptography's x509: ~90 ms of imports).
    from cellos.network.cell_ca import CellCA

T = TypeVar("T")
DNS_LISTEN = ("127.0.0.1", 53)
L7_LISTEN = ("127.0.0.1", 15001)
#: Firewall mark of the L7 proxy's own upstream connections (not redirected again).
L7_MARK = 0x1


class ProxyLoop:
    """One event loop thread per process for every cell's proxies."""

    _instance: ProxyLoop | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self.loop.run_forever, name="cellos-proxies", daemon=True)
        thread.start()

    @classmethod
    def get(cls) -> ProxyLoop:
        with cls._lock:
            if cls._instance is None:
                cls._instance = ProxyLoop()
            return cls._instance

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def upstream_of(dns: DnsAuthority) -> tuple[str, int, str | None, str]:
    if dns.resolvers:
        resolver = dns.resolvers[0]
        host, _, port = resolver.address.rpartition(":")
        return host.strip("[]"), int(port), resolver.resolver_id, resolver.protocol
    try:
        with open("/etc/resolv.conf", encoding="utf-8") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    return parts[1], 53, None, "do53-udp"
    except OSError:
        pass
    raise PolicyRefused(
        "spec.authority.dnsAuthority.resolvers",
        "no resolver declared and the host has none in /etc/resolv.conf",
    )


def _redirect_commands(ports: list[int]) -> list[dict[str, Any]]:
    """Inside the cell's namespace: unmarked TCP to the checked ports goes to the proxy."""
    table = "cellos_l7"
    return [
        {"add": {"table": {"family": "ip", "name": table}}},
        {
            "add": {
                "chain": {
                    "family": "ip",
                    "table": table,
                    "name": "output",
                    "type": "nat",
                    "hook": "output",
                    "prio": -100,
                    "policy": "accept",
                }
            }
        },
        {
            "add": {
                "rule": {
                    "family": "ip",
                    "table": table,
                    "chain": "output",
                    "expr": [
                        nft.match(nft.meta("mark"), L7_MARK, op="!="),
                        nft.match(nft.meta("l4proto"), "tcp"),
                        nft.match(nft.payload("tcp", "dport"), {"set": sorted(ports)}),
                        {"redirect": {"port": L7_LISTEN[1]}},
                    ],
                }
            }
        },
    ]


_UPSTREAM_CONTEXTS: dict[tuple[str | None, int, int], ssl.SSLContext] = {}
_UPSTREAM_LOCK = threading.Lock()


def upstream_context(cafile: str | None) -> ssl.SSLContext:
    """How the proxy verifies the real upstream of an injection host: the host's trust store,
    or only the CAs of ``cafile`` (``CELLOS_INJECTION_UPSTREAM_CA``).

    Loading a trust store costs tens of milliseconds; one context (read-only once built) serves
    every cell of this process, and is rebuilt when the CA file changes."""
    stamp = (0, 0)
    if cafile is not None:
        try:
            info = os.stat(cafile)
        except OSError as exc:
            raise PolicyRefused(
                "CELLOS_INJECTION_UPSTREAM_CA", f"cannot read {cafile!r}: {exc.strerror}"
            ) from None
        stamp = (info.st_mtime_ns, info.st_size)
    key = (cafile, *stamp)
    with _UPSTREAM_LOCK:
        context = _UPSTREAM_CONTEXTS.get(key)
        if context is None:
            try:
                context = ssl.create_default_context(cafile=cafile)
            except (ssl.SSLError, OSError) as exc:
                raise PolicyRefused(
                    "CELLOS_INJECTION_UPSTREAM_CA",
                    f"cannot load CA certificates from {cafile!r}: {exc}",
                ) from None
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.set_alpn_protocols(["http/1.1"])
            _UPSTREAM_CONTEXTS.clear()  # one trust store is current at a time
            _UPSTREAM_CONTEXTS[key] = context
        return context


class CellProxies:
    def __init__(
        self,
        net: scope.CellNetwork,
        dns: DnsAuthority | None,
        l7_names: list[str] | None = None,
        l7_ports: list[int] | None = None,
        injection_ca: CellCA | None = None,
        upstream_ca_file: str | None = None,
    ) -> None:
        self.net = net
        self.dns_authority = dns
        self.l7_names = l7_names or []
        self.l7_ports = l7_ports or []
        self.injection_ca = injection_ca
        self.upstream_ca_file = upstream_ca_file
        self._injections: Injections | None = None
        self._l7: L7Proxy | None = None
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._events_lock = threading.Lock()
        self._dns: DnsProxy | None = None

    def _record(self, event_type: str, data: dict[str, Any]) -> None:
        with self._events_lock:
            self.events.append((event_type, data))

    def _on_dns_decision(self, data: dict[str, Any]) -> None:
        kind = (
            ev.DNS_QUERY_PERMITTED if data.get("decision") == "permitted" else ev.DNS_QUERY_REFUSED
        )
        self._record(kind, data)

    def _on_answer(self, name: str, addresses: list[str]) -> None:
        # Before the client gets the answer: the address is reachable once it knows it.
        scope.pin(self.net, name, addresses)
        if self._injections is not None:
            self._injections.note_addresses(name, addresses)

    def start(self) -> None:
        self._start_dns()
        self._start_l7()

    def _start_l7(self) -> None:
        """Ports 80/443 of the cell go through the SNI/Host check: an nft table inside the
        cell's namespace redirects them to the proxy, whose own upstream connections carry a
        mark and leave through the cell's egress rules like any other flow."""
        if not self.l7_ports or not self.l7_names:
            return
        listen = in_netns(
            self.net.netns_path, lambda: bound_socket(socket.SOCK_STREAM, L7_LISTEN, listen=True)
        )
        netns = self.net.netns_path

        async def connect_upstream(host: str, port: int) -> tuple[Any, Any]:
            sock = in_netns(netns, lambda: unbound_socket(mark=L7_MARK))
            loop = asyncio.get_running_loop()
            try:
                await loop.sock_connect(sock, (host, port))
            except BaseException:
                sock.close()
                raise
            return await asyncio.open_connection(sock=sock)

        injection = None
        try:
            if self.injection_ca is not None:
                self._injections = Injections(self.injection_ca.hosts)
                for rule in self.net.rules:  # host rules the supervisor resolved up front
                    if rule.host is not None:
                        addresses = [a.removesuffix("/32") for a in rule.addresses]
                        self._injections.note_addresses(rule.host, addresses)
                injection = InjectionSetup(
                    injections=self._injections,
                    ca=self.injection_ca,
                    upstream_context=upstream_context(self.upstream_ca_file),
                    on_event=lambda d: self._record(ev.L7_SECRET_INJECTION, d),
                )
            proxy = L7Proxy(
                self.l7_names,
                lambda d: self._record(ev.L7_EGRESS_DECISION, d),
                connect_upstream=connect_upstream,
                injection=injection,
            )
            nft.run(_redirect_commands(self.l7_ports), netns=netns)
            ProxyLoop.get().call(proxy.start_on(listen))
        except CellosError:
            listen.close()
            raise
        except Exception as exc:  # noqa: BLE001 - any failure is a host error for the cell
            listen.close()
            raise HostError("network", f"cannot start the cell's L7 proxy: {exc}") from None
        self._l7 = proxy

    @property
    def dns_active(self) -> bool:
        """Whether the cell's DNS proxy listens on :data:`DNS_LISTEN` in its namespace."""
        return self._dns is not None

    @property
    def l7_active_ports(self) -> list[int]:
        """The TCP ports the SNI/Host proxy (on :data:`L7_LISTEN`) checks; [] when none."""
        return list(self.l7_ports) if self._l7 is not None else []

    @property
    def injects(self) -> bool:
        """Whether the cell's L7 proxy runs with secret injection."""
        return self._l7 is not None and self._injections is not None

    def arm(self, secrets: Sequence[InjectedSecret]) -> None:
        """Hand the resolved injection secrets to the running L7 proxy."""
        if self._injections is None:
            raise HostError("network", "the cell's L7 proxy does not inject secrets")
        self._injections.arm(secrets)

    def _start_dns(self) -> None:
        if self.dns_authority is None:
            return
        host, port, resolver_id, protocol = upstream_of(self.dns_authority)
        udp, tcp = in_netns(
            self.net.netns_path,
            lambda: (
                bound_socket(socket.SOCK_DGRAM, DNS_LISTEN),
                bound_socket(socket.SOCK_STREAM, DNS_LISTEN, listen=True),
            ),
        )
        proxy = DnsProxy(
            self.dns_authority.hostname_allowlist,
            (host, port),
            self._on_answer,
            self._on_dns_decision,
            resolver_id=resolver_id,
            upstream_protocol="do53-tcp" if protocol == "do53-tcp" else "do53-udp",
        )
        try:
            ProxyLoop.get().call(proxy.start_on(udp, tcp))
        except Exception as exc:  # noqa: BLE001 - any failure is a host error for the cell
            udp.close()
            tcp.close()
            raise HostError("network", f"cannot start the cell's DNS proxy: {exc}") from None
        self._dns = proxy

    def stop(self) -> None:
        if self._dns is not None:
            ProxyLoop.get().call(self._dns.close())
            self._dns = None
        if self._l7 is not None:
            ProxyLoop.get().call(self._l7.close())
            self._l7 = None

    def drain(self) -> list[tuple[str, dict[str, Any]]]:
        with self._events_lock:
            events, self.events = self.events, []
        return events
