"""Running a tool call's cell on a warm supervisor, with its own stop request.

One :class:`~cellos.supervisor.lifecycle.Supervisor` is composed at server start (backend,
sinks, signer, exports: the ``CELLOS_*`` variables, as ``cellos-supervisor`` reads them) and
serves every call, as the work-queue worker does. ``Supervisor.stop`` stops *every* cell of
an instance, but a cancelled call must stop only its own: each call runs on a shallow copy
that shares the backend, sinks and signer and has a fresh :class:`StopRequest`.
"""

from __future__ import annotations

import base64
import copy
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cellos.core.stop import StopRequest
from cellos.mcp.documents import CellCall
from cellos.mcp.runlog import RunLog
from cellos.mcp.settings import McpSettings
from cellos.supervisor.lifecycle import RunOutcome, Supervisor

#: ``reason`` in the events of a cell whose tool call was cancelled by the client.
CANCELLED = "mcp_call_cancelled"

Progress = Callable[[str, bytes], None]


@dataclass
class Capture:
    """The first ``limit`` bytes of each stream (redacted, as the supervisor relays them)."""

    limit: int
    data: dict[str, bytearray] = field(
        default_factory=lambda: {"stdout": bytearray(), "stderr": bytearray()}
    )
    total: dict[str, int] = field(default_factory=lambda: {"stdout": 0, "stderr": 0})

    def add(self, stream: str, chunk: bytes) -> bytes:
        """Keep what fits; return that part (what may still be streamed to the client)."""
        held = self.data.setdefault(stream, bytearray())
        self.total[stream] = self.total.get(stream, 0) + len(chunk)
        room = max(0, self.limit - len(held))
        kept = chunk[:room]
        held += kept
        return kept

    def text(self, stream: str) -> str:
        return bytes(self.data.get(stream, b"")).decode("utf-8", errors="replace")

    def truncated(self, stream: str) -> bool:
        return self.total.get(stream, 0) > len(self.data.get(stream, b""))


class _Output:
    """The OutputSink port: capture, then hand what was kept to the progress callback."""

    def __init__(self, capture: Capture, progress: Progress | None) -> None:
        self.capture, self.progress = capture, progress

    def write(self, stream: str, data: bytes) -> None:
        kept = self.capture.add(stream, data)
        if kept and self.progress is not None:
            self.progress(stream, kept)


class CellRunner:
    def __init__(self, settings: McpSettings, env: Mapping[str, str]) -> None:
        from cellos.supervisor.composition import build_supervisor

        self.settings = settings
        os.makedirs(settings.export_dir, mode=0o700, exist_ok=True)
        composed = {
            **env,
            # The per-server log get_run reads; the exports the artifacts come from.
            "CELL_OS_JSONL_EVENTS": settings.events_path,
            "CELLOS_EXPORT_DIR": settings.export_dir,
        }
        self.supervisor: Supervisor = build_supervisor(composed)
        self.supervisor.reap_stale()  # what a killed server left, as cellos-supervisor does
        keys = None
        if self.supervisor.signer is not None:
            from cellos.core.signing import VerifyKeys

            keys = VerifyKeys.from_signers(self.supervisor.signer)
        self.log = RunLog(settings.events_path, keys)
        self._lock = threading.Lock()

    @property
    def backend_name(self) -> str:
        return str(getattr(self.supervisor.backend, "name", type(self.supervisor.backend)))

    def close(self) -> None:
        self.supervisor.close()

    def run(
        self, call: CellCall, stop: StopRequest, progress: Progress | None = None
    ) -> dict[str, Any]:
        """Run the cell to its end (teardown and events included); the tool's result."""
        supervisor = copy.copy(self.supervisor)
        supervisor.stop_request = stop
        capture = Capture(self.settings.output_limit_bytes)
        outcome = supervisor.run(call.document, on_output=_Output(capture, progress))
        return self.result(call, outcome, capture)

    def result(self, call: CellCall, outcome: RunOutcome, capture: Capture) -> dict[str, Any]:
        run = outcome.result
        return {
            "cellId": outcome.cell_id,
            "runId": outcome.run_id,
            "exitCode": run.exit_code if run is not None else None,
            "outcome": outcome.outcome,
            "terminalState": outcome.terminal_state,
            "forced": bool(run and run.forced) or outcome.terminal_state == "forced",
            "reason": run.reason if run is not None else None,
            "durationMs": run.duration_ms if run is not None else None,
            "stdout": capture.text("stdout"),
            "stderr": capture.text("stderr"),
            "stdoutBytes": capture.total.get("stdout", 0),
            "stderrBytes": capture.total.get("stderr", 0),
            "stdoutTruncated": capture.truncated("stdout"),
            "stderrTruncated": capture.truncated("stderr"),
            "artifacts": self._artifacts(call, outcome),
            "errors": [f"{e.path}: {e.reason}" for e in outcome.errors],
            "evidence": self.log.verdict(outcome.run_id).as_dict(),
        }

    def _artifacts(self, call: CellCall, outcome: RunOutcome) -> list[dict[str, Any]]:
        exported = {r.name: r for r in outcome.exports}
        items: list[dict[str, Any]] = []
        for name, path in call.artifacts.items():
            receipt = exported.get(name)
            if receipt is None:
                items.append({"name": name, "path": path, "exported": False})
                continue
            item: dict[str, Any] = {
                "name": name,
                "path": path,
                "exported": True,
                "sizeBytes": receipt.size_bytes,
                "sha256": receipt.sha256,
                "location": receipt.destination,
            }
            if receipt.size_bytes <= self.settings.inline_artifact_bytes:
                try:
                    # Our own export, but read as it was written: never through a symlink.
                    fd = os.open(receipt.destination, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    with os.fdopen(fd, "rb") as f:
                        data = f.read(self.settings.inline_artifact_bytes + 1)
                    item["contentBase64"] = base64.b64encode(data).decode()
                except OSError as exc:
                    item["inlineError"] = exc.strerror or str(exc)
            items.append(item)
        return items
