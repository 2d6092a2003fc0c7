"""NATS subject names of CellOS, and the one encoding of ids inside them (no I/O).

NATS splits subjects on ``.`` and reserves ``*``, ``>`` and whitespace, but cell ids may
contain ``.`` (``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``). Replacing ``.`` by ``_`` (what earlier
versions did) is not injective: ``tenant.cell-1`` and ``tenant_cell-1`` then shared one
subject, and a subscriber to one cell got the other's events.

:func:`encode_token` is injective: every character outside ``[A-Za-z0-9_-]`` -- ``.``, the
escape character ``%`` itself, and anything a future id alphabet might allow -- becomes
``%XX`` (the hex of each of its UTF-8 bytes, upper case), as in URL percent-encoding. So
``tenant.cell-1`` is ``tenant%2Ecell-1``, ``tenant_cell-1`` stays ``tenant_cell-1``, and an
id made only of letters, digits, ``_`` and ``-`` is its own token. :func:`decode_token` is its
inverse. Every publisher and subscriber builds its subjects here (events, work queue, cell
leases, and any later per-cell stream such as logs), so the rule lives in one place.
"""

from __future__ import annotations

import re
from typing import Final

EVENTS_PREFIX: Final = "cellos.events.cell"
LOGS_PREFIX: Final = "cellos.logs"
DEFAULT_TENANT: Final = "default"

_SAFE: Final = re.compile(r"[A-Za-z0-9_-]")
_ESCAPED: Final = re.compile(r"((?:%[0-9A-F]{2})+)")


def encode_token(value: str) -> str:
    """``value`` as one NATS subject token (injective; see the module docstring)."""
    if not value:
        raise ValueError("an empty id cannot be a subject token")
    return "".join(
        ch if _SAFE.fullmatch(ch) else "".join(f"%{b:02X}" for b in ch.encode("utf-8"))
        for ch in value
    )


def decode_token(token: str) -> str:
    """The id :func:`encode_token` turned into ``token``."""
    return _ESCAPED.sub(lambda m: bytes.fromhex(m.group(1).replace("%", "")).decode("utf-8"), token)


def cell_subject(prefix: str, tenant: str | None, cell_id: str, *rest: str) -> str:
    """``<prefix>.<tenant>.<cellId>[.<rest>...]`` with tenant and cell id encoded.

    ``rest`` are fixed tokens of the caller (a phase such as ``started``, a stream kind),
    never ids; ``*`` and ``>`` are allowed there, so the same helper builds filters.
    """
    parts = [prefix, encode_token(tenant or DEFAULT_TENANT), encode_token(cell_id), *rest]
    return ".".join(parts)


def event_subject(tenant: str | None, cell_id: str, phase: str) -> str:
    """Subject of one event on ``CELLOS_EVENTS``."""
    return cell_subject(EVENTS_PREFIX, tenant, cell_id, phase)


def events_filter(tenant: str | None, cell_id: str, phase: str = ">") -> str:
    """Subject filter for one cell's events (``phase``: one phase, or ``>`` for all)."""
    if tenant is None:
        return ".".join([EVENTS_PREFIX, "*", encode_token(cell_id), phase])
    return cell_subject(EVENTS_PREFIX, tenant, cell_id, phase)


def logs_subject(tenant: str | None, cell_id: str, stream: str) -> str:
    """Subject of a cell's output chunks on ``CELLOS_LOGS`` (``stream``: stdout or stderr)."""
    return cell_subject(LOGS_PREFIX, tenant, cell_id, stream)


def logs_filter(cell_id: str, stream: str) -> str:
    """Subject filter for one cell's output stream, whatever its tenant."""
    return ".".join([LOGS_PREFIX, "*", encode_token(cell_id), stream])


def tenant_of_subject(subject: str | None, prefix: str = EVENTS_PREFIX) -> str | None:
    """The (decoded) tenant token of a subject built by :func:`cell_subject`."""
    if not subject or not subject.startswith(prefix + "."):
        return None
    token = subject[len(prefix) + 1 :].split(".", 1)[0]
    return decode_token(token) if token else None
