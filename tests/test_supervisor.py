"""The supervisor end to end through the real ``cellos-supervisor`` CLI."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    CliResult,
    base_env,
    doc,
    read_events,
    require_host,
    require_sandbox,
    running_with,
    short_types,
    stubborn_workload,
    unique_sleep,
    write_doc,
)

Run = Callable[..., CliResult]

FULL_ORDER = [
    "lifecycle.v1.started",
    "observability.v1.process_spawned",
    "command.v1.completed",
    "export.v2.completed",
    "evidence_bundle.v1.emitted",
    "lifecycle.v1.destroyed",
    "compliance.v1.summary",
]


#: The seed contract's document, verbatim (the Rust integration test writes exactly this): no
#: ``run`` section, so the cell is created, exports and is destroyed.
SEED_DOCUMENT = """{"apiVersion": "cellos.io/v1", "kind": "ExecutionCell",
 "spec": {"id": "%(id)s", "authority": {"secretRefs": []},
          "lifetime": {"ttlSeconds": 60},
          "export": {"artifacts": [{"name": "out.txt", "path": "%(path)s"}]}}}
"""
RUNLESS_ORDER = [
    "lifecycle.v1.started",
    "export.v2.completed",
    "evidence_bundle.v1.emitted",
    "lifecycle.v1.destroyed",
    "compliance.v1.summary",
]


def _seed_runs(tmp_path: Path, supervisor_cli: Run, backend: str) -> tuple[Path, list[CliResult]]:
    root = tmp_path / "exports"
    env = base_env(
        tmp_path,
        CELLOS_DEPLOYMENT_PROFILE="portable",
        CELL_OS_USE_NOOP_SINK="1",
        CELLOS_CELL_BACKEND=backend,
        CELLOS_EXPORT_DIR=str(root),
    )
    results = []
    for cell_id, source, content in (
        ("seq-cell-a", "only-a.txt", "alpha"),
        ("seq-cell-b", "only-b.txt", "beta"),
    ):
        (tmp_path / source).write_text(content)
        spec = tmp_path / f"{cell_id}.json"
        spec.write_text(SEED_DOCUMENT % {"id": cell_id, "path": tmp_path / source})
        results.append(supervisor_cli(str(spec), env))
    return root, results


def test_seed_two_sequential_stub_runs_export_their_own_files(
    tmp_path: Path, supervisor_cli: Run
) -> None:
    root, results = _seed_runs(tmp_path, supervisor_cli, "stub")
    for result in results:
        assert result.code == 0, result
        assert result.stderr == "", result
    assert sorted(os.listdir(root)) == ["seq-cell-a", "seq-cell-b"]
    assert os.listdir(root / "seq-cell-a") == ["out.txt"]
    assert os.listdir(root / "seq-cell-b") == ["out.txt"]
    assert (root / "seq-cell-a" / "out.txt").read_text() == "alpha"
    assert (root / "seq-cell-b" / "out.txt").read_text() == "beta"


def test_seed_on_an_isolating_backend_fails_the_export_truthfully(
    tmp_path: Path, supervisor_cli: Run
) -> None:
    """On ``cellos`` an artifact path is in the cell, where nothing ran to write the file: the
    export fails (``export.v2.failed``, exit 1) rather than copying the host's file."""
    root, results = _seed_runs(tmp_path, supervisor_cli, "cellos")
    for result in results:
        assert result.code == 1, result
        assert "Traceback" not in result.stderr, result
        assert result.stderr.startswith("error: spec.export.artifacts[0].path: "), result
    assert not root.exists() or all(not any(d.iterdir()) for d in root.iterdir())


