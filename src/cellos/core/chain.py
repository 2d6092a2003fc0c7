"""The run chain: sequence numbers and back-links that make a run tamper-evident (no I/O).

Every event of one supervisor run carries three CloudEvents extension attributes:

* ``cellosrunid`` -- the run it belongs to (several runs may share one sink or file);
* ``cellosseq`` -- 0, 1, 2, ... within the run, so a gap or a swap is visible;
* ``cellosprev`` -- hex SHA-256 of the canonical bytes of the previous *stamped* event of the
  run (``GENESIS`` for the first), so altering any earlier event breaks every later link.

Stamp after every transformation that changes the event as it will be delivered (redaction in
particular): the digest covers the event exactly as a verifier will read it back.
"""

from __future__ import annotations

import threading
from typing import Any, Final

from cellos.core.canonical import copy_and_digest
from cellos.core.ids import uuid4

#: ``cellosprev`` of the first event of a run.
GENESIS: Final = "0" * 64

RUN_ID_ATTR: Final = "cellosrunid"
SEQ_ATTR: Final = "cellosseq"
PREV_ATTR: Final = "cellosprev"


class RunChain:
    """Stamps the events of one run, in emission order.

    Thread-safe: observability events may be emitted from helper threads (DNS proxy, flow
    counters) while the supervisor emits lifecycle events, and the sequence must stay dense.
    """

    def __init__(self, run_id: str | None = None) -> None:
        if run_id is not None and not run_id:
            raise ValueError("run_id must be a non-empty string")
        self._run_id = run_id if run_id is not None else uuid4()
        self._lock = threading.Lock()
        self._next_seq = 0
        self._prev = GENESIS

    @classmethod
    def resume(cls, run_id: str, last_seq: int, last_digest: str) -> RunChain:
        """Continue a run whose events up to ``last_seq`` (digest ``last_digest``) were
        emitted elsewhere, e.g. by a supervisor that died: a reaper's events then extend it."""
        chain = cls(run_id)
        chain._next_seq = last_seq + 1
        chain._prev = last_digest
        return chain

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def last(self) -> tuple[int, str]:
        """(seq, digest) of the last stamped event; (-1, GENESIS) before the first."""
        with self._lock:
            return self._next_seq - 1, self._prev

    def stamp(self, event: dict[str, Any]) -> dict[str, Any]:
        """Return a new event carrying the chain attributes; ``event`` is left unchanged.

        The input is deep-copied so that a caller mutating its own ``data`` afterwards cannot
        silently invalidate the digest the next event will link to. Any chain attributes
        already present are replaced. If the event cannot be canonicalised the chain does not
        advance, so the sequence stays dense.
        """
        with self._lock:
            attrs = {RUN_ID_ATTR: self._run_id, SEQ_ATTR: self._next_seq, PREV_ATTR: self._prev}
            # may raise; state is untouched until it succeeds
            stamped: dict[str, Any]
            stamped, digest = copy_and_digest({**event, **attrs})
            self._next_seq += 1
            self._prev = digest
            return stamped
