"""The ``firecracker`` backend (``CELLOS_CELL_BACKEND=firecracker``).

No firecracker binary exists on the development host, and its ``/dev/kvm`` boots only
paravirtualised guests, so the backend's wiring is tested against a **fake** Firecracker
(``tests/fake_firecracker.py``): it serves the API on the backend's socket, validates every
request body against the vendored API specification, enforces Firecracker's call order and
records the calls, and answers the CellOS guest channel on its stdin/stdout (Firecracker's
serial port) by running the request on the host. What it proves: the calls and their order
(machine-config, boot-source, ``InstanceStart``; ``PATCH /vm`` + ``PUT /snapshot/create``;
``PUT /snapshot/load``), the request on ``boot_args`` (secrets never), exit code, output and
artifacts over the channel, manifest verification (vmlinux included) before every boot, the
pool's hand-over of a Firecracker guest's channel, snapshot digests verified before restore,
and no residue. What it cannot prove: that a real Firecracker boots the Debian kernel; the
end-to-end test at the bottom does, where a firecracker binary and a usable KVM exist (it is
reported as not run, by name, here).

Where neither exists, a run is refused before anything starts (tested with the real host).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cellos.core.errors import CellosError, HostError
from cellos.hosts.microvm.accel import kvm_identity
from cellos.hosts.microvm.firecracker import find_firecracker
from cellos.hosts.microvm.manifest import Artifact, Manifest, sha256_file
from cellos.hosts.microvm.vmlinux import extract_vmlinux
from tests.conftest import (
    REPO,
    CliResult,
    base_env,
    doc,
    read_events,
    require_host,
    run_cli,
    write_doc,
)

Run = Callable[..., CliResult]


# -------------------------------------------------------------- refused where it cannot run


def test_without_a_firecracker_binary_a_run_is_refused_before_anything_starts(
    tmp_path: Path, supervisor_cli: Run
) -> None:
    (tmp_path / "x").mkdir()
    env = base_env(
        tmp_path,
        PATH="/usr/sbin:/usr/bin:/sbin:/bin",  # no firecracker there (nor on this host at all)
        CELLOS_CELL_BACKEND="firecracker",
        CELL_OS_JSONL_EVENTS=str(tmp_path / "events.jsonl"),
        CELLOS_EXPORT_DIR=str(tmp_path / "x"),
    )
    if shutil.which("firecracker", path=env["PATH"]):
        pytest.skip("this host has a firecracker binary: nothing to refuse")
    document = doc("fc-refused", ["/bin/sh", "-c", "touch /tmp/ran"])
    result = supervisor_cli(str(write_doc(tmp_path / "c.yaml", document)), env)
    assert result.code == 1, result
    assert result.stderr.splitlines() == [
        "error: CELLOS_FIRECRACKER: firecracker not found: the firecracker backend needs the "
        "firecracker binary (set CELLOS_FIRECRACKER to it or put it on PATH)"
    ]
    # Nothing ran, nothing is left: no event, no state, no export.
    assert not (tmp_path / "events.jsonl").exists() or not read_events(tmp_path / "events.jsonl")
    assert list((tmp_path / "x").iterdir()) == []
    state = tmp_path / "state"
    assert not state.exists() or not any(state.rglob("record.json"))
    # And doctor says why.
    doctor = run_cli("cellos.cli", ["doctor"], env, timeout=120)
    line = next(x for x in doctor.stdout.splitlines() if x.startswith("microvm:firecracker"))
    assert "MISSING" in line and "CELLOS_FIRECRACKER" in line, line


def test_without_a_usable_kvm_the_backend_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cellos.hosts.microvm import fc_backend
    from cellos.hosts.registry import make_backend

    monkeypatch.setattr(fc_backend, "kvm_identity", lambda: None)
    with pytest.raises(HostError) as caught:
        make_backend("firecracker", {"CELLOS_FIRECRACKER": "/bin/true"})
    assert caught.value.path == "/dev/kvm"
    assert "KVM only" in caught.value.reason
    # TCG cannot be asked for: Firecracker has none.
    monkeypatch.setattr(fc_backend, "kvm_identity", lambda: "0:0:0")
    with pytest.raises(CellosError, match="KVM only") as refused:
        make_backend(
            "firecracker", {"CELLOS_FIRECRACKER": "/bin/true", "CELLOS_MICROVM_ACCEL": "tcg"}
        )
    assert refused.value.path == "CELLOS_MICROVM_ACCEL"


# ------------------------------------------------------------------------ vmlinux extraction


def _bzimage(payload: bytes) -> bytes:
    setup = bytearray(1024)  # setup_sects = 1: the payload's code starts at 2*512
    setup[0x1F1] = 1
    setup[0x202:0x206] = b"HdrS"
    setup[0x206:0x208] = struct.pack("<H", 0x020F)
    setup[0x248:0x250] = struct.pack("<II", 16, len(payload))
    return bytes(setup) + b"\0" * 16 + payload


def test_vmlinux_is_extracted_from_lz4_and_gzip_bzimages() -> None:
    """The kernel build's LZ4 "legacy" frame (``lz4 -l``: 8 MiB blocks, then the size) and
    gzip; anything else is refused by name, a broken block as malformed."""
    import lz4.block

    kernel = b"\x7fELF" + bytes(range(256)) * 40_000  # ~10 MiB: more than one block
    framed = struct.pack("<I", 0x184C2102)
    for i in range(0, len(kernel), 8 << 20):
        packed = lz4.block.compress(kernel[i : i + (8 << 20)], store_size=False)
        framed += struct.pack("<I", len(packed)) + packed
    framed += struct.pack("<I", len(kernel))  # the build's trailing size word
    assert extract_vmlinux(_bzimage(framed), "vmlinuz") == kernel
    assert extract_vmlinux(_bzimage(gzip.compress(kernel)), "vmlinuz") == kernel
    bad_block = b"\x00\xff\xff" + b"\0" * 16  # a back-reference before the output's start
    broken = framed[:4] + struct.pack("<I", len(bad_block)) + bad_block
    with pytest.raises(HostError, match="malformed LZ4"):
        extract_vmlinux(_bzimage(broken), "vmlinuz")
    with pytest.raises(HostError, match="unsupported method"):
        extract_vmlinux(_bzimage(b"\x28\xb5\x2f\xfd" + b"\0" * 32), "vmlinuz")
    with pytest.raises(HostError, match="not a bzImage"):
        extract_vmlinux(kernel, "vmlinux")


# --------------------------------------------------------------------- against the fake


def _fake_binary(where: Path, record: Path) -> Path:
    binary = where / "firecracker"
    binary.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from tests.fake_firecracker import main\n"
        f"main(sys.argv, {str(record)!r})\n"
    )
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return binary


def _fake_image(where: Path, vmm: Path) -> Path:
    image = where / "image"
    image.mkdir()
    (image / "vmlinuz").write_bytes(b"MZ fake bzImage")
    (image / "initrd.cpio.gz").write_bytes(gzip.compress(b"fake initrd"))
    (image / "vmlinux").write_bytes(b"\x7fELF fake kernel")
    manifest = Manifest(
        kernel=Artifact("vmlinuz", sha256_file(image / "vmlinuz")),
        initrd=Artifact("initrd.cpio.gz", sha256_file(image / "initrd.cpio.gz")),
        vmm=Artifact(os.path.realpath(vmm), sha256_file(vmm)),
        vmlinux=Artifact("vmlinux", sha256_file(image / "vmlinux")),
    )
    (image / "manifest.json").write_text(json.dumps(manifest.to_json()))
    return image


class Fake:
    def __init__(self, tmp_path: Path) -> None:
        self.record = tmp_path / "fc-calls.jsonl"
        self.binary = _fake_binary(tmp_path, self.record)
        self.image = _fake_image(tmp_path, self.binary)
        (tmp_path / "x").mkdir()
        self.env = base_env(
            tmp_path,
            CELLOS_CELL_BACKEND="firecracker",
            CELLOS_FIRECRACKER=str(self.binary),
            CELLOS_MICROVM_IMAGE=str(self.image),
            CELLOS_EXPORT_DIR=str(tmp_path / "x"),
            CELL_OS_JSONL_EVENTS=str(tmp_path / "events.jsonl"),
        )

    def calls(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def sessions(self) -> dict[int, list[tuple[str, str]]]:
        """Each fake VMM's API calls, in order, by pid."""
        found: dict[int, list[tuple[str, str]]] = {}
        for call in self.calls():
            if "method" in call and call["method"] != "GET":
                found.setdefault(call["pid"], []).append((call["method"], call["path"]))
        return found

    def pids(self) -> set[int]:
        return {c["pid"] for c in self.calls()}


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Fake]:
    require_host(kvm_identity() is not None, "an openable /dev/kvm (the backend checks it)")
    made = Fake(tmp_path)
    yield made
    # Every fake VMM was killed (a Firecracker guest never ends its VMM itself).
    for pid in made.pids():
        assert not _alive(pid), f"fake firecracker {pid} is still running"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