@pytest.mark.parametrize("backend", ["stub", "cellos"])
def test_runless_cell_emits_the_lifecycle_without_a_command(
    tmp_path: Path, supervisor_cli: Run, backend: str, cloudevents_validator: Any
) -> None:
    events_path = tmp_path / "events.jsonl"
    env = base_env(
        tmp_path,
        CELLOS_CELL_BACKEND=backend,
        CELL_OS_JSONL_EVENTS=str(events_path),
        CELLOS_EXPORT_DIR=str(tmp_path / "exports"),
    )
    source = tmp_path / "only-a.txt"
    source.write_text("alpha")
    spec = tmp_path / "runless.json"
    spec.write_text(SEED_DOCUMENT % {"id": "runless-1", "path": source})
    result = supervisor_cli(str(spec), env)
    events = read_events(events_path)
    for event in events:
        cloudevents_validator.validate(event)
    types = short_types(events)
    by_type = {t: e["data"] for t, e in zip(types, events, strict=True)}
    assert by_type["lifecycle.v1.started"]["timeoutSeconds"] is None
    summary = by_type["compliance.v1.summary"]
    assert summary["exitCode"] is None
    assert summary["secretDeliveryMode"] is None
    assert by_type["lifecycle.v1.destroyed"]["destroyed"] is True
    if backend == "stub":
        assert result.code == 0, result
        assert types == RUNLESS_ORDER
        assert summary["outcome"] == "succeeded"
        assert summary["exportsCompleted"] == 1
    else:
        assert result.code == 1, result
        failed = [t.replace("export.v2.completed", "export.v2.failed") for t in RUNLESS_ORDER]
        assert types == failed
        assert by_type["export.v2.failed"]["path"] == str(source)
        assert summary["outcome"] == "failed"
        assert (summary["exportsCompleted"], summary["exportsFailed"]) == (0, 1)


@pytest.mark.parametrize("backend", ["stub", "cellos"])
def test_lifecycle_events_in_order_and_valid(
    tmp_path: Path, supervisor_cli: Run, backend: str, cloudevents_validator: Any
) -> None:
    events_path = tmp_path / "events.jsonl"
    env = base_env(
        tmp_path,
        CELLOS_CELL_BACKEND=backend,
        CELL_OS_JSONL_EVENTS=str(events_path),
        CELLOS_EXPORT_DIR=str(tmp_path / "exports"),
    )
    artifact = "/workspace/out.txt" if backend == "cellos" else str(tmp_path / "out.txt")
    target = "out.txt" if backend == "cellos" else str(tmp_path / "out.txt")
    spec = write_doc(
        tmp_path / "c.yaml",
        doc(
            "order-1",
            argv=["/bin/sh", "-c", f"printf 'hello cell' > {target}; echo said"],
            correlation={"tenantId": "acme", "labels": {"k": "v"}},
            export={"artifacts": [{"name": "out.txt", "path": artifact}]},
        ),
    )
    result = supervisor_cli(str(spec), env)
    assert result.code == 0, result
    assert result.stdout == "said\n"
    events = read_events(events_path)
    assert short_types(events) == FULL_ORDER
    for event in events:
        cloudevents_validator.validate(event)
        assert event["subject"] == "urn:cellos:cell:order-1"
        assert event["source"].startswith("/cellos/supervisor/")
    assert [e["cellosseq"] for e in events] == list(range(len(FULL_ORDER)))
    assert len({e["cellosrunid"] for e in events}) == 1
    by_type = {t: e["data"] for t, e in zip(short_types(events), events, strict=True)}
    exported = (tmp_path / "exports" / "order-1" / "out.txt").read_bytes()
    assert exported == b"hello cell"
    assert by_type["export.v2.completed"]["sha256"] == hashlib.sha256(exported).hexdigest()
    assert by_type["export.v2.completed"]["sizeBytes"] == len(exported)
    assert by_type["command.v1.completed"]["exitCode"] == 0
    assert by_type["observability.v1.process_spawned"] == {
        "cellId": "order-1",
        "program": "/bin/sh",
        "argc": 3,
    }
    assert by_type["lifecycle.v1.destroyed"]["terminalState"] == "clean"
    assert by_type["lifecycle.v1.destroyed"]["outcome"] == "succeeded"
    assert (
        by_type["evidence_bundle.v1.emitted"]["artifacts"][0]["sha256"]
        == hashlib.sha256(exported).hexdigest()
    )
    summary = by_type["compliance.v1.summary"]
    assert summary["correlation"] == {"tenantId": "acme", "labels": {"k": "v"}}
    assert summary["exitCode"] == 0 and summary["outcome"] == "succeeded"


def test_workload_exit_status_is_the_process_exit_status(
    tmp_path: Path, supervisor_cli: Run
) -> None:
    env = base_env(tmp_path, CELL_OS_USE_NOOP_SINK="1")
    spec = write_doc(tmp_path / "c.yaml", doc("exit-5", argv=["/bin/sh", "-c", "exit 5"]))
    assert supervisor_cli(str(spec), env).code == 5


