"""The ports of CellOS (DESIGN.md §1) and the values that cross them.

The supervisor talks to backends, sinks, brokers and export sinks only through these
Protocols, so every adapter can be swapped without touching the lifecycle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, runtime_checkable

import msgspec

from cellos.core.stop import StopRequest

if TYPE_CHECKING:
    from cellos.core.spec import CellSpec

CloudEvent = dict[str, Any]


class CellHandle(msgspec.Struct, frozen=True):
    """Returned by ``create``: enough to run in, export from and destroy the cell."""

    cell_id: str
    backend: str
    #: Isolation features actually applied (evidence for ``lifecycle.v1.started``).
    isolation: tuple[str, ...] = ()
    #: Host resources created for the cell, by kind (e.g. ``{"cgroup": "/sys/fs/..."}``).
    resources: Mapping[str, str] = msgspec.field(default_factory=dict)
    #: Digests of boot artifacts and the like (microVM backends stamp theirs here).
    digests: Mapping[str, str] = msgspec.field(default_factory=dict)

    def evidence(self) -> dict[str, Any]:
        return {
            "cellId": self.cell_id,
            "backend": self.backend,
            "isolation": list(self.isolation),
            "resources": dict(self.resources),
            "digests": dict(self.digests),
        }


class TeardownReport(msgspec.Struct, frozen=True):
    """What ``destroy`` found and removed."""

    cell_id: str
    destroyed: bool
    #: Live cells this backend still tracks after this one was destroyed.
    peers_tracked_after: int
    #: Processes still alive in the cell that teardown had to kill.
    processes_killed: int = 0
    #: Anything teardown could not remove (empty means no residue).
    residue: tuple[str, ...] = ()


class ChainPosition(msgspec.Struct, frozen=True):
    """Where a run's event chain stands: its id and its last event's seq, digest and type.

    A backend keeps it in the cell's state record, so that the events a reaper emits for a
    cell whose supervisor died continue that run's own chain."""

    run_id: str
    seq: int
    digest: str
    event_type: str


class ReapedCell(msgspec.Struct, frozen=True):
    """A cell of a dead supervisor that a reaper found and removed."""

    cell_id: str
    removed: tuple[str, ...]
    residue: tuple[str, ...]
    #: The dead cell's ``spec.correlation`` (tenant, run ids), when its state recorded it, so
    #: that the reap events reach the same tenant and run as the cell's own events.
    correlation: Mapping[str, Any] | None = None
    #: The dead run's chain as last recorded (None: it had emitted nothing yet).
    chain: ChainPosition | None = None
    backend: str | None = None


#: The workload's output streams, in the order their statistics are reported.
STREAMS = ("stdout", "stderr")


@runtime_checkable
class OutputSink(Protocol):
    """Receives the workload's output as it is produced (DESIGN.md §5 "Output").

    ``stream`` is ``"stdout"`` or ``"stderr"``; chunks of one stream arrive in order, on the
    thread that supervises the workload. ``write`` must return promptly: the workload's pipes
    are not read while it runs (a slow sink slows the workload, it must never stall it)."""

    def write(self, stream: str, data: bytes) -> None: ...


class WorkloadRequest(msgspec.Struct, frozen=True):
    """The workload to start inside a created cell."""

    argv: Sequence[str]
    #: The complete environment of the workload: nothing else is inherited.
    env: Mapping[str, str]
    working_directory: str
    #: Seconds until the workload is killed (command timeout or what is left of the TTL).
    deadline_seconds: float | None
    graceful_shutdown_seconds: float
    #: Set by the supervisor when the cell must stop early (e.g. it was signalled).
    stop: StopRequest | None = None
    #: Where the workload's output goes as it is produced (None: only the bounded capture
    #: of ``WorkloadResult.stdout``/``stderr``).
    output: OutputSink | None = None
    #: Secrets delivered as files (``runtimeBroker``, ``runtimeLeasedBroker``): key -> value,
    #: each written to ``/run/secrets/<key>`` inside the cell by a :class:`SecretFilesBackend`.
    #: Never in ``env``, never in an event; ``repr`` leaves the values out.
    secret_files: Mapping[str, bytes] = msgspec.field(default_factory=dict)
    #: Seconds after the workload's start when the secret files are removed (None: never).
    secret_lease_seconds: int | None = None

    def __repr__(self) -> str:
        # Secret values never reach a log line or a traceback: only the keys are shown.
        return (
            f"WorkloadRequest(argv={list(self.argv)!r}, "
            f"working_directory={self.working_directory!r}, "
            f"secret_files={sorted(self.secret_files)!r})"
        )


