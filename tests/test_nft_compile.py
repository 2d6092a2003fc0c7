"""``cellos.network.nft`` compiles nftables commands into nf_tables netlink itself. These tests
prove that it compiles what ``nft`` compiles: the same commands are applied once by the
``nft`` tool and once by ``nft.run``, each in a network namespace of its own, and the
kernel's rules are listed back instruction by instruction (``nft --debug=netlink``) and as
``nft -j`` sees them. Every table CellOS writes is covered: the cell's host table (IPv4 and
IPv6 rules, byte-aligned and other prefixes, host rules with pinned sets, DNS ports), the
microVM guest's table and the L7 redirect."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from cellos.core.errors import HostError
from cellos.network import guest_link, nft, nft_netlink, proxies, scope
from cellos.network.netlink import attr_list
from tests.test_network import _ready


def _ip_netns(*args: str) -> None:
    subprocess.run(["ip", "netns", *args], check=True, capture_output=True)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    """Two empty network namespaces: one for ``nft``, one for the compiler."""
    _ready()
    names = (f"nftc-tool-{os.getpid()}", f"nftc-ours-{os.getpid()}")
    for name in names:
        _ip_netns("add", name)
    try:
        yield names
    finally:
        for name in names:
            _ip_netns("delete", name)


def _nft(netns: str, *args: str, stdin: str | None = None) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, "nft", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def _instructions(netns: str) -> str:
    """The kernel's rules and set elements, without handles; a set's elements sorted (a
    hash set lists them in an order of its own)."""
    listing = _nft(netns, "--debug=netlink", "list", "ruleset")
    listing = listing[: listing.find("\ntable ")]  # the instructions, not the text form
    listing = re.sub(r"^(\S+ \S+ \S+)( \d+)+$", r"\1", listing, flags=re.M)
    listing = re.sub(r"__set\d+", "__set", listing)
    blocks = re.split(r"\n(?=\S)", listing)
    return "\n".join(
        "\n".join([b.splitlines()[0], *sorted(b.splitlines()[1:])]) if "@" in b else b
        for b in blocks
    )


def _as_nft_sees_it(netns: str) -> Any:
    listing = json.loads(_nft(netns, "-j", "list", "ruleset"))["nftables"]
    for item in listing:
        for body in item.values():
            if isinstance(body, dict):
                body.pop("handle", None)
    return listing


def _same_as_nft(namespaces: tuple[str, str], *batches: list[dict[str, Any]]) -> None:
    tool, ours = namespaces
    for commands in batches:
        _nft(tool, "-j", "-f", "-", stdin=json.dumps({"nftables": commands}))
        nft.run(commands, netns=f"/run/netns/{ours}")
    assert _instructions(ours) == _instructions(tool)
    assert _as_nft_sees_it(ours) == _as_nft_sees_it(tool)


def _cell(rules: list[scope.AllowRule], ipv6: bool = True) -> scope.CellNetwork:
    net = scope.CellNetwork(
        cell_id="c1",
        slot=7,
        netns="cellos-c1",
        host_if="cvh7",
        cell_if="cvc7",
        host_ip="10.99.0.29",
        cell_ip="10.99.0.30",
        table="cellos_c1",
        slot_file="/unused",
        rules=rules,
        host_ip6="fd00::1d" if ipv6 else None,
        cell_ip6="fd00::1e" if ipv6 else None,
    )
    net.dns_ports = [("udp", 53), ("tcp", 53)]
    return net


CIDRS = [
    "192.0.2.0/24",
    "203.0.113.7/32",
    "10.0.0.0/20",
    "0.0.0.0/0",
    "128.0.0.0/1",
    "2001:db8::/32",
    "2001:db8::/33",
    "2001:db8::1/128",
    "::/0",
]


def test_the_cell_table_compiles_as_nft_compiles_it(namespaces: tuple[str, str]) -> None:
    rules = [
        scope.AllowRule(i, (cidr,), 443 + i, "tcp" if i % 2 else "udp", f"cidr:{cidr}")
        for i, cidr in enumerate(CIDRS)
    ]
    rules += [
        scope.AllowRule(9, ("198.51.100.1/32", "198.51.100.2/32"), 8443, "tcp", "host:a", "a"),
        scope.AllowRule(10, (), 53, "udp", "host:b", "b"),
    ]
    net = _cell(rules)
    pin = {"add": {"element": {"family": "inet", "table": net.table, "name": "h10"}}}
    pin["add"]["element"]["elem"] = ["192.0.2.9", "192.0.2.10"]
    _same_as_nft(namespaces, scope.table_commands(net), [pin])


def test_an_ipv4_only_cell_table_compiles_as_nft_compiles_it(
    namespaces: tuple[str, str],
) -> None:
    rules = [scope.AllowRule(0, ("192.0.2.0/24",), 443, "tcp", "cidr:192.0.2.0/24")]
    net = _cell(rules, ipv6=False)
    net.dns_ports = []
    _same_as_nft(namespaces, scope.table_commands(net))


def test_the_guest_and_redirect_tables_compile_as_nft_compiles_them(
    namespaces: tuple[str, str],
) -> None:
    guest = guest_link.table_commands("tap0", "cvc7", dns=True, l7_ports=[443, 8443], ipv6=True)
    _same_as_nft(namespaces, guest, proxies._redirect_commands([443, 8443]))


def test_a_failing_batch_applies_nothing_and_names_the_command(
    namespaces: tuple[str, str],
) -> None:
    """One transaction: a rule for a chain that does not exist fails the whole batch (the
    table is not left behind), and the error names the rule."""
    _, ours = namespaces
    commands = [
        {"add": {"table": {"family": "inet", "name": "t"}}},
        {
            "add": {
                "rule": {
                    "family": "inet",
                    "table": "t",
                    "chain": "missing",
                    "expr": [{"accept": None}],
                    "comment": "lost",
                }
            }
        },
    ]
    with pytest.raises(HostError) as caught:
        nft.run(commands, netns=f"/run/netns/{ours}")
    assert str(caught.value) == (
        "nftables: cannot add rule inet t missing (lost): No such file or directory"
    )
    assert _as_nft_sees_it(ours) == [{"metainfo": _as_nft_sees_it(ours)[0]["metainfo"]}]


def test_a_host_rule_with_the_longest_name_compiles_to_a_comment_the_kernel_keeps(
    namespaces: tuple[str, str],
) -> None:
    """A host rule's label carries its name (up to 253 characters): its comment is cut to
    the kernel's 256 bytes of user data, not an error (libnftables aborted the whole
    process on it)."""
    name = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert len(name) == 253
    net = _cell([scope.AllowRule(0, ("192.0.2.1/32",), 443, "tcp", f"host:{name}", name)])
    rules = [m for m in nft.compile_commands(scope.table_commands(net)) if m.kind & 0xFF == 6]
    comments = [nft_netlink._comment(dict(attr_list(m.body))[7]) for m in rules]
    long = comments[3]
    assert long.startswith(f"allow 0 host:{name[:200]}") and len(long.encode()) == 253
    assert comments[:3] == ["replies to the cell", "unsolicited to the cell", "cell replies"]
    nft.run(scope.table_commands(net), netns=f"/run/netns/{namespaces[1]}")
    kept = [i["rule"].get("comment") for i in _as_nft_sees_it(namespaces[1]) if "rule" in i]
    assert long in kept


@pytest.mark.parametrize(
    "command",
    [
        {"delete": {"table": {"family": "inet", "name": "t"}}},
        {"add": {"map": {"family": "inet", "table": "t", "name": "m"}}},
        {"add": {"rule": {"family": "inet", "table": "t", "chain": "c", "expr": [{"log": {}}]}}},
        {
            "add": {
                "rule": {
                    "family": "inet",
                    "table": "t",
                    "chain": "c",
                    "expr": [nft.match(nft.payload("tcp", "sport"), 1)],
                }
            }
        },
        {
            "add": {
                "rule": {
                    "family": "inet",
                    "table": "t",
                    "chain": "c",
                    "expr": [nft.match(nft.meta("oifname"), "x", op="<")],
                }
            }
        },
    ],
)
def test_what_the_compiler_does_not_know_is_refused(command: dict[str, Any]) -> None:
    """Never a silently different rule: an unknown command, statement, field or operator is
    an error before anything is sent."""
    with pytest.raises(ValueError, match=r"^nft: unsupported"):
        nft.compile_commands([command])
