"""A cell's network scope: its own network namespace, a veth pair to the host, and an
nftables table that allows exactly the declared egress and drops (and counts) the rest.

Addresses come from a pool (``CELLOS_NETWORK_POOL``, default ``10.213.0.0/16``) carved into
/30s, every one of them used: slot ``n`` is the pool's ``n``-th /30, from 0, so a /n pool
holds 2^(30-n) cells with egress authority at once. Host side ``.1``, cell side ``.2``. A
slot is claimed with an O_EXCL file under the state root, so cells of different supervisors
never collide. Every name is derived from the cell id (netns ``cellos-<id>``, table
``cellos_<id>``) or from its slot (interfaces are limited to 15 characters: ``cvh<slot>`` /
``cvc<slot>``), and the whole scope is recorded in the cell's state record before anything
is created, so a reaper can always remove it.

Rules of the cell's table (family ``inet``, in the host's namespace):

* forward, from the cell: one ``accept`` rule per egress rule (``ip daddr`` + ``dport``), then
  TCP ``reject with tcp reset`` and ``reject`` (ICMP admin-prohibited) for everything else:
  blocked connections fail visibly, and every rule counts.
* forward, to the cell: only replies (``ct state established,related``).
* input, from the cell: only replies; the cell cannot reach the host itself (rejected).
* postrouting: masquerade of the cell's address, so only allowed flows ever leave NATed.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from typing import TYPE_CHECKING, Any

from cellos.core import cidr
from cellos.core.errors import HostError, PolicyRefused
from cellos.core.spec import EgressRule
from cellos.network import nft

if TYPE_CHECKING:
    from cellos.network.rtnl import Rtnl

DEFAULT_POOL = "10.213.0.0/16"
#: IPv6 link addresses (unique local, RFC 4193): slot ``n`` is its ``n``-th /126 (host ``::1``,
#: cell ``::2`` of it), used only by cells with an IPv6 egress rule.
POOL6 = "fd63:656c:6c6f::/64"
FAMILY = "inet"


class AllowRule:
    """One egress rule as the scope enforces it. (Plain classes, not dataclasses: this
    module is imported by every one-shot ``cellos-supervisor`` of a cell with egress
    authority, and generating dataclass methods costs milliseconds there.)"""

    __slots__ = ("addresses", "host", "index", "port", "protocol", "source")

    def __init__(
        self,
        index: int,
        addresses: tuple[str, ...],  # CIDRs (for a host rule: its pinned addresses so far)
        port: int,
        protocol: str,
        source: str,  # "cidr:<x>" or "host:<name>"
        host: str | None = None,
    ) -> None:
        self.index = index
        self.addresses = addresses
        self.port = port
        self.protocol = protocol
        self.source = source
        self.host = host

    @property
    def set_name(self) -> str:
        """Host rules match a set, so the DNS proxy can pin answered addresses at run time."""
        return f"h{self.index}"

    def record(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


class CellNetwork:
    __slots__ = (
        "cell_id",
        "cell_if",
        "cell_ip",
        "cell_ip6",
        "dns_ports",
        "host_if",
        "host_index",
        "host_ip",
        "host_ip6",
        "netns",
        "rules",
        "slot",
        "slot_file",
        "table",
    )

    def __init__(
        self,
        *,
        cell_id: str,
        slot: int,
        netns: str,
        host_if: str,
        cell_if: str,
        host_ip: str,
        cell_ip: str,
        table: str,
        slot_file: str,
        rules: list[AllowRule] | None = None,
        host_ip6: str | None = None,
        cell_ip6: str | None = None,
    ) -> None:
        self.cell_id = cell_id
        self.slot = slot
        self.netns = netns
        self.host_if = host_if
        self.cell_if = cell_if
        self.host_ip = host_ip
        self.cell_ip = cell_ip
        self.table = table
        self.slot_file = slot_file
        self.rules = rules or []
        #: (protocol, port) pairs on which names answered by the cell's DNS proxy are
        #: reachable.
        self.dns_ports: list[tuple[str, int]] = []
        #: IPv6 ends of the link (a /126 of :data:`POOL6`, same slot), only for a cell with
        #: an IPv6 rule; a cell without one has no IPv6 address but the kernel's link-local
        #: one, and no IPv6 route.
        self.host_ip6 = host_ip6
        self.cell_ip6 = cell_ip6
        #: The interface index of the host's end once this process created it (a name can
        #: be another cell's after ours is gone; an index is not reused).
        self.host_index: int | None = None

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.netns}"

    def record(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__slots__}
        data["rules"] = [r.record() for r in self.rules]
        data["dns_ports"] = [list(p) for p in self.dns_ports]
        return data


def _table_name(cell_id: str) -> str:
    return "cellos_" + re.sub(r"[^A-Za-z0-9_]", "_", cell_id)


def parse_pool(pool: str) -> cidr.Network:
    """``CELLOS_NETWORK_POOL``: an IPv4 network of at least one /30 (a /n holds 2^(30-n)
    links, so that many cells with egress authority can run at once)."""
    try:
        network = cidr.parse_network(pool.strip())
    except ValueError as exc:
        raise PolicyRefused("CELLOS_NETWORK_POOL", f"{pool!r} is not a network: {exc}") from None
    if network.version != 4:
        raise PolicyRefused("CELLOS_NETWORK_POOL", "must be an IPv4 network")
    if network.prefixlen > 30:
        raise PolicyRefused(
            "CELLOS_NETWORK_POOL",
            f"{network} is smaller than a /30 (each cell with egress authority needs one /30)",
        )
    return network


def pool_capacity(pool: cidr.Network) -> int:
    """How many /30 links (cells with egress authority at once) the pool holds."""
    return pool.num_addresses // 4


_host_rtnl: Any = None
_host_rtnl_lock = threading.Lock()


def host_rtnl() -> Rtnl:
    """The process's rtnetlink socket in the host's namespace (opened once)."""
    global _host_rtnl
    from cellos.network.rtnl import Rtnl

    with _host_rtnl_lock:
        if _host_rtnl is None:
            _host_rtnl = Rtnl()
        return _host_rtnl  # type: ignore[no-any-return]


def host_link(slot: int) -> str:
    return f"cvh{slot}"


def claim_slot(state_root: str, cell_id: str, pool: cidr.Network) -> tuple[int, str]:
    """Claim a free /30 of the pool (slot ``n`` is its ``n``-th /30, from 0): ``net/slots/<n>``
    is created as a symlink naming the cell, so the claim and its owner appear in one atomic
    step (a reaper can always tell whose a slot is, even if the claim happened just before
    its supervisor died)."""
    slots = os.path.join(state_root, "net", "slots")
    capacity = pool_capacity(pool)
    host = host_rtnl()
    try:
        os.makedirs(slots, mode=0o700, exist_ok=True)
        for slot in range(capacity):
            path = os.path.join(slots, str(slot))
            try:
                os.symlink(cell_id, path)
            except FileExistsError:
                continue
            if host.link_index(host_link(slot)) is not None:
                # The link of a scope the kernel is still freeing (a namespace is freed
                # asynchronously, its veth pair with it), or another state directory's: the
                # slot's name and addresses are not free yet.
                os.unlink(path)
                continue
            return slot, path
    except OSError as exc:
        raise HostError(
            "CELLOS_STATE_DIR", f"cannot claim a network slot in {slots}: {exc.strerror}"
        ) from None
    raise HostError(
        "CELLOS_NETWORK_POOL",
        f"pool exhausted: all {capacity} /30 link(s) of {pool} are in use by running cells "
        "with egress authority (a pool /n holds 2^(30-n); use a larger pool or retry later)",
    )


def resolve_rules(rules: list[EgressRule], *, pin_by_dns: bool = False) -> list[AllowRule]:
    """``host`` rules are resolved by the supervisor before the cell starts; with a DNS
    authority they start empty and are pinned to what the cell's DNS proxy answers."""
    resolved = []
    for index, rule in enumerate(rules):
        if rule.cidr is not None:
            net = cidr.parse_network(rule.cidr)
            resolved.append(
                AllowRule(index, (str(net),), rule.port, rule.protocol, f"cidr:{rule.cidr}")
            )
            continue
        assert rule.host is not None
        if pin_by_dns:
            resolved.append(
                AllowRule(
                    index,
                    (),
                    rule.port,
                    rule.protocol,
                    f"host:{rule.host}",
                    host=rule.host.lower().rstrip("."),
                )
            )
            continue
        try:
            import socket  # only for host rules resolved here

            infos = socket.getaddrinfo(rule.host, rule.port, socket.AF_INET)
        except OSError as exc:
            raise HostError(
                f"spec.authority.egressRules[{index}].host",
                f"cannot resolve {rule.host!r}: {exc.strerror or exc}",
            ) from None
        addresses = tuple(sorted({f"{info[4][0]}/32" for info in infos}))
        resolved.append(
            AllowRule(
                index,
                addresses,
                rule.port,
                rule.protocol,
                f"host:{rule.host}",
                host=rule.host.lower().rstrip("."),
            )
        )
    return resolved


