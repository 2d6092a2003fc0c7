"""The table of a backend's live cells in this process.

Live cells are a property of the host, not of one backend object: every backend instance of a
kind shares one table (other processes are kept out by each backend's own means, such as the
``cellos`` backend's state-directory lock).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from cellos.core.errors import HostError

T = TypeVar("T")


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
