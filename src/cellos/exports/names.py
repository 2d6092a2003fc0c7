"""The one check every export sink makes before it writes anything."""

from __future__ import annotations

from cellos.core.errors import ExportError
from cellos.core.spec import check_cell_id, check_safe_file_name


def check_export_target(cell_id: str, name: str) -> None:
    """Refuse a cell id or artifact name that could escape the destination's namespace."""
    try:
        check_cell_id(cell_id)
        check_safe_file_name(name)
    except ValueError as exc:
        raise ExportError(name, str(exc)) from None
