"""The lifecycle state machine (DESIGN.md §3).

validate -> network_scope -> secrets -> create + lifecycle.started -> run -> export ->
destroy -> revoke -> evidence_bundle -> lifecycle.destroyed -> compliance.summary

Anything that fails after ``create`` still destroys and revokes (``finally``). Every run ends
with a compliance summary, even one refused before ``create``, so a verifier can tell a
complete run from a truncated one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cellos.core import events as ev
from cellos.core.canonical import canonical_bytes, sha256_hex
from cellos.core.errors import (
    CellosError,
    ExportError,
    HostError,
    PolicyRefused,
    SecretBrokerError,
)
from cellos.core.ports import (
    CellBackend,
    CellHandle,
    EventSink,
    ExportReceipt,
    ExportSink,
    NetworkEvidenceBackend,
    ReapedCell,
    ReapingBackend,
    SecretBroker,
    TeardownReport,
    WorkloadRequest,
    WorkloadResult,
)
from cellos.core.secrets_env import secret_env_name
from cellos.core.signing import Signer
from cellos.core.spec import ExecutionCell, to_document
from cellos.sinks.redact import Redactor
from cellos.supervisor.emitter import EventEmitter

log = logging.getLogger(__name__)

#: TTL applied when a document declares no ``lifetime`` (every cell has a wall-clock bound).
DEFAULT_TTL_SECONDS = 3600
#: Exit status of a run whose workload was killed by timeout or TTL (as timeout(1) does).
EXIT_FORCED = 124


@dataclass
class RunOutcome:
    """What one run produced; ``exit_code`` is the supervisor's process exit status."""

    cell_id: str
    run_id: str
    exit_code: int
    outcome: str
    terminal_state: str
    result: WorkloadResult | None = None
    exports: list[ExportReceipt] = field(default_factory=list)
    errors: list[CellosError] = field(default_factory=list)
    teardown: TeardownReport | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    lost_events: int = 0
    #: Packets per decision (``allowed`` / ``dropped``) counted by the cell's egress rules.
    flows: dict[str, int] = field(default_factory=dict)
    #: The run reached the export step (failed exports count only then).
    exports_attempted: bool = False


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
    ) -> None:
        self.backend = backend
        self.sinks = sinks
        self.broker = broker
        self.exporter = exporter
        self.signer = signer
        self.host = host
        self.default_ttl_seconds = default_ttl_seconds
        self.profile = profile

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def reap_stale(self) -> list[ReapedCell]:
        """Remove what crashed supervisors left; one destroyed event (and summary) per cell."""
        if not isinstance(self.backend, ReapingBackend):
            return []
        reaped = self.backend.reap()
        for cell in reaped:
            emitter = EventEmitter(
                cell_id=cell.cell_id,
                host=self.host,
                sinks=self.sinks,
                redactor=Redactor(),
                signer=self.signer,
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
        return reaped

    # -- the lifecycle -----------------------------------------------------------------------

    def run(self, document: ExecutionCell, delivery: Mapping[str, Any] | None = None) -> RunOutcome:
        """Run one cell. ``delivery`` (e.g. a work-queue attempt number and the run ids of
        earlier attempts) is recorded in the started event and the compliance summary."""
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
        try:
            self._check_policy(document)
            revoke_pending = True
            secret_env = self._resolve_secrets(document, redactor)
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
                        "enforced": any(f.startswith("network:") for f in handle.isolation),
                    },
                    "correlation": _correlation(document),
                    "delivery": dict(delivery) if delivery else None,
                },
            )
            try:
                # A cell without ``run`` (the seed contract) is created, exports, is destroyed:
                # no process_spawned / command.completed events (docs/events.md).
                if spec.run is not None:
                    out.result = self._run_workload(
                        document, handle, secret_env, ttl_deadline, emitter
                    )
                    if out.result.spawn_error:
                        out.errors.append(HostError("spec.run.argv[0]", out.result.spawn_error))
                out.flows = self._emit_network(handle, emitter)
                out.exports_attempted = True
                out.exports = self._export(document, handle, emitter, out.errors)
            finally:
                out.teardown = self._destroy(handle, out.errors)
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
            out.lost_events = emitter.lost
            if out.lost_events and out.exit_code == 0:
                out.exit_code = 1
            out.events = emitter.emitted
            if out.result is not None:
                # The workload may print its own secret; nothing we relay may carry it.
                out.result = replace(
                    out.result,
                    stdout=redactor.bytes(out.result.stdout),
                    stderr=redactor.bytes(out.result.stderr),
                )
            redactor.forget()
        return out

    # -- steps -------------------------------------------------------------------------------

    def _check_policy(self, document: ExecutionCell) -> None:
        run = document.spec.run
        if run is None:
            return  # no workload, so no secret delivery to check
        if run.secret_delivery != "env":
            raise PolicyRefused(
                "spec.run.secretDelivery",
                f"{run.secret_delivery!r} is not supported by this build (use 'env')",
            )
        if (
            self.profile == "hardened"
            and run.secret_delivery == "env"
            and document.spec.authority.secret_refs
        ):
            raise PolicyRefused(
                "spec.run.secretDelivery", "the hardened profile refuses secretDelivery 'env'"
            )

    def _resolve_secrets(self, document: ExecutionCell, redactor: Redactor) -> dict[str, str]:
        values: dict[str, str] = {}
        for index, key in enumerate(document.spec.authority.secret_refs):
            try:
                value = self.broker.resolve(document.spec.id, key)
            except SecretBrokerError as exc:
                raise SecretBrokerError(
                    f"spec.authority.secretRefs[{index}]", f"{key!r}: {exc.reason}"
                ) from None
            redactor.add(value)
            values[secret_env_name(key)] = value
        return values

    def _run_workload(
        self,
        document: ExecutionCell,
        handle: CellHandle,
        secret_env: dict[str, str],
        ttl_deadline: float,
        emitter: EventEmitter,
    ) -> WorkloadResult:
        run = document.spec.run
        if run is None:  # run() does not call this for a cell without a workload
            raise HostError("spec.run", "no workload declared")
        remaining_ttl = max(0.0, ttl_deadline - time.monotonic())
        timeout = run.timeout_seconds
        ttl_binds = timeout is None or remaining_ttl < timeout
        deadline = remaining_ttl if ttl_binds else float(timeout or 0)
        grace = run.limits.graceful_shutdown_seconds if run.limits else 5
        emitter.emit(
            ev.PROCESS_SPAWNED,
            {
                "cellId": handle.cell_id,
                "program": run.argv[0],
                "argc": len(run.argv),
            },
        )
        request = WorkloadRequest(
            argv=run.argv,
            env={**run.env, **secret_env},
            working_directory=run.working_directory,
            deadline_seconds=deadline,
            graceful_shutdown_seconds=float(grace),
        )
        result = self.backend.run(handle, request)
        reason = result.reason
        if result.forced:
            reason = "ttl" if ttl_binds else "timeout"
        emitter.emit(
            ev.COMMAND_COMPLETED,
            {
                "cellId": handle.cell_id,
                "exitCode": result.exit_code,
                "durationMs": result.duration_ms,
                "spawnError": result.spawn_error,
                "forced": result.forced,
                "reason": reason,
                "stdoutBytes": result.stdout_bytes,
                "stderrBytes": result.stderr_bytes,
                "outputTruncated": result.truncated,
                "limits": dict(result.limits),
            },
        )
        if result.forced:
            return _with_reason(result, reason)
        return result

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
            where = f"spec.export.artifacts[{index}]"
            try:
                if self.exporter is None:
                    raise ExportError("CELLOS_EXPORT_DIR", "no export destination is configured")
                with self.backend.open_artifact(handle, artifact.path) as source:
                    receipt = self.exporter.export(handle.cell_id, artifact.name, source)
            except CellosError as exc:
                errors.append(ExportError(f"{where}.path", exc.reason))
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
        forced = bool(result and result.forced)
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
            "reason": result.reason if result else None,
            "destroyed": bool(teardown and teardown.destroyed),
            "peersTrackedAfter": teardown.peers_tracked_after if teardown else None,
            "processesKilled": teardown.processes_killed if teardown else None,
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
                "policy": to_document(document.spec.policy)
                if document.spec.policy
                else None,
            },
        )

    @staticmethod
    def _exit_status(out: RunOutcome) -> tuple[int, str]:
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


def _correlation(document: ExecutionCell) -> dict[str, Any] | None:
    corr = document.spec.correlation
    return to_document(corr, exclude_none=True) if corr else None


def _with_reason(result: WorkloadResult, reason: str | None) -> WorkloadResult:
    return replace(result, reason=reason)
