"""A warm pool of booted, idle, single-use microVM guests (``cellos microvm pool``).

A pool guest is booted with ``cellos.pool=1`` on its kernel command line and its serial port
where the host can reach it after the boot: under QEMU a Unix-socket chardev (``qemu.sock`` in
the guest's directory); under Firecracker, whose serial port is the VMM's stdin/stdout, one end
of a socket pair that the manager keeps and hands (``SCM_RIGHTS``) to the supervisor that
connects to ``channel.sock`` after claiming the guest. The VMM specifics (its command, its
API, how a snapshot is made and restored) are the backend's :class:`PoolVmm`. Its init
mounts everything, sets up the cgroup hierarchy, sends ``CELLOS:IDLE`` and then waits for the
request as one line on that channel (the kernel command line's ``cellos.argv=... cellos.env=...``
syntax, see ``guest/init.c``). Nothing of a cell is on its kernel command line.

One pool per state root, in the cell-state store (``$CELLOS_STATE_DIR/microvm-pool``)::

    pool.lock                flock held by the pool manager for its whole life; its content:
                             the manager (pid, start) and the pool's shape (size, memoryMiB,
                             vcpus, accel, image, digests, maxAgeSeconds)
    guests/<id>/record.json  written before the guest's VMM is started: shape, image, digests,
                             when it was started
    guests/<id>/pid.json     the VMM (pid, start time; a child of the manager: it dies with
                             it, PDEATHSIG)
    guests/<id>/qemu.sock    the guest's channel (QEMU listens)
    guests/<id>/channel.sock Firecracker: where the manager hands the channel to the claimer
    guests/<id>/fc.sock      Firecracker's API socket
    guests/<id>/ready        written once the guest said CELLOS:IDLE (or, restored from the
                             snapshot, answered a ping): readyMs, from (boot | snapshot)
    snapshot/                with ``--snapshot``: the snapshot's files (QEMU: snapshot.bin, an
                             idle guest migrated to a file; Firecracker: snapshot.vmstate and
                             snapshot.mem) and snapshot.json (their sha256, and the image
                             digests, accelerator and shape it was made from), verified before
                             every restore
    guests/<id>/claim.lock   flock held by the supervisor whose cell uses the guest
    guests/<id>/claimed      created with O_EXCL by that supervisor (the atomic claim: one
                             winner, ever; a guest is never handed out twice)

The manager keeps ``size`` guests booting or ready, replaces a guest that died or is older
than ``maxAgeSeconds``, and removes a used one when its VMM is gone (the supervisor kills it
after its cell; the manager kills it when its claimer died). A supervisor claims a ready guest
of its shape, checks that its VMM is alive and its channel answers, records the VMM in its own
cell record (so ``cellos reap`` kills it if the supervisor dies), sends the request, and reads
the results as from a cold boot. Stopping the manager (SIGTERM/SIGINT, ``cellos microvm pool
stop``) kills every guest and removes the pool's state; a crashed manager's guests die with it
and ``cellos reap`` removes what is left.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from cellos.core.errors import CellosError, HostError, InvalidSpec
from cellos.core.log import get_logger
from cellos.hosts.microvm.manifest import ManifestMismatch, sha256_file
from cellos.hosts.microvm.unixsock import bind_unix, connect_unix
from cellos.hosts.process import die_with_parent
from cellos.hosts.procfs import runs_in
from cellos.hosts.state import lock_now, process_start, read_owner, rmtree

log = get_logger(__name__)

POOL_DIR = "microvm-pool"
#: A guest that has not said CELLOS:IDLE by then is killed and replaced.
BOOT_TIMEOUT_SECONDS = 120.0
DEFAULT_MAX_AGE_SECONDS = 600.0
LOCK_BYTES = 2048
#: How long the manager waits before it tries again to boot after a refused boot.
RETRY_SECONDS = 5.0
#: How long a claimed guest has to answer the host's ping (a loaded TCG host is slow).
PING_TIMEOUT_SECONDS = 3.0
SOCKET = "qemu.sock"
#: Where a manager hands a Firecracker guest's channel (its serial socket pair) to the claimer.
HANDOFF = "channel.sock"
#: ``channel`` of a VMM whose serial port is its stdin/stdout (the manager holds the host end).
STDIO = "stdio"


@dataclass(frozen=True)
class Shape:
    memory_mib: int
    vcpus: int


class PoolVmm(Protocol):
    """What the manager needs of a VMM (the backend of ``qemu`` or ``firecracker``)."""

    #: "listen": the VMM listens on the guest's ``qemu.sock``; ``STDIO``: the serial port is
    #: the VMM's stdin/stdout, whose host end ``pool_start`` returns.
    pool_channel: str
    #: The files of a snapshot, in the snapshot directory.
    snapshot_files: tuple[str, ...]

    def pool_prepare(self, shape: Shape) -> dict[str, Any]:
        """Verify the image's manifest (before every boot); the fields a guest's record carries
        (accel, image, digests): what a supervisor checks before using it."""
        ...

    def pool_start(
        self, shape: Shape, guest_dir: str, *, restore: str | None, snapshottable: bool
    ) -> tuple[subprocess.Popen[bytes], socket.socket | None]:
        """Start a pool guest's VMM in ``guest_dir`` (its cwd) with :func:`start_vmm`: booted,
        or restored from the snapshot in the directory ``restore``; ``snapshottable``: it will
        be snapshotted. Returns the VMM and the host end of its channel (``STDIO`` only)."""
        ...

    def pool_snapshot(self, guest_dir: str, deadline: float) -> None:
        """Write the snapshot files of the idle guest running in ``guest_dir`` there."""
        ...


def pool_root(state_root: str) -> str:
    return os.path.join(state_root, POOL_DIR)


def _guests(root: str) -> str:
    return os.path.join(root, "guests")


def _write_json(path: str, value: Mapping[str, Any]) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(value, fh)
    os.replace(tmp, path)


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _alive(pid: object, start: object) -> bool:
    return isinstance(pid, int) and pid > 1 and start is not None and process_start(pid) == start


def _lock_free(path: str) -> int | None:
    """The lock at ``path`` taken now (the caller closes it), or None when someone holds it
    (or it does not exist)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    if not lock_now(fd):
        os.close(fd)
        return None
    return fd