BOOT = [("PUT", "/machine-config"), ("PUT", "/boot-source"), ("PUT", "/actions")]


def test_a_cell_boots_through_the_api_and_reports_over_the_serial_channel(
    tmp_path: Path, fake: Fake, supervisor_cli: Run
) -> None:
    document = doc(
        "fc-cell",
        ["/bin/sh", "-c", 'echo "hello $WHO"; echo oops >&2; echo art > out.txt; exit 3'],
        run={
            "env": {"WHO": "firecracker"},
            "limits": {"memoryMaxBytes": 512 << 20, "cpuMax": {"quotaMicros": 150_000}},
        },
        export={"artifacts": [{"name": "out.txt", "path": "out.txt"}]},
    )
    result = supervisor_cli(str(write_doc(tmp_path / "c.yaml", document)), fake.env)
    assert result.code == 3, result
    assert result.stdout == "hello firecracker\n"
    assert "oops" in result.stderr
    assert (tmp_path / "x" / "fc-cell" / "out.txt").read_text() == "art\n"
    # Two VMMs: the one-time KVM probe (a /bin/true guest) and the cell's; each configured
    # in the specification's order, every body valid (the fake answers 400 otherwise).
    sessions = list(fake.sessions().values())
    assert sessions == [BOOT, BOOT], sessions
    assert all(c["status"] == 204 for c in fake.calls() if "status" in c)
    bodies = [c for c in fake.calls() if c.get("path") == "/machine-config"]
    assert bodies[-1]["body"] == {"vcpu_count": 2, "mem_size_mib": 512, "smt": False}
    boot = [c for c in fake.calls() if c.get("path") == "/boot-source"][-1]["body"]
    assert boot["kernel_image_path"] == str(fake.image / "vmlinux")
    assert boot["initrd_path"] == str(fake.image / "initrd.cpio.gz")
    assert boot["boot_args"].startswith("console=ttyS0 ") and "reboot=k" in boot["boot_args"]
    assert "cellos.argv=" in boot["boot_args"]
    run = [c for c in fake.calls() if c.get("guest") == "run"][-1]
    assert run["cgroup"] == {"memory.max": str(512 << 20)}
    events = read_events(tmp_path / "events.jsonl")
    started = events[0]["data"]
    assert "microvm:firecracker" in started["isolation"]
    assert started["resources"]["accel"] == "kvm"
    assert started["resources"]["accelDecidedBy"] == "probe"
    assert started["digests"]["vmlinuxSha256"] == sha256_file(fake.image / "vmlinux")
    assert any(e["type"].endswith("lifecycle.v1.destroyed") for e in events)
    # The cell's directory (API socket, VMM log) is gone with it.
    assert not (tmp_path / "state" / "cells" / "fc-cell").exists()


