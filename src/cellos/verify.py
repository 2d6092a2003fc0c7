"""Offline verification of a JSONL events file: signatures and the run chain (DESIGN.md §4).

Backs ``cellos events verify FILE --keys KEYS``. Lives outside ``cellos.core`` because it
reads a file.

What is checked, line by line (line numbers are 1-based):

* every line is one JSON object (no blank lines; a final newline is optional), without
  duplicate keys or NaN;
* with keys, every line is a signed envelope that verifies (``unwrap_signed``); an unsigned
  line fails. Without keys, envelopes are only checked structurally and plain events are
  accepted -- that mode proves chain integrity, not authenticity;
* every (inner) event carries ``cellosrunid``/``cellosseq``/``cellosprev``; per run, the
  sequence starts at 0 and grows by exactly 1, each ``cellosprev`` is the digest of the
  previous inner event of that run (``GENESIS`` for seq 0), and nothing follows the run's
  compliance summary;
* with ``require_complete``, every run ends with the compliance summary, which the
  supervisor always emits last; so a truncated run (final lines deleted) fails, reported at
  the run's last remaining event.

Verification stops at the first failing line: once the chain is broken, later "errors" are
only echoes of the first.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

from cellos.core.canonical import event_digest, strict_loads
from cellos.core.chain import GENESIS, PREV_ATTR, RUN_ID_ATTR, SEQ_ATTR
from cellos.core.errors import InvalidSpec
from cellos.core.events import COMPLIANCE_SUMMARY, SIGNED_ENVELOPE
from cellos.core.signing import SignatureInvalid, VerifyKeys, parse_envelope, unwrap_signed

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


class _LineError(Exception):
    """A reason why the current line fails; turned into ``first_error`` by the caller."""


@dataclass
class _Run:
    next_seq: int
    prev: str
    last_line: int
    last_type: str


def _parse_line(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _LineError("not UTF-8") from None
    if not text.strip():
        raise _LineError("blank line")
    try:
        obj = strict_loads(text)
    except json.JSONDecodeError as exc:
        raise _LineError(f"malformed JSON: {exc.msg} (column {exc.colno})") from None
    except ValueError as exc:
        raise _LineError(f"malformed JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _LineError("not a JSON object")
    return obj


def _inner_event(obj: dict[str, Any], keys: VerifyKeys | None) -> dict[str, Any]:
    try:
        if keys is not None:
            if obj.get("type") != SIGNED_ENVELOPE:
                raise _LineError("unsigned event, but verify keys were given")
            return unwrap_signed(obj, keys)
        if obj.get("type") == SIGNED_ENVELOPE:
            return parse_envelope(obj).event
    except SignatureInvalid as exc:
        raise _LineError(exc.reason) from None
    return obj


def _check_cloudevent(event: dict[str, Any]) -> None:
    if event.get("specversion") != "1.0":
        raise _LineError("not a CloudEvents 1.0 event (specversion)")
    for attr in ("id", "source", "type"):
        if not isinstance(event.get(attr), str) or not event[attr]:
            raise _LineError(f"not a CloudEvent: {attr!r} missing or not a string")


def _check_chain(event: dict[str, Any], runs: dict[str, _Run], line: int) -> None:
    run_id, seq, prev = event.get(RUN_ID_ATTR), event.get(SEQ_ATTR), event.get(PREV_ATTR)
    if not isinstance(run_id, str) or not run_id:
        raise _LineError(f"{RUN_ID_ATTR} missing or not a non-empty string")
    # bool is an int subclass; JSON true is not a sequence number.
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise _LineError(f"{SEQ_ATTR} missing or not a non-negative integer")
    if not isinstance(prev, str) or _HEX64.fullmatch(prev) is None:
        raise _LineError(f"{PREV_ATTR} missing or not 64 lower-case hex digits")
    try:
        digest = event_digest(event)
    except ValueError as exc:
        raise _LineError(f"event has no canonical form: {exc}") from None

    state = runs.get(run_id)
    if state is None:
        if seq != 0:
            raise _LineError(
                f"run {run_id}: first event has {SEQ_ATTR} {seq}, expected 0 "
                "(earlier events missing or out of order)"
            )
        if prev != GENESIS:
            raise _LineError(f"run {run_id}: {SEQ_ATTR} 0 must have {PREV_ATTR} of 64 zeros")
        runs[run_id] = _Run(next_seq=1, prev=digest, last_line=line, last_type=event["type"])
        return
    if state.last_type == COMPLIANCE_SUMMARY:
        raise _LineError(
            f"run {run_id}: event after the run's compliance summary (line {state.last_line})"
        )
    if seq != state.next_seq:
        raise _LineError(
            f"run {run_id}: {SEQ_ATTR} {seq}, expected {state.next_seq} "
            "(an event is missing, duplicated or out of order)"
        )
    if prev != state.prev:
        raise _LineError(
            f"run {run_id}: {PREV_ATTR} does not match the digest of the previous event "
            f"(line {state.last_line}); an event was altered or replaced"
        )
    state.next_seq, state.prev = seq + 1, digest
    state.last_line, state.last_type = line, event["type"]


def verify_events_file(
    path: str, keys: VerifyKeys | None, *, require_complete: bool = True
) -> VerifyReport:
    """Verify a JSONL events file; see the module docstring for the rules.

    Raises ``InvalidSpec(path, reason)`` only if the file cannot be read at all; every
    problem with its content is reported in the returned ``VerifyReport``.
    """
    runs: dict[str, _Run] = {}
    events = 0
    try:
        with open(path, "rb") as f:
            # Iterating keeps memory flat for large files; each item keeps its b"\n", and a
            # final line without one is accepted, so only the trailing newline is optional.
            for line, raw in enumerate(f, start=1):
                try:
                    event = _inner_event(_parse_line(raw), keys)
                    _check_cloudevent(event)
                    _check_chain(event, runs, line)
                except _LineError as exc:
                    return VerifyReport(False, events, len(runs), (line, str(exc)))
                events += 1
    except OSError as exc:
        raise InvalidSpec(path, f"cannot read events file: {exc.strerror}") from None

    if require_complete:
        if events == 0:
            return VerifyReport(False, 0, 0, (0, "file contains no events"))
        open_runs = [
            (s.last_line, rid) for rid, s in runs.items() if s.last_type != COMPLIANCE_SUMMARY
        ]
        if open_runs:
            line, run_id = min(open_runs)
            reason = (
                f"run {run_id}: last event is {runs[run_id].last_type}, not the compliance "
                "summary (run incomplete or its final events were removed)"
            )
            return VerifyReport(False, events, len(runs), (line, reason))
    return VerifyReport(True, events, len(runs), None)