def wants_ipv6(rules: list[AllowRule]) -> bool:
    return any(":" in address for rule in rules for address in rule.addresses)


def plan(
    cell_id: str, rules: list[AllowRule], state_root: str, pool: str = DEFAULT_POOL
) -> CellNetwork:
    network = parse_pool(pool)
    slot, slot_file = claim_slot(state_root, cell_id, network)
    base = slot * 4  # the slot's /30 in the pool, its /126 in POOL6
    pool6 = cidr.parse_network(POOL6)
    v6 = wants_ipv6(rules)
    return CellNetwork(
        cell_id=cell_id,
        slot=slot,
        netns=f"cellos-{cell_id}",
        host_if=host_link(slot),
        cell_if=f"cvc{slot}",
        host_ip=network.address(base + 1),
        cell_ip=network.address(base + 2),
        table=_table_name(cell_id),
        slot_file=slot_file,
        rules=rules,
        host_ip6=pool6.address(base + 1) if v6 else None,
        cell_ip6=pool6.address(base + 2) if v6 else None,
    )


def _addr_match(address: str) -> dict[str, Any]:
    net = cidr.parse_network(address)
    right: Any = (
        net.network_address
        if net.prefixlen == net.max_prefixlen
        else {"prefix": {"addr": net.network_address, "len": net.prefixlen}}
    )
    return nft.match(nft.payload("ip" if net.version == 4 else "ip6", "daddr"), right)


