"""One contract, every backend: create/run/destroy, errors, hygiene, residue."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from cellos.core.errors import ExportError, HostError
from cellos.core.ports import CellBackend, WorkloadRequest
from cellos.core.spec import CellSpec
from cellos.hosts.cellos import CellosBackend
from cellos.hosts.process import RELAY_CAP_BYTES
from cellos.hosts.stub import StubBackend
from tests.conftest import (
    doc,
    require_host,
    require_sandbox,
    running_with,
    stubborn_workload,
    unique_sleep,
)

BACKENDS = ["stub", "cellos", "gvisor", "qemu"]
#: Seconds a backend needs before the workload runs at all: a qemu guest boots its kernel
#: under TCG here (~2-3 s), so a deadline meant for the workload gets this on top.
BOOT_SLACK = {"qemu": 10.0}


def gvisor_backend(state_root: Path) -> CellBackend:
    require_host(shutil.which("runsc") is not None, "gVisor runsc")
    require_host(os.geteuid() == 0, "root (Debian's runsc cannot run rootless)")
    from cellos.hosts.gvisor import GvisorBackend

    return GvisorBackend(state_root=str(state_root))


def qemu_backend(image: Path, state_root: Path) -> CellBackend:
    from cellos.hosts.microvm.backend import MicrovmBackend

    # TCG, as CELLOS_MICROVM_ACCEL=tcg CELLOS_MICROVM_ALLOW_TCG=1: no KVM probe boot per test.
    return MicrovmBackend(
        image_dir=str(image), state_root=str(state_root), allow_tcg=True, accel="tcg"
    )


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CellBackend]:
    if request.param == "stub":
        yield StubBackend()
    elif request.param == "cellos":
        require_sandbox()
        yield CellosBackend(state_root=str(tmp_path / "state"))
    elif request.param == "qemu":
        image = request.getfixturevalue("image_dir")
        yield qemu_backend(image, tmp_path / "state")
        # Residue: no VMM process of this image; records and directories: the autouse check.
        assert running_with(str(image)) == [], "a VMM process is still running"
    else:
        # Residue (no container state, bundle, workspace, record): the autouse check.
        yield gvisor_backend(tmp_path / "gvisor")


def spec(cell_id: str = "contract-1", **run: object) -> CellSpec:
    from cellos.core.loading import validate_document

    return validate_document(doc(cell_id, run=run)).spec


def request_for(
    argv: list[str], env: dict[str, str] | None = None, deadline: float | None = 30
) -> WorkloadRequest:
    return WorkloadRequest(
        argv=argv,
        env=env or {},
        working_directory="/workspace",
        deadline_seconds=deadline,
        graceful_shutdown_seconds=1,
    )


def test_create_and_destroy(backend: CellBackend) -> None:
    handle = backend.create(spec())
    assert handle.cell_id == "contract-1"
    assert handle.backend == backend.name
    report = backend.destroy(handle)
    assert report.destroyed is True
    assert report.peers_tracked_after == 0
    assert report.residue == ()


def test_workload_env_is_exactly_the_declared_set(backend: CellBackend) -> None:
    os.environ["CELLOS_TEST_AMBIENT"] = "leak"
    try:
        handle = backend.create(spec())
        try:
            result = backend.run(
                handle,
                request_for(["/bin/cat", "/proc/self/environ"], {"A": "1", "B": "two words"}),
            )
        finally:
            backend.destroy(handle)
    finally:
        del os.environ["CELLOS_TEST_AMBIENT"]
    assert result.exit_code == 0
    assert sorted(result.stdout.split(b"\0")[:-1]) == [b"A=1", b"B=two words"]


def test_no_supervisor_fd_leaks_and_stdio_are_pipes(backend: CellBackend, tmp_path: Path) -> None:
    leaked = os.open(tmp_path, os.O_RDONLY)  # deliberately inheritable
    os.set_inheritable(leaked, True)
    try:
        handle = backend.create(spec())
        try:
            result = backend.run(
                handle,
                request_for(
                    [
                        "/bin/sh",
                        "-c",
                        # A glob, not ls (gVisor's 2022 kernel lacks the statx(2) flags ls
                        # uses) nor find -printf (busybox in the qemu guest has none).
                        # In a subshell: its directory fd is not the shell's ($$ stays).
                        '(for f in /proc/$$/fd/*; do echo "${f##*/}"; done); '
                        "for i in 0 1 2; do readlink /proc/$$/fd/$i; done; cat",
                    ]
                ),
            )
        finally:
            backend.destroy(handle)
    finally:
        os.close(leaked)
    lines = result.stdout.decode().split()
    fds = [x for x in lines if x.isdigit()]
    assert fds == ["0", "1", "2"], result.stdout
    # gVisor shows the host pipes it was handed as host:[N].
    assert all(x.startswith(("pipe:", "host:")) for x in lines[3:6]), lines
    assert result.exit_code == 0  # cat saw EOF on stdin at once


def test_exit_code_and_streams(backend: CellBackend) -> None:
    handle = backend.create(spec())
    try:
        result = backend.run(
            handle, request_for(["/bin/sh", "-c", "echo out; echo err >&2; exit 7"])
        )
    finally:
        backend.destroy(handle)
    assert (result.exit_code, result.stdout, result.stderr) == (7, b"out\n", b"err\n")
    assert not result.forced and result.spawn_error is None


def test_spawn_error_has_no_exit_code(backend: CellBackend) -> None:
    handle = backend.create(spec())
    try:
        result = backend.run(handle, request_for(["/nonexistent/program"]))
    finally:
        backend.destroy(handle)
    assert result.exit_code is None
    assert result.spawn_error and "No such file" in result.spawn_error


def test_deadline_kills_everything_the_workload_started(backend: CellBackend) -> None:
    # On qemu the workload's processes live in the guest: the fixture checks the VMM is gone.
    marker = unique_sleep()
    argv = ["/bin/sh", "-c", f"trap '' TERM; sleep {marker} & echo started; wait"]
    handle = backend.create(spec())
    try:
        result = backend.run(
            handle, request_for(argv, deadline=1 + BOOT_SLACK.get(backend.name, 0))
        )
        assert result.forced and result.exit_code is None
        assert result.stdout == b"started\n"
        assert running_with(marker) == []
    finally:
        backend.destroy(handle)


def test_cellos_deadline_kills_a_daemonized_workload(tmp_path: Path) -> None:
    """setsid escapes a process group, not the cell's pid namespace and cgroup."""
    marker = unique_sleep()
    backend = CellosBackend(state_root=str(tmp_path / "state"))
    handle = backend.create(spec())
    try:
        result = backend.run(handle, request_for(stubborn_workload(marker), deadline=1))
        assert result.forced and result.stdout == b"started\n"
        assert running_with(marker) == []
    finally:
        backend.destroy(handle)


