"""DSSE (Dead Simple Signing Envelope, v1.0) pieces of the ``dsse`` signing format.

With ``CELLOS_EVENT_SIGNING_FORMAT=dsse`` the ``data`` of a ``dev.cellos.events.signed_envelope.v1``
CloudEvent is a DSSE envelope instead of ``{kid, alg, signature, event}``::

    {"payloadType": "application/cloudevents+json",
     "payload": base64(RFC 8785 canonical bytes of the inner event),
     "signatures": [{"keyid": <kid>, "sig": base64(Ed25519(PAE(payloadType, payload)))}]}

and the envelope's ``datacontenttype`` is ``application/vnd.dsse.envelope.v1+json`` (that is how
readers tell the two formats apart). Any DSSE implementation verifies such ``data`` with the
Ed25519 public key alone; see docs/events.md.

This module only encodes and decodes (no key, no cryptography import): readers that merely
open envelopes (sinks, the projection) use :func:`decode_payload` through
:mod:`cellos.core.envelopes`, the signing code uses the rest.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Final

#: The DSSE ``payloadType``: the payload is one CloudEvent in JSON (structured mode).
PAYLOAD_TYPE: Final = "application/cloudevents+json"
#: The envelope CloudEvent's ``datacontenttype`` when its data is a DSSE envelope
#: (the media type the DSSE spec registers for the JSON envelope).
CONTENT_TYPE: Final = "application/vnd.dsse.envelope.v1+json"
DATA_KEYS: Final = frozenset({"payloadType", "payload", "signatures"})
SIGNATURE_KEYS: Final = frozenset({"keyid", "sig"})


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 Pre-Authentication Encoding, the bytes a DSSE signature covers:
    ``"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`` (lengths in bytes, decimal)."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


def b64encode(data: bytes) -> str:
    """Standard base64 with padding: what DSSE's reference implementations write."""
    return base64.standard_b64encode(data).decode("ascii")


def b64decode(text: Any) -> bytes:
    """Decode standard, padded base64, refusing every other spelling (``ValueError``).

    DSSE lets verifiers accept several base64 dialects; ours accepts only the one it writes,
    in its one canonical form, so that an envelope cannot be re-spelled (a changed byte of the
    text always changes what it decodes to, or is refused). Messages never echo the input.
    """
    if not isinstance(text, str):
        raise ValueError("must be a base64 string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("not valid standard base64 (with padding)") from None
    if b64encode(raw) != text:
        raise ValueError("base64 is not canonical (padding or trailing bits)")
    return raw


def is_dsse_data(envelope: dict[str, Any]) -> bool:
    """Whether an envelope CloudEvent carries a DSSE envelope (by its datacontenttype)."""
    return envelope.get("datacontenttype") == CONTENT_TYPE


def decode_payload(data: Any) -> bytes | None:
    """The payload bytes of a DSSE envelope ``data``, ``None`` if there are none to decode.

    No signature check and no payloadType check: this is for readers that only route events;
    verification (:func:`cellos.core.signing.unwrap_signed`) checks everything.
    """
    if not isinstance(data, dict):
        return None
    try:
        return b64decode(data.get("payload"))
    except ValueError:
        return None
