"""Reading events off the wire: the inner event of a signed envelope, and the cell it is about.

One rule for every reader (the JetStream sink, the DLQ, the projection, ``cellos events
verify``), so that they cannot disagree on which cell an event belongs to. Nothing here
checks a signature: :func:`cellos.core.signing.unwrap_signed` does, when there are keys.

Both signing formats share the envelope type ``dev.cellos.events.signed_envelope.v1``: the
``envelope`` format carries the inner event as ``data.event``, the ``dsse`` format as the
base64 ``data.payload`` of a DSSE envelope (``datacontenttype``
``application/vnd.dsse.envelope.v1+json``). :func:`inner_event` opens either.
"""

from __future__ import annotations

from typing import Any, Final

from cellos.core.events import SIGNED_ENVELOPE

CELL_URN_PREFIX: Final = "urn:cellos:cell:"
# Equal to cellos.core.dsse.CONTENT_TYPE (tests check), spelled out so that opening an
# envelope of the default format imports nothing more.
_DSSE_CONTENT_TYPE: Final = "application/vnd.dsse.envelope.v1+json"


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
    if event.get("datacontenttype") == _DSSE_CONTENT_TYPE:
        return _dsse_inner(data)
    inner = data.get("event") if isinstance(data, dict) else None
    return inner if isinstance(inner, dict) else None


def _dsse_inner(data: Any) -> dict[str, Any] | None:
    # Imported here: a run without DSSE (most) never needs base64 decoding of events.
    from cellos.core.canonical import strict_loads
    from cellos.core.dsse import decode_payload

    payload = decode_payload(data)
    if payload is None:
        return None
    try:
        inner = strict_loads(payload)
    except (ValueError, RecursionError):  # bad JSON or UTF-8; or nested too deeply
        return None
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