@pytest.mark.parametrize("backend", ["stub", "cellos"])
@pytest.mark.parametrize("bound", ["timeout", "ttl"])
def test_timeout_and_ttl_kill_everything_and_report_forced(
    tmp_path: Path, supervisor_cli: Run, backend: str, bound: str
) -> None:
    events_path = tmp_path / "events.jsonl"
    marker = unique_sleep()
    env = base_env(tmp_path, CELLOS_CELL_BACKEND=backend, CELL_OS_JSONL_EVENTS=str(events_path))
    lifetime = {"ttlSeconds": 1 if bound == "ttl" else 60}
    run: dict[str, Any] = {"limits": {"gracefulShutdownSeconds": 1}}
    if bound == "timeout":
        run["timeoutSeconds"] = 1
    # The stub has no pid namespace: a setsid daemon would escape its process group.
    argv = (
        stubborn_workload(marker)
        if backend == "cellos"
        else ["/bin/sh", "-c", f"trap '' TERM; sleep {marker} & echo started; wait"]
    )
    spec = write_doc(tmp_path / "c.yaml", doc("slow-1", argv=argv, run=run, lifetime=lifetime))
    result = supervisor_cli(str(spec), env)
    assert result.code == 124, result
    assert result.stdout == "started\n"
    events = read_events(events_path)
    destroyed = next(e["data"] for e in events if e["type"].endswith("lifecycle.v1.destroyed"))
    assert destroyed["terminalState"] == "forced"
    assert destroyed["outcome"] == "failed"
    assert "exitCode" not in destroyed
    assert destroyed["reason"] == bound
    command = next(e["data"] for e in events if e["type"].endswith("command.v1.completed"))
    assert command["exitCode"] is None and command["forced"] is True
    assert running_with(marker) == [], f"processes still running after {bound}"


SECRET = "s3cr3t-" + uuid.uuid4().hex


def test_secret_reaches_only_the_workload(tmp_path: Path, supervisor_cli: Run) -> None:
    events_path = tmp_path / "events.jsonl"
    env = base_env(
        tmp_path,
        CELLOS_BROKER="env",
        CELLOS_SECRET_API_TOKEN=SECRET,
        CELL_OS_JSONL_EVENTS=str(events_path),
        CELLOS_EXPORT_DIR=str(tmp_path / "x"),
    )
    script = (
        f'[ "$API_TOKEN" = "{SECRET}" ] && echo match; echo "leak $API_TOKEN"; '
        'echo "err $API_TOKEN" >&2; echo "$API_TOKEN" > secret.txt; exit 3'
    )
    spec = write_doc(
        tmp_path / "c.yaml",
        doc(
            "secret-1",
            argv=["/bin/sh", "-c", script],
            authority={"secretRefs": ["api-token"]},
            export={"artifacts": [{"name": "secret.txt", "path": "/workspace/secret.txt"}]},
        ),
    )
    result = supervisor_cli(str(spec), env)
    assert result.code == 3
    assert "match" in result.stdout
    assert "leak [REDACTED]" in result.stdout and "err [REDACTED]" in result.stderr
    for text in (result.stdout, result.stderr, events_path.read_text()):
        assert SECRET not in text
    # The workload's own artifact may hold it; its name never does.
    assert os.listdir(tmp_path / "x" / "secret-1") == ["secret.txt"]


def test_missing_secret_fails_before_anything_runs(tmp_path: Path, supervisor_cli: Run) -> None:
    marker = tmp_path / "ran"
    events_path = tmp_path / "events.jsonl"
    env = base_env(
        tmp_path,
        CELLOS_BROKER="env",
        CELL_OS_JSONL_EVENTS=str(events_path),
        CELLOS_EXPORT_DIR=str(tmp_path / "x"),
    )
    spec = write_doc(
        tmp_path / "c.yaml",
        doc(
            "nosecret",
            argv=["/bin/touch", str(marker)],
            authority={"secretRefs": ["ok", "db-pass"]},
            export={"artifacts": [{"name": "a", "path": "/workspace/a"}]},
        ),
    )
    env["CELLOS_SECRET_OK"] = "fine"
    result = supervisor_cli(str(spec), env)
    assert result.code == 1
    assert result.stderr.startswith(
        "error: spec.authority.secretRefs[1]: 'db-pass': secret not found"
    )
    assert "fine" not in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "state").exists()
    events = read_events(events_path)
    assert short_types(events) == ["compliance.v1.summary"]
    assert events[0]["data"]["outcome"] == "failed"


