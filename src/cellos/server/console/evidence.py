"""Per-run evidence verdicts for the console, computed by :class:`cellos.verify.EventVerifier`
-- the code behind ``cellos events verify`` -- so the badge a browser shows and the command's
answer cannot disagree.

A :class:`RunEvidence` is fed the stream messages of one run in stream order. It keeps the
first failure (later failures of a broken chain are only echoes of it, as in the command),
which key(s) signed, and how the run ended. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from cellos.core import events as ev
from cellos.core.chain import RUN_ID_ATTR, SEQ_ATTR
from cellos.core.envelopes import inner_event, is_envelope
from cellos.core.signing import VerifyKeys
from cellos.verify import EventVerifier

#: Problem kinds, from the verifier's reason (the reason itself is always shown too).
_KINDS: Final = (
    ("unsigned event", "unsigned"),
    ("unknown kid", "unknown-key"),
    ("bad signature", "bad-signature"),
    ("signature:", "bad-signature"),
    ("cellosseq", "broken-chain"),
    ("cellosprev", "broken-chain"),
    ("after the run's compliance summary", "broken-chain"),
)


def _kind(reason: str) -> str:
    for needle, kind in _KINDS:
        if needle in reason:
            return kind
    return "invalid-event"


@dataclass
class RunEvidence:
    """What the record of one run proves so far."""

    run_id: str
    keys: VerifyKeys | None
    verifier: EventVerifier = field(init=False)
    events: int = 0
    kids: list[str] = field(default_factory=list)
    unsigned: int = 0
    #: First failure: stream seq, the event's own ``cellosseq`` (if readable), reason.
    problem: tuple[int, int | None, str] | None = None
    last_type: str | None = None
    terminal_state: str | None = None
    end_reason: str | None = None

    def __post_init__(self) -> None:
        self.verifier = EventVerifier(self.keys, position_name="stream seq")

    def feed(self, seq: int, payload: Any) -> None:
        self.events += 1
        inner = inner_event(payload)
        if not is_envelope(payload):
            self.unsigned += 1
        if self.problem is not None:
            return
        step = self.verifier.feed(payload, seq)
        if not step.ok:
            run_seq = inner.get(SEQ_ATTR) if inner is not None else None
            readable = isinstance(run_seq, int) and not isinstance(run_seq, bool)
            self.problem = (seq, run_seq if readable else None, step.reason or "failed")
            return
        if step.kid is not None and step.kid not in self.kids:
            self.kids.append(step.kid)
        event = step.event or {}
        self.last_type = event.get("type")
        data = event.get("data")
        if isinstance(data, dict) and self.last_type in (
            ev.LIFECYCLE_DESTROYED,
            ev.COMPLIANCE_SUMMARY,
        ):
            self.terminal_state = _text(data.get("terminalState")) or self.terminal_state
            self.end_reason = _text(data.get("reason")) or self.end_reason

    def verdict(self) -> dict[str, Any]:
        """The Verdict schema (:data:`VERDICT`)."""
        complete = self.problem is None and self.last_type == ev.COMPLIANCE_SUMMARY
        problem = None
        if self.problem is not None:
            seq, run_seq, reason = self.problem
            problem = {"kind": _kind(reason), "streamSeq": seq, "runSeq": run_seq}
            problem["reason"] = reason
        signed = self.keys is not None and self.problem is None and self.unsigned == 0
        badges: list[str] = []
        if problem is not None:
            where = problem["runSeq"] if problem["runSeq"] is not None else f"stream {seq}"
            label = {
                "unsigned": "unsigned",
                "unknown-key": "unknown key",
                "bad-signature": "bad signature",
                "broken-chain": "broken chain",
            }.get(str(problem["kind"]), "invalid event")
            badges.append(f"{label} at seq {where}")
        else:
            if signed:
                badges.append(f"signed by {', '.join(self.kids)}")
            elif self.keys is None:
                badges.append("not authenticated (server has no verify keys)")
            badges.append("chain intact")
            badges.append("complete" if complete else "in progress")
        forced = self.terminal_state == "forced"
        reaped = forced and self.end_reason in ("reaped", "supervisor_lost")
        if forced:
            badges.append("reaped" if reaped else "forced")
        return {
            "runId": self.run_id,
            "events": self.events,
            "ok": problem is None and complete,
            "signed": signed,
            "kids": list(self.kids),
            "chainIntact": problem is None or problem["kind"] != "broken-chain",
            "complete": complete,
            "forced": forced,
            "reaped": reaped,
            "problem": problem,
            "badges": badges,
            "verify": self._verify_line(complete),
        }

    def _verify_line(self, complete: bool) -> str:
        """What ``cellos events verify`` prints for this run (positions: stream seqs)."""
        if self.problem is not None:
            seq, _, reason = self.problem
            return f"error: stream seq {seq}: {reason}"
        if not complete:
            gap = self.verifier.incomplete()
            if gap is not None:
                return f"error: stream seq {gap[0]}: {gap[1]}"
            return "error: no events"
        signed = "signatures valid, " if self.keys is not None else ""
        return f"ok: {self.verifier.events} events in 1 run(s), {signed}chain intact"


class EvidenceIndex:
    """Every run's evidence, fed every stream message in order (see the console feed)."""

    def __init__(self, keys: VerifyKeys | None) -> None:
        self.keys = keys
        self.runs: dict[tuple[str, str], RunEvidence] = {}
        self.last_seq = 0

    def feed(self, seq: int, payload: Any, cell_id: str | None) -> bool:
        """Fold one message; whether it belonged to a run of a cell."""
        if seq <= self.last_seq:
            return False
        self.last_seq = seq
        inner = inner_event(payload)
        run_id = inner.get(RUN_ID_ATTR) if inner is not None else None
        if cell_id is None or not isinstance(run_id, str) or not run_id:
            return False
        key = (cell_id, run_id)
        run = self.runs.get(key)
        if run is None:
            run = self.runs[key] = RunEvidence(run_id, self.keys)
        run.feed(seq, payload)
        return True

    def verdict(self, cell_id: str, run_id: str | None) -> dict[str, Any] | None:
        run = self.runs.get((cell_id, run_id)) if run_id else None
        return run.verdict() if run is not None else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
