"""The ``qemu`` microVM backend: a real guest kernel under QEMU (TCG on this machine, KVM
where it can boot the guest), booted from an image this project builds."""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    CliResult,
    base_env,
    doc,
    read_events,
    running_with,
    short_types,
    write_doc,
)

Run = Callable[..., CliResult]


def vm_env(tmp_path: Path, image: Path, **extra: str) -> dict[str, str]:
    return base_env(
        tmp_path,
        CELLOS_CELL_BACKEND="qemu",
        CELLOS_MICROVM_IMAGE=str(image),
        CELLOS_MICROVM_ALLOW_TCG="1",
        CELL_OS_JSONL_EVENTS=str(tmp_path / "ev.jsonl"),
        CELLOS_EXPORT_DIR=str(tmp_path / "x"),
        **extra,
    )


def assert_no_vm_residue(tmp_path: Path, image: Path) -> None:
    assert running_with(str(image)) == [], "a VMM process is still running"
    cells = tmp_path / "state" / "cells"
    assert not cells.exists() or os.listdir(cells) == []


@pytest.mark.parametrize("code", [0, 7])
def test_a_cell_boots_a_guest_kernel_and_returns_everything(
    tmp_path: Path, image_dir: Path, supervisor_cli: Run, code: int
) -> None:
    spec = write_doc(
        tmp_path / "c.yaml",
        doc(
            f"vm-{code}",
            argv=[
                "/bin/sh",
                "-c",
                f"echo out; echo err >&2; uname -r; echo $ONLY; ls /sys/class/net; "
                f"printf report > /workspace/r.txt; exit {code}",
            ],
            run={"env": {"ONLY": "declared"}},
            export={"artifacts": [{"name": "r.txt", "path": "/workspace/r.txt"}]},
        ),
    )
    result = supervisor_cli(str(spec), vm_env(tmp_path, image_dir), timeout=180)
    assert result.code == code, result
    lines = result.stdout.splitlines()
    assert lines[0] == "out" and lines[2] == "declared"
    # No egress authority: no network device at all (the VMM gives the guest none).
    assert lines[3:] == ["lo"], result
    assert lines[1] != platform.release()  # the guest's own kernel
    assert "err" in result.stderr
    assert (tmp_path / "x" / f"vm-{code}" / "r.txt").read_text() == "report"
    events = read_events(tmp_path / "ev.jsonl")
    started = events[0]["data"]
    assert set(started["digests"]) == {"kernelSha256", "initrdSha256", "vmmSha256"}
    assert "manifest:verified" in started["isolation"]
    assert "network:loopback-only" in started["isolation"]
    assert started["networkScope"]["enforced"] is True
    assert_no_vm_residue(tmp_path, image_dir)


