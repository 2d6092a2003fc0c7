"""``cellos-supervisor SPEC`` (``-`` for stdin): run one cell and exit with its status.

Exit status: the workload's own on a normal exit; 124 when it was killed by timeout or TTL;
2 for invalid input or configuration; 1 for any other failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import TextIO

from cellos.core import log as log_setup
from cellos.core.errors import CellosError, InvalidSpec
from cellos.core.loading import load_document
from cellos.output.relay import TerminalRelay
from cellos.supervisor.composition import build_supervisor
from cellos.supervisor.lifecycle import Supervisor


def configure_logging() -> None:
    """stderr, ``cellos: LEVEL: message``, ``CELLOS_LOG_LEVEL`` (applied on the first message:
    a clean run never loads :mod:`logging`)."""
    log_setup.configure()


def _hold_standard_fds() -> None:
    """A standard descriptor (0-2) closed at start (``>&-``) is held open on /dev/null, so
    that no file the supervisor opens later (an events file, a pipe) can take its number and
    receive what is written to that stream. ``sys.stdout``/``sys.stderr`` stay None then, and
    nothing is relayed to them."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd, inheritable=False)
                os.close(null)


def _write(stream: TextIO | None, data: bytes) -> str | None:
    """Write to a standard stream; a closed stream is skipped and a reader that has gone
    (EPIPE) is ignored. Returns why any other failure happened, else None."""
    if stream is None or not data:
        return None
    try:
        stream.buffer.write(data)
        stream.flush()
    except BrokenPipeError:
        # What is still buffered goes to /dev/null, so the final flush at exit cannot fail.
        with contextlib.suppress(OSError, ValueError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, stream.fileno())
            os.close(null)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _flush_standard_streams() -> None:
    """The relay writes to descriptors 1 and 2 directly: nothing of ours may be buffered."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.flush()


def print_line(text: str) -> None:
    """One line on stderr (skipped when stderr is closed or its reader has gone)."""
    _write(sys.stderr, (text + "\n").encode(errors="replace"))


def print_error(exc: CellosError) -> None:
    problems = exc.problems if isinstance(exc, InvalidSpec) else [(exc.path, exc.reason)]
    for path, reason in problems:
        print_line(f"error: {path}: {reason}")


#: Signals that stop a running cell truthfully (grace, kill, teardown, events) instead of
#: killing the supervisor: a second one skips what is left of the grace period.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_spec(path: str) -> int:
    """Load, compose and run; shared by ``cellos-supervisor`` and ``cellos run``."""
    supervisors: list[Supervisor] = []
    early: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        if supervisors:
            supervisors[0].stop(signum)
        else:
            early.append(signum)  # before the supervisor exists: it stops before create

    _hold_standard_fds()
    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        try:
            document = load_document(path, sys.stdin.buffer if sys.stdin is not None else None)
            supervisor = build_supervisor(os.environ)
        except CellosError as exc:
            print_error(exc)
            return exc.exit_code
        supervisors.append(supervisor)
        for signum in early:
            supervisor.stop(signum)
        # The workload's output is relayed as it is produced (redacted by the supervisor).
        relay = TerminalRelay({"stdout": _fd_of(sys.stdout), "stderr": _fd_of(sys.stderr)})
        _flush_standard_streams()
        try:
            supervisor.reap_stale()
            outcome = supervisor.run(document, on_output=relay)
        finally:
            relay.drain()
            supervisor.close()
        exit_code = outcome.exit_code
        for name, failure in relay.errors().items():
            print_line(f"error: {name}: cannot relay the workload's output: {failure}")
            exit_code = exit_code or 1
        for name, dropped in relay.dropped().items():
            where = (outcome.output.get(name) or {}).get("log")
            print_line(
                f"warning: {name}: {dropped} bytes of the workload's output were not relayed "
                "(the reader did not keep up)" + (f"; the log has them: {where}" if where else "")
            )
        for err in outcome.errors:
            print_error(err)
        if outcome.lost_events:
            print_line(f"error: events: {outcome.lost_events} event(s) could not be delivered")
        return exit_code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _fd_of(stream: TextIO | None) -> int | None:
    """The descriptor under a standard stream; None when it is closed or has none (an
    in-process caller's replacement, e.g. a StringIO): nothing is relayed there then."""
    if stream is None:
        return None
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None


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
    from cellos.core.fast_exit import exit_now

    exit_now(main())
