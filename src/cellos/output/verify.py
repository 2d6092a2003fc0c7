"""``cellos logs verify``: check a captured log against the run's ``command.v1.completed``.

The completed event records, per stream, the byte count and sha256 of the whole (redacted)
stream as emitted (and, for a log cut at its bound, ``logSha256`` of the part it holds). A
log is accepted when its size and digest equal the record's; otherwise the answer says how it
differs (size, and the first differing byte when the log is longer or shorter than the
record, or the digest for a log of the right size).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cellos.core.envelopes import inner_event
from cellos.core.errors import InvalidSpec
from cellos.core.events import COMMAND_COMPLETED
from cellos.core.ports import STREAMS
from cellos.core.signing import VerifyKeys

_READ = 1 << 20


@dataclass(frozen=True)
class LogCheck:
    ok: bool
    message: str


def _inner(obj: Any) -> Any:
    # The one unwrap rule (both signing formats); only needs the inner event, not its proof.
    return inner_event(obj)


def find_record(events_path: str, cell_id: str, run_id: str | None) -> dict[str, Any]:
    """The data of the cell's ``command.v1.completed`` (of ``run_id``, else its last run)."""
    found: dict[str, Any] | None = None
    try:
        with open(events_path, "rb") as f:
            for raw in f:
                try:
                    event = _inner(json.loads(raw))
                except ValueError:
                    continue  # events verify names malformed lines; here they hold no record
                if not isinstance(event, dict) or event.get("type") != COMMAND_COMPLETED:
                    continue
                data = event.get("data")
                if not isinstance(data, dict) or data.get("cellId") != cell_id:
                    continue
                if run_id is None or event.get("cellosrunid") == run_id:
                    found = {**data, "runId": event.get("cellosrunid")}
    except OSError as exc:
        raise InvalidSpec("--events", f"cannot read {events_path}: {exc.strerror}") from None
    if found is None:
        which = f"run {run_id} of cell {cell_id!r}" if run_id else f"cell {cell_id!r}"
        raise InvalidSpec("--cell", f"no command.v1.completed of {which} in {events_path}")
    return found


def check_log(log_path: str, record: dict[str, Any], stream: str) -> LogCheck:
    if stream not in STREAMS:
        raise InvalidSpec("--stream", f"must be one of {', '.join(STREAMS)}")
    entry = (record.get("output") or {}).get(stream)
    if not isinstance(entry, dict) or "sha256" not in entry:
        raise InvalidSpec("--events", f"the record of run {record['runId']} has no {stream} digest")
    digest = hashlib.sha256()
    size = 0
    try:
        with open(log_path, "rb") as f:
            while chunk := f.read(_READ):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise InvalidSpec("LOG", f"cannot read {log_path}: {exc.strerror}") from None
    got = digest.hexdigest()
    total, want = int(entry["bytes"]), str(entry["sha256"])
    what = f"{stream} of run {record['runId']} of cell {record.get('cellId')}"
    if size == total and got == want:
        return LogCheck(True, f"ok: {log_path} is the {what} ({size} bytes, sha256 {got})")
    log_bytes, log_sha = entry.get("logBytes"), entry.get("logSha256")
    if entry.get("logDroppedBytes") and size == log_bytes and got == log_sha:
        return LogCheck(
            True,
            f"ok: {log_path} is the first {size} of {total} bytes of the {what} (the log was "
            f"cut at its bound; {total - size} bytes were dropped, as the record states)",
        )
    if size != total and not (entry.get("logDroppedBytes") and size == log_bytes):
        return LogCheck(
            False,
            f"{log_path}: {size} bytes, but the record says the {what} had {total}"
            + (f" (the log holds its first {log_bytes})" if entry.get("logDroppedBytes") else ""),
        )
    return LogCheck(
        False,
        f"{log_path}: content differs from the {what}: sha256 {got}, the record says "
        f"{log_sha if size != total else want} ({size} bytes, as recorded)",
    )


def verify_log(
    log_path: str,
    events_path: str,
    cell_id: str,
    stream: str,
    run_id: str | None = None,
    keys: VerifyKeys | None = None,
) -> LogCheck:
    """Check ``log_path``; with ``keys``, the events file must verify first (signatures, chain),
    so that the record compared against is the signed one."""
    if keys is not None:
        from cellos.verify import verify_events_file

        report = verify_events_file(events_path, keys, require_complete=False)
        if not report.ok:
            assert report.first_error is not None
            line, reason = report.first_error
            return LogCheck(False, f"{events_path}:{line}: {reason}")
    return check_log(log_path, find_record(events_path, cell_id, run_id), stream)
