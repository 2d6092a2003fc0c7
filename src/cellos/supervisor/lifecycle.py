"""The lifecycle state machine (DESIGN.md §3).

validate -> network_scope -> secrets -> create + lifecycle.started -> run -> export ->
destroy -> revoke -> evidence_bundle -> lifecycle.destroyed -> compliance.summary

Anything that fails after ``create`` still destroys and revokes (``finally``). Every run ends
with a compliance summary, even one refused before ``create``, so a verifier can tell a
complete run from a truncated one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from cellos.core import events as ev
from cellos.core import isolation
from cellos.core.canonical import canonical_bytes, sha256_hex
from cellos.core.chain import RunChain
from cellos.core.errors import (
    CellosError,
    ExportError,
    HostError,
    PolicyRefused,
    SecretBrokerError,
    SinkError,
)
from cellos.core.log import get_logger
from cellos.core.ports import (
    CellBackend,
    CellHandle,
    ChainRecordingBackend,
    EventSink,
    ExportReceipt,
    ExportSink,
    NetworkEvidenceBackend,
    OutputSink,
    ReapedCell,
    ReapingBackend,
    SecretBroker,
    SecretFilesBackend,
    SecretInjectingBackend,
    TeardownReport,
    WorkloadRequest,
    WorkloadResult,
)
from cellos.core.secrets_env import secret_env_name
from cellos.core.spec import SECRETS_DIRECTORY, ExecutionCell, to_document
from cellos.core.stop import StopRequest
from cellos.output.pipeline import OutputPipeline, OutputSettings, truncated
from cellos.sinks.redact import Redactor
from cellos.supervisor.emitter import EventEmitter
from cellos.supervisor.secret_delivery import ResolvedSecrets, deliver

if TYPE_CHECKING:
    from cellos.core.signing import Signer

log = get_logger(__name__)

#: TTL applied when a document declares no ``lifetime`` (every cell has a wall-clock bound).
DEFAULT_TTL_SECONDS = 3600
#: Exit status of a run whose workload was killed by timeout or TTL (as timeout(1) does).
EXIT_FORCED = 124


class RunOutcome(msgspec.Struct):
    """What one run produced; ``exit_code`` is the supervisor's process exit status."""

    cell_id: str
    run_id: str
    exit_code: int
    outcome: str
    terminal_state: str
    result: WorkloadResult | None = None
    exports: list[ExportReceipt] = msgspec.field(default_factory=list)
    errors: list[CellosError] = msgspec.field(default_factory=list)
    teardown: TeardownReport | None = None
    events: list[dict[str, Any]] = msgspec.field(default_factory=list)
    lost_events: int = 0
    #: Packets per decision (``allowed`` / ``dropped``) counted by the cell's egress rules.
    flows: dict[str, int] = msgspec.field(default_factory=dict)
    #: The run reached the export step (failed exports count only then).
    exports_attempted: bool = False
    #: Per stream (``stdout``, ``stderr``): what ``command.v1.completed`` says of the output
    #: (``bytes``, ``sha256``, the log's path and truncation, NATS losses).
    output: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)


