"""IP networks and addresses of egress rules: parsed and printed without :mod:`ipaddress`.

Why: every one-shot ``cellos-supervisor`` of a cell with a CIDR rule validates the rule and
builds its network scope (:mod:`cellos.network.scope`) from it. :mod:`ipaddress` cost
1.3-2.4 ms of that process (``-X importtime``; more in a bare interpreter), against a budget of
15 ms for the whole network scope (issue 14). This module costs ~0.25 ms: one small class on
top of the C module ``_socket`` (``inet_pton``; ``socket`` itself costs ~2 ms to import), which
the egress path loads anyway for rtnetlink and nftables (~0.5 ms, only moved earlier).

What it accepts, ``ipaddress`` accepts too, with the same meaning, and its text is
``str(ipaddress.ip_network(x))`` / ``str(ipaddress.ip_address(x))`` (tests/test_cidr.py
compares both on random networks and on inputs both must refuse):

* an IPv4 dotted quad (glibc's ``inet_pton``: four decimal numbers up to 255, no leading
  zeros), or an IPv6 address in RFC 4291 text form (an embedded dotted quad included);
* optionally ``/`` and a prefix length: ASCII decimal digits only (no sign, no spaces),
  0-32 or 0-128; without one, a single address (/32, /128);
* strict (the default): host bits set is an error, as ``ipaddress.ip_network(x, strict=True)``.

It is stricter than ``ipaddress`` in two ways, on purpose: no IPv6 zone id (``fe80::%eth0``)
and no netmask or hostmask after the ``/`` (``10.0.0.0/255.0.0.0``); the document's schema
refuses both anyway (and ``CELLOS_NETWORK_POOL`` takes a prefix length only). IPv6 text is
RFC 5952's (lower-case hex, the first longest run of two or more zero groups compressed) and
never dotted, ``::ffff:1.2.3.4`` included: ``::ffff:102:304`` as Python 3.11's ``ipaddress``
prints it (glibc's ``inet_ntop`` would print it dotted).
"""

from __future__ import annotations

import _socket

_AF_INET = _socket.AF_INET
_AF_INET6 = _socket.AF_INET6


def parse_address(text: str) -> tuple[int, int]:
    """``(version, value)`` of an IPv4 or IPv6 address; :class:`ValueError` naming the text
    otherwise."""
    if ":" in text:
        try:
            return 6, int.from_bytes(_socket.inet_pton(_AF_INET6, text), "big")
        except (OSError, ValueError):  # ValueError: NUL, unencodable (surrogates)
            raise ValueError(
                f"{text!r} is not an IPv6 address (hexadecimal groups, no zone id)"
            ) from None
    try:
        return 4, int.from_bytes(_socket.inet_pton(_AF_INET, text), "big")
    except (OSError, ValueError):
        raise ValueError(
            f"{text!r} is not an IPv4 address (four decimal numbers from 0 to 255, "
            "without leading zeros)"
        ) from None


def packed(text: str) -> tuple[int, bytes]:
    """The socket family (``AF_INET``, ``AF_INET6``) and the network-order bytes of an
    address, for netlink; :class:`ValueError` as :func:`parse_address`."""
    version, value = parse_address(text)
    if version == 4:
        return _AF_INET, value.to_bytes(4, "big")
    return _AF_INET6, value.to_bytes(16, "big")


def format_address(version: int, value: int) -> str:
    """The text of an address: dotted quad, or RFC 5952 IPv6 (as :mod:`ipaddress` prints)."""
    if version == 4:
        return f"{value >> 24}.{(value >> 16) & 255}.{(value >> 8) & 255}.{value & 255}"
    groups = [(value >> shift) & 0xFFFF for shift in range(112, -16, -16)]
    # The first longest run of zero groups; compressed only if it has two or more.
    best_start = best_length = 0
    start = -1
    for index, group in enumerate(groups):
        if group:
            start = -1
            continue
        if start < 0:
            start = index
        if index - start + 1 > best_length:
            best_start, best_length = start, index - start + 1
    text = [f"{group:x}" for group in groups]
    if best_length < 2:
        return ":".join(text)
    return ":".join(text[:best_start]) + "::" + ":".join(text[best_start + best_length :])


class Network:
    """An IP network: ``version`` (4 or 6), ``value`` (its first address as an integer) and
    ``prefixlen``. Made by :func:`parse_network`."""

    __slots__ = ("prefixlen", "value", "version")

    def __init__(self, version: int, value: int, prefixlen: int) -> None:
        self.version = version
        self.value = value
        self.prefixlen = prefixlen

    @property
    def max_prefixlen(self) -> int:
        return 32 if self.version == 4 else 128

    @property
    def num_addresses(self) -> int:
        return 1 << (self.max_prefixlen - self.prefixlen)

    @property
    def network_address(self) -> str:
        return format_address(self.version, self.value)

    def address(self, offset: int) -> str:
        """The text of the network's ``offset``-th address (from 0, within the network)."""
        if not 0 <= offset < self.num_addresses:
            raise ValueError(f"{self} has no address number {offset}")
        return format_address(self.version, self.value + offset)

    def __str__(self) -> str:
        return f"{self.network_address}/{self.prefixlen}"

    def __repr__(self) -> str:
        return f"Network({str(self)!r})"


def parse_network(text: str, *, strict: bool = True) -> Network:
    """``address[/prefixlen]`` (see the module's docstring); :class:`ValueError` with the
    reason otherwise. ``strict``: host bits set is an error, else they are cleared."""
    address, slash, prefix = text.partition("/")
    version, value = parse_address(address)
    bits = 32 if version == 4 else 128
    prefixlen = bits
    if slash:
        digits = prefix.lstrip("0") or "0"  # leading zeros: as ipaddress ("/024" is /24)
        if not (prefix.isascii() and prefix.isdigit() and len(digits) <= 3) or int(digits) > bits:
            raise ValueError(
                f"{prefix!r} is not a prefix length of IPv{version} (a decimal number from 0 "
                f"to {bits})"
            )
        prefixlen = int(digits)
    host = value & ((1 << (bits - prefixlen)) - 1)
    if host:
        network = Network(version, value - host, prefixlen)
        if strict:
            raise ValueError(
                f"{format_address(version, value)}/{prefixlen} has host bits set: the network "
                f"is {network}"
            )
        return network
    return Network(version, value, prefixlen)
