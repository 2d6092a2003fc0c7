"""A microVM guest's link into its cell's network scope: a tap device inside the cell's
network namespace, whose file descriptor the VMM is given.

The scope itself (namespace, veth pair, the cell's nft table in the host's namespace, the
DNS and L7 proxies) is :class:`cellos.network.cell_egress.CellEgress`, exactly as for the
``cellos`` and ``gvisor`` backends. This module only adds the guest's end of it:

* ``/dev/net/tun`` is opened, and ``TUNSETIFF`` issued, by a throwaway thread that joined the
  cell's namespace: the tap (``cvt<slot>``) is created there, and the descriptor stays bound
  to it whatever namespace its holder is in. So the VMM itself runs in the host's namespace
  (no ``setns`` in QEMU, no namespace of its own) while every frame of the guest enters the
  cell's namespace. The descriptor holds the namespace alive (the tun socket keeps a
  reference), and the tap is not persistent: it disappears with the last descriptor (the
  VMM's and ours), or with the namespace when a reaper kills the VMM.
* The guest gets a link-local /30 of its own on the tap (:data:`GUEST_IP`; gateway
  :data:`GATEWAY_IP`, the namespace's end) and the namespace **masquerades** what the guest
  sends out of the veth as the cell's address. Why NAT and not the cell's address on the
  guest: the cell's own proxies (the DNS proxy's upstream queries, the L7 proxy's upstream
  connections) also live in that namespace and must leave with the cell's address through
  the same table. With one source address for both, the host-side table (its per-rule
  counters, the DNS-pinned sets, the rejects, the masquerade out) applies to the guest
  unchanged, and so do the flow-decision events.
* A small table in the cell's namespace (``inet cellos_guest``) does what the ``cellos``
  backend's cell gets from sharing the namespace: DNS to the gateway goes to the DNS proxy
  (``127.0.0.1:53``, hence ``route_localnet`` on the tap), TCP to the L7-checked ports goes to
  the SNI/Host proxy (DNAT keeps the original destination, which the proxy reads with
  ``SO_ORIGINAL_DST`` as it does after the ``cellos`` cell's ``redirect``), and nothing else
  of the guest reaches the namespace itself (rejected visibly); nothing unsolicited reaches
  the guest.

The table and the tap exist before the VMM starts: no frame of the guest ever passes
unfiltered. A cell with an IPv6 rule (the scope then has an IPv6 link) gives its guest an
IPv6 /126 of its own too (:data:`GUEST_IP6`), masqueraded the same way as the cell's IPv6
address; a cell without one has no IPv6 on the tap at all (the namespace's default, set by
the scope), as on the cell's own link.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from typing import TYPE_CHECKING, Any

from cellos.core.errors import HostError
from cellos.network import nft, scope

if TYPE_CHECKING:
    from cellos.network.cell_egress import CellEgress

#: The guest's link: a /30 of the IPv4 link-local range, the same in every cell's namespace
#: (each namespace is its own world; the cell's traffic leaves NATed as the cell's address).
GATEWAY_IP = "169.254.213.1"
GUEST_IP = "169.254.213.2"
PREFIX = 30
#: Its IPv6 link (cells with an IPv6 rule only): a unique-local /126 outside the scope's pool.
GATEWAY_IP6 = "fd63:656c:6c6f:1::1"
GUEST_IP6 = "fd63:656c:6c6f:1::2"
PREFIX6 = 126
#: The guest's MAC (alone on its tap: it needs no uniqueness beyond that).
GUEST_MAC = "52:54:00:ce:11:05"
TABLE = "cellos_guest"

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000


def tap_name(slot: int) -> str:
    return f"cvt{slot}"


class GuestLink:
    """The open tap of one guest (its descriptor is handed to the VMM) and what the guest
    configures on its side (``request`` travels in the guest's request)."""

    def __init__(self, fd: int, name: str, nameserver: str | None, *, ipv6: bool) -> None:
        self.fd = fd
        self.name = name
        self.nameserver = nameserver
        self.ipv6 = ipv6
        self.mac = GUEST_MAC

    def request(self) -> dict[str, str]:
        """The guest init's ``cellos.net`` object: its address, gateway and resolver."""
        found = {"address": f"{GUEST_IP}/{PREFIX}", "gateway": GATEWAY_IP}
        if self.ipv6:
            found["address6"] = f"{GUEST_IP6}/{PREFIX6}"
            found["gateway6"] = GATEWAY_IP6
        if self.nameserver is not None:
            found["nameserver"] = self.nameserver
        return found

    def close(self) -> None:
        """Our copy of the descriptor (the VMM's dies with it); the tap goes with the last."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def open_link(egress: CellEgress) -> GuestLink:
    """The tap in the cell's namespace, its address, the namespace's table for the guest;
    after ``egress.create`` (the scope and its proxies exist). Nothing is left on failure
    that the scope's own teardown does not remove (the table and the tap live in its
    namespace)."""
    from cellos.network import rtnl

    net = egress.net
    name = tap_name(net.slot)
    dns = egress.proxies is not None and egress.proxies.dns_active
    l7_ports = egress.proxies.l7_active_ports if egress.proxies is not None else []
    ipv6 = net.cell_ip6 is not None

    def inside() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            ifr = struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI)
            fcntl.ioctl(fd, _TUNSETIFF, ifr)
            # Routing between the tap and the veth, and DNAT to the proxies on loopback:
            # both per namespace, so they change nothing outside the cell's.
            rtnl.write_sysctl("net.ipv4.ip_forward", "1")
            rtnl.write_sysctl(f"net.ipv4.conf.{name}.route_localnet", "1")
            if ipv6:
                rtnl.write_sysctl("net.ipv6.conf.all.forwarding", "1")
            with rtnl.Rtnl() as cell:
                index = cell.link_index(name)
                if index is None:
                    raise HostError("network", f"tap {name} vanished after creation")
                cell.add_address(index, GATEWAY_IP, PREFIX, name)
                if ipv6:
                    cell.add_address(index, GATEWAY_IP6, PREFIX6, name)
                cell.set_up(index, name)
        except BaseException:
            os.close(fd)
            raise
        return fd

    try:
        fd = rtnl.in_netns(net.netns_path, inside)
    except HostError:
        raise
    except OSError as exc:
        raise HostError("network", f"cannot create the guest's tap device: {exc}") from None
    link = GuestLink(fd, name, GATEWAY_IP if dns else None, ipv6=ipv6)
    try:
        commands = table_commands(name, net.cell_if, dns=dns, l7_ports=l7_ports, ipv6=ipv6)
        nft.run(commands, netns=net.netns_path)
    except BaseException:
        link.close()
        raise
    return link


def table_commands(
    tap: str, cell_if: str, *, dns: bool, l7_ports: list[int], ipv6: bool = False
) -> list[dict[str, Any]]:
    """The namespace's table for its guest (see the module docstring)."""
    t = TABLE

    def chain(name: str, kind: str, prio: int) -> dict[str, Any]:
        body = {"family": scope.FAMILY, "table": t, "name": name, "type": kind, "hook": name}
        return {"add": {"chain": {**body, "prio": prio, "policy": "accept"}}}

    from_guest = nft.match(nft.meta("iifname"), tap)
    to_guest = nft.match(nft.meta("oifname"), tap)
    replies = nft.match({"ct": {"key": "state"}}, ["established", "related"], op="in")
    cmds: list[dict[str, Any]] = [
        {"add": {"table": {"family": scope.FAMILY, "name": t}}},
        chain("prerouting", "nat", -100),
        chain("input", "filter", 0),
        chain("forward", "filter", 0),
        chain("postrouting", "nat", 100),
    ]
    if dns:
        from cellos.network.proxies import DNS_LISTEN

        to_gateway = nft.match(nft.payload("ip", "daddr"), GATEWAY_IP)
        for protocol in ("udp", "tcp"):
            cmds.append(
                scope.rule_command(
                    t,
                    "prerouting",
                    [
                        from_guest,
                        to_gateway,
                        nft.match(nft.payload(protocol, "dport"), 53),
                        {"dnat": {"family": "ip", "addr": DNS_LISTEN[0], "port": DNS_LISTEN[1]}},
                    ],
                    f"guest dns {protocol}",
                )
            )
    if l7_ports:
        from cellos.network.proxies import L7_LISTEN

        cmds.append(
            scope.rule_command(
                t,
                "prerouting",
                [
                    from_guest,
                    nft.match(nft.payload("tcp", "dport"), {"set": sorted(l7_ports)}),
                    {"dnat": {"family": "ip", "addr": L7_LISTEN[0], "port": L7_LISTEN[1]}},
                ],
                "guest l7 check",
            )
        )
    dnat = nft.match({"ct": {"key": "status"}}, "dnat", op="in")
    cmds += [
        scope.rule_command(t, "input", [from_guest, replies, {"accept": None}], "replies"),
        scope.rule_command(t, "input", [from_guest, dnat, {"accept": None}], "to the proxies"),
    ]
    if ipv6:
        # Neighbour discovery with the gateway (what ARP is to IPv4), as on the cell's link.
        nd = ["nd-neighbor-solicit", "nd-neighbor-advert"]
        cmds.append(
            scope.rule_command(
                t,
                "input",
                [
                    from_guest,
                    nft.match(nft.payload("icmpv6", "type"), {"set": nd}),
                    {"accept": None},
                ],
                "neighbour discovery",
            )
        )
    cmds += [
        *scope.visible_denials(t, "input", from_guest, " to the namespace"),
        scope.rule_command(
            t,
            "forward",
            [from_guest, nft.match(nft.meta("oifname"), cell_if), {"accept": None}],
            "out through the cell's table",
        ),
        scope.rule_command(t, "forward", [to_guest, replies, {"accept": None}], "replies in"),
        scope.rule_command(t, "forward", [to_guest, {"drop": None}], "unsolicited to the guest"),
        *scope.visible_denials(t, "forward", from_guest, " elsewhere"),
    ]
    # iifname is unknown in postrouting: the guest's source address selects its packets.
    sources = [("ip", GUEST_IP)] + ([("ip6", GUEST_IP6)] if ipv6 else [])
    for family, source in sources:
        cmds.append(
            scope.rule_command(
                t,
                "postrouting",
                [
                    nft.match(nft.payload(family, "saddr"), source),
                    nft.match(nft.meta("oifname"), cell_if),
                    {"masquerade": None},
                ],
                "as the cell's address" if family == "ip" else "as the cell's IPv6 address",
            )
        )
    return cmds
