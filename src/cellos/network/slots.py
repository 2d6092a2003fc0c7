"""Releasing the network address slots of cells that are gone, for the start-up reaper of
every supervisor: only ``os`` calls, so that a host which has ever run an egress cell does
not load the network stack (rtnetlink, the nf_tables compiler, C calls: several ms) on every
start."""

from __future__ import annotations

import os

from cellos.hosts.state import CellStore


def sweep_slots(store: CellStore) -> list[str]:
    """Release slots whose cell is gone (its supervisor died between claiming the slot and
    recording it); a slot is only touched under its cell's lock. Returns the released paths."""
    slots = os.path.join(store.root, "net", "slots")
    try:
        names = os.listdir(slots)
    except FileNotFoundError:
        return []
    released = []
    for name in names:
        path = os.path.join(slots, name)
        try:
            owner = os.readlink(path)
        except OSError:
            continue
        if os.path.lexists(store.cell_dir(owner)):
            continue  # a live cell's, or a dead cell's that the reaper removes with its record
        fd = store.claim_dead(owner, create=True)
        if fd is None:
            continue
        try:
            if not os.path.lexists(store.cell_dir(owner)) and os.readlink(path) == owner:
                os.unlink(path)
                released.append(path)
        except OSError:
            pass
        finally:
            store.drop_dead(owner, fd)
    return released
