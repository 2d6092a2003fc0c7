"""A full filesystem, for real: a small tmpfs mounted for the test, filled up, freed again.

What must hold: the shared JSONL events file never keeps a partial line (a failed append
leaves the file as it was, so the next run's first event is never glued onto a fragment);
a run whose start cannot be recorded does not run its workload; a failed export leaves no
empty cell directory.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CliResult, base_env, doc, require_host, require_sandbox, write_doc

Run = Callable[..., CliResult]
#: Pages of the test filesystem: room for a few runs' events, small enough to fill quickly.
TMPFS_SIZE = "64k"


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh tmpfs of TMPFS_SIZE (root and mount(8) needed; fails under
    CELLOS_REQUIRE_HOST_FEATURES=1 when it cannot be mounted)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    why = "root" if os.geteuid() != 0 else ("mount(8)" if not shutil.which("mount") else "")
    if not why:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0755", "cellos-test", str(mnt)],
            capture_output=True,
            text=True,
            check=False,
        )
        why = "" if proc.returncode == 0 else proc.stderr.strip() or f"exit {proc.returncode}"
    require_host(not why, f"mounting a small tmpfs ({why})")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def fill(mnt: Path, spare_pages: int = 0) -> Path:
    """Take every free page of the filesystem but ``spare_pages``; returns the filler (delete
    it to free them)."""
    filler = mnt / f"filler-{uuid.uuid4().hex[:8]}"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        fh.truncate(max(0, fh.tell() - spare_pages * 4096))
    return filler


def verify(events: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cellos.cli", "events", "verify", str(events)],
        capture_output=True,
        text=True,
        check=False,
    )


def lines_of(events: Path) -> list[dict[str, Any]]:
    """Every line of the file, each of which must be one whole JSON event."""
    raw = events.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), f"partial last line: {raw[-120:]!r}"
    return [json.loads(line) for line in raw.splitlines()]


def _stub_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return base_env(tmp_path, CELLOS_CELL_BACKEND="stub", **extra)


# No spare page: the run's events have only what is left of the file's last page; one spare
# page: some of them fit, and the one that does not must not stay as a fragment.
@pytest.mark.parametrize("spare_pages", [0, 1])
def test_a_full_events_file_never_keeps_a_partial_line(
    small_tmpfs: Path, tmp_path: Path, supervisor_cli: Run, spare_pages: int
) -> None:
    events = small_tmpfs / "events.jsonl"
    env = _stub_env(tmp_path, CELL_OS_JSONL_EVENTS=str(events))

    def run(name: str) -> CliResult:
        # Long ids make every event ~1 KiB: one spare page then takes some events of a run.
        cell_id = name + "-" + "x" * 100
        return supervisor_cli(str(write_doc(tmp_path / f"{name}.yaml", doc(cell_id))), env)

    assert run("disk-a").code == 0
    first = lines_of(events)
    filler = fill(small_tmpfs, spare_pages)
    # The events file's last page (and the spare one) has some room left: runs fill it, and
    # the event that does not fit must be removed again, not left as a fragment.
    for attempt in range(5):
        full = run(f"disk-b{attempt}")
        if full.code != 0:
            break
        first = lines_of(events)  # a run that fitted entirely
    assert full.code == 1, full
    during = lines_of(events)  # whole lines only: the fragment was removed
    assert "Traceback" not in full.stderr, full
    # The log line says why: the path and the error.
    assert f"event lost: sink jsonl failed: cannot write {str(events)!r}: " in full.stderr
    assert "No space left on device (ENOSPC)" in full.stderr
    assert during[: len(first)] == first
    run_b = during[len(first) :]
    seqs = [e["cellosseq"] for e in run_b]
    # The workload ran only if its start was recorded: 6 events then, else 4 (no spawn/command).
    emitted = 6 if 0 in seqs else 4
    lost = emitted - len(seqs)
    assert lost >= 1
    assert f"error: events: {lost} event(s) could not be delivered" in full.stderr, full

    filler.unlink()
    assert run("disk-c").code == 0
    after = lines_of(events)  # no line glued onto a fragment
    assert after[: len(during)] == during
    assert [e["cellosseq"] for e in after[len(during) :]] == [0, 1, 2, 3, 4, 5]
    # The verifier passes over runs a and c and names exactly what run b lost.
    checked = verify(events)
    assert "malformed" not in checked.stderr, checked.stderr
    if not seqs:
        assert checked.returncode == 0, checked  # nothing of run b reached the file
        return
    assert checked.returncode == 1, checked
    run_id = run_b[0]["cellosrunid"]
    missing = [s for s in range(emitted) if s not in seqs]
    if missing[0] < max(seqs):
        assert f"run {run_id}: " in checked.stderr, checked.stderr
        assert f"expected {missing[0]}" in checked.stderr, checked.stderr
    else:
        # Only its last events are missing: the run is incomplete, and nothing else is wrong.
        assert run_id in checked.stderr, checked.stderr
        allowed = subprocess.run(
            [
                sys.executable,
                "-m",
                "cellos.cli",
                "events",
                "verify",
                "--allow-incomplete",
                *[str(events)],
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert allowed.returncode == 0, allowed


@pytest.mark.parametrize("backend", ["stub", "cellos"])
def test_a_start_that_cannot_be_recorded_runs_nothing(
    small_tmpfs: Path, tmp_path: Path, supervisor_cli: Run, backend: str
) -> None:
    if backend == "cellos":
        require_sandbox()
    events = small_tmpfs / "events.jsonl"
    events.touch()
    fill(small_tmpfs)
    # The stub runs on the host, where the marker shows a run; a sandbox would not see it,
    # and there the cell's state must be gone (cgroups and mounts: the autouse check).
    marker = tmp_path / "workload-ran"
    env = base_env(tmp_path, CELLOS_CELL_BACKEND=backend, CELL_OS_JSONL_EVENTS=str(events))
    spec = write_doc(tmp_path / "c.yaml", doc("disk-start", argv=["/bin/touch", str(marker)]))
    result = supervisor_cli(str(spec), env)
    assert result.code == 1, result
    assert (
        "error: events: lifecycle.v1.started could not be delivered to any sink "
        f"(jsonl: cannot write {str(events)!r}: No space left on device (ENOSPC)); "
        "the workload was not run"
    ) in result.stderr, result
    assert "Traceback" not in result.stderr
    assert not marker.exists(), "the workload ran although its start was not recorded"
    assert events.read_bytes() == b""
    cells = tmp_path / "state" / "cells"
    assert not cells.exists() or os.listdir(cells) == []  # the cell was destroyed


def test_a_failed_export_leaves_no_empty_cell_directory(
    small_tmpfs: Path, tmp_path: Path, supervisor_cli: Run
) -> None:
    exports = small_tmpfs / "exports"
    exports.mkdir()
    fill(small_tmpfs)
    artifact = tmp_path / "big.bin"
    artifact.write_bytes(b"x" * 65536)
    env = _stub_env(tmp_path, CELL_OS_USE_NOOP_SINK="1", CELLOS_EXPORT_DIR=str(exports))
    spec = write_doc(
        tmp_path / "c.yaml",
        doc("disk-export", export={"artifacts": [{"name": "big.bin", "path": str(artifact)}]}),
    )
    result = supervisor_cli(str(spec), env)
    assert result.code == 1, result
    assert (
        "error: spec.export.artifacts[0].path: cannot write artifact: No space left on device"
        in result.stderr
    ), result
    assert os.listdir(exports) == [], "the failed export left its cell directory"


APPENDER = """
import json, sys, uuid
from cellos.sinks.jsonl import JsonlFileSink
sink = JsonlFileSink(sys.argv[1])
ok = 0
for n in range(int(sys.argv[2])):
    event = {"specversion": "1.0", "id": str(uuid.uuid4()), "writer": sys.argv[3], "n": n,
             "data": "x" * (200 + 37 * (n % 11))}
    try:
        sink.emit(event)
        ok += 1
    except Exception:
        pass
sink.close()
print(ok)
"""


def test_concurrent_appenders_on_a_filling_disk_leave_only_whole_lines(
    small_tmpfs: Path, tmp_path: Path
) -> None:
    """Three supervisors' sinks share one events file while the disk runs full: every line
    in the file is whole, and each writer's successful appends are exactly its lines."""
    events = small_tmpfs / "events.jsonl"
    fill(small_tmpfs, spare_pages=6)
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", APPENDER, str(events), "200", f"w{i}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    delivered = {f"w{i}": int(w.communicate(timeout=60)[0]) for i, w in enumerate(writers)}
    lines = lines_of(events)
    assert sum(delivered.values()) < 600, "the disk never ran full"
    for writer, count in delivered.items():
        assert len([e for e in lines if e["writer"] == writer]) == count, writer
