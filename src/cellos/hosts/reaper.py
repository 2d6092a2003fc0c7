"""Finding and removing what dead supervisors left behind (``cellos reap``), for every backend.

The rule for liveness is the store's (:mod:`cellos.hosts.state`): a cell is reaped only while
the reaper holds its lock, which a living supervisor never gives up. The record names what the
cell had; the backend that made it removes its own parts (``reap_resources`` of its reaper
module: the launcher and cgroups, runsc's container, the VMM), then the network scope that any
backend may have recorded; the directory and the lock go last. The dead run's chain position
(kept in the lock) is returned, so that the reaper's events continue that run's own chain.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from cellos.core.ports import ReapedCell
from cellos.hosts.state import CellStore, chain_of, read_owner, read_record, rmtree

#: The module whose ``reap_resources(record) -> (removed, residue)`` removes a backend's parts.
BACKEND_REAPERS = {
    "cellos": "cellos.hosts.cellos.reaper",
    "gvisor": "cellos.hosts.gvisor.reaper",
    "qemu": "cellos.hosts.microvm.reaper",
    "firecracker": "cellos.hosts.microvm.reaper",
}


def reap_record(record: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Remove the host resources a dead cell's record names; return (removed, residue)."""
    backend = record.get("backend", "cellos")
    module = BACKEND_REAPERS.get(backend if isinstance(backend, str) else "")
    if module is None:
        return [], [f"record: unknown backend {backend!r}"]
    removed, residue = importlib.import_module(module).reap_resources(record)
    removed, residue = list(removed), list(residue)
    if "network" in record:
        # The same scope on every backend, removed after the backend's own part: once the
        # launcher, runsc or the VMM is gone, nothing holds the namespace (a qemu guest's tap
        # goes with the VMM's descriptor).
        from cellos.network.cell_egress import reap_recorded

        net_removed, net_residue = reap_recorded(record)
        removed += net_removed
        residue += net_residue
    return removed, residue


def _reap_one(store: CellStore, cell_id: str, fd: int) -> ReapedCell | None:
    cell_dir = store.cell_dir(cell_id)
    if not os.path.lexists(cell_dir):
        # A lock without a cell: its supervisor died before creating anything, or one is
        # about to create it (it then finds its lock unlinked and takes a new one).
        store.drop_dead(cell_id, fd)
        return None
    try:
        record = read_record(cell_dir) or {}
        owner = read_owner(fd)
        removed, residue = reap_record(record)
        rmtree(cell_dir)
        (residue if os.path.lexists(cell_dir) else removed).append(f"dir:{cell_dir}")
    finally:
        store.drop_dead(cell_id, fd)
    correlation = record.get("correlation")
    backend = record.get("backend")
    return ReapedCell(
        cell_id,
        tuple(removed),
        tuple(residue),
        correlation=correlation if isinstance(correlation, dict) else None,
        chain=chain_of(owner),
        backend=backend if isinstance(backend, str) else None,
    )


def reap(store: CellStore) -> list[ReapedCell]:
    """Reap every cell of the store whose supervisor is dead; live cells are never touched."""
    reaped = []
    for cell_id in store.ids():
        fd = store.claim_dead(cell_id)
        if fd is None:
            continue  # a live supervisor owns it (or it is already gone)
        result = _reap_one(store, cell_id, fd)
        if result is not None:
            reaped.append(result)
    if os.path.isdir(os.path.join(store.root, "microvm-pool")):
        from cellos.hosts.microvm.pool import reap_pool

        reap_pool(store.root)  # only when its manager is dead
    if os.path.isdir(os.path.join(store.root, "net")):
        from cellos.network.slots import sweep_slots

        sweep_slots(store)
    return reaped
