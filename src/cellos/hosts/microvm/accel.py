"""The KVM/TCG decision of the ``qemu`` backend, probed once and cached in the state directory.

``/dev/kvm`` can exist and still be unable to boot an ordinary guest (hosts that only run
paravirtualised guests), so a short real boot with ``-accel kvm`` decides. Its answer holds
for as long as the facts it depends on, which form the cache key:

* ``bootId`` - ``/proc/sys/kernel/random/boot_id`` (a reboot re-probes),
* ``kernelRelease`` - the host kernel (``uname -r``),
* ``vmmSha256`` - the QEMU binary (verified against the image manifest before it is used),
* ``kvm`` - ``/dev/kvm``'s identity (``st_dev:st_ino:st_rdev``: a re-created or different
  device re-probes).

The decisions live in ``<state dir>/microvm-accel.json`` (written to a temporary file and
renamed; entries of earlier boots are dropped on write). Concurrent first cells probe once:
the probe runs under ``<state dir>/.microvm-accel.lock`` and a waiter reads the result. The
file must be ours and writable by no one else, or it is refused. ``cellos doctor`` shows the
decision and ``cellos doctor --refresh-microvm-probe`` probes again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cellos.core.errors import HostError

CACHE_NAME = "microvm-accel.json"
LOCK_NAME = ".microvm-accel.lock"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
KVM_DEVICE = "/dev/kvm"
#: A guest that KVM can boot runs ``/bin/true`` and powers off well within this; one that
#: hangs is killed when it passes (the probe then decides TCG).
PROBE_TIMEOUT_SECONDS = 5.0
CACHE_VERSION = 1

#: ``(kvm works, what happened)``: one bounded probe boot.
Probe = Callable[[], tuple[bool, str]]


@dataclass(frozen=True)
class AccelDecision:
    accel: str  # "kvm" | "tcg"
    #: "probe" (probed now), "cache" (an earlier probe), "CELLOS_MICROVM_ACCEL", "no-kvm".
    decided_by: str
    detail: str
    probed_at: str | None = None
    probe_ms: int | None = None


def kvm_identity() -> str | None:
    """``st_dev:st_ino:st_rdev`` of /dev/kvm when it can be opened read-write, else None."""
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    return f"{info.st_dev}:{info.st_ino}:{info.st_rdev}"


def host_key(vmm_sha256: str, kvm: str) -> dict[str, str]:
    """The facts a KVM probe's answer depends on."""
    try:
        with open(BOOT_ID_PATH, encoding="ascii") as fh:
            boot_id = fh.read().strip()
    except OSError as exc:
        raise HostError(BOOT_ID_PATH, f"cannot read the host boot id: {exc.strerror}") from exc
    return {
        "bootId": boot_id,
        "kernelRelease": os.uname().release,
        "vmmSha256": vmm_sha256,
        "kvm": kvm,
    }


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class AccelCache:
    """The probe decisions of one state directory."""

    def __init__(self, state_root: str) -> None:
        self.root = state_root
        self.path = os.path.join(state_root, CACHE_NAME)

    def _entries(self) -> list[dict[str, Any]]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise HostError(self.path, f"cannot read the KVM probe cache: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())
            if (
                not stat.S_ISREG(info.st_mode)
                or info.st_uid != os.geteuid()
                or info.st_mode & 0o022
            ):
                raise HostError(
                    self.path,
                    f"refusing the KVM probe cache: must be a file owned by uid {os.geteuid()} "
                    "and not writable by group or others (remove it to probe again)",
                )
            raw = fh.read()
        try:
            doc = json.loads(raw)
        except ValueError:
            return []  # a torn or foreign file: probe again and overwrite it
        entries = doc.get("entries") if isinstance(doc, dict) else None
        if doc.get("version") != CACHE_VERSION or not isinstance(entries, list):
            return []
        return [e for e in entries if isinstance(e, dict) and isinstance(e.get("key"), dict)]

    def lookup(self, key: dict[str, str]) -> AccelDecision | None:
        for entry in self._entries():
            if entry["key"] == key and entry.get("accel") in ("kvm", "tcg"):
                return AccelDecision(
                    accel=str(entry["accel"]),
                    decided_by="cache",
                    detail=str(entry.get("detail", "")),
                    probed_at=str(entry.get("probedAt")),
                    probe_ms=ms if isinstance(ms := entry.get("probeMs"), int) else None,
                )
        return None

    def _store(self, key: dict[str, str], decision: AccelDecision) -> None:
        kept = [
            e
            for e in self._entries()
            if e["key"] != key and e["key"].get("bootId") == key["bootId"]
        ]
        entry = {
            "key": key,
            "accel": decision.accel,
            "detail": decision.detail,
            "probedAt": decision.probed_at,
            "probeMs": decision.probe_ms,
        }
        data = json.dumps({"version": CACHE_VERSION, "entries": [*kept[-7:], entry]}, indent=2)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(data + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise HostError(self.path, f"cannot write the KVM probe cache: {exc.strerror}") from exc

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            fd = os.open(
                os.path.join(self.root, LOCK_NAME),
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
        except OSError as exc:
            raise HostError(
                "CELLOS_STATE_DIR", f"{self.root}: cannot lock the KVM probe cache: {exc.strerror}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def decide(self, key: dict[str, str], probe: Probe, *, refresh: bool = False) -> AccelDecision:
        """The cached decision for ``key``, or probe once (under the lock) and cache it."""
        if not refresh and (hit := self.lookup(key)) is not None:
            return hit
        with self._lock():
            if not refresh and (hit := self.lookup(key)) is not None:
                return hit  # another cell probed while we waited
            started = time.monotonic()
            works, detail = probe()
            decision = AccelDecision(
                accel="kvm" if works else "tcg",
                decided_by="probe",
                detail=detail,
                probed_at=_now(),
                probe_ms=round((time.monotonic() - started) * 1000),
            )
            self._store(key, decision)
        return decision
