"""The one error hierarchy of CellOS.

Every error carries a ``path`` (a JSON path into the document, or a config name) and a
``reason``; the CLI prints ``error: <path>: <reason>``. Messages must never contain a secret
value: callers pass names, never values.
"""

from __future__ import annotations


class CellosError(Exception):
    """Root of every error CellOS raises on purpose."""

    #: Process exit status the CLI uses for this class of error.
    exit_code: int = 1

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class InvalidSpec(CellosError):
    """The document (or a CLI argument naming one) is malformed or breaks a rule."""

    exit_code = 2

    def __init__(self, path: str, reason: str, *, more: list[tuple[str, str]] | None = None):
        super().__init__(path, reason)
        #: Every problem found, the first one included, as (path, reason) pairs.
        self.problems: list[tuple[str, str]] = [(path, reason), *(more or [])]


class PolicyRefused(CellosError):
    """The configuration or profile refuses what the document or environment asks for."""

    exit_code = 2


class HostError(CellosError):
    """The isolation backend failed to create, run or destroy a cell."""


class SecretBrokerError(CellosError):
    """A secret could not be resolved or revoked (the message names the key, never the value)."""


class ExportError(CellosError):
    """An artifact could not be exported."""


class SinkError(CellosError):
    """An event could not be delivered to a sink."""
