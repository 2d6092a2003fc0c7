"""Live cells: the table of a backend kind's cells in this process, and the shape shared by
every backend that keeps host state (:class:`StoredBackend`).

Live cells are a property of the host, not of one backend object: every backend instance of a
kind shares one table; other processes are kept out by the cell-state store's lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from cellos.core.errors import CellosError, HostError
from cellos.core.ports import CellHandle, ChainPosition, ReapedCell
from cellos.core.spec import CellSpec, to_document
from cellos.hosts.state import CellState, CellStore

T = TypeVar("T")


def create_network_or_undo(create: Callable[[], None], undo: Callable[[], list[str]]) -> None:
    """Create a cell's network scope; when that is refused or fails, undo the cell created so
    far (the refusal stands, unless something could not be removed: then that is the error)."""
    try:
        create()
    except CellosError:
        residue = undo()
        if residue:
            raise HostError(
                "network", f"cannot set up the network; left behind: {residue}"
            ) from None
        raise


class LiveCells(Generic[T]):
    def __init__(self) -> None:
        self._cells: dict[str, T] = {}
        self._lock = threading.Lock()

    def add(self, cell_id: str, make: Callable[[], T]) -> T:
        """Refuse a duplicate live id, else ``make()`` the cell's state and track it (atomic)."""
        with self._lock:
            if cell_id in self._cells:
                raise HostError("spec.id", f"a live cell with id {cell_id!r} already exists")
            cell = make()
            self._cells[cell_id] = cell
            return cell

    def get(self, cell_id: str) -> T:
        with self._lock:
            cell = self._cells.get(cell_id)
        if cell is None:
            raise HostError(cell_id, "cell is not live (already destroyed or never created)")
        return cell

    def remove(self, cell_id: str) -> int:
        """Stop tracking ``cell_id``; return how many cells are still tracked."""
        with self._lock:
            self._cells.pop(cell_id, None)
            return len(self._cells)

    def __len__(self) -> int:
        with self._lock:
            return len(self._cells)

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._cells))


class StoredBackend:
    """The shape every backend with host state shares: its live cells are in the table of its
    kind (in this process) *and* in the host-wide cell-state store (across processes), so a
    duplicate id is refused everywhere, a dead supervisor's cell is reaped, and each cell's
    record keeps where its run chain stands."""

    store: CellStore

    def _state_of(self, handle: CellHandle) -> CellState:
        raise NotImplementedError

    def open_cell(
        self,
        table: LiveCells[T],
        spec: CellSpec,
        record: dict[str, Any],
        make: Callable[[CellState], T],
    ) -> T:
        """Lock the id in the store and write the record (before anything named in it
        exists), then ``make`` the backend's live cell; both or neither."""
        name = getattr(self, "name", "cellos")
        if spec.correlation is not None:
            # For the reaper's events, should this supervisor die with the cell.
            record = {
                **record,
                "correlation": to_document(spec.correlation, exclude_none=True),
            }

        def track() -> T:
            state = self.store.acquire(spec.id, name, record)
            try:
                return make(state)
            except BaseException:
                self.store.release(state)
                raise

        return table.add(spec.id, track)

    def reap(self) -> list[ReapedCell]:
        """Remove what dead supervisors' cells (of any backend) left in this store."""
        from cellos.hosts.reaper import reap

        return reap(self.store)

    def note_chain(self, handle: CellHandle, position: ChainPosition) -> None:
        self._state_of(handle).note_chain(position)