def rule_command(table: str, chain: str, expr: list[Any], comment: str) -> dict[str, Any]:
    return {
        "add": {
            "rule": {
                "family": FAMILY,
                "table": table,
                "chain": chain,
                "comment": comment,
                "expr": expr,
            }
        }
    }


DNS_SET = "dns_allowed"


def _set(table: str, name: str, elements: list[str]) -> dict[str, Any]:
    body: dict[str, Any] = {"family": FAMILY, "table": table, "name": name, "type": "ipv4_addr"}
    if elements:
        body["elem"] = elements
    return {"add": {"set": body}}


def pin(net: CellNetwork, name: str, addresses: list[str]) -> None:
    """Make addresses the cell's DNS proxy answered for ``name`` reachable: into the set of
    the host rules for that name, else into the set of names allowed by the DNS authority."""
    v4 = [a for a in addresses if cidr.parse_address(a)[0] == 4]
    if not v4:
        return
    sets = [r.set_name for r in net.rules if r.host is not None and r.host == name]
    if not sets and net.dns_ports:
        sets = [DNS_SET]
    nft.run(
        [
            {"add": {"element": {"family": FAMILY, "table": net.table, "name": s, "elem": v4}}}
            for s in sets
        ]
    )


def visible_denials(
    table: str, chain: str, from_cell: dict[str, Any], suffix: str
) -> list[dict[str, Any]]:
    """Blocked traffic fails visibly (TCP reset, ICMP admin-prohibited), and is counted."""
    return [
        rule_command(
            table,
            chain,
            [
                from_cell,
                nft.match(nft.meta("l4proto"), "tcp"),
                {"counter": None},
                {"reject": {"type": "tcp reset"}},
            ],
            f"deny tcp{suffix}",
        ),
        rule_command(
            table,
            chain,
            [
                from_cell,
                {"counter": None},
                {"reject": {"type": "icmpx", "expr": "admin-prohibited"}},
            ],
            f"deny other{suffix}",
        ),
    ]