class WorkloadResult(msgspec.Struct, frozen=True):
    """How the workload ended."""

    exit_code: int | None
    duration_ms: int
    #: Set when the workload could not be started at all (no exit code then).
    spawn_error: str | None = None
    #: True when CellOS killed the workload (timeout, TTL); no exit code then.
    forced: bool = False
    #: Why it ended, when not a plain exit: ``timeout``, ``signal:<n>``, ``spawn_failed``.
    reason: str | None = None
    #: The first bytes of each stream (bounded, for diagnostics and direct callers of a
    #: backend); the whole stream went to ``WorkloadRequest.output`` as it was produced.
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    truncated: bool = False
    #: Kernel counters of the cell's limits (e.g. ``oomKills``, ``pidsLimitHits``).
    limits: Mapping[str, int] = msgspec.field(default_factory=dict)
    #: The workload's processes CellOS killed while running it (at the deadline, or left
    #: behind when the workload exited); teardown adds its own count.
    processes_killed: int = 0


@runtime_checkable
class CellBackend(Protocol):
    """An isolation backend (``cellos.hosts.<name>``)."""

    name: str

    def create(self, spec: CellSpec) -> CellHandle: ...

    def run(self, handle: CellHandle, request: WorkloadRequest) -> WorkloadResult: ...

    def open_artifact(self, handle: CellHandle, path: str) -> BinaryIO:
        """Open an artifact for reading, resolving ``path`` inside the cell's own filesystem."""
        ...

    def destroy(self, handle: CellHandle) -> TeardownReport: ...


@runtime_checkable
class SecretFilesBackend(Protocol):
    """A backend that delivers ``WorkloadRequest.secret_files`` as files under /run/secrets on
    a per-cell tmpfs (mode 0400, owned by the workload's uid), removes them when the lease
    ends, and leaves no copy on the host after teardown."""

    def secret_files_refusal(self, spec: CellSpec) -> str | None:
        """None when this backend can deliver ``spec``'s secrets as files; else why not."""
        ...


@runtime_checkable
class NetworkEvidenceBackend(Protocol):
    """A backend that enforces egress and can attribute flows to its rules."""

    def network_events(self, handle: CellHandle) -> list[tuple[str, dict[str, Any]]]:
        """(event type, data) of every network decision of the cell, in order."""
        ...


class InjectedSecret(msgspec.Struct, frozen=True):
    """One ``authority.secretInjection`` entry with its resolved secret, for the cell's L7 proxy.

    The workload holds only ``placeholder``; the proxy replaces a header value that contains it
    by ``format`` with ``{value}`` = the secret, on requests to ``host`` only."""

    secret_ref: str
    #: Lower case, without a trailing dot.
    host: str
    header: str
    format: str
    placeholder: str
    value: str

    def __repr__(self) -> str:
        # The value never reaches a log line or a traceback.
        return f"InjectedSecret(secret_ref={self.secret_ref!r}, host={self.host!r})"

    def header_value(self) -> str:
        return self.format.replace("{value}", self.value, 1)


@runtime_checkable
class SecretInjectingBackend(Protocol):
    """A backend whose egress proxy can put secrets into requests (``secretInjection``)."""

    def inject_secrets(self, handle: CellHandle, secrets: Sequence[InjectedSecret]) -> None:
        """Arm the created cell's proxy; called after create, before the workload starts."""
        ...


@runtime_checkable
class ReapingBackend(Protocol):
    """A backend that leaves host state a crashed supervisor could orphan."""

    def reap(self) -> list[ReapedCell]: ...


@runtime_checkable
class ChainRecordingBackend(Protocol):
    """A backend that records, with each live cell, where the cell's run chain stands."""

    def note_chain(self, handle: CellHandle, position: ChainPosition) -> None: ...


@runtime_checkable
class EventSink(Protocol):
    """Receives finished (chained, possibly signed) CloudEvents."""

    def emit(self, event: CloudEvent) -> None: ...

    def flush(self) -> None:
        """Return once every event emitted so far is delivered (or dead-lettered); raise
        ``SinkError`` if one was lost. A sink that delivers inside ``emit`` does nothing."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class SecretBroker(Protocol):
    """Resolves secret keys to values for one cell and revokes them at teardown."""

    name: str

    def resolve(self, cell_id: str, key: str) -> str: ...

    def revoke(self, cell_id: str) -> None: ...


class ExportReceipt(msgspec.Struct, frozen=True):
    name: str
    destination: str
    size_bytes: int
    sha256: str


@runtime_checkable
class ExportSink(Protocol):
    """Stores one artifact's bytes under the cell's export location."""

    name: str

    def export(self, cell_id: str, name: str, source: BinaryIO) -> ExportReceipt: ...