def test_symlink_at_export_destination_is_refused(tmp_path: Path, supervisor_cli: Run) -> None:
    victim = tmp_path / "victim"
    victim.write_text("original")
    cell_dir = tmp_path / "x" / "sym-1"
    cell_dir.mkdir(parents=True)
    (cell_dir / "out.txt").symlink_to(victim)
    events_path = tmp_path / "events.jsonl"
    env = base_env(
        tmp_path, CELL_OS_JSONL_EVENTS=str(events_path), CELLOS_EXPORT_DIR=str(tmp_path / "x")
    )
    spec = write_doc(
        tmp_path / "c.yaml",
        doc(
            "sym-1",
            argv=["/bin/sh", "-c", "echo evil > out.txt"],
            export={"artifacts": [{"name": "out.txt", "path": "/workspace/out.txt"}]},
        ),
    )
    result = supervisor_cli(str(spec), env)
    assert result.code == 1
    assert "error: spec.export.artifacts[0].path: export destination is a symlink" in result.stderr
    assert victim.read_text() == "original"
    assert os.listdir(cell_dir) == ["out.txt"]  # no partial file left behind
    failed = [e for e in read_events(events_path) if e["type"].endswith("export.v2.failed")]
    assert len(failed) == 1 and "symlink" in failed[0]["data"]["reason"]


def test_missing_artifact_is_a_failed_export_never_an_empty_file(
    tmp_path: Path, supervisor_cli: Run
) -> None:
    events_path = tmp_path / "events.jsonl"
    env = base_env(
        tmp_path, CELL_OS_JSONL_EVENTS=str(events_path), CELLOS_EXPORT_DIR=str(tmp_path / "x")
    )
    spec = write_doc(
        tmp_path / "c.yaml",
        doc("miss-1", export={"artifacts": [{"name": "gone.txt", "path": "/workspace/gone.txt"}]}),
    )
    result = supervisor_cli(str(spec), env)
    assert result.code == 1
    assert "does not exist" in result.stderr
    assert not (tmp_path / "x").exists()
    types = short_types(read_events(events_path))
    assert "export.v2.failed" in types and "export.v2.completed" not in types
    assert types[-2:] == ["lifecycle.v1.destroyed", "compliance.v1.summary"]


def test_workload_symlink_cannot_exfiltrate_host_files(tmp_path: Path, supervisor_cli: Run) -> None:
    env = base_env(tmp_path, CELL_OS_USE_NOOP_SINK="1", CELLOS_EXPORT_DIR=str(tmp_path / "x"))
    spec = write_doc(
        tmp_path / "c.yaml",
        doc(
            "exfil-1",
            argv=["/bin/sh", "-c", "mkdir d && ln -s /etc/shadow d/f && ln -s /etc d2"],
            export={
                "artifacts": [
                    {"name": "a", "path": "/workspace/d/f"},
                    {"name": "b", "path": "/workspace/d2/shadow"},
                ]
            },
        ),
    )
    result = supervisor_cli(str(spec), env)
    assert result.code == 1
    assert result.stderr.count("symlink") == 2
    assert not (tmp_path / "x").exists()


def test_events_survive_a_failing_sink_in_the_dlq(tmp_path: Path, supervisor_cli: Run) -> None:
    dlq = tmp_path / "dlq"
    env = base_env(tmp_path, CELL_OS_JSONL_EVENTS="/dev/full", CELLOS_DLQ_DIR=str(dlq))
    spec = write_doc(tmp_path / "c.yaml", doc("dlq-1"))
    result = supervisor_cli(str(spec), env)
    assert result.code == 0, result
    kept = sorted(os.listdir(dlq / "jsonl"))
    assert len(kept) == 6  # started, spawned, command, evidence, destroyed, summary
    assert all(name.endswith(".json") for name in kept)


