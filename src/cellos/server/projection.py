"""Cell state projected from the event stream (pure: no I/O).

The HTTP API never stores cell state of its own. It folds the messages of ``CELLOS_EVENTS``, in
stream order, into one record per cell, so the same stream always yields the same projection:
rebuilt by replaying the stream from its first sequence, a restarted server answers exactly
what it answered before. Submissions still waiting in the work queue are the one other input
(:meth:`Projection.apply_submission`); they only make a cell PENDING until a run of it starts.

State machine of one run (the events are the supervisor's, DESIGN.md §3/§4)::

    (submitted, in the queue) ............................... PENDING
    lifecycle.started  (cell created: admitted by policy) ... ADMITTED
    process_spawned    (the workload is being started) ...... RUNNING
    lifecycle.destroyed / compliance.summary:
        terminalState "forced" (timeout, TTL, kill, reaped) . KILLED
        outcome "succeeded" ................................. COMPLETED
        otherwise ........................................... FAILED

A run whose first event is its summary (refused before create) is FAILED, and, like any
run, it picks up the submission queued before it. States only move
forward (a late observability event does not reopen a finished run); the summary, the last
event of every run, has the final word on outcome and exit code. Any other event of a run
not yet seen to start (a stream whose oldest messages have expired) counts as RUNNING.

A cell id may run more than once (a re-run, a work-queue retry): the record shows the cell's
latest run (the one whose first event came last in the stream), with ``runs`` counting all
runs seen. A submission is satisfied by a run of the cell whose first event is at or after
the submission time (``started``, or the lone summary of a run refused before create); until
then the cell is PENDING, unless an earlier run is still active.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

from cellos.core import events as ev
from cellos.core.chain import RUN_ID_ATTR
from cellos.core.envelopes import cell_id_of, tenant_in
from cellos.core.envelopes import inner_event as unwrap
from cellos.core.subjects import tenant_of_subject

__all__ = ["TERMINAL", "CellState", "Projection", "cell_id_of", "unwrap"]

#: Older runs of one cell id kept for bookkeeping (the record shows the latest).
MAX_RUNS_PER_CELL: Final = 16


class CellState(StrEnum):
    PENDING = "PENDING"
    ADMITTED = "ADMITTED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    KILLED = "KILLED"


TERMINAL: Final = frozenset({CellState.COMPLETED, CellState.FAILED, CellState.KILLED})
_RANK: Final = {
    CellState.PENDING: 0,
    CellState.ADMITTED: 1,
    CellState.RUNNING: 2,
    CellState.COMPLETED: 3,
    CellState.FAILED: 3,
    CellState.KILLED: 3,
}


def tenant_of(inner: dict[str, Any], nats_subject: str | None) -> str | None:
    """``data.correlation.tenantId``, else the (decoded) tenant token of the NATS subject."""
    return tenant_in(inner) or tenant_of_subject(nats_subject)


def _time(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _not_before(later: str | None, earlier: str) -> bool:
    """``later >= earlier`` as instants; an unreadable time counts as later (fail open to the
    run: a run that started is better evidence than a clock)."""
    a, b = _time(later), _time(earlier)
    if a is None or b is None:
        return later is not None
    return a >= b


@dataclass
class RunRecord:
    """One run of a cell (one ``cellosrunid``)."""

    run_id: str
    first_seq: int
    #: PENDING only until its first event is folded (every event moves it on).
    state: CellState = CellState.PENDING
    attempt: int = 1
    exit_code: int | None = None
    outcome: str | None = None
    terminal_state: str | None = None
    reason: str | None = None
    errors: list[str] = field(default_factory=list)
    backend: str | None = None
    started_at: str | None = None
    #: Time of the run's first event folded: what says a queued submission was picked up
    #: (a run refused before create has only its summary, but it did pick it up).
    first_time: str | None = None
    finished_at: str | None = None
    updated_at: str | None = None
    last_seq: int = 0
    events: int = 0
    seen_start: bool = False

    def advance(self, state: CellState) -> None:
        if _RANK[state] > _RANK[self.state]:
            self.state = state


@dataclass(frozen=True)
class Submission:
    """A document waiting in the work queue."""

    submitted_at: str
    queue_seq: int | None = None
    tenant: str | None = None


@dataclass
class CellRecord:
    cell_id: str
    tenant: str = "default"
    current: RunRecord | None = None
    runs: dict[str, RunRecord] = field(default_factory=dict)
    runs_seen: int = 0
    submission: Submission | None = None
    last_seq: int = 0
    #: Stream sequences of every event of this cell, ascending (the /events index).
    seqs: list[int] = field(default_factory=list)

    @property
    def state(self) -> CellState:
        run = self.current
        if run is not None and run.state not in TERMINAL:
            return run.state
        if self.submission is not None:
            return CellState.PENDING
        return run.state if run is not None else CellState.PENDING

    def view(self) -> dict[str, Any]:
        """The JSON form served by the API (camelCase, stable key set)."""
        run = self.current
        return {
            "id": self.cell_id,
            "tenant": self.tenant,
            "state": self.state.value,
            "runId": run.run_id if run else None,
            "attempt": run.attempt if run else None,
            "exitCode": run.exit_code if run else None,
            "outcome": run.outcome if run else None,
            "terminalState": run.terminal_state if run else None,
            "reason": run.reason if run else None,
            "errors": list(run.errors) if run else [],
            "backend": run.backend if run else None,
            "submittedAt": self.submission.submitted_at if self.submission else None,
            "startedAt": run.started_at if run else None,
            "finishedAt": run.finished_at if run else None,
            "updatedAt": run.updated_at if run else None,
            "lastSeq": self.last_seq,
            "events": run.events if run else 0,
            "runs": self.runs_seen,
        }


class Projection:
    """All cells, folded from stream messages given in stream order."""

    def __init__(self) -> None:
        self.cells: dict[str, CellRecord] = {}
        #: Highest stream sequence applied (0 before any).
        self.last_seq = 0
        #: Messages that were not a cell event (malformed, no cell id), by stream sequence.
        self.skipped: list[int] = []

    # -- input -------------------------------------------------------------------------------

    def skip(self, seq: int, payload: Any = None) -> None:
        """Account for a message that must not be folded (it failed verification).

        It is still listed among the events of the cell it names, if that cell is known, so
        a reader of the cell's events sees it (flagged by the caller); it never creates a
        cell nor changes one's state.
        """
        if seq <= self.last_seq:
            return
        self.last_seq = seq
        self.skipped.append(seq)
        inner = unwrap(payload)
        cell_id = cell_id_of(inner) if inner is not None else None
        if cell_id is not None and cell_id in self.cells:
            self.cells[cell_id].seqs.append(seq)

    def apply(self, seq: int, payload: Any, nats_subject: str | None = None) -> str | None:
        """Fold one stream message; the cell id it changed, or ``None`` if it was skipped.

        ``payload`` is the decoded message (a CloudEvent or a signed envelope). A sequence at
        or below the last one applied is ignored, so a redelivery cannot count twice.
        """
        if seq <= self.last_seq:
            return None
        self.last_seq = seq
        inner = unwrap(payload)
        cell_id = cell_id_of(inner) if inner is not None else None
        if inner is None or cell_id is None:
            self.skipped.append(seq)
            return None
        cell = self.cells.get(cell_id)
        if cell is None:
            cell = self.cells[cell_id] = CellRecord(cell_id)
        tenant = tenant_of(inner, nats_subject)
        if tenant:
            cell.tenant = tenant
        cell.last_seq = seq
        cell.seqs.append(seq)
        self._apply_to_run(cell, seq, inner)
        return cell_id

    def apply_submission(
        self, cell_id: str, submitted_at: str, *, tenant: str | None = None, queue_seq: int | None
    ) -> None:
        """Record a document waiting in the work queue (see the module docstring)."""
        cell = self.cells.get(cell_id)
        if cell is None:
            cell = self.cells[cell_id] = CellRecord(cell_id, tenant=tenant or "default")
        elif tenant and cell.current is None:
            cell.tenant = tenant
        if any(_not_before(run.first_time, submitted_at) for run in cell.runs.values()):
            return  # already picked up
        cell.submission = Submission(submitted_at, queue_seq, tenant)

    # -- output ------------------------------------------------------------------------------

    def get(self, cell_id: str) -> dict[str, Any] | None:
        cell = self.cells.get(cell_id)
        return cell.view() if cell is not None else None

    def snapshot(self) -> list[dict[str, Any]]:
        """Every cell's record, ordered by cell id."""
        return [self.cells[cid].view() for cid in sorted(self.cells)]

    def event_seqs(self, cell_id: str, since: int = 0) -> list[int]:
        cell = self.cells.get(cell_id)
        if cell is None:
            return []
        return [s for s in cell.seqs if s > since]

    # -- the fold ----------------------------------------------------------------------------

    def _apply_to_run(self, cell: CellRecord, seq: int, inner: dict[str, Any]) -> None:
        run_id = inner.get(RUN_ID_ATTR)
        key = run_id if isinstance(run_id, str) and run_id else "-"
        run = cell.runs.get(key)
        if run is None:
            run = RunRecord(run_id=key, first_seq=seq)
            cell.runs[key] = run
            cell.runs_seen += 1
            cell.current = run
            while len(cell.runs) > MAX_RUNS_PER_CELL:
                oldest = min(cell.runs.values(), key=lambda r: r.first_seq)
                del cell.runs[oldest.run_id]
        run.events += 1
        run.last_seq = seq
        time = inner.get("time") if isinstance(inner.get("time"), str) else None
        if time is not None:
            run.updated_at = time
        if run.events == 1:
            # Any first event of a run, ``started`` or a refusal's lone summary, picks up a
            # submission queued before it: the same rule as apply_submission, so replaying
            # the streams and following them live give the same projection.
            run.first_time = time
            sub = cell.submission
            if sub is not None and _not_before(time, sub.submitted_at):
                cell.submission = None
        data = inner.get("data")
        data = data if isinstance(data, dict) else {}
        kind = inner.get("type")

        if kind == ev.LIFECYCLE_STARTED:
            run.seen_start = True
            run.started_at = run.started_at or time
            run.backend = _str(data.get("backend")) or run.backend
            run.attempt = _attempt(data, run.attempt)
            run.advance(CellState.ADMITTED)
        elif kind == ev.PROCESS_SPAWNED:
            run.advance(CellState.RUNNING)
        elif kind == ev.COMMAND_COMPLETED:
            run.advance(CellState.RUNNING)
            if run.state not in TERMINAL:
                run.exit_code = _int(data.get("exitCode"))
                run.reason = _str(data.get("reason")) or run.reason
        elif kind in (ev.LIFECYCLE_DESTROYED, ev.COMPLIANCE_SUMMARY):
            final = kind == ev.COMPLIANCE_SUMMARY
            if run.state in TERMINAL and not final:
                return
            outcome = _str(data.get("outcome"))
            terminal_state = _str(data.get("terminalState"))
            run.outcome = outcome or run.outcome
            run.terminal_state = terminal_state or run.terminal_state
            if "exitCode" in data or final:
                run.exit_code = _int(data.get("exitCode"))
            run.reason = _str(data.get("reason")) or run.reason
            if final:
                run.attempt = _attempt(data, run.attempt)
                errors = data.get("errors")
                if isinstance(errors, list):
                    run.errors = [str(e) for e in errors]
            run.finished_at = time or run.finished_at
            if run.terminal_state == "forced":
                run.state = CellState.KILLED
            elif run.outcome == "succeeded":
                run.state = CellState.COMPLETED
            else:
                run.state = CellState.FAILED
        else:
            run.advance(CellState.RUNNING)
        if not run.seen_start and run.started_at is None and run.state not in TERMINAL:
            # First seen mid-run (expired head of the stream): the earliest time we have.
            run.started_at = time


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _attempt(data: dict[str, Any], default: int) -> int:
    delivery = data.get("delivery")
    if isinstance(delivery, dict):
        attempt = _int(delivery.get("attempt"))
        if attempt is not None and attempt >= 1:
            return attempt
    return default