def table_commands(net: CellNetwork) -> list[dict[str, Any]]:
    t = net.table
    cmds: list[dict[str, Any]] = [
        {"add": {"table": {"family": FAMILY, "name": t}}},
        {
            "add": {
                "chain": {
                    "family": FAMILY,
                    "table": t,
                    "name": "forward",
                    "type": "filter",
                    "hook": "forward",
                    "prio": 0,
                    "policy": "accept",
                }
            }
        },
        {
            "add": {
                "chain": {
                    "family": FAMILY,
                    "table": t,
                    "name": "input",
                    "type": "filter",
                    "hook": "input",
                    "prio": 0,
                    "policy": "accept",
                }
            }
        },
        {
            "add": {
                "chain": {
                    "family": FAMILY,
                    "table": t,
                    "name": "postrouting",
                    "type": "nat",
                    "hook": "postrouting",
                    "prio": 100,
                    "policy": "accept",
                }
            }
        },
    ]
    from_cell = nft.match(nft.meta("iifname"), net.host_if)
    to_cell = nft.match(nft.meta("oifname"), net.host_if)
    replies = nft.match({"ct": {"key": "state"}}, ["established", "related"], op="in")
    cmds.append(
        rule_command(t, "forward", [to_cell, replies, {"accept": None}], "replies to the cell")
    )
    cmds.append(
        rule_command(
            t, "forward", [to_cell, {"counter": None}, {"drop": None}], "unsolicited to the cell"
        )
    )
    cmds.append(rule_command(t, "forward", [from_cell, replies, {"accept": None}], "cell replies"))
    for rule in net.rules:
        port = nft.match(nft.payload(rule.protocol, "dport"), rule.port)
        if rule.host is not None:
            # Host rules match a set, so the DNS proxy can pin answered addresses at run time.
            cmds.append(_set(t, rule.set_name, [a.removesuffix("/32") for a in rule.addresses]))
            in_set = nft.match(nft.payload("ip", "daddr"), f"@{rule.set_name}")
            cmds.append(
                rule_command(
                    t,
                    "forward",
                    [from_cell, in_set, port, {"counter": None}, {"accept": None}],
                    f"allow {rule.index} {rule.source} {rule.protocol}/{rule.port}",
                )
            )
            continue
        for address in rule.addresses:
            cmds.append(
                rule_command(
                    t,
                    "forward",
                    [from_cell, _addr_match(address), port, {"counter": None}, {"accept": None}],
                    f"allow {rule.index} {rule.source} {address} {rule.protocol}/{rule.port}",
                )
            )
    if net.dns_ports:
        cmds.append(_set(t, DNS_SET, []))
        in_dns_set = nft.match(nft.payload("ip", "daddr"), f"@{DNS_SET}")
        for protocol, dport in net.dns_ports:
            cmds.append(
                rule_command(
                    t,
                    "forward",
                    [
                        from_cell,
                        in_dns_set,
                        nft.match(nft.payload(protocol, "dport"), dport),
                        {"counter": None},
                        {"accept": None},
                    ],
                    f"allow dns-pinned {protocol}/{dport}",
                )
            )
    cmds += visible_denials(t, "forward", from_cell, "")
    cmds.append(rule_command(t, "input", [from_cell, replies, {"accept": None}], "host replies"))
    if net.cell_ip6 is not None:
        # IPv6 needs neighbour discovery with the host's end (what ARP is to IPv4, which
        # nftables' inet family never sees); nothing else of ICMPv6 reaches the host.
        nd = ["nd-neighbor-solicit", "nd-neighbor-advert"]
        cmds.append(
            rule_command(
                t,
                "input",
                [
                    from_cell,
                    nft.match(nft.payload("icmpv6", "type"), {"set": nd}),
                    {"accept": None},
                ],
                "neighbour discovery",
            )
        )
    cmds += visible_denials(t, "input", from_cell, " to host")
    sources = [("ip", net.cell_ip)] + ([("ip6", net.cell_ip6)] if net.cell_ip6 else [])
    for family, source in sources:
        cmds.append(
            rule_command(
                t,
                "postrouting",
                [
                    nft.match(nft.payload(family, "saddr"), source),
                    nft.match(nft.meta("oifname"), net.host_if, op="!="),
                    {"masquerade": None},
                ],
                "nat out" if family == "ip" else "nat6 out",
            )
        )
    return cmds


def create(net: CellNetwork) -> None:
    """Build the namespace, the veth pair, addresses, routes and the table, in this process
    (rtnetlink and libnftables). The table is in place before the host's end of the link
    comes up: no packet of the cell ever passes unfiltered."""
    from cellos.network import link_release

    try:
        host = host_rtnl()
        ipv6 = net.cell_ip6 is not None
        _build_link(net, ipv6)
        index = host.link_index(net.host_if)
        if index is None:
            raise HostError("network", f"veth {net.host_if} vanished after creation")
        # Known from here on, so that an undo after a later failure deletes this link too.
        net.host_index = index
        _enable_forwarding(ipv6=ipv6)
        nft.run(table_commands(net))
        link_release.prepare(net.host_if, index)
        _ipv6_sysctl(net.host_if, ipv6)
        host.add_address(index, net.host_ip, 30, net.host_if)
        if net.host_ip6 is not None:
            host.add_address(index, net.host_ip6, 126, net.host_if)
        host.set_up(index, net.host_if)
    except HostError:
        raise
    except OSError as exc:
        raise HostError("network", f"cannot create the cell's network scope: {exc}") from None


