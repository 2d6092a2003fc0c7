"""A cell's egress authority as one piece every enforcing backend opens and closes.

The scope (netns, veth, nft table: :mod:`cellos.network.scope`), the DNS proxy and the L7
check (:mod:`cellos.network.proxies`) and the cell's ``resolv.conf`` are the same whatever
runs inside the namespace (the ``cellos`` launcher, or runsc with its host network inside it),
so the same document means the same network on each backend. Every backend opens it the
same way, :meth:`CellEgress.open`: plan (claims the address slot), hand it to the caller's
live cell (from then on its teardown closes it), record it (the reaper can find all of it),
create it.

Imported only for cells with egress authority; the proxies (asyncio, dnslib: ~25 ms of
imports) only for cells that need one (a DNS authority, or names to check on 80/443).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol

from cellos.core.errors import HostError, PolicyRefused
from cellos.core.events import NETWORK_FLOW_DECISION
from cellos.core.spec import L7_PORTS, CellSpec
from cellos.hosts.state import CellState
from cellos.network import scope

if TYPE_CHECKING:
    from cellos.network.cell_ca import CellCA
    from cellos.network.proxies import CellProxies

#: The key of the cell's state record that names its scope.
RECORD_KEY = "network"


class EgressHolder(Protocol):
    """A backend's live cell, as far as its egress goes."""

    state: CellState
    egress: CellEgress | None


class CellEgress:
    def __init__(self, spec: CellSpec, net: scope.CellNetwork) -> None:
        self.spec = spec
        self.net = net
        self.proxies: CellProxies | None = None
        #: The cell's resolver configuration (its own DNS proxy), when it has DNS authority.
        self.resolv_conf: str | None = None

    @classmethod
    def plan(cls, spec: CellSpec, state_root: str, pool: str | None) -> CellEgress:
        """Resolve the rules and claim an address slot; nothing exists on the host yet."""
        if os.geteuid() != 0:
            raise PolicyRefused(
                "spec.authority.egressRules",
                "network authority needs root on this host (netns, veth, nft)",
            )
        _refuse_unchecked_ipv6(spec)
        dns = spec.authority.dns_authority
        rules = scope.resolve_rules(list(spec.authority.egress_rules), pin_by_dns=dns is not None)
        net = scope.plan(spec.id, rules, state_root, pool or scope.DEFAULT_POOL)
        if dns is not None:
            net.dns_ports = sorted({(r.protocol, r.port) for r in spec.authority.egress_rules})
        return cls(spec, net)

    @classmethod
    def open(
        cls,
        spec: CellSpec,
        live: EgressHolder,
        state_root: str,
        pool: str | None,
        *,
        injection_ca: CellCA | None = None,
        upstream_ca_file: str | None = None,
    ) -> CellEgress:
        """Plan; hand to ``live`` (its teardown closes whatever exists if a later step
        fails); record in its state; create (see :meth:`create`)."""
        egress = cls.plan(spec, state_root, pool)
        live.egress = egress
        egress.record_in(live.state)
        egress.create(
            live.state.path("resolv.conf"),
            injection_ca=injection_ca,
            upstream_ca_file=upstream_ca_file,
        )
        return egress

    @property
    def netns_path(self) -> str:
        return self.net.netns_path

    def record_in(self, state: CellState) -> None:
        """Name the whole scope in the cell's state record before any of it exists."""
        state.record[RECORD_KEY] = self.net.record()
        try:
            state.save()
        except OSError as exc:
            raise HostError(
                "CELLOS_STATE_DIR", f"cannot record the cell's network: {exc.strerror}"
            ) from None

    def create(
        self,
        resolv_conf_path: str,
        *,
        injection_ca: CellCA | None = None,
        upstream_ca_file: str | None = None,
    ) -> None:
        """Namespace, veth, table, then the proxies; ``resolv_conf_path`` is written when the
        cell has DNS authority (the cell then asks its own proxy, nobody else). With
        ``injection_ca`` the L7 proxy terminates TLS for the cell's secretInjection hosts and
        verifies their real certificates (against ``upstream_ca_file``, else the host's store).
        """
        scope.create(self.net)
        dns = self.spec.authority.dns_authority
        if dns is not None:
            with open(resolv_conf_path, "w", encoding="utf-8") as fh:
                fh.write("nameserver 127.0.0.1\noptions timeout:2 attempts:2\n")
            self.resolv_conf = resolv_conf_path
        # Ports 80/443 are checked at L7 against the names the cell may reach.
        names = sorted(
            {r.host for r in self.net.rules if r.host} | set(dns.hostname_allowlist if dns else [])
        )
        l7_ports = sorted(
            {r.port for r in self.spec.authority.egress_rules if r.protocol == "tcp"}
            & set(L7_PORTS)
        )
        if dns is None and not (names and l7_ports):
            return  # nothing to proxy: no event loop, no asyncio import
        from cellos.network.proxies import CellProxies

        self.proxies = CellProxies(
            self.net,
            dns,
            l7_names=names,
            l7_ports=l7_ports,
            injection_ca=injection_ca,
            upstream_ca_file=upstream_ca_file,
        )
        self.proxies.start()

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """The proxies' decisions (DNS, L7) in order, then one ``network_flow_decision`` per
        counting nftables rule of the cell."""
        found = self.proxies.drain() if self.proxies is not None else []
        found += [(NETWORK_FLOW_DECISION, d) for d in scope.flow_decisions(self.net)]
        return found

    def close(self) -> list[str]:
        """Stop the proxies and remove the scope; what could not be removed."""
        if self.proxies is not None:
            self.proxies.stop()
            self.proxies = None
        return scope.destroy(self.net.record())


def _refuse_unchecked_ipv6(spec: CellSpec) -> None:
    """The SNI/Host check redirects IPv4 only: an IPv6 rule on a port it checks, in a cell
    that has names to check, would let IPv6 connections past the check. Refused (before
    anything is resolved or claimed), not ignored."""
    rules = spec.authority.egress_rules
    dns = spec.authority.dns_authority
    if not (any(r.host for r in rules) or (dns is not None and dns.hostname_allowlist)):
        return
    for index, rule in enumerate(rules):
        if (
            rule.cidr is not None
            and ":" in rule.cidr
            and rule.protocol == "tcp"
            and rule.port in L7_PORTS
        ):
            raise PolicyRefused(
                f"spec.authority.egressRules[{index}].cidr",
                f"an IPv6 rule on tcp/{rule.port} cannot be combined with names checked at L7 "
                "(SNI/Host: host rules or dnsAuthority.hostnameAllowlist) in this build; the "
                "check sees IPv4 only",
            )


def reap_recorded(record: dict[str, Any]) -> tuple[list[str], list[str]]:
    """A dead cell's scope, as its state record names it: (removed, residue)."""
    network = record.get(RECORD_KEY)
    if not isinstance(network, dict):
        return [], []
    left = scope.destroy(network, delete_link=True)
    return ([] if left else [f"network:{network.get('netns')}"]), left
