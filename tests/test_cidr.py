"""cellos.core.cidr against the standard library's ipaddress: same acceptance, same values,
same text; and the cold egress path (validating a CIDR rule, the network scope's planning)
no longer imports ipaddress."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellos.core import cidr
from cellos.core.errors import InvalidSpec, PolicyRefused
from cellos.core.loading import validate_document
from cellos.core.spec import EgressRule
from cellos.network import nft, scope
from tests.conftest import doc
from tests.test_cold_start import _python

#: Newer Pythons' ipaddress prints an IPv4-mapped IPv6 address dotted (``::ffff:1.2.3.4``);
#: 3.11's, which cidr follows, does not (``::ffff:102:304``). Only then is the text compared.
MAPPED_DOTTED = "." in str(ipaddress.IPv6Address("::ffff:1.2.3.4"))

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _reference(text: str, strict: bool) -> IPNetwork | None:
    try:
        return ipaddress.ip_network(text, strict=strict)
    except ValueError:
        return None


def _ours(text: str, strict: bool) -> cidr.Network | None:
    try:
        return cidr.parse_network(text, strict=strict)
    except ValueError:
        return None


def _same_text_expected(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return not (
        MAPPED_DOTTED and isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped
    )


def _stricter_on_purpose(text: str) -> bool:
    """What ipaddress accepts and cidr refuses by design: a zone id, a netmask/hostmask."""
    return "%" in text or "." in text.partition("/")[2]


def assert_agree(text: str) -> None:
    """cidr and ipaddress accept and refuse ``text`` alike (strict and not), and agree on
    what it means and how it prints."""
    for strict in (True, False):
        ref, ours = _reference(text, strict), _ours(text, strict)
        if ref is not None and ours is None and _stricter_on_purpose(text):
            continue
        assert (ref is None) == (ours is None), (text, strict, ref, ours)
        if ref is None or ours is None:
            continue
        assert ours.version == ref.version
        assert ours.prefixlen == ref.prefixlen
        assert ours.max_prefixlen == ref.max_prefixlen
        assert ours.num_addresses == ref.num_addresses
        assert ours.value == int(ref.network_address)
        if _same_text_expected(ref.network_address):
            assert str(ours) == str(ref), (text, strict)
            assert ours.network_address == str(ref.network_address)


# -- generated text forms ----------------------------------------------------------------------

#: IPv6 groups, biased towards zero runs (compression) and the mapped prefix.
_GROUP = st.one_of(st.just(0), st.just(0), st.just(0xFFFF), st.integers(0, 0xFFFF))


def _hex_group(draw: st.DrawFn, group: int) -> str:
    text = f"{group:x}"
    text = "0" * draw(st.integers(0, 4 - len(text))) + text  # leading zeros: allowed
    return text.upper() if draw(st.booleans()) else text


def _ipv4_text(value: int) -> str:
    return ".".join(str((value >> shift) & 255) for shift in (24, 16, 8, 0))


@st.composite
def ipv6_addresses(draw: st.DrawFn) -> tuple[int, str]:
    """An IPv6 address and one of its valid text forms: any zero run (or none) compressed,
    groups padded or not, either case, the last 32 bits dotted or not."""
    groups = draw(st.lists(_GROUP, min_size=8, max_size=8))
    if draw(st.integers(0, 4)) == 0:
        groups[:6] = [0, 0, 0, 0, 0, 0xFFFF]  # IPv4-mapped
    value = int.from_bytes(b"".join(g.to_bytes(2, "big") for g in groups), "big")
    dotted = draw(st.booleans())
    hex_count = 6 if dotted else 8
    parts = [_hex_group(draw, g) for g in groups[:hex_count]]
    if dotted:
        parts.append(_ipv4_text(value & 0xFFFFFFFF))
    runs = [
        (start, end)
        for start in range(hex_count)
        for end in range(start + 1, hex_count + 1)
        if not any(groups[start:end])
    ]
    compress = draw(st.booleans())
    if runs and compress:
        start, end = draw(st.sampled_from(runs))
        text = ":".join(parts[:start]) + "::" + ":".join(parts[end:])
    else:
        text = ":".join(parts)
    return value, text


@st.composite
def ipv4_addresses(draw: st.DrawFn) -> tuple[int, str]:
    value = draw(st.integers(0, 2**32 - 1) | st.sampled_from([0, 2**32 - 1, 0x0A000000]))
    return value, _ipv4_text(value)


@st.composite
def networks(draw: st.DrawFn) -> str:
    """``address[/prefix]`` text, host bits set or not, the prefix sometimes zero-padded."""
    version = draw(st.sampled_from([4, 6]))
    bits = 32 if version == 4 else 128
    value, text = draw(ipv4_addresses() if version == 4 else ipv6_addresses())
    if draw(st.integers(0, 5)) == 0:
        return text
    prefix = draw(st.integers(0, bits))
    if draw(st.booleans()):  # a network address: no host bits
        host = value & ((1 << (bits - prefix)) - 1)
        value -= host
        text = _ipv4_text(value) if version == 4 else str(ipaddress.IPv6Address(value))
    return f"{text}/{'0' * draw(st.integers(0, 2))}{prefix}"


@settings(max_examples=1500, deadline=None)
@given(networks())
def test_networks_agree_with_ipaddress(text: str) -> None:
    assert_agree(text)


@settings(max_examples=1000, deadline=None)
@given(ipv4_addresses() | ipv6_addresses())
def test_addresses_agree_with_ipaddress(case: tuple[int, str]) -> None:
    value, text = case
    ref = ipaddress.ip_address(text)
    version, parsed = cidr.parse_address(text)
    assert (version, parsed) == (ref.version, int(ref)) and parsed == value
    if _same_text_expected(ref):
        assert cidr.format_address(version, parsed) == str(ref)


@settings(max_examples=1000, deadline=None)
@given(st.lists(_GROUP, min_size=8, max_size=8))
def test_ipv6_text_is_rfc5952_as_ipaddress_prints_it(groups: list[int]) -> None:
    """Longest run of two or more zero groups compressed, the first on a tie, lower case."""
    value = int.from_bytes(b"".join(g.to_bytes(2, "big") for g in groups), "big")
    ref = ipaddress.IPv6Address(value)
    if _same_text_expected(ref):
        assert cidr.format_address(6, value) == str(ref)


#: Mostly the characters of addresses: the fuzz finds near-misses of valid text.
_FUZZ = st.text(
    st.sampled_from("0123456789abcdefABCDEF:./") | st.sampled_from(" %+-_x\x00\u0661\udc80"),
    max_size=48,
)


@st.composite
def near_misses(draw: st.DrawFn) -> str:
    """A valid network's text with a few characters inserted, deleted or replaced."""
    text = draw(networks())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        edit = draw(st.sampled_from(["insert", "delete", "replace"]))
        char = draw(st.sampled_from("0123456789aAfF:./ %+-\x00\u0661"))
        if edit == "insert":
            text = text[:at] + char + text[at:]
        else:
            text = text[:at] + (char if edit == "replace" else "") + text[at + 1 :]
    return text