def _build_link(net: CellNetwork, ipv6: bool) -> None:
    """The cell's namespace and the veth pair, the cell's end configured (the host's end is
    left down)."""
    from cellos.network import rtnl

    host_ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with rtnl.new_netns(net.netns), rtnl.Rtnl() as cell:
            # IPv6 on the cell's link only for a cell with an IPv6 rule (then without
            # router solicitations: its route is static); otherwise not even the
            # kernel's link-local address.
            _ipv6_sysctl("default", ipv6)
            cell.add_veth(net.cell_if, net.host_if, host_ns)
            lo = cell.link_index("lo")
            if lo is not None:
                cell.set_up(lo, "lo")
            index = cell.link_index(net.cell_if)
            if index is None:
                raise HostError("network", f"veth {net.cell_if} vanished after creation")
            cell.add_address(index, net.cell_ip, 30, net.cell_if)
            cell.add_default_route(net.host_ip, index)
            if net.cell_ip6 is not None and net.host_ip6 is not None:
                cell.add_address(index, net.cell_ip6, 126, net.cell_if)
                cell.add_default_route(net.host_ip6, index)
    finally:
        os.close(host_ns)


def _ipv6_sysctl(interface: str, ipv6: bool) -> None:
    """IPv6 of ``interface`` (or ``default``: links created later) in the calling thread's
    namespace: off, or on without router solicitations."""
    from cellos.network.rtnl import write_sysctl

    conf = f"net.ipv6.conf.{interface}."
    try:
        if not ipv6:
            write_sysctl(conf + "disable_ipv6", "1")
            return
        for name, value in (("disable_ipv6", "0"), ("router_solicitations", "0")):
            write_sysctl(conf + name, value)
    except FileNotFoundError:
        if ipv6:
            raise HostError(
                "spec.authority.egressRules", "IPv6 is not available on this host's kernel"
            ) from None
        # No IPv6 in this kernel at all: nothing to turn off.


_forwarding_checked: set[str] = set()


def _enable_forwarding(*, ipv6: bool = False) -> None:
    """Routing between the cells' links and the rest: IPv4 always, IPv6 only once a cell
    has an IPv6 rule (a host that forwards IPv6 stops accepting router advertisements on
    interfaces with ``accept_ra=1``; see docs/network.md)."""
    paths = ["/proc/sys/net/ipv4/ip_forward"]
    if ipv6:
        paths.append("/proc/sys/net/ipv6/conf/all/forwarding")
    for path in paths:
        if path in _forwarding_checked:
            continue
        with open(path, "rb") as fh:
            if fh.read().strip() != b"1":
                with open(path, "wb") as out:
                    out.write(b"1")
        _forwarding_checked.add(path)


def destroy(record: dict[str, Any], *, delete_link: bool = False) -> list[str]:
    """Delete the veth pair, the table and the namespace named in a record, release the
    slot; return what could not be removed.

    The link goes first: once it is gone nothing crosses from the namespace, whatever might
    still hold it, so the table can go next. It is deleted by a short-lived helper
    (:mod:`cellos.network.link_release`), and this returns once the host no longer shows it:
    the kernel's wait for its final free (an RCU barrier, tens of ms) is not the cell's. The
    namespace, unbound and with nothing left in it but loopback, is freed by the kernel later.
    A name can be a later cell's once ours is gone, so only the link this process made (its
    recorded index) is deleted; ``delete_link`` (the reaper, whose cell is dead) deletes
    whatever link has the recorded name, in this thread.
    """
    from cellos.network import link_release, nft_netlink, rtnl

    residue: list[str] = []
    host_if = record.get("host_if")
    if isinstance(host_if, str):
        ours = record.get("host_index")
        try:
            host = host_rtnl()
            found = host.link_index(host_if)
            if found is not None and found == ours and not delete_link:
                link_release.release(host, host_if, found)
            else:
                if isinstance(ours, int):
                    link_release.dismiss(host_if, ours)
                if delete_link and found is not None:
                    host.delete_link(found, host_if)
        except OSError:
            residue.append(f"veth:{host_if}")
    table = record.get("table")
    if isinstance(table, str):
        try:
            nft_netlink.delete_table(FAMILY, table)
        except OSError:
            residue.append(f"nft:{table}")
    name = record.get("netns")
    if isinstance(name, str):
        try:
            rtnl.remove_netns(name)
        except OSError:
            residue.append(f"netns:{name}")
    slot_file = record.get("slot_file")
    if isinstance(slot_file, str):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(slot_file)
    return residue


def flow_decisions(net: CellNetwork) -> list[dict[str, Any]]:
    """nft counters of the cell's table, one entry per counting rule (for events)."""
    from cellos.network import nft_netlink

    return [
        {
            "rule": rule.comment,
            "chain": rule.chain,
            "decision": "allowed" if rule.comment.startswith("allow") else "dropped",
            "packets": rule.packets,
            "bytes": rule.bytes,
        }
        for rule in nft_netlink.rule_counters(FAMILY, net.table)
    ]
