"""CloudEvents 1.0 builders for the event catalogue of DESIGN.md §4 (no I/O)."""

from __future__ import annotations

from typing import Any, Final

from cellos.core.ids import rfc3339_now, uuid4
from cellos.core.ports import CloudEvent

_PREFIX: Final = "dev.cellos.events.cell."

LIFECYCLE_STARTED: Final = _PREFIX + "lifecycle.v1.started"
LIFECYCLE_DESTROYED: Final = _PREFIX + "lifecycle.v1.destroyed"
COMMAND_COMPLETED: Final = _PREFIX + "command.v1.completed"
EXPORT_COMPLETED: Final = _PREFIX + "export.v2.completed"
EXPORT_FAILED: Final = _PREFIX + "export.v2.failed"
PROCESS_SPAWNED: Final = _PREFIX + "observability.v1.process_spawned"
NETWORK_FLOW_DECISION: Final = _PREFIX + "observability.v1.network_flow_decision"
DNS_QUERY_PERMITTED: Final = _PREFIX + "observability.v1.dns_query_permitted"
DNS_QUERY_REFUSED: Final = _PREFIX + "observability.v1.dns_query_refused"
L7_EGRESS_DECISION: Final = _PREFIX + "observability.v1.l7_egress_decision"
L7_SECRET_INJECTION: Final = _PREFIX + "observability.v1.l7_secret_injection"
EVIDENCE_BUNDLE_EMITTED: Final = _PREFIX + "evidence_bundle.v1.emitted"
COMPLIANCE_SUMMARY: Final = _PREFIX + "compliance.v1.summary"
SIGNED_ENVELOPE: Final = "dev.cellos.events.signed_envelope.v1"

#: Short phase names, used e.g. as the last token of a NATS subject.
PHASES: Final = {
    LIFECYCLE_STARTED: "started",
    LIFECYCLE_DESTROYED: "destroyed",
    COMMAND_COMPLETED: "command",
    EXPORT_COMPLETED: "export",
    EXPORT_FAILED: "export",
    PROCESS_SPAWNED: "observability",
    NETWORK_FLOW_DECISION: "observability",
    DNS_QUERY_PERMITTED: "observability",
    DNS_QUERY_REFUSED: "observability",
    L7_EGRESS_DECISION: "observability",
    L7_SECRET_INJECTION: "observability",
    EVIDENCE_BUNDLE_EMITTED: "evidence",
    COMPLIANCE_SUMMARY: "compliance",
}


def new_event(event_type: str, cell_id: str, data: dict[str, Any], *, host: str) -> CloudEvent:
    """A structured-mode CloudEvent; chain attributes are added later by the emitter."""
    return {
        "specversion": "1.0",
        "id": uuid4(),
        "source": f"/cellos/supervisor/{host}",
        "type": event_type,
        "subject": f"urn:cellos:cell:{cell_id}",
        "time": rfc3339_now(),
        "datacontenttype": "application/json",
        "data": data,
    }