@settings(max_examples=3000, deadline=None)
@given(_FUZZ | near_misses())
def test_arbitrary_text_is_refused_and_accepted_alike(text: str) -> None:
    assert_agree(text)


@settings(max_examples=500, deadline=None)
@given(networks(), st.data())
def test_nth_address_is_ipaddress_arithmetic(text: str, data: st.DataObject) -> None:
    net = cidr.parse_network(text, strict=False)
    ref = ipaddress.ip_network(text, strict=False)
    offset = data.draw(st.integers(0, min(net.num_addresses - 1, 2**70)))
    if _same_text_expected(ref.network_address):
        assert net.address(offset) == str(ref.network_address + offset)
    with pytest.raises(ValueError, match="has no address number"):
        net.address(net.num_addresses)


# -- hand-picked -------------------------------------------------------------------------------

BOTH_REFUSE = [
    ("1.2.3.4/33", "not a prefix length"),
    ("::1/129", "not a prefix length"),
    ("1.2.3.4/-1", "not a prefix length"),
    ("1.2.3.4/ 8", "not a prefix length"),
    ("1.2.3.4/8 ", "not a prefix length"),
    ("1.2.3.4/+8", "not a prefix length"),
    ("1.2.3.4/", "not a prefix length"),
    ("1.2.3.4/8/8", "not a prefix length"),
    ("1.2.3.4/\u0668", "not a prefix length"),  # ARABIC-INDIC DIGIT EIGHT
    ("1.2.3.4/1000000000000000000000000000008", "not a prefix length"),
    ("01.2.3.4/8", "not an IPv4 address"),
    ("1.2.3.04", "not an IPv4 address"),
    ("1.2.3.00", "not an IPv4 address"),
    ("1.2.3/8", "not an IPv4 address"),
    ("1.2.3.4.", "not an IPv4 address"),
    ("256.0.0.0", "not an IPv4 address"),
    ("1.2.3.4 ", "not an IPv4 address"),
    (" 1.2.3.4", "not an IPv4 address"),
    ("1.2.3.\u0664", "not an IPv4 address"),
    ("1.2.3.4\x00", "not an IPv4 address"),
    ("1.2.3.\udc80", "not an IPv4 address"),
    ("0x1.2.3.4", "not an IPv4 address"),
    ("16909060", "not an IPv4 address"),  # inet_aton would take it; inet_pton does not
    ("", "not an IPv4 address"),
    ("/8", "not an IPv4 address"),
    ("fe80::1%eth0/64", "not an IPv6 address"),
    ("1::2:3:4:5:6:7:8", "not an IPv6 address"),
    ("::1:2:3:4:5:6:7:8", "not an IPv6 address"),
    ("1:2:3:4:5:6:7:8:9", "not an IPv6 address"),
    ("1:2:3:4:5:6:7:8::", "not an IPv6 address"),
    ("1:2:3:4:5:6:7", "not an IPv6 address"),
    ("12345::", "not an IPv6 address"),
    (":1::", "not an IPv6 address"),
    ("1::2::3", "not an IPv6 address"),
    ("1:::2", "not an IPv6 address"),
    ("::g", "not an IPv6 address"),
    ("::1.2.3.04", "not an IPv6 address"),
    ("::1.2.3", "not an IPv6 address"),
    ("1:2:3:4:5:6:7:1.2.3.4", "not an IPv6 address"),
    ("::1.2.3.4:5", "not an IPv6 address"),
    ("[::1]", "not an IPv6 address"),
    ("10.0.0.1/24", "10.0.0.1/24 has host bits set: the network is 10.0.0.0/24"),
    ("2001:DB8::1/32", "2001:db8::1/32 has host bits set: the network is 2001:db8::/32"),
    ("::ffff:1.2.3.4/96", "::ffff:102:304/96 has host bits set"),
]


