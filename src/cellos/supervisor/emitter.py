"""Turning event data into finished events: redact, chain, sign, deliver.

The order matters: redaction happens before the chain hash and the signature, so that what a
verifier checks is exactly what was delivered (DESIGN.md §4, sink chain Dlq(Sign(Redact(inner)))).
A delivery failure never aborts a run: it is counted, and the supervisor fails the run's exit
status instead, so teardown still happens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from cellos.core.chain import RunChain
from cellos.core.errors import CellosError
from cellos.core.events import new_event
from cellos.core.log import get_logger
from cellos.core.ports import ChainPosition, CloudEvent, EventSink
from cellos.sinks.redact import Redactor

if TYPE_CHECKING:
    from cellos.core.signing import Signer

log = get_logger(__name__)


class EventEmitter:
    def __init__(
        self,
        *,
        cell_id: str,
        host: str,
        sinks: Sequence[EventSink],
        redactor: Redactor,
        signer: Signer | None,
        chain: RunChain | None = None,
    ) -> None:
        self.cell_id = cell_id
        self.host = host
        self.sinks = sinks
        self.redactor = redactor
        self.signer = signer
        self.chain = chain or RunChain()
        #: Inner (unsigned) events of this run, in order.
        self.emitted: list[CloudEvent] = []
        self.lost = 0
        #: Told where the chain stands after each event (the backend keeps it with the cell,
        #: so that a reaper can continue the chain should this supervisor die).
        self.on_emit: Callable[[ChainPosition], None] | None = None
        #: Why each sink failed for the last event, ``"<sink>: <reason>"`` (empty: delivered).
        self.last_failures: list[str] = []

    @property
    def run_id(self) -> str:
        return self.chain.run_id

    def emit(self, event_type: str, data: dict[str, Any]) -> CloudEvent:
        event = self.redactor.apply(new_event(event_type, self.cell_id, data, host=self.host))
        event = self.chain.stamp(event)
        self.emitted.append(event)
        if self.on_emit is not None:
            seq, digest = self.chain.last
            try:
                self.on_emit(ChainPosition(self.chain.run_id, seq, digest, event_type))
            except OSError as exc:
                # Only a reaper's events would miss it; this event itself is still delivered.
                log.warning("cannot record the chain position: %s", exc.strerror or exc)
        wire = event
        if self.signer is not None:
            from cellos.core.signing import wrap_signed

            wire = wrap_signed(event, self.signer)
        self.last_failures = []
        for sink in self.sinks:
            try:
                sink.emit(wire)
            except Exception as exc:  # noqa: BLE001 - a sink failure must not abort teardown
                self.lost += 1
                name = getattr(sink, "name", type(sink).__name__)
                # A sink's own errors name it already: "<name>: <reason>" once is enough.
                own = isinstance(exc, CellosError) and exc.path == name
                reason = exc.reason if isinstance(exc, CellosError) and own else str(exc)
                why = self.redactor.text(reason)
                self.last_failures.append(f"{name}: {why}")
                log.error(
                    "event lost: sink %s failed: %s (%s, seq %s)",
                    name,
                    why,
                    event_type.removeprefix("dev.cellos.events.cell."),
                    event.get("cellosseq"),
                    extra={"error": why, "event_id": event["id"]},
                )
        return event

    def flush(self) -> None:
        """Wait until every sink has delivered (or dead-lettered) what it was given; a sink
        that lost events there counts them as lost."""
        for sink in self.sinks:
            try:
                sink.flush()
            except Exception as exc:  # noqa: BLE001 - counted, like a failure in emit()
                self.lost += 1
                name = getattr(sink, "name", type(sink).__name__)
                log.error("events lost: sink %s failed: %s", name, self.redactor.text(str(exc)))

    @property
    def last_undelivered(self) -> bool:
        """The last event reached no sink at all (there were sinks, and every one failed)."""
        return bool(self.sinks) and len(self.last_failures) == len(self.sinks)
