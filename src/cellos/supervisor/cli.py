"""``cellos-supervisor SPEC`` (``-`` for stdin): run one cell and exit with its status.

Exit status: the workload's own on a normal exit; 124 when it was killed by timeout or TTL;
2 for invalid input or configuration; 1 for any other failure.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from cellos.core.errors import CellosError, InvalidSpec
from cellos.core.loading import load_document
from cellos.supervisor.composition import build_supervisor


def configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("CELLOS_LOG_LEVEL", "WARNING").upper(),
        format="cellos: %(levelname)s: %(message)s",
    )


def print_error(exc: CellosError) -> None:
    problems = exc.problems if isinstance(exc, InvalidSpec) else [(exc.path, exc.reason)]
    for path, reason in problems:
        print(f"error: {path}: {reason}", file=sys.stderr)


def run_spec(path: str) -> int:
    """Load, compose and run; shared by ``cellos-supervisor`` and ``cellos run``."""
    try:
        document = load_document(path, sys.stdin.buffer)
        supervisor = build_supervisor(os.environ)
    except CellosError as exc:
        print_error(exc)
        return exc.exit_code
    try:
        supervisor.reap_stale()
        outcome = supervisor.run(document)
    finally:
        supervisor.close()
    if outcome.result is not None:
        # Relay the workload's output (the supervisor has already redacted secret values).
        sys.stdout.buffer.write(outcome.result.stdout)
        sys.stdout.flush()
        sys.stderr.buffer.write(outcome.result.stderr)
        sys.stderr.flush()
    for err in outcome.errors:
        print_error(err)
    if outcome.lost_events:
        print(
            f"error: events: {outcome.lost_events} event(s) could not be delivered", file=sys.stderr
        )
    return outcome.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) == 1 and (args[0] == "-" or not args[0].startswith("-")):
        # The one-document call a CI system makes: no need to load argparse (start time).
        configure_logging()
        return run_spec(args[0])
    import argparse

    parser = argparse.ArgumentParser(
        prog="cellos-supervisor",
        description="Run one ExecutionCell document (configured by CELLOS_* variables).",
    )
    parser.add_argument("spec", help="path to the document (YAML or JSON), or - for stdin")
    parsed = parser.parse_args(args)
    configure_logging()
    return run_spec(parsed.spec)


if __name__ == "__main__":
    raise SystemExit(main())
