"""Reading events off the wire: the inner event of a signed envelope, and the cell it is about.

One rule for every reader (the JetStream sink, the DLQ, the projection, ``cellos events
verify``), so that they cannot disagree on which cell an event belongs to. Nothing here
checks a signature: :func:`cellos.core.signing.unwrap_signed` does, when there are keys.
"""

from __future__ import annotations

from typing import Any, Final

from cellos.core.events import SIGNED_ENVELOPE

CELL_URN_PREFIX: Final = "urn:cellos:cell:"


def is_envelope(event: Any) -> bool:
    """Whether ``event`` is a signed-envelope CloudEvent (by its type only)."""
    return isinstance(event, dict) and event.get("type") == SIGNED_ENVELOPE


def inner_event(event: Any) -> dict[str, Any] | None:
    """The event an envelope carries, the event itself if it is not one; ``None`` for
    anything that is not a JSON object (or an envelope without an object inside)."""
    if not isinstance(event, dict):
        return None
    if event.get("type") != SIGNED_ENVELOPE:
        return event
    data = event.get("data")
    inner = data.get("event") if isinstance(data, dict) else None
    return inner if isinstance(inner, dict) else None


def cell_id_of(event: Any) -> str | None:
    """The cell an (inner) event is about: its ``subject`` URN, else ``data.cellId``."""
    if not isinstance(event, dict):
        return None
    subject = event.get("subject")
    if isinstance(subject, str) and subject.startswith(CELL_URN_PREFIX):
        cell_id = subject[len(CELL_URN_PREFIX) :]
        if cell_id:
            return cell_id
    data = event.get("data")
    if isinstance(data, dict) and isinstance(data.get("cellId"), str) and data["cellId"]:
        return str(data["cellId"])
    return None


def tenant_in(event: Any) -> str | None:
    """``data.correlation.tenantId`` of an (inner) event, if it names one."""
    data = event.get("data") if isinstance(event, dict) else None
    corr = data.get("correlation") if isinstance(data, dict) else None
    tenant = corr.get("tenantId") if isinstance(corr, dict) else None
    return tenant if isinstance(tenant, str) and tenant else None


def dedupe_id(event: Any) -> str:
    """The ``Nats-Msg-Id`` of a wire event: the inner event's id.

    An envelope has an id of its own (it is a different CloudEvent); the inner id is the
    event's identity, the same whichever envelope carries it, so a re-publish of the same
    event (a retry, a DLQ replay) is recognised as a duplicate.
    """
    inner = inner_event(event)
    ident = inner.get("id") if inner is not None else None
    if not isinstance(ident, str) or not ident:
        ident = event.get("id") if isinstance(event, dict) else None
    if not isinstance(ident, str) or not ident:
        raise ValueError("event has no id")
    return ident
