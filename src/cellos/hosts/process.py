"""Running a workload process with hygiene, bounded capture and a hard deadline.

Shared by the backends that start a host process (``stub``, ``cellos``). Hygiene:

* the environment is exactly the declared one (nothing inherited from the supervisor);
* stdin, stdout and stderr are pipes; every other descriptor is closed on exec;
* the workload leads its own process group, so a timeout kills everything it forked
  (a process that calls ``setsid`` escapes the group; the ``cellos`` backend's cgroup and pid
  namespace close that gap).

Exit is detected through a pidfd in the same ``select`` loop that drains the pipes, and the
child is not reaped until its process group has been killed, so the group id cannot have been
recycled by an unrelated process when we signal it.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from cellos.core.ports import WorkloadRequest, WorkloadResult
from cellos.hosts.procfs import iter_procs

#: env(1) inside a gVisor cell: removes the variable runsc adds (HOME),
#: so that the workload's environment is exactly the declared one.
ENV_PROGRAM = "/usr/bin/env"
#: Bytes of each stream written to the log file; the rest is counted and dropped.
LOG_CAP_BYTES = 16 << 20
#: Bytes of each stream kept in memory for the supervisor to relay.
RELAY_CAP_BYTES = 1 << 20
_READ_CHUNK = 65536


class _BoundedStream:
    """Counts every byte, writes up to LOG_CAP to a file, keeps up to RELAY_CAP in memory."""

    def __init__(self, log: BinaryIO | None) -> None:
        self.log = log
        self.total = 0
        self.kept = bytearray()
        self.truncated = False

    def feed(self, chunk: bytes) -> None:
        if self.log is not None and self.total < LOG_CAP_BYTES:
            self.log.write(chunk[: LOG_CAP_BYTES - self.total])
        if len(self.kept) < RELAY_CAP_BYTES:
            self.kept += chunk[: RELAY_CAP_BYTES - len(self.kept)]
        self.total += len(chunk)
        # Truncated means bytes were lost from the durable copy (the log, or memory without one).
        self.truncated = self.total > (LOG_CAP_BYTES if self.log is not None else RELAY_CAP_BYTES)


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


@dataclass(frozen=True)
class SpawnOptions:
    cwd: str
    #: Directory for ``stdout.log`` / ``stderr.log``; None keeps output in memory only.
    log_dir: str | None = None
    #: Runs in the child between fork and exec (e.g. joining a cgroup). Must be async-safe.
    preexec: Callable[[], None] | None = None
    #: Called with the pid right after a successful spawn (e.g. to record it for a reaper).
    on_spawn: Callable[[int], None] | None = None
    #: The command actually executed (e.g. the sandbox launcher); default ``request.argv``.
    command: Sequence[str] | None = None
    #: Extra descriptors the command needs (e.g. a seccomp program for the launcher).
    pass_fds: tuple[int, ...] = ()
    control: ProcessControl = field(default_factory=ProcessGroupControl)


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


def _open_log(log_dir: str | None, name: str) -> BinaryIO | None:
    if log_dir is None:
        return None
    fd = os.open(
        os.path.join(log_dir, name),
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
    )
    return os.fdopen(fd, "wb")


def spawn_isolated_workload(request: WorkloadRequest, options: SpawnOptions) -> WorkloadResult:
    """Run ``request.argv`` to completion or deadline; never raises for workload failures."""
    started = time.monotonic()
    argv = list(options.command or request.argv)
    # Logs are opened first: a failure here must not leave a started, unsupervised workload.
    out_log = _open_log(options.log_dir, "stdout.log")
    err_log = _open_log(options.log_dir, "stderr.log")
    try:
        proc = subprocess.Popen(
            argv,
            env=dict(request.env),
            cwd=options.cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            close_fds=True,
            pass_fds=options.pass_fds,
            start_new_session=True,
            preexec_fn=options.preexec,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        for log in (out_log, err_log):
            if log is not None:
                log.close()
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return WorkloadResult(
            exit_code=None,
            duration_ms=int((time.monotonic() - started) * 1000),
            spawn_error=f"cannot start {argv[0]!r}: {why}",
            reason="spawn_failed",
        )
    if options.on_spawn is not None:
        options.on_spawn(proc.pid)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    # The workload gets an immediate EOF on stdin: cells are not interactive.
    proc.stdin.close()
    stdout_stream, stderr_stream = _BoundedStream(out_log), _BoundedStream(err_log)
    streams = {proc.stdout.fileno(): stdout_stream, proc.stderr.fileno(): stderr_stream}
    killed: set[int] = set()
    try:
        forced, status = _supervise(proc, streams, request, started, options.control, killed)
    finally:
        for log in (out_log, err_log):
            if log is not None:
                log.close()
        proc.stdout.close()
        proc.stderr.close()
    exit_code: int | None = None
    reason: str | None = "timeout" if forced else None
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


def _supervise(
    proc: subprocess.Popen[bytes],
    streams: dict[int, _BoundedStream],
    request: WorkloadRequest,
    started: float,
    control: ProcessControl,
    killed: set[int],
) -> tuple[bool, int]:
    """Drain output until the workload exits or its deadline passes; return (forced, status).
    ``killed`` collects the workload's processes that were running when CellOS stopped them
    (at the deadline, at the kill after the grace period, stragglers after the exit)."""
    pidfd = os.pidfd_open(proc.pid)
    sel = selectors.DefaultSelector()
    try:
        for fd in streams:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        sel.register(pidfd, selectors.EVENT_READ)
        deadline = None if request.deadline_seconds is None else started + request.deadline_seconds
        kill_at: float | None = None
        forced = False
        exited = False
        while True:
            now = time.monotonic()
            if not forced and deadline is not None and now >= deadline:
                forced = True
                killed |= _workload_processes(control, proc.pid)
                control.terminate(proc.pid)
                kill_at = now + request.graceful_shutdown_seconds
            if kill_at is not None and now >= kill_at:
                killed |= _workload_processes(control, proc.pid)
                control.kill(proc.pid)
                kill_at = None
            if exited and not any(k.fd in streams for k in sel.get_map().values()):
                break
            timeout = None
            for t in (deadline if not forced else None, kill_at):
                if t is not None:
                    timeout = (
                        max(0.0, t - now) if timeout is None else min(timeout, max(0.0, t - now))
                    )
            for key, _ in sel.select(timeout):
                if key.fd == pidfd:
                    # Exited but not reaped: kill stragglers in its group while the group id
                    # is still guaranteed to be ours, so that no orphan keeps the pipes open.
                    exited = True
                    sel.unregister(pidfd)
                    killed |= _workload_processes(control, proc.pid)
                    control.kill(proc.pid)
                    kill_at = None
                    continue
                try:
                    chunk = os.read(key.fd, _READ_CHUNK)
                except BlockingIOError:
                    continue
                if chunk:
                    streams[key.fd].feed(chunk)
                else:
                    sel.unregister(key.fd)
        _, status = os.waitpid(proc.pid, 0)
        proc.returncode = -1  # reaped here; keep Popen from waiting again
        _wait_all_gone(control, proc.pid)
        return forced, status
    finally:
        sel.close()
        os.close(pidfd)
