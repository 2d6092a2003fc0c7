"""How resolved secrets reach a cell: as variables, as files under ``/run/secrets``
(``secretDelivery: runtimeBroker`` / ``runtimeLeasedBroker``), or (``authority.
secretInjection``) only as per-cell placeholders that the cell's L7 proxy replaces in requests
to the declared hosts."""

from __future__ import annotations

import msgspec

from cellos.core.errors import SecretBrokerError
from cellos.core.ports import InjectedSecret
from cellos.core.secrets_env import placeholder_env_name, secret_env_name
from cellos.core.spec import CellSpec


class ResolvedSecrets(msgspec.Struct):
    #: Variables for the workload: secret values, and placeholders of injected secrets.
    env: dict[str, str] = msgspec.field(default_factory=dict)
    #: key -> value of the secrets delivered as files (empty with ``secretDelivery: env``).
    files: dict[str, bytes] = msgspec.field(default_factory=dict)
    #: What the cell's L7 proxy injects (empty without secretInjection).
    injected: list[InjectedSecret] = msgspec.field(default_factory=list)
    #: Every resolved value (what output redaction must hide).
    values: list[str] = msgspec.field(default_factory=list)


def new_placeholder() -> str:
    """An unguessable per-cell token that stands for a secret (it is not the secret)."""
    # Imported here: secrets pulls in hmac, hashlib and random (~8 ms), which a cell without
    # secretInjection, and every one-shot supervisor start, does not need.
    import secrets

    return "cellos-placeholder-" + secrets.token_hex(24)


def deliver(spec: CellSpec, resolved: dict[str, str]) -> ResolvedSecrets:
    """``resolved``: secret key -> value, for every key of ``authority.secretRefs``."""
    out = ResolvedSecrets(values=list(resolved.values()))
    placeholders: dict[str, str] = {}
    if spec.authority.secret_injection:
        # Only injection cells pay for it (every one-shot supervisor imports this module).
        from cellos.network.allowlist import normalize_name
    for index, entry in enumerate(spec.authority.secret_injection):
        value = resolved[entry.secret_ref]
        if not _header_safe(value):
            # The value is never shown; only why it cannot be used.
            raise SecretBrokerError(
                f"spec.authority.secretInjection[{index}].secretRef",
                f"{entry.secret_ref!r}: the secret cannot be put into a header (it holds "
                "characters other than printable ASCII, space and tab)",
            )
        if entry.secret_ref not in placeholders:  # one placeholder per secret, made once
            placeholders[entry.secret_ref] = new_placeholder()
        placeholder = placeholders[entry.secret_ref]
        out.injected.append(
            InjectedSecret(
                secret_ref=entry.secret_ref,
                host=normalize_name(entry.host),
                header=entry.header,
                format=entry.format,
                placeholder=placeholder,
                value=value,
            )
        )
    as_files = spec.run is not None and spec.run.secrets_as_files
    for key, value in resolved.items():
        if key in placeholders:
            out.env[placeholder_env_name(key)] = placeholders[key]
        elif as_files:
            out.files[key] = value.encode()
        else:
            out.env[secret_env_name(key)] = value
    return out


def _header_safe(value: str) -> bool:
    return bool(value) and all(ch == "\t" or " " <= ch <= "~" for ch in value)