def test_secrets_reach_the_guest_on_the_channel_never_in_boot_args(
    tmp_path: Path, fake: Fake, supervisor_cli: Run
) -> None:
    secret = "s3cr3t-value-xyz"
    env = {
        **fake.env,
        "CELLOS_BROKER": "env",
        "CELLOS_SECRET_DB": secret,
        "CELLOS_MICROVM_ACCEL": "kvm",  # no probe boot this time
    }
    document = doc(
        "fc-secret",
        ["/bin/true"],
        authority={"secretRefs": ["DB"]},
        run={"secretDelivery": "runtimeBroker"},
    )
    result = supervisor_cli(str(write_doc(tmp_path / "c.yaml", document)), env)
    assert result.code == 0, result
    text = fake.record.read_text()
    assert secret not in text  # neither in an API body (boot_args) nor anywhere else
    run = [c for c in fake.calls() if c.get("guest") == "run"][-1]
    assert run["secrets"] and run["secrets"][0].endswith("bytes")
    assert secret not in (tmp_path / "events.jsonl").read_text()


def test_a_changed_vmlinux_is_refused_before_the_vmm_starts(
    tmp_path: Path, fake: Fake, supervisor_cli: Run
) -> None:
    vmlinux = fake.image / "vmlinux"
    vmlinux.write_bytes(vmlinux.read_bytes() + b"!")
    result = supervisor_cli(str(write_doc(tmp_path / "c.yaml", doc("fc-tampered"))), fake.env)
    assert result.code == 1, result
    assert f"{vmlinux}: sha256 mismatch" in result.stderr, result
    assert fake.calls() == []  # no VMM was started