@pytest.mark.parametrize("victim", ["vmlinuz", "initrd.cpio.gz"])
def test_a_tampered_image_is_refused_before_boot(
    tmp_path: Path, image_dir: Path, supervisor_cli: Run, victim: str
) -> None:
    tampered = tmp_path / "image"
    shutil.copytree(image_dir, tampered)
    data = bytearray((tampered / victim).read_bytes())
    data[len(data) // 2] ^= 0x01
    (tampered / victim).write_bytes(bytes(data))
    marker = tmp_path / "never"
    spec = write_doc(tmp_path / "c.yaml", doc("vm-tamper", argv=["/bin/touch", str(marker)]))
    result = supervisor_cli(str(spec), vm_env(tmp_path, tampered), timeout=120)
    assert result.code == 1, result
    assert victim in result.stderr and "sha256" in result.stderr.lower(), result.stderr
    events = read_events(tmp_path / "ev.jsonl")
    assert short_types(events) == ["lifecycle.v1.destroyed", "compliance.v1.summary"]
    assert (
        events[0]["data"]["reason"] == "create_failed" and events[0]["data"]["outcome"] == "failed"
    )
    assert running_with(str(tampered)) == []


@pytest.mark.parametrize("bound", ["timeout", "ttl"])
def test_timeout_and_ttl_kill_the_vm_and_leave_nothing(
    tmp_path: Path, image_dir: Path, supervisor_cli: Run, bound: str
) -> None:
    run: dict[str, Any] = {"limits": {"gracefulShutdownSeconds": 1}}
    if bound == "timeout":
        run["timeoutSeconds"] = 8
    spec = write_doc(
        tmp_path / "c.yaml",
        doc(
            "vm-slow",
            argv=["/bin/sleep", "300"],
            run=run,
            lifetime={"ttlSeconds": 8 if bound == "ttl" else 120},
        ),
    )
    result = supervisor_cli(str(spec), vm_env(tmp_path, image_dir), timeout=180)
    assert result.code == 124, result
    destroyed = next(
        e["data"]
        for e in read_events(tmp_path / "ev.jsonl")
        if e["type"].endswith("lifecycle.v1.destroyed")
    )
    assert destroyed["terminalState"] == "forced" and destroyed["reason"] == bound
    assert "exitCode" not in destroyed
    assert_no_vm_residue(tmp_path, image_dir)


def test_tcg_must_be_allowed_explicitly_when_kvm_cannot_boot(
    tmp_path: Path, image_dir: Path, supervisor_cli: Run
) -> None:
    from cellos.hosts.microvm.backend import MicrovmBackend
    from cellos.hosts.microvm.image import MANIFEST_NAME
    from cellos.hosts.microvm.manifest import load_manifest

    backend = MicrovmBackend(
        image_dir=str(image_dir), state_root=str(tmp_path / "state"), allow_tcg=False
    )
    manifest = load_manifest(image_dir / MANIFEST_NAME)
    try:
        accel = backend.accel(manifest)
    except Exception as exc:  # noqa: BLE001 - the refusal is what this host should produce
        assert "CELLOS_MICROVM_ALLOW_TCG" in str(exc)
        return
    assert accel == "kvm"  # only where KVM really boots the guest


def completed(tmp_path: Path) -> dict[str, Any]:
    return next(
        e["data"]
        for e in read_events(tmp_path / "ev.jsonl")
        if e["type"].endswith("command.v1.completed")
    )


def test_an_oom_kill_in_the_guest_is_reported(
    tmp_path: Path, image_dir: Path, supervisor_cli: Run
) -> None:
    """dd with a 200 MiB buffer under memoryMaxBytes 32 MiB: the guest kernel's OOM killer
    kills it in the workload's cgroup, and the guest reports the cgroup's counter."""
    spec = write_doc(
        tmp_path / "c.yaml",
        doc(
            "vm-oom",
            argv=["/bin/dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1"],
            run={"limits": {"memoryMaxBytes": 32 << 20}},
        ),
    )
    result = supervisor_cli(str(spec), vm_env(tmp_path, image_dir), timeout=180)
    assert result.code == 137, result
    data = completed(tmp_path)
    assert data["reason"] == "oom_killed", data
    assert data["limits"]["oomKills"] >= 1 and data["limits"]["pidsLimitHits"] == 0, data
    assert_no_vm_residue(tmp_path, image_dir)


def test_pids_max_bounds_a_fork_bomb_in_the_guest_and_is_reported(
    tmp_path: Path, image_dir: Path, supervisor_cli: Run
) -> None:
    """pidsMax 16 counts the workload's processes (itself included), as on the cellos
    backend: 15 children fit, the 16th fork is refused and reported."""
    script = (
        "i=0; while [ $i -lt 15 ]; do sleep 5 & i=$((i+1)); done; echo fifteen; "
        "i=0; while [ $i -lt 25 ]; do sleep 5 & i=$((i+1)); done; echo never"
    )
    spec = write_doc(
        tmp_path / "c.yaml",
        doc("vm-pids", argv=["/bin/sh", "-c", script], run={"limits": {"pidsMax": 16}}),
    )
    result = supervisor_cli(str(spec), vm_env(tmp_path, image_dir), timeout=180)
    assert result.code != 0 and "fork" in result.stderr, result
    assert result.stdout == "fifteen\n", result
    data = completed(tmp_path)
    assert data["reason"] == "pids_limit_reached", data
    assert data["limits"]["pidsLimitHits"] >= 1 and data["limits"]["oomKills"] == 0, data
    assert_no_vm_residue(tmp_path, image_dir)


def test_hostname_working_directory_and_relative_artifacts(
    tmp_path: Path, image_dir: Path, supervisor_cli: Run
) -> None:
    """The guest is named after the cell (first 64 characters), the workload starts in
    run.workingDirectory (created, owned by the workload's user), and a relative artifact
    path is relative to it, as on the other backends; a path leaving it is refused."""
    cell_id = "v" + "x" * 127
    spec = write_doc(
        tmp_path / "c.yaml",
        doc(
            cell_id,
            argv=[
                "/bin/sh",
                "-c",
                "hostname; pwd; ls -nd .; mkdir out; "
                "printf rel > out/r.txt; printf abs > /srv/job/a.txt",
            ],
            run={"workingDirectory": "/srv/job"},
            export={
                "artifacts": [
                    {"name": "r.txt", "path": "out/r.txt"},
                    {"name": "a.txt", "path": "/srv/job/a.txt"},
                    {"name": "up.txt", "path": "../etc/x"},
                ]
            },
        ),
    )
    result = supervisor_cli(str(spec), vm_env(tmp_path, image_dir), timeout=180)
    lines = result.stdout.splitlines()
    assert lines[:2] == [cell_id[:64], "/srv/job"], result
    assert "65534" in lines[2], result
    assert (tmp_path / "x" / cell_id / "r.txt").read_text() == "rel"
    assert (tmp_path / "x" / cell_id / "a.txt").read_text() == "abs"
    assert not (tmp_path / "x" / cell_id / "up.txt").exists()
    assert result.code == 1 and "spec.export.artifacts[2].path" in result.stderr, result
    assert_no_vm_residue(tmp_path, image_dir)


def test_a_working_directory_the_guest_owns_is_refused_before_boot(
    tmp_path: Path, image_dir: Path, supervisor_cli: Run
) -> None:
    spec = write_doc(
        tmp_path / "c.yaml", doc("vm-wd", argv=["/bin/true"], run={"workingDirectory": "/proc/x"})
    )
    result = supervisor_cli(str(spec), vm_env(tmp_path, image_dir), timeout=60)
    assert result.code == 2, result
    assert result.stderr.startswith("error: spec.run.workingDirectory: /proc/x is inside /proc")
    assert_no_vm_residue(tmp_path, image_dir)
