"""How a workload ended, from a backend's limit counters (one rule for every backend).

``oomKills`` (processes killed by an OOM killer) and ``pidsLimitHits`` (process creations the
pids limit refused) become ``command.v1.completed.limits``; a kill they explain becomes its
``reason``. A forced end (timeout, TTL, signal) keeps its own reason.
"""

from __future__ import annotations

from collections.abc import Mapping

from msgspec.structs import replace

from cellos.core.ports import WorkloadResult


def with_limit_reason(result: WorkloadResult, counters: Mapping[str, int] | None) -> WorkloadResult:
    if not counters:
        return result
    if result.forced:
        return replace(result, limits=dict(counters))
    if counters.get("oomKills"):
        return replace(result, reason="oom_killed", limits=dict(counters))
    if counters.get("pidsLimitHits"):
        return replace(result, reason=result.reason or "pids_limit_reached", limits=dict(counters))
    return replace(result, limits=dict(counters))