@pytest.mark.parametrize(("text", "reason"), BOTH_REFUSE)
def test_what_ipaddress_refuses_is_refused_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError):
        ipaddress.ip_network(text, strict=True)
    with pytest.raises(ValueError) as info:
        cidr.parse_network(text)
    assert reason in str(info.value)


@pytest.mark.parametrize(
    "text", ["fe80::%eth0/64", "fe80::%eth0", "10.0.0.0/255.0.0.0", "10.0.0.0/0.255.255.255"]
)
def test_zone_ids_and_netmasks_are_refused_on_purpose(text: str) -> None:
    """ipaddress takes these; cidr does not (nor does the document's schema)."""
    assert _reference(text, True) is not None
    assert _ours(text, True) is None
    assert_agree(text)  # the exemption is exactly these forms


@pytest.mark.parametrize(
    ("text", "printed"),
    [
        ("::ffff:1.2.3.4", "::ffff:102:304/128"),  # inet_ntop: ::ffff:1.2.3.4
        ("::1.2.3.4", "::102:304/128"),  # IPv4-compatible; inet_ntop: ::1.2.3.4
        ("::FFFF:0102:0304/128", "::ffff:102:304/128"),
        ("::ffff:0:0/96", "::ffff:0:0/96"),
        ("0:0:1:0:0:1:0:0", "::1:0:0:1:0:0/128"),  # a tie: the first run
        ("1:0:0:1:0:0:0:1", "1:0:0:1::1/128"),  # the longest run
        ("1:0:2:3:4:5:6:7", "1:0:2:3:4:5:6:7/128"),  # a single zero group: not compressed
        ("1.2.3.0/024", "1.2.3.0/24"),  # leading zeros of a prefix: as ipaddress
        ("0.0.0.0/0000", "0.0.0.0/0"),
        ("::/0", "::/0"),
    ],
)
def test_hand_picked_text(text: str, printed: str) -> None:
    assert str(cidr.parse_network(text)) == printed
    assert_agree(text)
    if not MAPPED_DOTTED:
        assert str(ipaddress.ip_network(text)) == printed