def test_cellos_tracks_live_cells(tmp_path: Path) -> None:
    backend = CellosBackend(state_root=str(tmp_path / "state"))
    a = backend.create(spec("live-a"))
    b = backend.create(spec("live-b"))
    with pytest.raises(HostError, match="already exists"):
        backend.create(spec("live-a"))
    # A second backend object (and the state-dir lock, for other processes) sees it too.
    with pytest.raises(HostError, match="already exists"):
        CellosBackend(state_root=str(tmp_path / "state")).create(spec("live-a"))
    assert backend.destroy(a).peers_tracked_after == 1
    with pytest.raises(HostError, match="not live"):
        backend.destroy(a)
    assert backend.destroy(b).peers_tracked_after == 0
    assert os.listdir(tmp_path / "state" / "cells") == []


def test_cellos_refuses_a_live_id_held_by_another_process(tmp_path: Path) -> None:
    import subprocess
    import sys

    state = tmp_path / "state"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time\nfrom cellos.hosts.cellos import CellosBackend\n"
            "from tests.test_backend_contract import spec\n"
            f"CellosBackend(state_root={str(state)!r}).create(spec('shared-id'))\n"
            "print('ready', flush=True)\ntime.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(HostError, match="another process"):
            CellosBackend(state_root=str(state)).create(spec("shared-id"))
    finally:
        holder.kill()
        holder.wait()
    # The holder died without destroying: its lock is gone with it, and the stale state is
    # cleaned up when the id is created again.
    backend = CellosBackend(state_root=str(state))
    handle = backend.create(spec("shared-id"))
    backend.destroy(handle)
    assert os.listdir(state / "cells") == []


def test_cellos_workspace_logs_and_artifacts(tmp_path: Path) -> None:
    backend = CellosBackend(state_root=str(tmp_path / "state"))
    handle = backend.create(spec())
    workspace = Path(handle.resources["workspace"])
    try:
        result = backend.run(
            handle,
            request_for(
                [
                    "/bin/sh",
                    "-c",
                    f"mkdir out && echo data > out/a.txt && ln -s /etc/hostname out/link "
                    f"&& echo raw-output-marker && head -c {RELAY_CAP_BYTES + 4096} /dev/zero",
                ]
            ),
        )
        assert result.exit_code == 0
        assert result.stdout_bytes == RELAY_CAP_BYTES + 4096 + 18 and result.truncated
        # The raw (unredacted) output is never written to the cell's state directory: the
        # output pipeline's redacted log is the only copy on disk.
        for path in workspace.parent.rglob("*"):
            if path.is_file() and path.parent != workspace / "out":
                assert b"raw-output-marker" not in path.read_bytes(), path
        with backend.open_artifact(handle, "/workspace/out/a.txt") as fh:
            assert fh.read() == b"data\n"
        with backend.open_artifact(handle, "out/a.txt") as fh:
            assert fh.read() == b"data\n"
        for bad, reason in [
            ("/workspace/out/link", "symlink"),
            ("/etc/passwd", "outside"),
            ("/workspace/../etc/passwd", "outside"),
            ("out/../../x", ".."),
            ("/workspace/missing", "does not exist"),
            ("/workspace/out", "not a regular"),
        ]:
            with pytest.raises(ExportError, match=reason):
                backend.open_artifact(handle, bad)
    finally:
        report = backend.destroy(handle)
    assert report.residue == ()
    assert not workspace.exists()


def test_stub_keeps_the_seed_contract() -> None:
    backend = StubBackend()
    empty = msgspec.structs.replace(spec(), id="")
    with pytest.raises(HostError, match=r"spec\.id must be non-empty"):
        backend.create(empty)
    handle = backend.create(spec())
    assert backend.destroy(handle).peers_tracked_after == 0
    assert backend.destroy(handle).destroyed is True  # the stub tracks nothing
