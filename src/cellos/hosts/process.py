"""Supervising a host process with hygiene, bounded capture, a hard deadline and early stop.

A :class:`HostCommand` is what a backend starts on the host: the workload itself (``stub``), or
what runs it (the ``cellos`` sandbox launcher, ``runsc``, the QEMU VMM). Hygiene:

* the environment is exactly the declared one (nothing inherited from the supervisor);
* stdin, stdout and stderr are pipes; every other descriptor is closed on exec;
* the workload leads its own process group, so a timeout kills everything it forked
  (a process that calls ``setsid`` escapes the group; the ``cellos`` backend's cgroup and pid
  namespace close that gap).

A deadline (or a :class:`StopRequest`, e.g. the supervisor was signalled) stops the process
gracefully (``ProcessControl.terminate``), then hard after the grace period; a second stop
request skips the rest of the grace. With ``die_with_parent`` the process is killed by the
kernel when the supervisor dies (``PR_SET_PDEATHSIG``), so that a VMM or runsc cannot outlive
an unsupervised cell.

Exit is detected through a pidfd in the same ``select`` loop that drains the pipes, and the
child is not reaped until its process group has been killed, so the group id cannot have been
recycled by an unrelated process when we signal it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Protocol

import msgspec

from cellos.core.errors import HostError
from cellos.core.ports import OutputSink, WorkloadRequest, WorkloadResult
from cellos.core.stop import StopRequest
from cellos.hosts.procfs import iter_procs

#: env(1) inside a gVisor cell: removes the variable runsc adds (HOME),
#: so that the workload's environment is exactly the declared one.
ENV_PROGRAM = "/usr/bin/env"
#: Bytes of the head of each stream kept in memory (``WorkloadResult.stdout``/``stderr``);
#: the whole stream goes to the command's ``output`` sink as it is read.
RELAY_CAP_BYTES = 1 << 20
#: Pipe capacity asked for the output pipes (Linux caps it at /proc/sys/fs/pipe-max-size):
#: bigger reads mean fewer trips through the loop for a workload that writes a lot.
_PIPE_SIZE = 1 << 20
#: Bytes per read: large reads allocate (and fault in) a fresh buffer each time, which costs
#: more than it saves once chunks are small (measured: 1 MiB reads of a busy pipe were 10x
#: slower than 256 KiB ones).
_READ_CHUNK = 256 << 10
#: Reads of one ready pipe before the loop looks at the deadline and the other pipe again.
_READS_PER_TURN = 8
#: A turn that read at least this much means a workload writing in bulk: the loop then
#: pauses for ``_BULK_PAUSE`` before the next one, so that the pipe fills and the next read
#: takes a lot at once. Without it every small write(2) of e.g. ``head`` (8 KiB) costs a
#: wake-up and a pass through the loop, which made bulk output several times slower. A line
#: every so often never reads that much in one turn, so its latency is untouched.
_BULK_BYTES = 4 << 10
_BULK_PAUSE = 0.0005
_F_SETPIPE_SZ = 1031


class _BoundedStream:
    """Counts every byte, hands it to the output sink, keeps up to RELAY_CAP in memory.

    Nothing of the raw stream is written to disk here: the output sink's durable log is the
    one copy on disk, and it is redacted (a workload that prints its secret must not leave it
    in a file of the cell's state directory)."""

    def __init__(self, name: str = "stdout", output: OutputSink | None = None) -> None:
        self.name = name
        self.output = output
        self.total = 0
        self.kept = bytearray()
        self.truncated = False

    def feed(self, chunk: bytes) -> None:
        if self.output is not None:
            self.output.write(self.name, chunk)
        if len(self.kept) < RELAY_CAP_BYTES:
            self.kept += chunk[: RELAY_CAP_BYTES - len(self.kept)]
        self.total += len(chunk)
        # Truncated: the in-memory head is not the whole stream.
        self.truncated = self.total > RELAY_CAP_BYTES


class ProcessControl(Protocol):
    """How to signal and enumerate everything a workload started (by default: its group)."""

    def terminate(self, pid: int) -> None:
        """First, graceful stage of a forced stop (SIGTERM to the workload's processes)."""

    def kill(self, pid: int) -> None:
        """SIGKILL everything of the workload."""

    def remaining(self, pid: int) -> list[int]:
        """Processes of the workload still running (zombies excluded)."""


class ProcessGroupControl:
    """The workload and everything it forked share the process group led by ``pid``."""

    def terminate(self, pid: int) -> None:
        _kill_group(pid, signal.SIGTERM)

    def kill(self, pid: int) -> None:
        _kill_group(pid, signal.SIGKILL)

    def remaining(self, pid: int) -> list[int]:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return []  # the common case: the group died with the workload
        except PermissionError:
            pass
        return _group_members(pid)

    def workload_processes(self, pid: int) -> list[int]:
        """The workload's own processes (here: everything in its group)."""
        return self.remaining(pid)


class HostCommand(msgspec.Struct, frozen=True):
    """A process to start on the host and supervise until it ends or must be stopped."""

    argv: Sequence[str]
    #: The process's complete environment (nothing is inherited).
    env: Mapping[str, str]
    deadline_seconds: float | None
    graceful_shutdown_seconds: float
    stop: StopRequest | None = None
    #: Receives each chunk of the process's stdout/stderr as it is read.
    output: OutputSink | None = None

    @classmethod
    def for_workload(
        cls,
        request: WorkloadRequest,
        argv: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> HostCommand:
        """The request's timing and stop; ``argv``/``env`` of what actually runs it."""
        return cls(
            argv=list(argv if argv is not None else request.argv),
            env=dict(env if env is not None else request.env),
            deadline_seconds=request.deadline_seconds,
            graceful_shutdown_seconds=request.graceful_shutdown_seconds,
            stop=request.stop,
            output=request.output,
        )


class SpawnOptions(msgspec.Struct, frozen=True):
    cwd: str
    #: Runs in the child between fork and exec (e.g. joining a cgroup). Must be async-safe.
    preexec: Callable[[], None] | None = None
    #: Called with the pid right after a successful spawn (e.g. to record it for a reaper).
    on_spawn: Callable[[int], None] | None = None
    #: Killed by the kernel if this (the spawning) thread dies: for processes that would
    #: otherwise outlive their supervisor (runsc, the VMM).
    die_with_parent: bool = False
    #: Extra descriptors the command needs (e.g. a seccomp program for the launcher).
    pass_fds: tuple[int, ...] = ()
    control: ProcessControl = msgspec.field(default_factory=ProcessGroupControl)
    #: Takes over the process's stdin pipe (it must close it; e.g. the microVM backend sends
    #: the guest its secrets on the serial line); None: stdin reads EOF at once.
    on_stdin: Callable[[IO[bytes]], None] | None = None


def _workload_processes(control: ProcessControl, pid: int) -> set[int]:
    """The workload's processes that a kill now would hit (a control that cannot tell the
    workload's processes from its own, e.g. runsc's, counts none)."""
    count = getattr(control, "workload_processes", None)
    return set(count(pid)) if callable(count) else set()


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    return [p.pid for p in iter_procs() if p.state != "Z" and p.pgrp == pgid]


def _wait_all_gone(control: ProcessControl, pid: int, timeout: float = 5.0) -> None:
    """SIGKILL is asynchronous: wait until nothing of the workload is still running, so that
    "the workload ended" really means nothing of it is left."""
    deadline = time.monotonic() + timeout
    while control.remaining(pid) and time.monotonic() < deadline:
        control.kill(pid)
        time.sleep(0.0005)


_PR_SET_PDEATHSIG = 1


def die_with_parent(then: Callable[[], None] | None = None) -> Callable[[], None]:
    """A preexec step: SIGKILL when the parent dies, and exit now if it already has (the
    death signal cannot fire for a parent that died before it was set)."""
    from cellos.core import libc  # only for the backends that need it (runsc, the VMM)

    # int prctl(int option, unsigned long arg2, ...): looked up here, called in the child.
    prctl = libc.function(
        "prctl", libc.Int, [libc.Int, libc.ULong, libc.ULong, libc.ULong, libc.ULong]
    )
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
        if then is not None:
            then()

    return preexec


def spawn_isolated_workload(request: WorkloadRequest, options: SpawnOptions) -> WorkloadResult:
    """Run the workload itself as a host process (see :func:`run_host_command`)."""
    return run_host_command(HostCommand.for_workload(request), options)


def run_host_command(command: HostCommand, options: SpawnOptions) -> WorkloadResult:
    """Run ``command`` to completion, deadline or stop; never raises for its failures."""
    started = time.monotonic()
    argv = list(command.argv)
    preexec = die_with_parent(options.preexec) if options.die_with_parent else options.preexec
    try:
        proc = subprocess.Popen(
            argv,
            env=dict(command.env),
            cwd=options.cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            close_fds=True,
            pass_fds=options.pass_fds,
            start_new_session=True,
            preexec_fn=preexec,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return WorkloadResult(
            exit_code=None,
            duration_ms=int((time.monotonic() - started) * 1000),
            spawn_error=f"cannot start {argv[0]!r}: {why}",
            reason="spawn_failed",
        )
    if options.on_spawn is not None:
        try:
            options.on_spawn(proc.pid)
        except OSError as exc:
            # E.g. the pid could not be recorded for a reaper: nothing may run unrecorded.
            options.control.kill(proc.pid)
            proc.kill()
            proc.communicate()
            raise HostError(
                "CELLOS_STATE_DIR", f"cannot record the started process: {exc.strerror}"
            ) from None
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    if options.on_stdin is not None:
        options.on_stdin(proc.stdin)
    else:
        # The workload gets an immediate EOF on stdin: cells are not interactive.
        proc.stdin.close()
    stdout_stream = _BoundedStream("stdout", command.output)
    stderr_stream = _BoundedStream("stderr", command.output)
    streams = {proc.stdout.fileno(): stdout_stream, proc.stderr.fileno(): stderr_stream}
    for fd in streams:
        # Best effort: a smaller pipe only means more, smaller reads.
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)
    killed: set[int] = set()
    try:
        stopped_by, status = _supervise(proc, streams, command, started, options.control, killed)
    finally:
        proc.stdout.close()
        proc.stderr.close()
    forced = stopped_by is not None
    exit_code: int | None = None
    reason = stopped_by
    if not forced:
        if os.WIFEXITED(status):
            exit_code = os.WEXITSTATUS(status)
        elif os.WIFSIGNALED(status):
            exit_code = 128 + os.WTERMSIG(status)
            reason = f"signal:{os.WTERMSIG(status)}"
    return WorkloadResult(
        exit_code=exit_code,
        duration_ms=int((time.monotonic() - started) * 1000),
        forced=forced,
        reason=reason,
        stdout=bytes(stdout_stream.kept),
        stderr=bytes(stderr_stream.kept),
        stdout_bytes=stdout_stream.total,
        stderr_bytes=stderr_stream.total,
        truncated=stdout_stream.truncated or stderr_stream.truncated,
        processes_killed=len(killed),
    )


class _Wakeup:
    """A self-pipe in the select loop, written by a stop request's waker."""

    def __init__(self, stop: StopRequest | None) -> None:
        self.stop = stop
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if stop is not None:
            stop.add_waker(self.wake)

    def wake(self) -> None:
        # Called from a signal handler too: never block, never raise.
        with contextlib.suppress(OSError):
            os.write(self.write_fd, b"!")

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            while os.read(self.read_fd, 64):
                pass

    def close(self) -> None:
        if self.stop is not None:
            self.stop.remove_waker(self.wake)
        os.close(self.read_fd)
        os.close(self.write_fd)


def _supervise(
    proc: subprocess.Popen[bytes],
    streams: dict[int, _BoundedStream],
    command: HostCommand,
    started: float,
    control: ProcessControl,
    killed: set[int],
) -> tuple[str | None, int]:
    """Drain output until the process exits, its deadline passes or a stop is requested;
    return (why CellOS stopped it: ``timeout`` or the stop's reason, or None; wait status).
    ``killed`` collects the workload's processes that were running when CellOS stopped them
    (at the deadline or stop, at the kill after the grace period, stragglers after the exit)."""
    pidfd = os.pidfd_open(proc.pid)
    sel = selectors.DefaultSelector()
    wakeup = _Wakeup(command.stop)
    stop = command.stop
    try:
        for fd in streams:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        sel.register(pidfd, selectors.EVENT_READ)
        sel.register(wakeup.read_fd, selectors.EVENT_READ)
        deadline = None if command.deadline_seconds is None else started + command.deadline_seconds
        kill_at: float | None = None
        stopped_by: str | None = None
        hurried = False
        exited = False
        while True:
            now = time.monotonic()
            if stopped_by is None and not exited:
                if stop is not None and stop.reason is not None:
                    stopped_by = stop.reason
                elif deadline is not None and now >= deadline:
                    stopped_by = "timeout"
                if stopped_by is not None:
                    killed |= _workload_processes(control, proc.pid)
                    control.terminate(proc.pid)
                    kill_at = now + command.graceful_shutdown_seconds
            if stop is not None and stop.hurry and kill_at is not None and not hurried:
                hurried = True
                kill_at = now
            if kill_at is not None and now >= kill_at:
                killed |= _workload_processes(control, proc.pid)
                control.kill(proc.pid)
                kill_at = None
            if exited and not any(k.fd in streams for k in sel.get_map().values()):
                break
            timeout = None
            for t in (deadline if stopped_by is None else None, kill_at):
                if t is not None:
                    timeout = (
                        max(0.0, t - now) if timeout is None else min(timeout, max(0.0, t - now))
                    )
            turn_bytes = 0
            for key, _ in sel.select(timeout):
                if key.fd == wakeup.read_fd:
                    wakeup.drain()
                    continue
                if key.fd == pidfd:
                    # Exited but not reaped: kill stragglers in its group while the group id
                    # is still guaranteed to be ours, so that no orphan keeps the pipes open.
                    exited = True
                    sel.unregister(pidfd)
                    # Usually nothing is left: one look, no kill (each look reads /proc or
                    # the cgroup, on every cell's hot path).
                    if control.remaining(proc.pid):
                        killed |= _workload_processes(control, proc.pid)
                        control.kill(proc.pid)
                    kill_at = None
                    continue
                # A busy pipe is drained a few reads at a time without a select in between.
                for _ in range(_READS_PER_TURN):
                    try:
                        chunk = os.read(key.fd, _READ_CHUNK)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno != errno.EIO:
                            raise
                        chunk = b""
                    if not chunk:
                        sel.unregister(key.fd)
                        break
                    streams[key.fd].feed(chunk)
                    turn_bytes += len(chunk)
                    if len(chunk) < _READ_CHUNK:
                        break
            if turn_bytes >= _BULK_BYTES and not exited:
                time.sleep(_BULK_PAUSE)
        _, status = os.waitpid(proc.pid, 0)
        proc.returncode = -1  # reaped here; keep Popen from waiting again
        _wait_all_gone(control, proc.pid)
        return stopped_by, status
    finally:
        sel.close()
        os.close(pidfd)
        wakeup.close()