def live_pool(state_root: str) -> dict[str, Any] | None:
    """The running pool manager's settings, or None when no manager holds the pool."""
    path = os.path.join(pool_root(state_root), "pool.lock")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = read_owner(fd)
            return owner if _alive(owner.get("pid"), owner.get("start")) else None
        return None  # nobody holds it: no manager
    finally:
        os.close(fd)


# -- the manager -----------------------------------------------------------------------------


@dataclass
class _Guest:
    gid: str
    path: str
    proc: subprocess.Popen[bytes]
    started: float
    wall: float
    sock: socket.socket | None = None
    seen: bytes = b""
    ready: bool = False
    #: "boot" (a cold boot to IDLE) or "snapshot" (restored from the pool's snapshot).
    source: str = "boot"
    next_ping: float = 0.0
    #: ``STDIO`` channels: the host end of the serial socket pair, kept until a claimer
    #: takes it from ``listener`` (``channel.sock``).
    end: socket.socket | None = None
    listener: socket.socket | None = None

    def close_channel(self) -> None:
        for sock in (self.sock, self.end, self.listener):
            if sock is not None:
                sock.close()
        self.sock = self.end = self.listener = None


class PoolManager:
    """Keeps ``size`` single-use guests of one shape booted and idle (``cellos microvm pool``).

    ``vmm`` verifies the image and starts (or restores) one pool guest (:class:`PoolVmm`)."""

    def __init__(
        self,
        state_root: str,
        size: int,
        shape: Shape,
        vmm: PoolVmm,
        *,
        max_age: float = DEFAULT_MAX_AGE_SECONDS,
        boot_timeout: float = BOOT_TIMEOUT_SECONDS,
        snapshot: bool = False,
    ) -> None:
        if size < 1:
            raise InvalidSpec("CELLOS_MICROVM_POOL", f"pool size must be at least 1 (got {size})")
        if max_age <= 0:
            raise InvalidSpec("CELLOS_MICROVM_POOL_MAX_AGE", "must be a positive number of seconds")
        self.root = pool_root(state_root)
        self.size = size
        self.shape = shape
        self.vmm = vmm
        self.max_age = max_age
        self.boot_timeout = boot_timeout
        self.guests: dict[str, _Guest] = {}
        self.lock_fd: int | None = None
        self.stopping = False
        self.settings: dict[str, Any] = {}
        self.replaced = 0
        #: After a failed boot (e.g. a refused image), the next attempt waits until then.
        self.retry_at = 0.0
        #: Refill by restoring a snapshot of an idle guest instead of booting one.
        self.snapshot = snapshot
        self.snapshot_meta: dict[str, Any] = {}

    def open(self) -> None:
        """Take the pool's lock (HostError naming CELLOS_STATE_DIR when another manager runs)
        and remove what a dead manager left."""
        os.makedirs(_guests(self.root), mode=0o700, exist_ok=True)
        path = os.path.join(self.root, "pool.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        if not lock_now(fd):
            owner = read_owner(fd)
            os.close(fd)
            raise HostError(
                "CELLOS_STATE_DIR",
                f"a microVM pool is already running for {self.root} (pid {owner.get('pid')})",
            ) from None
        self.lock_fd = fd
        for gid in os.listdir(_guests(self.root)):
            _remove_guest(os.path.join(_guests(self.root), gid))
        # The shape in the lock (for supervisors) is filled in by the first boot's fields.
        self._publish({})

    def _publish(self, fields: Mapping[str, Any]) -> None:
        assert self.lock_fd is not None
        self.settings = {
            "pid": os.getpid(),
            "start": process_start(os.getpid()),
            "size": self.size,
            "memoryMiB": self.shape.memory_mib,
            "vcpus": self.shape.vcpus,
            "maxAgeSeconds": self.max_age,
            **fields,
        }
        data = json.dumps(self.settings, separators=(",", ":")).encode()
        os.pwrite(self.lock_fd, data.ljust(LOCK_BYTES), 0)
        if len(data) > LOCK_BYTES:
            os.ftruncate(self.lock_fd, len(data))

    def _spawn(self) -> None:
        # readyMs counts from here: the image (and snapshot) verification is part of a refill.
        begun = time.monotonic()
        gid = f"g{uuid.uuid4().hex[:16]}"
        path = os.path.join(_guests(self.root), gid)
        os.mkdir(path, 0o700)
        try:
            fields = self.vmm.pool_prepare(self.shape)
            if self.settings.get("digests") != fields.get("digests"):
                self._publish(fields)
            source, restore = "boot", None
            if self.snapshot:
                restore = self._snapshot_for(fields)
                fields = {**fields, "snapshot": self.snapshot_meta["files"]}
                source = "snapshot"
            record = {
                "guestId": gid,
                "memoryMiB": self.shape.memory_mib,
                "vcpus": self.shape.vcpus,
                "created": time.time(),
                "from": source,
                **fields,
            }
            _write_json(os.path.join(path, "record.json"), record)  # before the VMM exists
            proc, end = self.vmm.pool_start(self.shape, path, restore=restore, snapshottable=False)
        except BaseException:
            rmtree(path)
            raise
        _write_json(
            os.path.join(path, "pid.json"), {"pid": proc.pid, "start": process_start(proc.pid)}
        )
        self.guests[gid] = _Guest(gid, path, proc, begun, time.time(), source=source, end=end)

    # -- snapshots -----------------------------------------------------------------------------

    def _snapshot_for(self, fields: Mapping[str, Any]) -> str:
        """The directory of the snapshot of an idle guest of this image, shape and
        accelerator (made when missing or stale), its files' digests verified against its
        manifest before every restore."""
        sdir = os.path.join(self.root, "snapshot")
        meta = _read_json(os.path.join(sdir, "snapshot.json"))
        wanted = {
            "digests": fields.get("digests"),
            "accel": fields.get("accel"),
            "image": fields.get("image"),
            "memoryMiB": self.shape.memory_mib,
            "vcpus": self.shape.vcpus,
        }
        if meta is None or any(meta.get(k) != v for k, v in wanted.items()):
            meta = self._make_snapshot(wanted)
        recorded = meta.get("files")
        files: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
        for name in self.vmm.snapshot_files:
            path = os.path.join(sdir, name)
            actual = sha256_file(path)
            if actual != files.get(name):
                raise ManifestMismatch(
                    path,
                    str(files.get(name)),
                    actual,
                    "; the pool's snapshot was changed after it was made and is not remade "
                    "automatically (restart the pool: cellos microvm pool stop, then start it)",
                )
        self.snapshot_meta = meta
        return sdir

    def _make_snapshot(self, wanted: Mapping[str, Any]) -> dict[str, Any]:
        """Boot a guest to IDLE, have the VMM write its snapshot, kill it."""
        build = os.path.join(self.root, "snapshot-build")
        rmtree(build)
        os.mkdir(build, 0o700)
        started = time.monotonic()
        proc, end = self.vmm.pool_start(self.shape, build, restore=None, snapshottable=True)
        try:
            deadline = time.monotonic() + self.boot_timeout
            _wait_line(build, end, b"CELLOS:IDLE", deadline, proc)
            self.vmm.pool_snapshot(build, deadline)
        except OSError as exc:
            raise HostError("microvm pool snapshot", f"{exc}") from None
        finally:
            proc.kill()
            proc.wait()
            if end is not None:
                end.close()
        meta = {
            **wanted,
            "files": {n: sha256_file(os.path.join(build, n)) for n in self.vmm.snapshot_files},
            "sizeBytes": sum(
                os.path.getsize(os.path.join(build, n)) for n in self.vmm.snapshot_files
            ),
            "created": time.time(),
            "madeInMs": round((time.monotonic() - started) * 1000),
        }
        for extra in os.listdir(build):  # sockets, the VMM's log: only the snapshot stays
            if extra not in self.vmm.snapshot_files:
                os.unlink(os.path.join(build, extra))
        _write_json(os.path.join(build, "snapshot.json"), meta)
        sdir = os.path.join(self.root, "snapshot")
        rmtree(sdir)
        os.rename(build, sdir)
        log.info("pool snapshot made in %d ms (%d bytes)", meta["madeInMs"], meta["sizeBytes"])
        return meta

    def _watch_boot(self, guest: _Guest) -> None:
        """Connect to a booting guest's channel and wait (without blocking) for IDLE (a
        restored guest was idle when its snapshot was made: it must answer a ping)."""
        if guest.sock is None and guest.end is not None:
            guest.sock, guest.end = guest.end, None
            guest.sock.setblocking(False)
        if guest.sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                _connect(sock, guest.path)
            except OSError:
                sock.close()  # QEMU has not created it yet
                return
            sock.setblocking(False)
            guest.sock = sock
        if guest.source == "snapshot" and time.monotonic() >= guest.next_ping:
            # Resent until answered: a byte that arrives while the migration is still
            # loading the serial port's state may be lost.
            with contextlib.suppress(OSError):
                guest.sock.send(b"\n")
            guest.next_ping = time.monotonic() + 0.5

    def _read_boot(self, guest: _Guest) -> None:
        assert guest.sock is not None
        try:
            data = guest.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            guest.sock.close()
            guest.sock = None
            return
        guest.seen = (guest.seen + data)[-4096:]
        if b"CELLOS:IDLE" in guest.seen or b"CELLOS:PONG" in guest.seen:
            if self.vmm.pool_channel == STDIO:
                # Kept for the claimer, who takes it from channel.sock (_hand_over).
                guest.end, guest.sock = guest.sock, None
                guest.end.setblocking(True)
                guest.listener = socket.socket(
                    socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
                )
                bind_unix(guest.listener, os.path.join(guest.path, HANDOFF))
                guest.listener.listen(1)
            else:
                guest.sock.close()
                guest.sock = None
            guest.ready = True
            ready_ms = round(self._age(guest) * 1000)
            _write_json(
                os.path.join(guest.path, "ready"), {"readyMs": ready_ms, "from": guest.source}
            )
            log.info("pool guest %s ready in %d ms (%s)", guest.gid, ready_ms, guest.source)

    @staticmethod
    def _hand_over(guest: _Guest) -> None:
        """Give the claimer (connected to channel.sock) the guest's channel, and let go of
        it: from now on only the claimer talks to that guest."""
        assert guest.listener is not None and guest.end is not None
        try:
            conn, _ = guest.listener.accept()
        except OSError:
            return
        with conn, contextlib.suppress(OSError):
            socket.send_fds(conn, [b"C"], [guest.end.fileno()])
        guest.close_channel()

    def _age(self, guest: _Guest) -> float:
        return time.monotonic() - guest.started

    def _kill(self, guest: _Guest) -> None:
        with contextlib.suppress(ProcessLookupError):
            guest.proc.kill()

    def tick(self, wait: float = 0.1) -> None:
        """One round: reap ended guests, retire old/stuck ones, refill, wait for boots."""
        for gid, guest in list(self.guests.items()):
            claimed = os.path.exists(os.path.join(guest.path, "claimed"))
            if guest.proc.poll() is not None:
                if not claimed:
                    log.warning("pool guest %s died unused; replacing it", gid)
                    self.replaced += 1
                if not guest.ready and not claimed:
                    # It never became idle (QEMU refused its command line, the guest
                    # crashed): say why and wait before the next boot, never spin.
                    why = log_tail(os.path.join(guest.path, "vmm.log"))
                    self._failed(
                        f"{guest.path}: the VMM exited with status {guest.proc.returncode} "
                        f"before the guest was idle{': ' + why if why else ''}"
                    )
                guest.close_channel()
                _remove_guest(guest.path)
                del self.guests[gid]
                continue
            if claimed:
                fd = _lock_free(os.path.join(guest.path, "claim.lock"))
                if fd is not None:  # its cell is over (or its supervisor died): kill the VMM
                    self._kill(guest)
                    os.close(fd)
                continue
            if not guest.ready and self._age(guest) > self.boot_timeout:
                log.warning("pool guest %s did not become idle; replacing it", gid)
                self._retire(guest)
            elif guest.ready and time.time() - guest.wall > self.max_age:
                self._retire(guest)
        unclaimed = sum(
            1 for g in self.guests.values() if not os.path.exists(os.path.join(g.path, "claimed"))
        )
        if not self.stopping and time.monotonic() >= self.retry_at:
            try:
                for _ in range(self.size - unclaimed):
                    self._spawn()
                if self.settings.get("error"):
                    self._publish({k: v for k, v in self.settings.items() if k != "error"})
            except CellosError as exc:
                # E.g. the image was changed after it was built: no guest boots from it; the
                # guests already booted (verified before their boot) are still handed out.
                self._failed(f"{exc.path}: {exc.reason}")
        booting: dict[int, _Guest] = {}
        handing: dict[int, _Guest] = {}
        for guest in self.guests.values():
            if not guest.ready:
                self._watch_boot(guest)
                if guest.sock is not None:
                    booting[guest.sock.fileno()] = guest
            elif guest.listener is not None:
                handing[guest.listener.fileno()] = guest
        readable, _, _ = select.select([*booting, *handing], [], [], wait)
        for fd in readable:
            if fd in booting:
                self._read_boot(booting[fd])
            else:
                self._hand_over(handing[fd])

    def _failed(self, why: str) -> None:
        """No guest could be made ready: published for ``pool status`` / doctor, and the next
        boot waits RETRY_SECONDS."""
        log.error("pool guest not started: %s", why)
        self._publish(
            {
                **{k: v for k, v in self.settings.items() if k not in ("pid", "start")},
                "error": why,
            }
        )
        self.retry_at = time.monotonic() + RETRY_SECONDS

    def _retire(self, guest: _Guest) -> None:
        """Take an unclaimed guest out of the pool (the manager claims it itself), kill it."""
        if _claim_file(guest.path, {"retiredBy": os.getpid()}):
            self._kill(guest)
            self.replaced += 1

    def run(self, should_stop: Callable[[], bool]) -> None:
        while not should_stop() and self._lock_is_current():
            self.tick()

    def _lock_is_current(self) -> bool:
        """False when the pool's lock file was removed or replaced (the pool's directory was
        deleted under the manager): it stops rather than run guests nobody can find."""
        assert self.lock_fd is not None
        try:
            current = os.stat(os.path.join(self.root, "pool.lock"), follow_symlinks=False)
        except FileNotFoundError:
            log.error("%s was removed: stopping the pool", self.root)
            return False
        return current.st_ino == os.fstat(self.lock_fd).st_ino

    def close(self) -> None:
        """Kill every guest, wait for them, remove the pool's state and release its lock."""
        self.stopping = True
        for guest in self.guests.values():
            self._kill(guest)
        for guest in self.guests.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                guest.proc.wait(timeout=10)
            guest.close_channel()
            _remove_guest(guest.path)
        self.guests.clear()
        if self.lock_fd is not None:
            try:
                ours = (
                    os.stat(os.path.join(self.root, "pool.lock"), follow_symlinks=False).st_ino
                    == os.fstat(self.lock_fd).st_ino
                )
            except FileNotFoundError:
                ours = False
            if ours:  # never another manager's pool, started after ours was deleted
                rmtree(self.root)
            os.close(self.lock_fd)
            self.lock_fd = None


def log_tail(path: str, limit: int = 300) -> str:
    """The last line(s) of a log, printable and bounded."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - limit))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return " ".join(text.split())[-limit:]


def _wait_line(
    directory: str,
    end: socket.socket | None,
    marker: bytes,
    deadline: float,
    proc: subprocess.Popen[bytes],
) -> None:
    """Read a guest's channel (``end``, or QEMU's socket in ``directory``) until ``marker``
    (HostError at the deadline). ``end`` is left open (its owner closes it)."""
    sock = end or socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        while end is None:
            try:
                _connect(sock, directory)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise HostError("microvm pool snapshot", "the guest did not start") from None
                time.sleep(0.02)
        seen = b""
        while marker not in seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HostError("microvm pool snapshot", "the guest did not become idle")
            sock.settimeout(left)
            data = sock.recv(65536)
            if not data:
                raise HostError("microvm pool snapshot", "the guest's channel closed")
            seen = (seen + data)[-4096:]
    finally:
        if end is None:
            sock.close()


def start_vmm(
    command: list[str], path: str, *, serial: socket.socket | None = None
) -> subprocess.Popen[bytes]:
    """Start a pool guest's VMM in its directory: no environment, its stderr in ``vmm.log``,
    killed when the manager dies; ``serial`` becomes its stdin/stdout (Firecracker's serial
    port), else they are /dev/null."""
    log_fd = os.open(
        os.path.join(path, "vmm.log"),
        os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
        0o600,
    )
    stdio: int = subprocess.DEVNULL if serial is None else serial.fileno()
    try:
        return subprocess.Popen(
            command,
            cwd=path,
            env={},
            stdin=stdio,
            stdout=stdio,
            stderr=log_fd,
            close_fds=True,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
    finally:
        os.close(log_fd)


class Qmp:
    """A minimal QMP client (one command at a time) on QEMU's unix socket."""

    def __init__(self, path: str, deadline: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(max(1.0, deadline - time.monotonic()))
        self.sock.connect(path)
        self.buf = b""
        self._message()  # the greeting
        self.call("qmp_capabilities")

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _message(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise HostError("microvm pool snapshot", "QMP connection closed")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        value = json.loads(line)
        return value if isinstance(value, dict) else {}

    def call(self, command: str, arguments: Mapping[str, Any] | None = None) -> dict[str, Any]:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = dict(arguments)
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self._message()
            if "error" in reply:
                raise HostError("microvm pool snapshot", f"QMP {command}: {reply['error']}")
            if "return" in reply:
                result = reply["return"]
                return result if isinstance(result, dict) else {}


def _connect(sock: socket.socket, guest_dir: str) -> None:
    """Connect to the socket QEMU listens on for a guest's channel."""
    connect_unix(sock, os.path.join(guest_dir, SOCKET))


def _claim_file(guest_dir: str, content: Mapping[str, Any]) -> bool:
    """The atomic claim: exactly one O_EXCL create of ``claimed`` ever succeeds."""
    try:
        fd = os.open(
            os.path.join(guest_dir, "claimed"),
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
    except FileExistsError:
        return False
    except OSError:
        return False  # the guest's directory is gone
    with os.fdopen(fd, "w") as fh:
        json.dump(content, fh)
    return True


def _remove_guest(path: str) -> None:
    pid = _read_json(os.path.join(path, "pid.json")) or {}
    if _alive(pid.get("pid"), pid.get("start")) and runs_in(pid["pid"], path):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid["pid"], signal.SIGKILL)
    rmtree(path)


# -- a supervisor's side ---------------------------------------------------------------------


@dataclass
class ClaimedGuest:
    """A pool guest this process claimed: its VMM, its connected channel, its claim lock."""

    path: str
    pid: int
    start: int
    sock: socket.socket
    lock_fd: int
    record: dict[str, Any] = field(default_factory=dict)
    killed: bool = False

    def kill(self) -> None:
        if not self.killed and _alive(self.pid, self.start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGKILL)
        self.killed = True

    def release(self) -> None:
        """Kill the VMM (single use), close the channel, give up the claim lock (the manager
        then removes the guest)."""
        self.kill()
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


def claim(
    state_root: str, shape: Shape, accel: str, image: str, digests: Mapping[str, str]
) -> tuple[ClaimedGuest | None, str]:
    """A ready guest of this shape, accel, image and verified digests, claimed for one cell;
    or None and why not (the cell then boots cold)."""
    settings = live_pool(state_root)
    if settings is None:
        return None, "no pool running"
    if (settings.get("memoryMiB"), settings.get("vcpus")) != (shape.memory_mib, shape.vcpus):
        return None, (
            f"the pool's shape ({settings.get('memoryMiB')} MiB, {settings.get('vcpus')} vCPU) "
            f"differs from the cell's ({shape.memory_mib} MiB, {shape.vcpus} vCPU)"
        )
    guests = _guests(pool_root(state_root))
    try:
        names = os.listdir(guests)
    except OSError:
        return None, "no pool running"
    max_age = settings.get("maxAgeSeconds", DEFAULT_MAX_AGE_SECONDS)
    mismatch = ""
    # Oldest first: the ones nearest their max age are used before they expire.
    for gid in sorted(names):
        path = os.path.join(guests, gid)
        if not os.path.exists(os.path.join(path, "ready")) or os.path.exists(
            os.path.join(path, "claimed")
        ):
            continue
        record = _read_json(os.path.join(path, "record.json")) or {}
        if (
            record.get("accel") != accel
            or record.get("image") != image
            or record.get("digests") != dict(digests)
            or (record.get("memoryMiB"), record.get("vcpus")) != (shape.memory_mib, shape.vcpus)
        ):
            mismatch = "the pool's guests run another image, digests or accelerator"
            continue
        created = record.get("created")
        if not isinstance(created, (int, float)) or time.time() - created > max_age:
            continue  # too old: the manager replaces it, never handed out
        guest = _take(path, record)
        if guest is not None:
            return guest, ""
    return None, mismatch or "no idle guest in the pool"


def _take(path: str, record: dict[str, Any]) -> ClaimedGuest | None:
    try:
        lock_fd = os.open(
            os.path.join(path, "claim.lock"),
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
    except OSError:
        return None
    if not lock_now(lock_fd):
        os.close(lock_fd)
        return None
    if not _claim_file(path, {"pid": os.getpid(), "start": process_start(os.getpid())}):
        os.close(lock_fd)
        return None
    # Ours now, for good: if it turns out dead, it is released (and replaced), never used.
    pid = _read_json(os.path.join(path, "pid.json")) or {}
    vmm, start = pid.get("pid"), pid.get("start")
    if not (isinstance(vmm, int) and isinstance(start, int) and _alive(vmm, start)):
        os.close(lock_fd)
        return None
    if not runs_in(vmm, path):
        os.close(lock_fd)
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(PING_TIMEOUT_SECONDS)
        if record.get("channel") == STDIO:
            sock = _handed_over(sock, path)
        else:
            _connect(sock, path)
        _ping(sock)
        sock.settimeout(None)
    except OSError:
        sock.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(vmm, signal.SIGKILL)
        os.close(lock_fd)
        return None
    return ClaimedGuest(path, vmm, start, sock, lock_fd, record)


def _handed_over(sock: socket.socket, path: str) -> socket.socket:
    """The guest's channel, handed over by the manager on ``channel.sock`` (``sock`` is
    closed). OSError when the manager does not hand it over in time."""
    with sock:
        connect_unix(sock, os.path.join(path, HANDOFF))
        _msg, fds, _flags, _addr = socket.recv_fds(sock, 1, 1)
    if not fds:
        raise ConnectionResetError("the pool manager handed over no channel")
    channel = socket.socket(fileno=fds[0])
    channel.settimeout(PING_TIMEOUT_SECONDS)
    return channel


def _ping(sock: socket.socket) -> None:
    """The guest itself must answer (an empty line: CELLOS:PONG); a VMM that is being killed
    can still accept a connection. OSError when it does not answer in time."""
    sock.sendall(b"\n")
    seen = b""
    deadline = time.monotonic() + PING_TIMEOUT_SECONDS
    while b"CELLOS:PONG\n" not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no answer from the pool guest")
        sock.settimeout(left)
        data = sock.recv(4096)
        if not data:
            raise ConnectionResetError("the pool guest's channel closed")
        seen = (seen + data)[-4096:]


# -- starting, stopping, reaping -------------------------------------------------------------


def start_detached(state_root: str, size: int, env: Mapping[str, str]) -> None:
    """Start ``cellos microvm pool`` in the background (a supervisor with CELLOS_MICROVM_POOL
    and no pool running); it keeps running after the supervisor exits."""
    root = pool_root(state_root)
    os.makedirs(root, mode=0o700, exist_ok=True)
    log_fd = os.open(
        os.path.join(state_root, "microvm-pool.log"),
        os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
        0o600,
    )
    try:
        subprocess.Popen(
            [sys.executable, "-m", "cellos.cli", "microvm", "pool", "--size", str(size)],
            env={**env, "CELLOS_STATE_DIR": state_root},
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            close_fds=True,
            start_new_session=True,
        )
    finally:
        os.close(log_fd)


def stop_pool(state_root: str, timeout: float = 30.0) -> bool:
    """SIGTERM the pool manager and wait for it to have removed everything; False when no
    pool was running."""
    settings = live_pool(state_root)
    if settings is None:
        reap_pool(state_root)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(int(settings["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while live_pool(state_root) is not None:
        if time.monotonic() > deadline:
            raise HostError(
                "cellos microvm pool", f"the pool manager did not stop within {timeout:g} s"
            )
        time.sleep(0.05)
    reap_pool(state_root)
    return True


def reap_pool(state_root: str) -> list[str]:
    """Remove what a dead pool manager left (its guests die with it; their directories and
    any VMM still found running in one are removed). A live pool is never touched."""
    root = pool_root(state_root)
    if not os.path.isdir(root):
        return []
    fd = _lock_free(os.path.join(root, "pool.lock"))
    if fd is None and os.path.exists(os.path.join(root, "pool.lock")):
        return []  # a live manager
    removed = []
    try:
        try:
            gids = sorted(os.listdir(_guests(root)))
        except FileNotFoundError:
            # None, or a manager that is stopping removed them itself just now (`pool stop`
            # reaps right after the manager's lock goes): nothing left to do for the guests.
            gids = []
        for gid in gids:
            _remove_guest(os.path.join(_guests(root), gid))
            removed.append(f"pool-guest:{gid}")
        rmtree(root)
    finally:
        if fd is not None:
            os.close(fd)
    return removed


def wait_ready(state_root: str, count: int, timeout: float) -> int:
    """Wait until ``count`` guests are idle in the pool; the number ready at the end."""
    deadline = time.monotonic() + timeout
    while True:
        guests = _guests(pool_root(state_root))
        try:
            ready = sum(
                1
                for gid in os.listdir(guests)
                if os.path.exists(os.path.join(guests, gid, "ready"))
                and not os.path.exists(os.path.join(guests, gid, "claimed"))
            )
        except OSError:
            ready = 0
        if ready >= count or time.monotonic() > deadline:
            return ready
        time.sleep(0.05)
