"""Deleting a cell's veth pair without waiting for the kernel's RCU barrier.

A link deletion (``RTM_DELLINK``) takes the pair off the host's view within about a
millisecond, but the request returns only after the kernel has waited in ``rcu_barrier``
(``netdev_run_todo``): 15-30 ms here. Leaving the pair to its namespace's destruction instead
costs as much, later: the kernel frees it in a worker, and a one-shot supervisor had to wait
for that at exit so that no link outlives it.

So the request is issued by a short-lived ``ip`` (iproute2), started with the scope and idle
until the teardown, and the caller waits only until the host no longer shows the link. The
same process also holds this process's netfilter socket (:mod:`cellos.network.nft_netlink`'s):
closing the last reference to it shortly after a table was deleted waits for the kernel's
deferred destruction of that table (one more grace period,
``nf_tables_trans_destroy_flush_work``), and the last holder pays it: the helper, not a
one-shot supervisor's exit. The helper gets nothing else: no environment, ``/dev/null`` for
its output, no other descriptor.

Without iproute2 a thread of this process issues the request (the process's exit then waits
for the kernel with it).
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from cellos.network.rtnl import Rtnl

#: Where iproute2's ``ip`` is looked for (never ``PATH``: root runs it).
IP_BINARIES = ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip")


def ip_binary() -> str | None:
    return next((path for path in IP_BINARIES if os.access(path, os.X_OK)), None)


class _Helper:
    """``ip -force -batch -``, idle on a pipe until it is told which link to delete. Started
    with the scope (:func:`prepare`), from a thread of its own, which then reaps it: its start
    (~0.5 ms in this process, ~2 ms of exec and dynamic linking in its own) overlaps the
    cell's start instead of its teardown. Given nothing but the netfilter sockets it holds."""

    def __init__(self, ip: str) -> None:
        self.done = threading.Event()
        self._started = threading.Event()
        self._stdin: IO[bytes] | None = None
        threading.Thread(
            target=self._run, args=(ip, _held_sockets()), name="cellos-link-release", daemon=True
        ).start()

    def _run(self, ip: str, held: tuple[int, ...]) -> None:
        try:
            proc = subprocess.Popen(
                [ip, "-force", "-batch", "-"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={},
                close_fds=True,
                pass_fds=held,
                bufsize=0,
            )
        except OSError:
            self.done.set()  # never started: the caller deletes the link itself
            self._started.set()
            return
        self._stdin = proc.stdin
        self._started.set()
        # Reaped here so that a long-lived supervisor keeps no zombie; a one-shot one exits
        # first and leaves the helper, still in the kernel's wait, to init.
        proc.wait()
        self.done.set()

    def delete(self, name: str | None) -> None:
        """Tell it to delete ``name``; None: to end without deleting anything."""
        self._started.wait()
        stdin = self._stdin
        if stdin is None:
            return
        try:
            if name is not None:
                stdin.write(f"link del dev {name}\n".encode())
        except OSError:
            pass  # it is gone: the caller sees the link still there and asks itself
        finally:
            stdin.close()  # end of its batch: it exits once the deletion is done


def _held_sockets() -> tuple[int, ...]:
    """This process's netfilter socket (:mod:`cellos.network.nft_netlink`'s, which wrote the
    table and through which the teardown deletes it), so that this process does not close
    it last."""
    from cellos.network import nft_netlink

    return (nft_netlink.socket_fd(),)


_prepared: dict[tuple[str, int], _Helper] = {}
_prepared_lock = threading.Lock()


def prepare(name: str, index: int) -> None:
    """Start the helper that will delete this link (nothing without iproute2)."""
    ip = ip_binary()
    if ip is None:
        return
    helper = _Helper(ip)
    with _prepared_lock:
        _prepared[(name, index)] = helper


def dismiss(name: str, index: int) -> None:
    """End the helper prepared for a link this process will not delete (gone already, or
    left to the reaper), so that a long-lived supervisor keeps no idle helper."""
    with _prepared_lock:
        helper = _prepared.pop((name, index), None)
    if helper is not None:
        helper.delete(None)


def release(host: Rtnl, name: str, index: int, *, timeout: float = 5.0) -> None:
    """Delete the veth pair whose host end is ``name`` (interface ``index``, a link this
    process made and still holds the slot of, so the name cannot be another's) and return
    once the host no longer shows it. Raises ``OSError`` when it is still there after
    ``timeout``."""
    done = _issue(name, index)
    deadline = time.monotonic() + timeout
    # The helper takes ~0.5 ms from the request to the link's unlisting: fine steps at first.
    delay = 0.0001
    while host.link_index(name) == index:
        if done.is_set():
            # The issuer gave up (``ip`` failed): ask once more here, and wait for it.
            try:
                host.delete_link(index, name)
            except OSError as exc:
                if exc.errno != errno.ENODEV:
                    raise
            return
        if time.monotonic() >= deadline:
            raise OSError(errno.ETIMEDOUT, f"link {name} still present after {timeout:g} s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.005)


def _issue(name: str, index: int) -> threading.Event:
    """Start the deletion; the event is set once its issuer has finished."""
    with _prepared_lock:
        helper = _prepared.pop((name, index), None)
    if helper is None:
        ip = ip_binary()
        if ip is None:
            done = threading.Event()
            threading.Thread(
                target=_delete_here,
                args=(name, index, done),
                name="cellos-link-release",
                daemon=True,
            ).start()
            return done
        helper = _Helper(ip)
    helper.delete(name)
    return helper.done


def _delete_here(name: str, index: int, done: threading.Event) -> None:
    from cellos.network.rtnl import Rtnl

    try:
        with Rtnl() as own:  # its own socket: the request blocks this thread, not the host's
            own.delete_link(index, name)
    except OSError:
        pass  # the caller sees the link still there, and asks again
    finally:
        done.set()
