"""The library entry point: run a cell from Python and consume its output live.

::

    import cellos

    def show(stream: str, data: bytes) -> None:
        print(stream, data.decode(errors="replace"), end="")

    outcome = cellos.run_cell("examples/hello.yaml", on_output=show,
                              env={"CELLOS_CELL_BACKEND": "stub"})
    print(outcome.exit_code, outcome.output["stdout"]["sha256"])

``on_output(stream, data)`` is called on the thread running the cell, in order per stream,
with the redacted bytes as they are produced; it should return promptly (the workload's pipes
are read between calls). An exception it raises stops the calls, never the cell. The
configuration is the ``CELLOS_*`` variables of ``cellos-supervisor`` (``env``, default
``os.environ``); the result is the supervisor's :class:`RunOutcome`. Invalid documents and
settings raise :class:`~cellos.core.errors.CellosError` (``.path``, ``.reason``) before
anything runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from cellos.core.spec import ExecutionCell
from cellos.supervisor.lifecycle import RunOutcome

OutputCallback = Callable[[str, bytes], None]


class _Callback:
    """Adapts a plain function to the OutputSink port."""

    def __init__(self, function: OutputCallback) -> None:
        self.function = function

    def write(self, stream: str, data: bytes) -> None:
        self.function(stream, data)


def load(
    document: ExecutionCell | Mapping[str, Any] | str | bytes | os.PathLike[str],
) -> ExecutionCell:
    """A validated document from a model, a mapping, a path, or YAML/JSON bytes."""
    from cellos.core.loading import load_document, parse_document, validate_document

    if isinstance(document, ExecutionCell):
        return document
    if isinstance(document, bytes):
        return validate_document(parse_document(document, "<document>"))
    if isinstance(document, Mapping):
        return validate_document(dict(document))
    return load_document(os.fspath(document))


def run_cell(
    document: ExecutionCell | Mapping[str, Any] | str | bytes | os.PathLike[str],
    *,
    on_output: OutputCallback | None = None,
    env: Mapping[str, str] | None = None,
) -> RunOutcome:
    """Run one cell to its end (teardown and every event included); see the module doc."""
    from cellos.supervisor.composition import build_supervisor

    cell = load(document)
    supervisor = build_supervisor(os.environ if env is None else env)
    try:
        supervisor.reap_stale()  # what a killed supervisor left, as cellos-supervisor does
        return supervisor.run(cell, on_output=_Callback(on_output) if on_output else None)
    finally:
        supervisor.close()


__all__ = ["OutputCallback", "RunOutcome", "load", "run_cell"]
