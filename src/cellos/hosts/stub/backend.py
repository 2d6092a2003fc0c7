"""The ``stub`` backend keeps the seed contract: it isolates nothing and makes no syscalls.

Secrets as files (``runtimeBroker``, ``runtimeLeasedBroker``) are refused before the cell is
created (:meth:`StubBackend.secret_files_refusal`): there is no cell file system to hold them.

``create`` only checks that the id is non-empty; ``destroy`` always reports
``destroyed: true, peers_tracked_after: 0``. The workload runs as a plain host subprocess
(still with a clean environment and closed descriptors) and artifact paths are host paths.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from cellos.core.errors import ExportError, HostError
from cellos.core.ports import CellHandle, TeardownReport, WorkloadRequest, WorkloadResult
from cellos.core.spec import CellSpec
from cellos.hosts.artifacts import open_regular_file
from cellos.hosts.process import SpawnOptions, spawn_isolated_workload


class StubBackend:
    name = "stub"

    def create(self, spec: CellSpec) -> CellHandle:
        if not spec.id:
            raise HostError("spec.id", "spec.id must be non-empty")
        return CellHandle(
            cell_id=spec.id, backend=self.name, isolation=("env-cleared", "fds-closed")
        )

    def secret_files_refusal(self, spec: CellSpec) -> str | None:
        """Refused: the stub's workload shares the host's file system, so there is no private
        /run/secrets to put files in (and a host directory would be readable by others)."""
        return (
            "the stub backend isolates nothing and has no private /run/secrets; use the "
            "cellos, gvisor or qemu backend (or secretDelivery 'env')"
        )

    def run(self, handle: CellHandle, request: WorkloadRequest) -> WorkloadResult:
        # The stub has no workspace: the workload runs in the supervisor's directory.
        return spawn_isolated_workload(request, SpawnOptions(cwd=os.getcwd()))

    def open_artifact(self, handle: CellHandle, path: str) -> BinaryIO:
        if not os.path.isabs(path):
            raise ExportError(path, "the stub backend needs an absolute host path")
        return open_regular_file(path)

    def destroy(self, handle: CellHandle) -> TeardownReport:
        return TeardownReport(cell_id=handle.cell_id, destroyed=True, peers_tracked_after=0)
