"""The counters and table deletion of ``cellos.network.nft_netlink`` (raw nf_tables netlink)
against what the ``nft`` tool itself reports, on a real table of the host."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator

import pytest

from cellos.network import nft, nft_netlink
from tests.test_network import _ready

PORT = 9  # discard: nothing listens; a datagram to it on loopback is only counted


@pytest.fixture
def table() -> Iterator[str]:
    """An ``inet`` table with a base chain on output: two counting rules with comments (one
    on loopback UDP to PORT, one that never matches), one rule without a counter."""
    _ready()
    name = f"cellos_nltest_{os.getpid()}"
    chain = {"family": "inet", "table": name, "name": "out"}
    rule = {"family": "inet", "table": name, "chain": "out"}
    lo_udp = [
        nft.match(nft.meta("oifname"), "lo"),
        nft.match(nft.meta("l4proto"), "udp"),
        nft.match(nft.payload("udp", "dport"), PORT),
    ]
    nft.run(
        [
            {"add": {"table": {"family": "inet", "name": name}}},
            {
                "add": {
                    "chain": {
                        **chain,
                        "type": "filter",
                        "hook": "output",
                        "prio": 0,
                        "policy": "accept",
                    }
                }
            },
            {"add": {"rule": {**rule, "expr": [*lo_udp, {"counter": None}], "comment": "seen"}}},
            {"add": {"rule": {**rule, "expr": [*lo_udp, {"accept": None}]}}},
            {
                "add": {
                    "rule": {
                        **rule,
                        "expr": [nft.match(nft.meta("oifname"), "none0"), {"counter": None}],
                        "comment": "never",
                    }
                }
            },
        ]
    )
    try:
        yield name
    finally:
        subprocess.run(["nft", "delete", "table", "inet", name], capture_output=True)


def _nft_tool_counters(name: str) -> list[tuple[str, str, int, int]]:
    listing = subprocess.run(
        ["nft", "-j", "list", "table", "inet", name], capture_output=True, text=True, check=True
    ).stdout
    found = []
    for item in json.loads(listing)["nftables"]:
        rule = item.get("rule")
        if not rule:
            continue
        counters = [e["counter"] for e in rule["expr"] if isinstance(e, dict) and "counter" in e]
        for counter in counters:
            found.append(
                (rule["chain"], rule.get("comment", ""), counter["packets"], counter["bytes"])
            )
    return found


def test_counters_are_what_nft_reports(table: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for payload in (b"a", b"bb", b"ccc"):
            sock.sendto(payload, ("127.0.0.1", PORT))
    ours = [
        (c.chain, c.comment, c.packets, c.bytes) for c in nft_netlink.rule_counters("inet", table)
    ]
    assert ours == _nft_tool_counters(table)
    seen = ours[0]
    assert seen[:3] == ("out", "seen", 3) and seen[3] > 0
    assert ours[1][1:3] == ("never", 0)


def test_a_table_that_does_not_exist_has_no_counters_and_is_not_deleted(table: str) -> None:
    assert nft_netlink.rule_counters("inet", table + "_missing") == []
    assert nft_netlink.delete_table("inet", table + "_missing") is False


def test_deleting_removes_the_table_once(table: str) -> None:
    assert nft_netlink.delete_table("inet", table) is True
    listed = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert f"inet {table}" not in listed
    assert nft_netlink.delete_table("inet", table) is False