def test_lost_events_fail_the_run(tmp_path: Path, supervisor_cli: Run) -> None:
    env = base_env(tmp_path, CELL_OS_JSONL_EVENTS="/dev/full")
    result = supervisor_cli(str(write_doc(tmp_path / "c.yaml", doc("lost-1"))), env)
    assert result.code == 1
    assert "could not be delivered" in result.stderr
    assert os.listdir(tmp_path / "state" / "cells") == []  # teardown still happened


def test_default_sink_is_stderr_jsonl(tmp_path: Path, supervisor_cli: Run) -> None:
    result = supervisor_cli(
        str(write_doc(tmp_path / "c.yaml", doc("stderr-1"))), base_env(tmp_path)
    )
    assert result.code == 0
    assert result.stderr.count('"specversion":"1.0"') == 6


def test_cgroup_leaf_is_created_joined_and_removed(tmp_path: Path) -> None:
    parent = Path("/sys/fs/cgroup/pids") / f"cellos-test-{uuid.uuid4().hex[:8]}"
    try:
        parent.mkdir()
    except OSError as exc:
        require_host(False, f"a writable cgroup hierarchy ({exc})")
    leaf = parent / "cellos-cg-1"
    try:
        env = base_env(tmp_path, CELLOS_CGROUP_PARENT=str(parent), CELL_OS_USE_NOOP_SINK="1")
        spec = write_doc(tmp_path / "c.yaml", doc("cg-1", argv=["/bin/sleep", "3"]))
        proc = subprocess.Popen([sys.executable, "-m", "cellos.supervisor.cli", str(spec)], env=env)
        members: list[str] = []
        deadline = time.monotonic() + 10
        # Until the cell has started: its launcher joins first, then forks pid 1 and the
        # workload inside the leaf.
        while len(members) < 3 and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                members = (leaf / "cgroup.procs").read_text().split()
            time.sleep(0.02)
        assert proc.wait(timeout=30) == 0
        # The launcher, the cell's pid 1 and the workload were all in the leaf.
        assert len(members) == 3, members
        assert not leaf.exists()
    finally:
        parent.rmdir()


def test_a_backend_bug_still_ends_in_teardown_and_a_summary() -> None:
    """A deliberately broken backend (a stub whose ``run`` raises, standing in for a bug that
    cannot be provoked in a real backend on purpose): no traceback escapes, the cell is still
    destroyed and the run still ends with a compliance summary."""
    from cellos.brokers import MemoryBroker
    from cellos.core.loading import validate_document
    from cellos.core.ports import CellHandle, TeardownReport, WorkloadRequest, WorkloadResult
    from cellos.hosts.stub import StubBackend
    from cellos.supervisor import Supervisor

    destroyed: list[str] = []

    class BrokenBackend(StubBackend):
        def run(self, handle: CellHandle, request: WorkloadRequest) -> WorkloadResult:
            raise RuntimeError("boom")

        def destroy(self, handle: CellHandle) -> TeardownReport:
            destroyed.append(handle.cell_id)
            return super().destroy(handle)

    supervisor = Supervisor(backend=BrokenBackend(), sinks=[], broker=MemoryBroker(), exporter=None)
    out = supervisor.run(validate_document(doc("bug-1")))
    assert out.exit_code == 1
    assert (out.errors[0].path, out.errors[0].reason) == (
        "supervisor",
        "unexpected RuntimeError: boom",
    )
    assert destroyed == ["bug-1"]
    assert short_types(out.events)[-2:] == ["lifecycle.v1.destroyed", "compliance.v1.summary"]


# -- closed and broken standard streams ----------------------------------------------------------

VERIFY = [sys.executable, "-m", "cellos.cli", "events", "verify"]


