"""The server's event log (``<data dir>/events.jsonl``): each run's events, and its verdict.

The supervisor appends every call's events to one JSONL file (signed when the server has a
key). :class:`RunLog` indexes it incrementally (it reads only what was appended since it last
looked, so a call's verdict does not cost a scan of the whole history) and verifies a run's
lines with the same :class:`~cellos.verify.EventVerifier` as ``cellos events verify``.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Any

from cellos.core.envelopes import inner_event
from cellos.core.signing import VerifyKeys
from cellos.verify import EventVerifier


@dataclass(frozen=True)
class Verdict:
    ok: bool
    signed: bool
    chain_intact: bool
    complete: bool
    events: int
    error: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "signed": self.signed,
            "chainIntact": self.chain_intact,
            "complete": self.complete,
            "events": self.events,
            "error": self.error,
        }


def _run_id(line: bytes) -> str | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    # The one unwrap rule: an envelope of either signing format (envelope, dsse).
    event = inner_event(event)
    if event is None:
        return None
    run_id = event.get("cellosrunid")
    return run_id if isinstance(run_id, str) else None


class RunLog:
    def __init__(self, path: str, keys: VerifyKeys | None) -> None:
        self.path = path
        self.keys = keys
        self._lock = threading.Lock()
        self._offset = 0
        self._partial = b""
        #: run id -> its raw lines, in file order.
        self._runs: dict[str, list[bytes]] = {}

    def _catch_up(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        with os.fdopen(fd, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for its end
        for line in lines:
            run_id = _run_id(line)
            if run_id is not None:
                self._runs.setdefault(run_id, []).append(line)

    def lines(self, run_id: str) -> list[bytes]:
        with self._lock:
            self._catch_up()
            return list(self._runs.get(run_id, ()))

    def events(self, run_id: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines(run_id)]

    def verdict(self, run_id: str) -> Verdict:
        lines = self.lines(run_id)
        if not lines:
            reason = f"no events of run {run_id} in {self.path}"
            return Verdict(False, False, False, False, 0, reason)
        verifier = EventVerifier(self.keys, position_name="event")
        for position, line in enumerate(lines, 1):
            step = verifier.feed_bytes(line, position)
            if not step.ok:
                return Verdict(
                    False, False, False, False, position - 1, f"event {position}: {step.reason}"
                )
        incomplete = verifier.incomplete()
        return Verdict(
            ok=incomplete is None,
            signed=self.keys is not None,
            chain_intact=True,
            complete=incomplete is None,
            events=len(lines),
            error=None if incomplete is None else f"event {incomplete[0]}: {incomplete[1]}",
        )