class Supervisor:
    """Runs cells; one instance can run many cells (warm mode), each with its own run chain."""

    def __init__(
        self,
        *,
        backend: CellBackend,
        sinks: Sequence[EventSink],
        broker: SecretBroker,
        exporter: ExportSink | None,
        signer: Signer | None = None,
        host: str = "localhost",
        default_ttl_seconds: int = DEFAULT_TTL_SECONDS,
        profile: str = "portable",
        reaper: Callable[[], list[ReapedCell]] | None = None,
        output: OutputSettings | None = None,
    ) -> None:
        self.backend = backend
        self.sinks = sinks
        self.broker = broker
        self.exporter = exporter
        self.signer = signer
        self.host = host
        self.default_ttl_seconds = default_ttl_seconds
        self.profile = profile
        #: Walks the host's cell-state store (every backend's cells); default: the backend's.
        self.reaper = reaper
        #: Set by :meth:`stop` (e.g. from a signal handler): running cells stop early.
        self.stop_request = StopRequest()
        #: Where each run's output goes besides the caller's consumer (log, NATS).
        self.output = output or OutputSettings()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        if self.output.publisher is not None:
            self.output.publisher.close()

    def stop(self, signum: int | None = None) -> None:
        """Stop the running cell (grace, then kill), export nothing more, tear down, and say
        so in its events; a second call skips the rest of the grace. Signal-handler safe."""
        self.stop_request.set(signum=signum)

    def reap_stale(self) -> list[ReapedCell]:
        """Remove what crashed supervisors left; per cell, the events that end its run (a
        forced completion if its workload had started, destroyed, summary), continuing the
        dead run's own chain when the store kept its position."""
        if self.reaper is not None:
            reaped = self.reaper()
        elif isinstance(self.backend, ReapingBackend):
            reaped = self.backend.reap()
        else:
            return []
        for cell in reaped:
            chain = cell.chain
            emitter = EventEmitter(
                cell_id=cell.cell_id,
                host=self.host,
                sinks=self.sinks,
                redactor=Redactor(),
                signer=self.signer,
                chain=RunChain.resume(chain.run_id, chain.seq, chain.digest) if chain else None,
            )
            if chain is not None and chain.event_type == ev.PROCESS_SPAWNED:
                emitter.emit(
                    ev.COMMAND_COMPLETED,
                    {
                        "cellId": cell.cell_id,
                        "exitCode": None,
                        "durationMs": None,
                        "spawnError": None,
                        "forced": True,
                        "reason": "supervisor_lost",
                    },
                )
            common: dict[str, Any] = {
                "cellId": cell.cell_id,
                "outcome": "failed",
                "terminalState": "forced",
                "reason": "reaped",
            }
            if cell.correlation:
                common["correlation"] = dict(cell.correlation)
            emitter.emit(
                ev.LIFECYCLE_DESTROYED,
                {
                    **common,
                    "destroyed": not cell.residue,
                    "removed": list(cell.removed),
                    "residue": list(cell.residue),
                },
            )
            emitter.emit(
                ev.COMPLIANCE_SUMMARY,
                {**common, "errors": [f"{cell.cell_id}: cell of a dead supervisor was reaped"]},
            )
            emitter.flush()  # as in run(): confirmed before the reap is reported
        return reaped

    # -- the lifecycle -----------------------------------------------------------------------

    def run(
        self,
        document: ExecutionCell,
        delivery: Mapping[str, Any] | None = None,
        *,
        on_output: OutputSink | None = None,
    ) -> RunOutcome:
        """Run one cell. ``delivery`` (e.g. a work-queue attempt number and the run ids of
        earlier attempts) is recorded in the started event and the compliance summary.
        ``on_output`` gets the workload's (redacted) output as it is produced."""
        spec = document.spec
        redactor = Redactor()
        emitter = EventEmitter(
            cell_id=spec.id, host=self.host, sinks=self.sinks, redactor=redactor, signer=self.signer
        )
        ttl = spec.lifetime.ttl_seconds if spec.lifetime else self.default_ttl_seconds
        ttl_deadline = time.monotonic() + ttl
        spec_digest = sha256_hex(canonical_bytes(to_document(document)))
        out = RunOutcome(
            cell_id=spec.id,
            run_id=emitter.run_id,
            exit_code=1,
            outcome="failed",
            terminal_state="clean",
        )
        handle: CellHandle | None = None
        revoke_pending = False
        stop = self.stop_request
        try:
            self._check_policy(document)
            revoke_pending = True
            secrets = self._resolve_secrets(document, redactor)
            if stop.is_set():
                raise HostError("supervisor", f"{stop.describe()} before the cell was created")
            try:
                handle = self.backend.create(spec)
            except CellosError as exc:
                # Evidence that the cell was refused at creation (e.g. a boot image whose
                # digest does not match its manifest): nothing was created, nothing runs.
                emitter.emit(
                    ev.LIFECYCLE_DESTROYED,
                    {
                        "cellId": spec.id,
                        "outcome": "failed",
                        "terminalState": "clean",
                        "reason": "create_failed",
                        "created": False,
                        "destroyed": True,
                        "error": f"{exc.path}: {exc.reason}",
                    },
                )
                raise
            if isinstance(self.backend, ChainRecordingBackend):
                backend, created = self.backend, handle
                emitter.on_emit = lambda position: backend.note_chain(created, position)
            emitter.emit(
                ev.LIFECYCLE_STARTED,
                {
                    "cellId": spec.id,
                    "backend": handle.backend,
                    "isolation": list(handle.isolation),
                    "resources": dict(handle.resources),
                    "digests": dict(handle.digests),
                    "specDigest": spec_digest,
                    "ttlSeconds": ttl,
                    "timeoutSeconds": spec.run.timeout_seconds if spec.run else None,
                    "networkScope": {
                        "egressRuleCount": len(spec.authority.egress_rules),
                        # Enforced when the backend applied an egress scope (or no network).
                        "enforced": isolation.network_enforced(handle.isolation),
                    },
                    "correlation": _correlation(document),
                    "delivery": dict(delivery) if delivery else None,
                    "secrets": _secrets_evidence(document),
                },
            )
            try:
                if emitter.last_undelivered:
                    # Not even the start could be recorded: nothing may run unrecorded.
                    raise SinkError(
                        "events",
                        "lifecycle.v1.started could not be delivered to any sink ("
                        + "; ".join(emitter.last_failures)
                        + "); the workload was not run",
                    )
                if secrets.injected:
                    # Before anything runs: the cell's L7 proxy learns the secrets it injects.
                    assert isinstance(self.backend, SecretInjectingBackend)  # _check_policy
                    self.backend.inject_secrets(handle, secrets.injected)
                # A cell without ``run`` (the seed contract) is created, exports, is destroyed:
                # no process_spawned / command.completed events (docs/events.md).
                if spec.run is not None:
                    out.result = self._run_workload(
                        document, handle, secrets, ttl_deadline, emitter, on_output, out
                    )
                    if out.result.spawn_error:
                        out.errors.append(HostError("spec.run.argv[0]", out.result.spawn_error))
                out.flows = self._emit_network(handle, emitter)
                if not stop.is_set():
                    out.exports_attempted = True
                    out.exports = self._export(document, handle, emitter, out.errors)
            finally:
                if stop.is_set():
                    out.errors.append(
                        HostError("supervisor", f"{stop.describe()}: the cell was cut short")
                    )
                out.teardown = self._destroy(handle, out.errors)
                emitter.on_emit = None  # the cell's record is gone with it
                revoke_pending = False
                self._revoke(spec.id, out.errors)
                self._emit_end(emitter, document, handle, spec_digest, out)
        except CellosError as exc:
            out.errors.insert(0, exc)
        except Exception as exc:
            # A bug must still end in teardown, a summary and a clear error, not a traceback.
            log.exception("unexpected failure of cell %s", spec.id)
            out.errors.insert(0, HostError("supervisor", f"unexpected {type(exc).__name__}: {exc}"))
        finally:
            if revoke_pending:
                self._revoke(spec.id, out.errors)
            out.exit_code, out.outcome = self._exit_status(out)
            self._emit_summary(emitter, document, ttl, out, delivery)
            # Sinks may publish asynchronously (JetStream pipelines its acks): the run is
            # reported only once destroyed and the summary are acked or dead-lettered.
            emitter.flush()
            out.lost_events = emitter.lost
            if out.lost_events and out.exit_code == 0:
                out.exit_code = 1
            out.events = emitter.emitted
            if out.result is not None:
                # The workload may print its own secret; nothing we relay may carry it.
                out.result = msgspec.structs.replace(
                    out.result,
                    stdout=redactor.bytes(out.result.stdout),
                    stderr=redactor.bytes(out.result.stderr),
                )
            redactor.forget()
        return out

    # -- steps -------------------------------------------------------------------------------

    def _check_policy(self, document: ExecutionCell) -> None:
        authority = document.spec.authority
        if authority.secret_injection and not isinstance(self.backend, SecretInjectingBackend):
            raise PolicyRefused(
                "spec.authority.secretInjection",
                f"the {self.backend.name} backend has no egress proxy that can inject secrets "
                "(secret injection needs the cellos backend)",
            )
        run = document.spec.run
        if run is None or not authority.secret_refs:
            return  # no workload or no secret, so no secret delivery to check
        if not run.secrets_as_files:
            # Injected secrets never reach the environment (only their placeholders do).
            if self.profile == "hardened" and set(authority.secret_refs) - authority.injected_refs:
                raise PolicyRefused(
                    "spec.run.secretDelivery",
                    "the hardened profile refuses secretDelivery 'env' "
                    "(use runtimeBroker or runtimeLeasedBroker)",
                )
            return
        where = run.working_directory.rstrip("/")
        if (
            where == SECRETS_DIRECTORY
            or where.startswith(SECRETS_DIRECTORY + "/")
            or (SECRETS_DIRECTORY.startswith(where + "/"))
        ):
            raise PolicyRefused(
                "spec.run.workingDirectory",
                f"{run.working_directory} overlaps {SECRETS_DIRECTORY}, where "
                f"secretDelivery {run.secret_delivery!r} puts the secrets",
            )
        backend = self.backend
        why = (
            backend.secret_files_refusal(document.spec)
            if isinstance(backend, SecretFilesBackend)
            else f"the {backend.name} backend cannot deliver secrets as files"
        )
        if why is not None:
            raise PolicyRefused("spec.run.secretDelivery", f"{run.secret_delivery!r}: {why}")

    def _resolve_secrets(self, document: ExecutionCell, redactor: Redactor) -> ResolvedSecrets:
        """Every secret the cell may resolve, and how each reaches it (variable, file or
        injection placeholder)."""
        values: dict[str, str] = {}
        for index, key in enumerate(document.spec.authority.secret_refs):
            try:
                value = self.broker.resolve(document.spec.id, key)
            except SecretBrokerError as exc:
                raise SecretBrokerError(
                    f"spec.authority.secretRefs[{index}]", f"{key!r}: {exc.reason}"
                ) from None
            redactor.add(value)
            values[key] = value
        return deliver(document.spec, values)

    def _run_workload(
        self,
        document: ExecutionCell,
        handle: CellHandle,
        secrets: ResolvedSecrets,
        ttl_deadline: float,
        emitter: EventEmitter,
        on_output: OutputSink | None,
        out: RunOutcome,
    ) -> WorkloadResult:
        run = document.spec.run
        if run is None:  # run() does not call this for a cell without a workload
            raise HostError("spec.run", "no workload declared")
        remaining_ttl = max(0.0, ttl_deadline - time.monotonic())
        timeout = run.timeout_seconds
        ttl_binds = timeout is None or remaining_ttl < timeout
        deadline = remaining_ttl if ttl_binds else float(timeout or 0)
        grace = run.limits.graceful_shutdown_seconds if run.limits else 5
        stop = self.stop_request
        if stop.is_set():
            # Stopped between create and run: the workload never starts.
            result = WorkloadResult(exit_code=None, duration_ms=0, forced=True, reason=stop.reason)
            self._emit_completed(emitter, handle, result, stop.reason)
            return result
        emitter.emit(
            ev.PROCESS_SPAWNED,
            {
                "cellId": handle.cell_id,
                "program": run.argv[0],
                "argc": len(run.argv),
            },
        )
        correlation = _correlation(document) or {}
        output = OutputPipeline(
            self.output,
            cell_id=handle.cell_id,
            run_id=emitter.run_id,
            tenant=str(correlation.get("tenantId") or "default"),
            secrets=[value.encode() for value in secrets.values],
            consumer=on_output,
        )
        request = WorkloadRequest(
            argv=run.argv,
            env={**run.env, **secrets.env},
            secret_files=secrets.files,
            secret_lease_seconds=run.secret_lease_seconds if secrets.files else None,
            working_directory=run.working_directory,
            deadline_seconds=deadline,
            graceful_shutdown_seconds=float(grace),
            stop=stop,
            output=output,
        )
        try:
            result = self.backend.run(handle, request)
            if not output.total and (result.stdout or result.stderr):
                # A backend that does not stream: its (bounded) capture is all there is.
                output.write("stdout", result.stdout)
                output.write("stderr", result.stderr)
        finally:
            out.output = output.finish()
        reason = result.reason
        if result.forced and reason == "timeout":
            reason = "ttl" if ttl_binds else "timeout"
        self._emit_completed(emitter, handle, result, reason, out.output)
        if result.forced:
            return _with_reason(result, reason)
        return result

    @staticmethod
    def _emit_completed(
        emitter: EventEmitter,
        handle: CellHandle,
        result: WorkloadResult,
        reason: str | None,
        output: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        output = output or {}
        emitter.emit(
            ev.COMMAND_COMPLETED,
            {
                "cellId": handle.cell_id,
                "exitCode": result.exit_code,
                "durationMs": result.duration_ms,
                "spawnError": result.spawn_error,
                "forced": result.forced,
                "reason": reason,
                # The streams as emitted (redacted): what the logs and NATS received.
                "stdoutBytes": output.get("stdout", {}).get("bytes", 0),
                "stderrBytes": output.get("stderr", {}).get("bytes", 0),
                "outputTruncated": truncated(output),
                "output": output,
                "limits": dict(result.limits),
            },
        )

    def _emit_network(self, handle: CellHandle, emitter: EventEmitter) -> dict[str, int]:
        """DNS/L7 decisions and nft counters become events; returns packets per decision."""
        if not isinstance(self.backend, NetworkEvidenceBackend):
            return {}
        totals = {"allowed": 0, "dropped": 0}
        for event_type, data in self.backend.network_events(handle):
            emitter.emit(event_type, {"cellId": handle.cell_id, **data})
            if event_type == ev.NETWORK_FLOW_DECISION:
                totals[data["decision"]] = totals.get(data["decision"], 0) + data["packets"]
        return totals

    def _export(
        self,
        document: ExecutionCell,
        handle: CellHandle,
        emitter: EventEmitter,
        errors: list[CellosError],
    ) -> list[ExportReceipt]:
        receipts: list[ExportReceipt] = []
        for index, artifact in enumerate(document.spec.artifacts):
            if self.stop_request.is_set():
                break  # asked to stop: nothing more leaves the cell
            where = f"spec.export.artifacts[{index}]"
            try:
                if self.exporter is None:
                    raise ExportError("CELLOS_EXPORT_DIR", "no export destination is configured")
                with self.backend.open_artifact(handle, artifact.path) as source:
                    receipt = self.exporter.export(handle.cell_id, artifact.name, source)
            except CellosError as exc:
                # Blame the variable when the destination is at fault, else the artifact.
                path = exc.path if exc.path.startswith("CELLOS_EXPORT") else f"{where}.path"
                if not any((e.path, e.reason) == (path, exc.reason) for e in errors):
                    errors.append(ExportError(path, exc.reason))
                emitter.emit(
                    ev.EXPORT_FAILED,
                    {
                        "cellId": handle.cell_id,
                        "name": artifact.name,
                        "path": artifact.path,
                        "reason": exc.reason,
                    },
                )
                continue
            receipts.append(receipt)
            emitter.emit(
                ev.EXPORT_COMPLETED,
                {
                    "cellId": handle.cell_id,
                    "name": artifact.name,
                    "path": artifact.path,
                    "destination": receipt.destination,
                    "exporter": self.exporter.name,
                    "sizeBytes": receipt.size_bytes,
                    "sha256": receipt.sha256,
                },
            )
        return receipts

    def _destroy(self, handle: CellHandle, errors: list[CellosError]) -> TeardownReport | None:
        try:
            report = self.backend.destroy(handle)
        except CellosError as exc:
            errors.append(exc)
            return None
        except OSError as exc:
            errors.append(HostError(handle.cell_id, f"teardown failed: {exc.strerror or exc}"))
            return None
        if report.residue:
            errors.append(
                HostError(handle.cell_id, f"teardown left residue: {', '.join(report.residue)}")
            )
        return report

    def _revoke(self, cell_id: str, errors: list[CellosError]) -> None:
        try:
            self.broker.revoke(cell_id)
        except CellosError as exc:
            errors.append(exc)

    def _emit_end(
        self,
        emitter: EventEmitter,
        document: ExecutionCell,
        handle: CellHandle,
        spec_digest: str,
        out: RunOutcome,
    ) -> None:
        result = out.result
        # A stop request cuts the run short even when the workload had already ended.
        forced = bool(result and result.forced) or self.stop_request.is_set()
        out.terminal_state = "forced" if forced else "clean"
        out.exit_code, out.outcome = self._exit_status(out)
        emitter.emit(
            ev.EVIDENCE_BUNDLE_EMITTED,
            {
                "cellId": handle.cell_id,
                "specDigest": spec_digest,
                "handleDigest": sha256_hex(canonical_bytes(handle.evidence())),
                "artifacts": [
                    {"name": r.name, "sha256": r.sha256, "sizeBytes": r.size_bytes}
                    for r in out.exports
                ],
            },
        )
        teardown = out.teardown
        data: dict[str, Any] = {
            "cellId": handle.cell_id,
            "outcome": out.outcome,
            "terminalState": out.terminal_state,
            "reason": (result.reason if result else None)
            or (self.stop_request.reason if forced else None),
            "destroyed": bool(teardown and teardown.destroyed),
            "peersTrackedAfter": teardown.peers_tracked_after if teardown else None,
            # Killed at the deadline (or left behind by the workload) and at teardown.
            "processesKilled": (
                teardown.processes_killed + (result.processes_killed if result else 0)
                if teardown
                else None
            ),
            "residue": list(teardown.residue) if teardown else None,
        }
        if not forced:
            # A forced teardown carries no exit code (DESIGN.md §3).
            data["exitCode"] = result.exit_code if result else None
        emitter.emit(ev.LIFECYCLE_DESTROYED, data)

    def _emit_summary(
        self,
        emitter: EventEmitter,
        document: ExecutionCell,
        ttl: int,
        out: RunOutcome,
        delivery: Mapping[str, Any] | None = None,
    ) -> None:
        spec = document.spec
        result = out.result
        emitter.emit(
            ev.COMPLIANCE_SUMMARY,
            {
                "cellId": spec.id,
                "outcome": out.outcome,
                "terminalState": out.terminal_state,
                "ttlSeconds": ttl,
                "egressRuleCount": len(spec.authority.egress_rules),
                "secretDeliveryMode": spec.run.secret_delivery if spec.run else None,
                "secretRefCount": len(spec.authority.secret_refs),
                "exitCode": None if result is None or result.forced else result.exit_code,
                "exportsCompleted": len(out.exports),
                "exportsFailed": (
                    len(spec.artifacts) - len(out.exports) if out.exports_attempted else 0
                ),
                "eventsLost": emitter.lost,
                "networkFlows": dict(out.flows),
                "errors": [f"{e.path}: {e.reason}" for e in out.errors],
                "correlation": _correlation(document),
                "delivery": dict(delivery) if delivery else None,
                "policy": to_document(document.spec.policy) if document.spec.policy else None,
            },
        )

    def _exit_status(self, out: RunOutcome) -> tuple[int, str]:
        signum = self.stop_request.signum
        if signum is not None:
            return 128 + signum, "failed"  # as a shell reports a command killed by it
        result = out.result
        if result is not None and result.forced:
            return EXIT_FORCED, "failed"
        if result is None and not out.errors:
            return 0, "succeeded"  # a cell without a workload that exported everything
        if result is None or result.exit_code is None:
            first = out.errors[0].exit_code if out.errors else 1
            return first, "failed"
        if result.exit_code != 0:
            return result.exit_code, "failed"
        if out.errors:
            return 1, "failed"
        return 0, "succeeded"


def _secrets_evidence(document: ExecutionCell) -> dict[str, Any] | None:
    """How the cell's secrets reach the workload: the mode and the keys, never a value."""
    run = document.spec.run
    keys = list(document.spec.authority.secret_refs)
    if run is None or not keys:
        return None
    files = run.secrets_as_files
    injected = document.spec.authority.injected_refs
    delivered = [k for k in keys if k not in injected]
    return {
        "mode": run.secret_delivery,
        "keys": keys,
        "directory": SECRETS_DIRECTORY if files and delivered else None,
        "variables": None if files else [secret_env_name(k) for k in delivered],
        "leaseSeconds": run.secret_lease_seconds,
        # Held by the cell's L7 proxy; the workload has only their placeholders.
        "injected": [k for k in keys if k in injected],
    }


def _correlation(document: ExecutionCell) -> dict[str, Any] | None:
    corr = document.spec.correlation
    return to_document(corr, exclude_none=True) if corr else None


def _with_reason(result: WorkloadResult, reason: str | None) -> WorkloadResult:
    return msgspec.structs.replace(result, reason=reason)
