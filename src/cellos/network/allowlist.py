"""Host-name allow-lists (``hostnameAllowlist`` semantics), shared by the DNS and L7 proxies.

Exact entries match the name itself, case-insensitively (ASCII only) and ignoring one trailing
dot; ``*.x`` matches every name strictly below ``x`` (``a.x``, ``a.b.x``) but never ``x``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from cellos.core.spec import check_hostname

_STR_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def normalize_name(name: str) -> str:
    """Lowercase (ASCII only) and drop one trailing dot.

    ASCII-only on purpose: ``str.lower`` maps e.g. the Kelvin sign U+212A to ``k``, which would
    let a different wire name compare equal to an allowed one.
    """
    if name.endswith("."):
        name = name[:-1]
    return name.translate(_STR_ASCII_LOWER)


class HostnameAllowlist:
    """``hostnameAllowlist`` semantics: exact names and ``*.`` wildcards (strict subdomains)."""

    def __init__(self, entries: Iterable[str]) -> None:
        exact: set[str] = set()
        parents: set[str] = set()
        for entry in entries:
            # Same rule as the spec validator, so a hand-built allowlist cannot be laxer.
            check_hostname(entry, allow_wildcard=True)
            norm = normalize_name(entry)
            if norm.startswith("*."):
                parents.add(norm[2:])
            else:
                exact.add(norm)
        self._exact: frozenset[str] = frozenset(exact)
        self._parents: frozenset[str] = frozenset(parents)

    def match(self, name: str) -> str | None:
        """The (normalized) entry that allows ``name``, or None.

        Exact entries win over wildcards so the event can say which rule applied.
        """
        if not name.isascii():
            return None
        norm = normalize_name(name)
        labels = norm.split(".")
        if not norm or any(not label for label in labels):
            return None
        if norm in self._exact:
            return norm
        # Only proper parents: "*.x" never matches "x" itself.
        for i in range(1, len(labels)):
            parent = ".".join(labels[i:])
            if parent in self._parents:
                return "*." + parent
        return None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.match(name) is not None