@pytest.mark.parametrize("closed", ["stdout", "stderr"])
def test_a_closed_standard_stream_is_skipped_and_the_run_completes(
    tmp_path: Path, closed: str
) -> None:
    events = tmp_path / "events.jsonl"
    env = base_env(tmp_path, CELLOS_CELL_BACKEND="stub", CELL_OS_JSONL_EVENTS=str(events))
    spec = write_doc(
        tmp_path / "c.yaml",
        doc("closed-1", argv=["/bin/sh", "-c", "echo out; echo err >&2; exit 3"]),
    )
    redirect = ">&-" if closed == "stdout" else "2>&-"
    script = f'exec "$0" -m cellos.supervisor.cli "$1" {redirect}'
    proc = subprocess.run(
        ["/bin/sh", "-c", script, sys.executable, str(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 3, proc  # the workload's status
    if closed == "stdout":
        assert proc.stdout == "" and proc.stderr == "err\n", proc
    else:
        assert proc.stdout == "out\n" and proc.stderr == "", proc
    # The events file did not take the closed descriptor's place, and the run is complete.
    assert subprocess.run([*VERIFY, str(events)], capture_output=True, check=False).returncode == 0
    assert short_types(read_events(events))[-1] == "compliance.v1.summary"


def test_a_stdout_reader_that_has_gone_is_no_traceback(tmp_path: Path) -> None:
    env = base_env(tmp_path, CELLOS_CELL_BACKEND="stub", CELL_OS_USE_NOOP_SINK="1")
    spec = write_doc(
        tmp_path / "c.yaml",
        doc("epipe-1", argv=["/bin/sh", "-c", "head -c 300000 /dev/zero; echo err >&2; exit 4"]),
    )
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "cellos.supervisor.cli", str(spec)],
            env=env,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 4, proc
    assert proc.stderr == "err\n", proc


# -- what the events and errors say -------------------------------------------------------------


@pytest.mark.parametrize("backend", ["stub", "cellos"])
def test_processes_killed_at_the_deadline_are_counted(
    tmp_path: Path, supervisor_cli: Run, backend: str
) -> None:
    if backend == "cellos":
        require_sandbox()
    events_path = tmp_path / "events.jsonl"
    marker = unique_sleep()
    env = base_env(tmp_path, CELLOS_CELL_BACKEND=backend, CELL_OS_JSONL_EVENTS=str(events_path))
    # Exactly two processes: a background sleep and the shell turned into the other one.
    argv = ["/bin/sh", "-c", f"sleep {marker} & exec sleep {marker}"]
    run = {"timeoutSeconds": 1, "limits": {"gracefulShutdownSeconds": 1}}
    spec = write_doc(tmp_path / "c.yaml", doc("killed-2", argv=argv, run=run))
    result = supervisor_cli(str(spec), env)
    assert result.code == 124, result
    destroyed = next(
        e["data"] for e in read_events(events_path) if e["type"].endswith("lifecycle.v1.destroyed")
    )
    assert destroyed["terminalState"] == "forced"
    assert destroyed["processesKilled"] == 2, destroyed
    assert running_with(marker) == []


def test_a_missing_export_dir_is_blamed_on_the_variable(
    tmp_path: Path, supervisor_cli: Run
) -> None:
    env = base_env(tmp_path, CELLOS_CELL_BACKEND="stub", CELL_OS_USE_NOOP_SINK="1")
    source = tmp_path / "a.txt"
    source.write_text("a\n")
    artifacts = [{"name": "a.txt", "path": str(source)}, {"name": "b.txt", "path": str(source)}]
    spec = write_doc(tmp_path / "c.yaml", doc("noexp-1", export={"artifacts": artifacts}))
    result = supervisor_cli(str(spec), env)
    assert result.code == 1, result
    assert result.stderr == "error: CELLOS_EXPORT_DIR: no export destination is configured\n"


def test_an_export_dir_that_is_a_file_is_not_a_directory(
    tmp_path: Path, supervisor_cli: Run
) -> None:
    not_a_dir = tmp_path / "exports"
    not_a_dir.write_text("a file\n")
    env = base_env(
        tmp_path,
        CELLOS_CELL_BACKEND="stub",
        CELL_OS_USE_NOOP_SINK="1",
        CELLOS_EXPORT_DIR=str(not_a_dir),
    )
    source = tmp_path / "a.txt"
    source.write_text("a\n")
    spec = write_doc(
        tmp_path / "c.yaml",
        doc("fileexp-1", export={"artifacts": [{"name": "a.txt", "path": str(source)}]}),
    )
    result = supervisor_cli(str(spec), env)
    assert result.code == 1, result
    assert result.stderr == f"error: CELLOS_EXPORT_DIR: {not_a_dir} is not a directory\n", result
    assert not_a_dir.read_text() == "a file\n"