def test_non_strict_clears_host_bits() -> None:
    net = cidr.parse_network("10.1.2.3/8", strict=False)
    assert (str(net), net.value, net.num_addresses) == ("10.0.0.0/8", 0x0A000000, 2**24)
    assert repr(net) == "Network('10.0.0.0/8')"


# -- the document and the network scope -------------------------------------------------------


def _cidr_problems(value: str) -> list[tuple[str, str]]:
    with pytest.raises(InvalidSpec) as info:
        validate_document(doc(authority={"egressRules": [{"cidr": value, "port": 443}]}))
    return info.value.problems


def test_a_document_with_host_bits_is_refused_with_the_network() -> None:
    assert _cidr_problems("10.0.0.1/24") == [
        (
            "spec.authority.egressRules[0].cidr",
            "'10.0.0.1/24' is not a valid CIDR (10.0.0.1/24 has host bits set: "
            "the network is 10.0.0.0/24)",
        )
    ]


@pytest.mark.parametrize("value", ["::ffff:1.2.3.4/128", "fe80::%eth0/64", "10.0.0.0/255.0.0.0"])
def test_the_schema_refuses_what_only_ipaddress_or_neither_reads(value: str) -> None:
    """Embedded dotted quads (which cidr reads like ipaddress), zone ids and netmasks (which
    only ipaddress reads) never reach the parser: the document's pattern refuses them."""
    [(path, reason)] = _cidr_problems(value)
    assert path == "spec.authority.egressRules[0].cidr"
    assert reason.endswith("is not a valid CIDR (an IPv4 or IPv6 address, optionally /<prefix>)")


@pytest.mark.parametrize("value", ["10.0.0.0/8", "2001:DB8::/32", "2001:0db8:0:0::1", "0.0.0.0/0"])
def test_a_cidr_rule_is_enforced_in_its_normal_form(value: str) -> None:
    rule = EgressRule(cidr=value, port=443)
    [allow] = scope.resolve_rules([rule])
    ref = ipaddress.ip_network(value)
    assert allow.addresses == (str(ref),)
    assert allow.source == f"cidr:{value}"
    family = "ip" if ref.version == 4 else "ip6"
    right: Any = (
        str(ref.network_address)
        if ref.prefixlen == ref.max_prefixlen
        else {"prefix": {"addr": str(ref.network_address), "len": ref.prefixlen}}
    )
    assert scope._addr_match(allow.addresses[0]) == nft.match(nft.payload(family, "daddr"), right)


@pytest.mark.parametrize(
    ("pool", "reason"),
    [
        ("10.213.0.1/16", "'10.213.0.1/16' is not a network: 10.213.0.1/16 has host bits set"),
        ("10.213.0.0/33", "'10.213.0.0/33' is not a network: '33' is not a prefix length"),
        ("nonsense", "'nonsense' is not a network: 'nonsense' is not an IPv4 address"),
        ("10.213.0.0/255.255.0.0", "'10.213.0.0/255.255.0.0' is not a network: '255.255.0.0'"),
        ("fd00::/64", "must be an IPv4 network"),
        ("10.213.0.0/31", "10.213.0.0/31 is smaller than a /30"),
    ],
)
def test_a_bad_network_pool_is_refused(pool: str, reason: str) -> None:
    with pytest.raises(PolicyRefused) as info:
        scope.parse_pool(pool)
    assert info.value.path == "CELLOS_NETWORK_POOL"
    assert info.value.reason.startswith(reason), info.value.reason


