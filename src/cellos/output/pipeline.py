"""One run's output: redact, count and digest, then fan out (log, NATS, live consumer).

The digest and the byte count are of the stream exactly as it was emitted (after
redaction), so a captured log can be checked against ``command.v1.completed``. Nothing here
blocks on a slow destination except the live consumer, whose own contract is to return
promptly (the terminal relay bounds its wait, see :mod:`cellos.output.relay`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import msgspec

from cellos.core.log import get_logger
from cellos.core.ports import STREAMS, OutputSink
from cellos.output.logfile import BoundedLog
from cellos.output.redacting import StreamRedactor

if TYPE_CHECKING:
    from cellos.output.natslogs import LogPublisher, RunLogs

log = get_logger(__name__)

#: Default bound of each stream's durable log.
DEFAULT_LOG_MAX_BYTES = 64 << 20
#: How long the end of a run waits for buffered output to reach NATS.
PUBLISH_WAIT_SECONDS = 2.0


class OutputSettings(msgspec.Struct, frozen=True):
    #: Directory of the durable logs (``<dir>/<cellId>/<runId>.<stream>.log``); None: none.
    log_dir: str | None = None
    log_max_bytes: int = DEFAULT_LOG_MAX_BYTES
    #: Live publication to ``CELLOS_LOGS`` (only when NATS is configured).
    publisher: LogPublisher | None = None
    publish_wait_seconds: float = PUBLISH_WAIT_SECONDS


def log_path(log_dir: str, cell_id: str, run_id: str, stream: str) -> str:
    return os.path.join(log_dir, cell_id, f"{run_id}.{stream}.log")


class _Stream:
    def __init__(self, name: str, secrets: list[bytes], log: BoundedLog | None) -> None:
        self.name = name
        self.redactor = StreamRedactor(secrets)
        self._digest: Any = None
        self.total = 0
        self.log = log
        #: Digest of what the log holds, taken where the log was cut (None: not cut).
        self.log_digest: Any = None

    @property
    def digest(self) -> Any:
        """The stream's sha256, created at the first byte: hashlib loads OpenSSL (fast for bulk
        output), which a cell that prints nothing, and a one-shot supervisor start, can skip."""
        if self._digest is None:
            import hashlib

            self._digest = hashlib.sha256()
        return self._digest

    def hexdigest(self) -> str:
        return self._digest.hexdigest() if self._digest is not None else EMPTY_SHA256


#: sha256 of no bytes.
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


class OutputPipeline:
    """An :class:`~cellos.core.ports.OutputSink` for one run."""

    def __init__(
        self,
        settings: OutputSettings,
        *,
        cell_id: str,
        run_id: str,
        tenant: str = "default",
        secrets: list[bytes] | None = None,
        consumer: OutputSink | None = None,
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.consumer_error: str | None = None
        values = list(secrets or [])
        self.streams = {
            name: _Stream(
                name,
                values,
                BoundedLog(
                    log_path(settings.log_dir, cell_id, run_id, name), settings.log_max_bytes
                )
                if settings.log_dir
                else None,
            )
            for name in STREAMS
        }
        self.nats: RunLogs | None = (
            settings.publisher.run(cell_id, run_id, tenant) if settings.publisher else None
        )
        self._finished: dict[str, dict[str, Any]] | None = None

    @property
    def total(self) -> int:
        return sum(s.total for s in self.streams.values())

    def write(self, stream: str, data: bytes) -> None:
        state = self.streams[stream]
        released = state.redactor.feed(data)
        if released:
            self._emit(state, released)

    def _emit(self, state: _Stream, data: bytes) -> None:
        log_ = state.log
        if log_ is not None and state.log_digest is None and len(data) > log_.room():
            # The log is cut inside this chunk: remember the digest of what it will hold,
            # so that a truncated log can still be checked against the record.
            state.log_digest = state.digest.copy()
            state.log_digest.update(data[: log_.room()])
        state.digest.update(data)
        state.total += len(data)
        if log_ is not None:
            log_.write(data)
        if self.nats is not None:
            self.nats.write(state.name, data)
        if self.consumer is not None:
            try:
                self.consumer.write(state.name, data)
            except Exception as exc:  # noqa: BLE001 - a consumer's bug must not stop the cell
                self.consumer_error = f"{type(exc).__name__}: {exc}"
                log.warning("the output consumer failed and gets no more output: %s", exc)
                self.consumer = None

    def finish(self) -> dict[str, dict[str, Any]]:
        """End of the streams: release what redaction held back, close the logs, wait
        (bounded) for NATS; per stream, what ``command.v1.completed`` reports."""
        if self._finished is not None:
            return self._finished
        for state in self.streams.values():
            rest = state.redactor.flush()
            if rest:
                self._emit(state, rest)
        nats = self.nats.finish(self.settings.publish_wait_seconds) if self.nats else None
        stats: dict[str, dict[str, Any]] = {}
        for name, state in self.streams.items():
            entry: dict[str, Any] = {"bytes": state.total, "sha256": state.hexdigest()}
            log_ = state.log
            if log_ is not None:
                log_.close()
                entry["log"] = log_.path if log_.written else None
                entry["logBytes"] = log_.written
                entry["logDroppedBytes"] = log_.dropped
                if log_.dropped:
                    entry["logSha256"] = (
                        state.log_digest.hexdigest()
                        if state.log_digest is not None and log_.error is None
                        else None
                    )
                if log_.error is not None:
                    entry["logError"] = log_.error
            if nats is not None:
                entry["natsDroppedBytes"] = nats[name]["droppedBytes"]
            stats[name] = entry
        self._finished = stats
        return stats


def truncated(stats: dict[str, dict[str, Any]]) -> bool:
    """Some bytes of some stream did not reach the durable log."""
    return any(entry.get("logDroppedBytes", 0) for entry in stats.values())