def test_an_image_without_vmlinux_is_refused_naming_what_is_missing(
    tmp_path: Path, fake: Fake, supervisor_cli: Run
) -> None:
    manifest = json.loads((fake.image / "manifest.json").read_text())
    del manifest["vmlinux"]
    (fake.image / "manifest.json").write_text(json.dumps(manifest))
    result = supervisor_cli(str(write_doc(tmp_path / "c.yaml", doc("fc-bz"))), fake.env)
    assert result.code == 1, result
    assert "no vmlinux: Firecracker boots only an uncompressed ELF kernel" in result.stderr
    assert "cellos microvm build-image --firecracker DIR" in result.stderr
    assert fake.calls() == []


def test_a_snapshot_pool_hands_a_restored_guest_to_the_cell(
    tmp_path: Path, fake: Fake, supervisor_cli: Run
) -> None:
    env = {**fake.env, "CELLOS_MICROVM_ACCEL": "kvm", "CELLOS_MICROVM_POOL": "1"}
    log = (tmp_path / "pool.log").open("w")
    pool = subprocess.Popen(
        [sys.executable, "-m", "cellos.cli", "microvm", "pool", "--size", "1", "--snapshot"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    snapshot = tmp_path / "state" / "microvm-pool" / "snapshot"
    try:
        from cellos.hosts.microvm.pool import wait_ready

        assert wait_ready(env["CELLOS_STATE_DIR"], 1, 60) == 1, (tmp_path / "pool.log").read_text()
        # The snapshot: a booted idle guest, paused, then written; its files' digests are in
        # its manifest. Every guest after it is restored from it.
        sessions = list(fake.sessions().values())
        assert sessions[0] == [*BOOT, ("PATCH", "/vm"), ("PUT", "/snapshot/create")]
        assert sessions[1] == [("PUT", "/snapshot/load")]
        meta = json.loads((snapshot / "snapshot.json").read_text())
        for name in ("snapshot.vmstate", "snapshot.mem"):
            assert meta["files"][name] == sha256_file(snapshot / name)
        load = next(c for c in fake.calls() if c.get("path") == "/snapshot/load")["body"]
        assert load["mem_backend"] == {
            "backend_type": "File",
            "backend_path": str(snapshot / "snapshot.mem"),
        }
        assert load["resume_vm"] is True

        document = doc(
            "fc-pooled",
            ["/bin/sh", "-c", "echo pooled > out.txt"],
            export={"artifacts": [{"name": "out.txt", "path": "out.txt"}]},
        )
        result = supervisor_cli(str(write_doc(tmp_path / "c.yaml", document)), env)
        assert result.code == 0, result
        resources = read_events(tmp_path / "events.jsonl")[0]["data"]["resources"]
        assert resources["pool"] == "hit", resources
        assert resources["poolGuestFrom"] == "snapshot"
        assert (tmp_path / "x" / "fc-pooled" / "out.txt").read_text() == "pooled\n"
        # The request came on the channel with fresh randomness and the host's clock.
        request = next(c for c in fake.calls() if c.get("guest") == "request")["params"]
        assert {"cellos.argv", "cellos.seed", "cellos.time"} <= set(request)

        # One changed byte of the snapshot's memory: no guest is restored from it again.
        mem = snapshot / "snapshot.mem"
        mem.write_bytes(mem.read_bytes() + b"x")
        deadline = time.monotonic() + 30
        status = run_cli("cellos.cli", ["microvm", "pool", "status"], env)
        while "sha256 mismatch" not in status.stderr and time.monotonic() < deadline:
            time.sleep(0.2)
            status = run_cli("cellos.cli", ["microvm", "pool", "status"], env)
        assert status.code == 1 and f"{mem}: sha256 mismatch" in status.stderr, status
    finally:
        stopped = run_cli("cellos.cli", ["microvm", "pool", "stop"], env)
        pool.wait(timeout=30)
        log.close()
    assert stopped.code == 0, stopped
    assert not (tmp_path / "state" / "microvm-pool").exists()


# ------------------------------------------------------------------ the real binary


def test_firecracker_backend_end_to_end_with_a_real_binary(
    tmp_path: Path, supervisor_cli: Run
) -> None:
    # Deliberately pytest.skip and not require_host (as test_boots_with_a_real_firecracker_
    # binary): without a firecracker binary and a KVM that boots a guest this test is reported
    # as not run, by name, even under CELLOS_REQUIRE_HOST_FEATURES=1.
    binary = find_firecracker()
    if binary is None or kvm_identity() is None:
        pytest.skip(
            "firecracker binary or /dev/kvm not present: "
            "test_firecracker_backend_end_to_end_with_a_real_binary not run "
            "(set CELLOS_FIRECRACKER or put firecracker on PATH, on a host with KVM)"
        )
    image = os.environ.get("CELLOS_FIRECRACKER_IMAGE")
    if not image:
        image = str(tmp_path / "image")
        built = run_cli(
            "cellos.cli",
            ["microvm", "build-image", "--firecracker", "--vmm", binary, image],
            {**os.environ},
            timeout=900,
        )
        assert built.code == 0, built
    (tmp_path / "x").mkdir()
    env = base_env(
        tmp_path,
        CELLOS_CELL_BACKEND="firecracker",
        CELLOS_FIRECRACKER=binary,
        CELLOS_MICROVM_IMAGE=image,
        CELLOS_EXPORT_DIR=str(tmp_path / "x"),
    )
    first = supervisor_cli(str(write_doc(tmp_path / "t.yaml", doc("fc-true"))), env, timeout=120)
    if first.code == 1 and "/dev/kvm" in first.stderr:
        pytest.skip(
            f"KVM cannot boot a Firecracker guest here: "
            f"test_firecracker_backend_end_to_end_with_a_real_binary not run ({first.stderr})"
        )
    assert first.code == 0, first
    art = doc(
        "fc-art",
        ["/bin/sh", "-c", "echo real > out.txt; cat /proc/sys/kernel/random/boot_id"],
        export={"artifacts": [{"name": "out.txt", "path": "out.txt"}]},
    )
    result = supervisor_cli(str(write_doc(tmp_path / "a.yaml", art)), env, timeout=120)
    assert result.code == 0, result
    assert (tmp_path / "x" / "fc-art" / "out.txt").read_text() == "real\n"

    pool_env = {**env, "CELLOS_MICROVM_POOL": "1", "CELL_OS_JSONL_EVENTS": str(tmp_path / "e")}
    log = (tmp_path / "pool.log").open("w")
    pool = subprocess.Popen(
        [sys.executable, "-m", "cellos.cli", "microvm", "pool", "--size", "2", "--snapshot"],
        env=pool_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        from cellos.hosts.microvm.pool import wait_ready

        assert wait_ready(env["CELLOS_STATE_DIR"], 2, 120) == 2, (tmp_path / "pool.log").read_text()
        boot_ids = set()
        for n in range(2):
            (tmp_path / "e").unlink(missing_ok=True)
            cell = doc(f"fc-pool-{n}", ["/bin/cat", "/proc/sys/kernel/random/boot_id"])
            hit = supervisor_cli(str(write_doc(tmp_path / "p.yaml", cell)), pool_env)
            assert hit.code == 0, hit
            boot_ids.add(hit.stdout)
            resources = read_events(tmp_path / "e")[0]["data"]["resources"]
            assert resources["pool"] == "hit" and resources["poolGuestFrom"] == "snapshot"
        assert len(boot_ids) == 2  # restored guests do not share an identity
    finally:
        run_cli("cellos.cli", ["microvm", "pool", "stop"], pool_env)
        pool.wait(timeout=30)
        log.close()


def test_a_killed_supervisors_vmm_dies_and_its_cell_is_reaped(
    tmp_path: Path, fake: Fake, cellos_cli: Run
) -> None:
    env = {**fake.env, "CELLOS_MICROVM_ACCEL": "kvm"}
    spec = write_doc(tmp_path / "c.yaml", doc("fc-orphan", ["/bin/sleep", "30"]))
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "cellos.supervisor.cli", str(spec)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not any(c.get("guest") == "run" for c in fake.calls()):
        assert time.monotonic() < deadline and supervisor.poll() is None
        time.sleep(0.05)
    record = json.loads((tmp_path / "state" / "cells" / "fc-orphan" / "record.json").read_text())
    assert record["backend"] == "firecracker"
    supervisor.kill()
    supervisor.wait()
    reaped = cellos_cli(["reap"], env)
    assert reaped.code == 0, reaped
    assert "fc-orphan" in reaped.stdout
    assert not (tmp_path / "state" / "cells" / "fc-orphan").exists()
    # The VMM died with its supervisor (PR_SET_PDEATHSIG) or was killed by the reaper (the
    # fixture asserts that no fake VMM is left).
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in fake.pids()) and time.monotonic() < deadline:
        time.sleep(0.05)