@pytest.mark.parametrize(
    ("pool", "capacity"), [(" 10.213.0.0/16\n", 16384), ("192.0.2.0/30", 1), ("0.0.0.0/0", 2**30)]
)
def test_pool_capacity(pool: str, capacity: int) -> None:
    assert scope.pool_capacity(scope.parse_pool(pool)) == capacity


@pytest.mark.parametrize("slot", [0, 1, 255, 16383])
@pytest.mark.parametrize("v6", [False, True])
def test_planned_addresses_are_the_slots_link(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, slot: int, v6: bool
) -> None:
    """Slot ``n``: the pool's ``n``-th /30 (host .1, cell .2), and POOL6's ``n``-th /126."""
    monkeypatch.setattr(scope, "claim_slot", lambda *_: (slot, str(tmp_path / str(slot))))
    rules = scope.resolve_rules(
        [EgressRule(cidr="2001:db8::/32" if v6 else "192.0.2.0/24", port=1)]
    )
    net = scope.plan("c", rules, str(tmp_path), "10.213.0.0/16")
    base = ipaddress.ip_network("10.213.0.0/16").network_address + slot * 4
    assert (net.host_ip, net.cell_ip) == (str(base + 1), str(base + 2))
    base6 = ipaddress.ip_network(scope.POOL6).network_address + slot * 4
    expected6 = (str(base6 + 1), str(base6 + 2)) if v6 else (None, None)
    assert (net.host_ip6, net.cell_ip6) == expected6


#: Validates a document with an IPv4 and an IPv6 CIDR rule, then plans what the network scope
#: needs from them (without claiming a slot); prints whether ipaddress or socket got imported.
COLD_EGRESS = """
import sys
from cellos.core.loading import validate_document
doc = {"apiVersion": "cellos.io/v1", "kind": "ExecutionCell",
       "spec": {"id": "a", "run": {"argv": ["/bin/true"]}, "authority": {"egressRules": [
           {"cidr": "10.0.0.0/8", "port": 443}, {"cidr": "2001:db8::/32", "port": 443}]}}}
cell = validate_document(doc)
import cellos.network.scope as scope
rules = scope.resolve_rules(list(cell.spec.authority.egress_rules))
scope.pool_capacity(scope.parse_pool(scope.DEFAULT_POOL))
assert [scope._addr_match(a) for r in rules for a in r.addresses]
print("cellos.core.cidr" in sys.modules, "ipaddress" in sys.modules, "socket" in sys.modules)
"""


def test_the_cold_egress_path_does_not_import_ipaddress() -> None:
    proc = _python(COLD_EGRESS)
    assert proc.stdout.split() == ["True", "False", "False"], (proc.stdout, proc.stderr)


@pytest.mark.parametrize(
    "address", ["10.0.0.1", "169.254.7.2", "::1", "fd00:ce11::1", "::ffff:1.2.3.4"]
)
def test_netlink_reads_addresses_as_ipaddress_did(address: str) -> None:
    ip = ipaddress.ip_address(address)
    family, packed = cidr.packed(address)
    assert packed == ip.packed
    assert family == (socket.AF_INET if ip.version == 4 else socket.AF_INET6)


@pytest.mark.parametrize("address", ["", "10.0.0", "010.0.0.1", "10.0.0.1/24", "host", "::g"])
def test_netlink_refuses_what_ipaddress_refused(address: str) -> None:
    with pytest.raises(ValueError):
        ipaddress.ip_address(address)
    with pytest.raises(ValueError, match=r"is not an IPv[46] address"):
        cidr.packed(address)
