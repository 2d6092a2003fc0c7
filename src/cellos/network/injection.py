"""Secret injection (``authority.secretInjection``): the cell's injection table and its reports.

The workload holds only a per-cell placeholder for each injected secret. In the header an entry
names, on a request whose ``Host`` is the entry's host (over TLS: whose SNI is that host too;
over plain HTTP: sent to an address resolved for that host), the cell's L7 proxy replaces a
value that contains the placeholder by the entry's ``format`` with the secret. Nothing else is
ever substituted: a placeholder found anywhere else (another host, another header, the request
target, a body) is passed on as it is and reported.

:class:`Injections` is what the proxy knows (hosts at create, secrets armed before the run,
addresses as they are resolved); :class:`ConnectionReport` turns decisions into the data of
``l7_secret_injection`` events (never a secret or a placeholder), reported before the request
concerned is sent on: a report that fails ends the connection. The request relay itself is
:mod:`cellos.network.http_relay`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from cellos.core.ports import InjectedSecret
from cellos.network.allowlist import normalize_name

__all__ = [
    "REASON_ADDRESS_MISMATCH",
    "REASON_INJECTED",
    "REASON_OUTSIDE_HEADER",
    "REASON_UPSTREAM_UNVERIFIED",
    "REASON_WRONG_HOST",
    "ConnectionReport",
    "Injections",
]

# reasonCode values of the l7_secret_injection event (docs/events.md); keep exactly.
REASON_INJECTED: Final = "l7_secret_injected"
REASON_WRONG_HOST: Final = "l7_secret_placeholder_wrong_host"
REASON_OUTSIDE_HEADER: Final = "l7_secret_placeholder_outside_header"
REASON_UPSTREAM_UNVERIFIED: Final = "l7_secret_upstream_unverified"
REASON_ADDRESS_MISMATCH: Final = "l7_secret_destination_not_host"


class Injections:
    """A cell's injection table: the hosts are known when the cell is created (the proxy
    terminates TLS for them), the secrets arrive with :meth:`arm` before the workload runs."""

    def __init__(self, hosts: Iterable[str]) -> None:
        self.hosts = frozenset(normalize_name(h) for h in hosts)
        self._secrets: tuple[InjectedSecret, ...] = ()
        self._placeholders: dict[bytes, str] = {}
        self._addresses: dict[str, set[str]] = {}

    def note_addresses(self, host: str, addresses: Iterable[str]) -> None:
        """Addresses ``host`` resolved to for the cell (its DNS proxy's answers, or what the
        supervisor resolved for a host rule): plain HTTP gets a secret only on a connection to
        one of them, since nothing else proves which server is at the other end."""
        key = normalize_name(host)
        if key in self.hosts:
            self._addresses.setdefault(key, set()).update(addresses)

    def reaches(self, host: str, address: str) -> bool:
        return address in self._addresses.get(host, ())

    def arm(self, secrets: Sequence[InjectedSecret]) -> None:
        for secret in secrets:
            if secret.host not in self.hosts:
                raise ValueError(f"{secret.host!r} is not an injection host of this cell")
        self._secrets = tuple(secrets)
        self._placeholders = {s.placeholder.encode("ascii"): s.secret_ref for s in secrets}

    def terminates(self, host: str | None) -> bool:
        """Whether the proxy terminates TLS for ``host`` (an injection host)."""
        return host is not None and normalize_name(host) in self.hosts

    @property
    def active(self) -> bool:
        return bool(self._secrets)

    @property
    def placeholders(self) -> dict[bytes, str]:
        """placeholder -> secret key."""
        return self._placeholders

    def for_request(self, host: str | None, header: str) -> list[InjectedSecret]:
        if host is None:
            return []
        header = header.lower()
        return [s for s in self._secrets if s.host == host and s.header.lower() == header]

    def injected_at(self, secret_ref: str, host: str | None) -> bool:
        return any(s.secret_ref == secret_ref and s.host == host for s in self._secrets)


class ConnectionReport:
    """Reports of one connection: at most one event per (secret, reason)."""

    def __init__(
        self, on_event: Callable[[dict[str, Any]], None], destination: str, server_name: str | None
    ) -> None:
        self._on_event = on_event
        self._destination = destination
        self._server_name = server_name
        self._seen: set[tuple[str | None, str]] = set()

    def note(
        self,
        reason: str,
        *,
        secret_ref: str | None = None,
        header: str | None = None,
        request_host: str | None = None,
    ) -> None:
        if (secret_ref, reason) in self._seen:
            return
        self._on_event(
            {
                "destination": self._destination,
                "serverName": self._server_name,
                "requestHost": request_host,
                "secretRef": secret_ref,
                "header": header,
                "decision": "injected" if reason == REASON_INJECTED else "refused",
                "reasonCode": reason,
            }
        )
        self._seen.add((secret_ref, reason))
