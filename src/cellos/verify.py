"""Verification of events: signatures and the run chain (DESIGN.md §4).

One implementation, :class:`EventVerifier`, is fed one event at a time and says for each
whether it passes or why not, naming the event by a *position* the caller chooses. It backs
``cellos events verify FILE --keys KEYS`` (positions are 1-based line numbers, through
:func:`verify_events_file`) and ``cellos events tail`` (positions are JetStream stream
sequences). Lives outside ``cellos.core`` because it reads files.

What is checked, event by event:

* every line is one JSON object (no blank lines; a final newline is optional), without
  duplicate keys or NaN;
* with keys, every line is a signed envelope that verifies (``verify_envelope``), in either
  format (``envelope`` or ``dsse``; a file may mix them); an unsigned line fails. Without
  keys, envelopes are only checked structurally and plain events are accepted -- that mode
  proves chain integrity, not authenticity;
* every (inner) event carries ``cellosrunid``/``cellosseq``/``cellosprev``; per run, the
  sequence starts at 0 and grows by exactly 1, each ``cellosprev`` is the digest of the
  previous inner event of that run (``GENESIS`` for seq 0), and nothing follows the run's
  compliance summary;
* with ``require_complete``, every run ends with the compliance summary, which the
  supervisor always emits last; so a truncated run (final lines deleted) fails, reported at
  the run's last remaining event.

Verification of a file stops at the first failing line: once the chain is broken, later
"errors" are only echoes of the first. The verifier itself changes its state only for an event
that passes, so a consumer that must go on (the API server skipping a forged event) can.

A reader that starts in the middle of a log (a stream whose oldest messages have expired, a
tail from ``--since``) passes ``anchor_unknown_runs=True``: a run first seen at a sequence
number other than 0 is then taken as it is, and verified from there on. That proves less (the
events before the anchor are not seen), so it is never the default.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

from cellos.core.canonical import event_digest, strict_loads
from cellos.core.chain import GENESIS, PREV_ATTR, RUN_ID_ATTR, SEQ_ATTR
from cellos.core.envelopes import is_envelope
from cellos.core.errors import InvalidSpec
from cellos.core.events import COMPLIANCE_SUMMARY
from cellos.core.signing import SignatureInvalid, VerifyKeys, parse_envelope, verify_envelope

_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_MAX_KEYS_FILE_BYTES: Final = 1 << 20


def load_verify_keys(path: str) -> VerifyKeys:
    """Read and parse a verify-keys JSON file; ``InvalidSpec(path..., reason)`` if bad."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_KEYS_FILE_BYTES + 1)
    except OSError as exc:
        raise InvalidSpec(path, f"cannot read verify keys: {exc.strerror}") from None
    if len(raw) > _MAX_KEYS_FILE_BYTES:
        raise InvalidSpec(path, f"larger than {_MAX_KEYS_FILE_BYTES} bytes")
    try:
        doc = strict_loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidSpec(path, "is not UTF-8") from None
    except json.JSONDecodeError as exc:
        # The message and position only; never the text (an HMAC key may be in it).
        reason = f"is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        raise InvalidSpec(path, reason) from None
    except ValueError as exc:  # duplicate key or NaN, from strict_loads
        raise InvalidSpec(path, f"is not valid JSON: {exc}") from None
    return VerifyKeys.from_document(doc, source=path)


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of ``verify_events_file``.

    ``events`` and ``runs`` count what was verified before the first error (all of the file
    when ``ok``). ``first_error`` is ``(line, reason)``; line 0 means the file as a whole
    (it holds no events).
    """

    ok: bool
    events: int
    runs: int
    first_error: tuple[int, str] | None


@dataclass(frozen=True)
class Step:
    """What :meth:`EventVerifier.feed` found for one event.

    ``event`` is the inner event (envelope removed) when ``ok``; ``kid`` the key that signed it
    (``None`` when it was not signed, or when no keys were given); ``reason`` why it failed.
    """

    position: int
    ok: bool
    event: dict[str, Any] | None = None
    kid: str | None = None
    reason: str | None = None

    @property
    def error(self) -> tuple[int, str] | None:
        """``(position, reason)`` of a failed event, ``None`` when it passed."""
        return None if self.ok else (self.position, self.reason or "failed")


class _Reject(Exception):
    """A reason why the current event fails; turned into a failed :class:`Step`."""


@dataclass
class _Run:
    next_seq: int
    prev: str
    last_position: int
    last_type: str
    anchored: bool = False


def _parse_bytes(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Reject("not UTF-8") from None
    if not text.strip():
        raise _Reject("blank line")
    try:
        obj = strict_loads(text)
    except json.JSONDecodeError as exc:
        raise _Reject(f"malformed JSON: {exc.msg} (column {exc.colno})") from None
    except ValueError as exc:
        raise _Reject(f"malformed JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _Reject("not a JSON object")
    return obj


def _inner_event(obj: Any, keys: VerifyKeys | None) -> tuple[dict[str, Any], str | None]:
    if not isinstance(obj, dict):
        raise _Reject("not a JSON object")
    try:
        if keys is not None:
            if not is_envelope(obj):
                raise _Reject("unsigned event, but verify keys were given")
            env = verify_envelope(obj, keys)
            return env.event, env.kid
        if is_envelope(obj):
            return parse_envelope(obj).event, None
    except SignatureInvalid as exc:
        raise _Reject(exc.reason) from None
    return obj, None


def _check_cloudevent(event: dict[str, Any]) -> None:
    if event.get("specversion") != "1.0":
        raise _Reject("not a CloudEvents 1.0 event (specversion)")
    for attr in ("id", "source", "type"):
        if not isinstance(event.get(attr), str) or not event[attr]:
            raise _Reject(f"not a CloudEvent: {attr!r} missing or not a string")


class EventVerifier:
    """Signatures and run chains of a sequence of events, fed one at a time.

    ``keys``: with keys every event must be a signed envelope that verifies; without, envelopes
    are opened structurally and plain events are accepted (chain integrity, not authenticity).
    ``anchor_unknown_runs``: accept a run first seen mid-way (see the module docstring). The
    state advances only for events that pass.
    """

    def __init__(
        self,
        keys: VerifyKeys | None,
        *,
        anchor_unknown_runs: bool = False,
        position_name: str = "position",
    ) -> None:
        self.keys = keys
        self.anchor_unknown_runs = anchor_unknown_runs
        #: How reasons name another event's position ("line", "stream seq").
        self.position_name = position_name
        #: Events that passed.
        self.events = 0
        self._runs: dict[str, _Run] = {}

    @property
    def runs(self) -> int:
        """Runs seen in events that passed."""
        return len(self._runs)

    def feed_bytes(self, raw: bytes, position: int) -> Step:
        """Verify one serialised event (a JSONL line, a message payload)."""
        try:
            obj = _parse_bytes(raw)
        except _Reject as exc:
            return Step(position, False, reason=str(exc))
        return self.feed(obj, position)

    def feed(self, obj: Any, position: int) -> Step:
        """Verify one decoded event (signed envelope or plain CloudEvent)."""
        try:
            event, kid = _inner_event(obj, self.keys)
            _check_cloudevent(event)
            self._check_chain(event, position)
        except _Reject as exc:
            return Step(position, False, reason=str(exc))
        self.events += 1
        return Step(position, True, event=event, kid=kid)

    def incomplete(self) -> tuple[int, str] | None:
        """``(position, reason)`` naming the earliest run whose last event is not its
        compliance summary (at that run's last event), or ``None`` if every run is complete."""
        open_runs = [
            (s.last_position, rid)
            for rid, s in self._runs.items()
            if s.last_type != COMPLIANCE_SUMMARY
        ]
        if not open_runs:
            return None
        position, run_id = min(open_runs)
        reason = (
            f"run {run_id}: last event is {self._runs[run_id].last_type}, not the compliance "
            "summary (run incomplete or its final events were removed)"
        )
        return position, reason

    def _check_chain(self, event: dict[str, Any], position: int) -> None:
        run_id, seq, prev = event.get(RUN_ID_ATTR), event.get(SEQ_ATTR), event.get(PREV_ATTR)
        if not isinstance(run_id, str) or not run_id:
            raise _Reject(f"{RUN_ID_ATTR} missing or not a non-empty string")
        # bool is an int subclass; JSON true is not a sequence number.
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise _Reject(f"{SEQ_ATTR} missing or not a non-negative integer")
        if not isinstance(prev, str) or _HEX64.fullmatch(prev) is None:
            raise _Reject(f"{PREV_ATTR} missing or not 64 lower-case hex digits")
        try:
            digest = event_digest(event)
        except ValueError as exc:
            raise _Reject(f"event has no canonical form: {exc}") from None

        state = self._runs.get(run_id)
        if state is None:
            if seq == 0 and prev != GENESIS:
                raise _Reject(f"run {run_id}: {SEQ_ATTR} 0 must have {PREV_ATTR} of 64 zeros")
            if seq != 0 and not self.anchor_unknown_runs:
                raise _Reject(
                    f"run {run_id}: first event has {SEQ_ATTR} {seq}, expected 0 "
                    "(earlier events missing or out of order)"
                )
            self._runs[run_id] = _Run(
                next_seq=seq + 1,
                prev=digest,
                last_position=position,
                last_type=event["type"],
                anchored=seq != 0,
            )
            return
        if state.last_type == COMPLIANCE_SUMMARY:
            raise _Reject(
                f"run {run_id}: event after the run's compliance summary "
                f"({self.position_name} {state.last_position})"
            )
        if seq != state.next_seq:
            raise _Reject(
                f"run {run_id}: {SEQ_ATTR} {seq}, expected {state.next_seq} "
                "(an event is missing, duplicated or out of order)"
            )
        if prev != state.prev:
            raise _Reject(
                f"run {run_id}: {PREV_ATTR} does not match the digest of the previous event "
                f"({self.position_name} {state.last_position}); an event was altered or replaced"
            )
        state.next_seq, state.prev = seq + 1, digest
        state.last_position, state.last_type = position, event["type"]


def verify_events_file(
    path: str, keys: VerifyKeys | None, *, require_complete: bool = True
) -> VerifyReport:
    """Verify a JSONL events file; see the module docstring for the rules.

    Raises ``InvalidSpec(path, reason)`` only if the file cannot be read at all; every
    problem with its content is reported in the returned ``VerifyReport``.
    """
    verifier = EventVerifier(keys, position_name="line")
    try:
        with open(path, "rb") as f:
            # Iterating keeps memory flat for large files; each item keeps its b"\n", and a
            # final line without one is accepted, so only the trailing newline is optional.
            for line, raw in enumerate(f, start=1):
                step = verifier.feed_bytes(raw, line)
                if step.error is not None:
                    return VerifyReport(False, verifier.events, verifier.runs, step.error)
    except OSError as exc:
        raise InvalidSpec(path, f"cannot read events file: {exc.strerror}") from None

    if require_complete:
        if verifier.events == 0:
            return VerifyReport(False, 0, 0, (0, "file contains no events"))
        incomplete = verifier.incomplete()
        if incomplete is not None:
            return VerifyReport(False, verifier.events, verifier.runs, incomplete)
    return VerifyReport(True, verifier.events, verifier.runs, None)
