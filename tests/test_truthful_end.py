"""Every cell ends truthfully: signals to the supervisor, killed supervisors on every backend,
reaping that never touches a live cell, duplicate ids, a full state directory.

Real parts throughout: the CLI in subprocesses, the ``cellos`` sandbox, runsc, QEMU guests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
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
    run_cli,
    running_with,
    short_types,
    unique_sleep,
    write_doc,
)

Run = Callable[..., CliResult]
SUPERVISOR = [sys.executable, "-m", "cellos.supervisor.cli"]


def start_supervisor(spec: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*SUPERVISOR, str(spec)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def sleeping(marker: str) -> bool:
    """The workload reached its ``sleep <marker>`` (not just a shell naming the marker)."""
    for pid in running_with(marker):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep\0"):
                return True
        except OSError:
            continue
    return False


def host_processes_under(path: Path) -> list[int]:
    """Live host processes that name ``path`` or run in it (runsc and its sandbox, a VMM)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            cwd = os.readlink(f"/proc/{pid}/cwd")
            stat = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if stat != b"Z" and (str(path).encode() in cmdline or cwd.startswith(str(path))):
            found.append(int(pid))
    return found


def events_of(path: Path) -> list[dict[str, Any]]:
    return read_events(path) if path.exists() else []


def started(path: Path) -> bool:
    return "observability.v1.process_spawned" in short_types(events_of(path))


def verify(path: Path) -> CliResult:
    return run_cli("cellos.cli", ["events", "verify", str(path)], dict(os.environ))


def backend_env(tmp_path: Path, backend: str, image: Path | None = None) -> dict[str, str]:
    env = base_env(
        tmp_path,
        CELLOS_CELL_BACKEND=backend,
        CELL_OS_JSONL_EVENTS=str(tmp_path / "events.jsonl"),
        CELLOS_EXPORT_DIR=str(tmp_path / "exports"),
    )
    if backend == "qemu":
        assert image is not None
        env.update(CELLOS_MICROVM_IMAGE=str(image), CELLOS_MICROVM_ACCEL="tcg")
        env["CELLOS_MICROVM_ALLOW_TCG"] = "1"
    return env


def require_backend(backend: str) -> None:
    if backend == "cellos":
        require_sandbox()
    elif backend == "gvisor":
        require_host(shutil.which("runsc") is not None, "gVisor runsc")
        require_host(os.geteuid() == 0, "root (Debian's runsc cannot run rootless)")


@pytest.fixture(params=["cellos", "gvisor", "qemu"])
def any_backend(request: pytest.FixtureRequest) -> Iterator[tuple[str, Path | None]]:
    backend = str(request.param)
    require_backend(backend)
    image = request.getfixturevalue("image_dir") if backend == "qemu" else None
    yield backend, image


# -- signals to the supervisor ------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signalled_supervisor_stops_the_cell_and_says_so(
    tmp_path: Path, sig: signal.Signals
) -> None:
    require_sandbox()
    marker = unique_sleep()
    spec = write_doc(
        tmp_path / "c.yaml",
        doc(
            "sig-cell",
            argv=["/bin/sh", "-c", f"echo up; sleep {marker}"],
            run={"timeoutSeconds": 120},
            export={"artifacts": [{"name": "never.txt", "path": "/workspace/never.txt"}]},
        ),
    )
    env = backend_env(tmp_path, "cellos")
    events = tmp_path / "events.jsonl"
    proc = start_supervisor(spec, env)
    wait_for(lambda: started(events) and sleeping(marker), 30, "the workload")
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, (proc.returncode, stderr)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert f"error: supervisor: stopped by {sig.name}" in stderr
    assert stdout == "up\n"  # what the workload wrote before it was stopped is relayed
    assert running_with(marker) == []
    found = read_events(events)
    assert short_types(found) == [
        "lifecycle.v1.started",
        "observability.v1.process_spawned",
        "command.v1.completed",
        "evidence_bundle.v1.emitted",
        "lifecycle.v1.destroyed",
        "compliance.v1.summary",
    ]  # nothing exported after the signal
    completed, destroyed, summary = found[2]["data"], found[4]["data"], found[5]["data"]
    assert completed["forced"] is True and completed["reason"] == "supervisor_signal"
    assert completed["exitCode"] is None
    assert destroyed["terminalState"] == "forced" and destroyed["destroyed"] is True
    assert destroyed["reason"] == "supervisor_signal" and "exitCode" not in destroyed
    assert summary["terminalState"] == "forced" and summary["outcome"] == "failed"
    assert verify(events).code == 0
    assert not (tmp_path / "exports" / "sig-cell").exists()


def test_a_second_signal_cuts_the_grace_period_short(tmp_path: Path) -> None:
    require_sandbox()
    marker = unique_sleep()
    spec = write_doc(
        tmp_path / "c.yaml",
        doc(
            "grace-cell",
            # Ignores SIGTERM: only the kill after the grace period ends it.
            argv=["/bin/sh", "-c", f"trap '' TERM; sleep {marker}"],
            run={"timeoutSeconds": 120, "limits": {"gracefulShutdownSeconds": 60}},
        ),
    )
    events = tmp_path / "events.jsonl"
    proc = start_supervisor(spec, backend_env(tmp_path, "cellos"))
    wait_for(lambda: started(events) and sleeping(marker), 30, "the workload")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None  # still in its 60 s grace period
    begun = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert time.monotonic() - begun < 10
    assert proc.returncode == 128 + signal.SIGTERM
    assert running_with(marker) == []
    assert read_events(events)[-2]["data"]["terminalState"] == "forced"


def test_a_signal_before_the_cell_exists_creates_nothing(tmp_path: Path) -> None:
    """SIGTERM while the supervisor is still starting: no cell, a summary, exit 143."""
    require_sandbox()
    spec = write_doc(tmp_path / "c.yaml", doc("early-cell", argv=["/bin/true"]))
    env = backend_env(tmp_path, "cellos")
    code = (
        "import os, signal, sys\n"
        "from cellos.supervisor import cli\n"
        "real = cli.build_supervisor\n"
        "def build(env):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(env)\n"
        "cli.build_supervisor = build\n"
        f"sys.exit(cli.main([{str(spec)!r}]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 143, proc.stderr
    assert "Traceback" not in proc.stderr
    found = read_events(tmp_path / "events.jsonl")
    assert short_types(found) == ["compliance.v1.summary"]
    assert "before the cell was created" in found[0]["data"]["errors"][0]


# -- killed supervisors, every backend -----------------------------------------------------------


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_supervisors_cell_is_gone_and_its_run_ends_forced(
    tmp_path: Path, any_backend: tuple[str, Path | None], how: signal.Signals
) -> None:
    backend, image = any_backend
    marker = unique_sleep()
    spec = write_doc(
        tmp_path / "c.yaml",
        doc(
            f"killed-{backend}",
            argv=["/bin/sh", "-c", f"echo up; sleep {marker}"],
            run={"timeoutSeconds": 240, "limits": {"gracefulShutdownSeconds": 2}},
        ),
    )
    env = backend_env(tmp_path, backend, image)
    events = tmp_path / "events.jsonl"
    proc = start_supervisor(spec, env)
    wait_for(lambda: started(events), 60, "process_spawned")
    if backend == "cellos":
        wait_for(lambda: sleeping(marker), 60, "the workload")
    else:
        # Inside gVisor's kernel or a guest the workload is no host process; runsc's sandbox
        # or the VMM is (the guest boots for seconds under TCG first).
        wait_for(lambda: host_processes_under(tmp_path) != [], 60, "runsc / the VMM")
        time.sleep(4 if backend == "qemu" else 1)
    proc.send_signal(how)
    proc.communicate(timeout=60)
    # The workload (and runsc / the VMM) does not outlive its supervisor's grace period.
    wait_for(lambda: running_with(marker) == [], 4, "the workload to be gone")
    wait_for(lambda: host_processes_under(tmp_path) == [], 4, "runsc / the VMM to be gone")
    cells = tmp_path / "state" / "cells"
    if how == signal.SIGTERM:
        assert proc.returncode == 143
    else:
        # Nothing can run in a SIGKILLed supervisor: the reaper finishes the job and the run.
        reap = run_cli("cellos.cli", ["reap"], env)
        assert reap.code == 0, reap
        assert f"reaped killed-{backend}" in reap.stdout
    assert not cells.exists() or os.listdir(cells) == []
    assert not (tmp_path / "state" / "runsc").exists() or not os.listdir(
        tmp_path / "state" / "runsc"
    )
    report = verify(events)
    assert report.code == 0, report  # the run is complete: its chain ends in a summary
    found = read_events(events)
    assert len({e["cellosrunid"] for e in found}) == 1
    assert found[-2]["data"]["terminalState"] == "forced"
    assert found[-1]["type"].endswith("compliance.v1.summary")
    reason = "reaped" if how == signal.SIGKILL else "supervisor_signal"
    assert found[-2]["data"]["reason"] == reason
    completed = [e for e in found if e["type"].endswith("command.v1.completed")]
    assert len(completed) == 1 and completed[0]["data"]["forced"] is True


# -- reaping never touches a live cell -----------------------------------------------------------


def run_loops(env: dict[str, str], specs: list[Path], cells_per_loop: int) -> list[str]:
    """One loop per document, in parallel, each running its cell ``cells_per_loop`` times one
    after another; returns the failed runs (exit status and stderr)."""

    def loop(spec: Path) -> list[str]:
        failures = []
        for _ in range(cells_per_loop):
            done = subprocess.run(
                [*SUPERVISOR, str(spec)], env=env, capture_output=True, text=True, timeout=120
            )
            if done.returncode != 0:
                failures.append(f"{spec.name}: exit {done.returncode}: {done.stderr}")
        return failures

    with ThreadPoolExecutor(len(specs)) as pool:
        return [f for run in pool.map(loop, specs) for f in run]


def test_parallel_loops_of_sequential_cells_are_never_reaped(tmp_path: Path) -> None:
    """20 loops in parallel, each running 10 cells one after another under its own id; every
    start also reaps. Before the store decided liveness by its lock, ~8 of 200 were 'reaped'."""
    require_sandbox()
    env = backend_env(tmp_path, "cellos")
    specs = [write_doc(tmp_path / f"l{i}.yaml", doc(f"loop-{i}")) for i in range(20)]
    assert run_loops(env, specs, 10) == []
    found = read_events(tmp_path / "events.jsonl")
    assert [e for e in found if e["data"].get("reason") == "reaped"] == []
    assert sum(1 for e in found if e["type"].endswith("lifecycle.v1.destroyed")) == 200
    assert verify(tmp_path / "events.jsonl").code == 0


def test_gvisor_parallel_loops_are_never_reaped(tmp_path: Path) -> None:
    require_backend("gvisor")
    env = backend_env(tmp_path, "gvisor")
    specs = [write_doc(tmp_path / f"g{i}.yaml", doc(f"gloop-{i}")) for i in range(4)]
    assert run_loops(env, specs, 3) == []
    found = read_events(tmp_path / "events.jsonl")
    assert [e for e in found if e["data"].get("reason") == "reaped"] == []
    assert sum(1 for e in found if e["type"].endswith("lifecycle.v1.destroyed")) == 12


HOLDER = """
import sys
from cellos.hosts.state import CellStore
store = CellStore(sys.argv[1])
state = store.acquire("racer", "cellos", {})
print("held", flush=True)
sys.stdin.readline()
store.release(state)
state = store.acquire("racer", "cellos", {"generation": 2})
print("again", flush=True)
sys.stdin.readline()
store.release(state)
"""


def test_a_reaper_racing_a_restarted_cell_leaves_the_new_cell_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reaper opens a cell's lock; before it locks it, the cell ends and a new cell of
    the same id starts (the pause the old reaper had between its check and its open). The
    old lock it then gets is not the cell's lock any more: nothing is reaped."""
    from cellos.hosts import reaper, state

    root = tmp_path / "state"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None and holder.stdout is not None
    assert holder.stdout.readline() == "held\n"
    real_flock = state.fcntl.flock
    raced = threading.Event()

    def flock_after_a_restart(fd: int, op: int) -> None:
        if not raced.is_set():
            raced.set()
            holder.stdin.write("\n")  # type: ignore[union-attr]
            holder.stdin.flush()  # type: ignore[union-attr]
            assert holder.stdout.readline() == "again\n"  # type: ignore[union-attr]
        real_flock(fd, op)

    monkeypatch.setattr(state.fcntl, "flock", flock_after_a_restart)
    assert reaper.reap(state.CellStore(str(root))) == []
    assert raced.is_set()
    record = json.loads((root / "cells" / "racer" / "record.json").read_text())
    assert record["generation"] == 2  # the new cell is untouched
    monkeypatch.undo()
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.wait(timeout=10) == 0
    assert os.listdir(root / "cells") == []


def test_the_reaper_takes_only_dead_cells(tmp_path: Path) -> None:
    from cellos.hosts import reaper, state

    root = tmp_path / "state"
    store = state.CellStore(str(root))
    live = store.acquire("alive", "cellos", {})
    # A dead supervisor's cell: the lock file exists, nobody holds it.
    dead = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, os\nfrom cellos.hosts.state import CellStore\n"
            "CellStore(sys.argv[1]).acquire('dead', 'cellos', {})\nos._exit(0)",
            str(root),
        ],
        check=False,
    )
    assert dead.returncode == 0
    reaped = reaper.reap(store)
    assert [c.cell_id for c in reaped] == ["dead"]
    assert os.path.isdir(live.cell_dir)
    assert store.release(live) == []
    assert os.listdir(root / "cells") == []


def test_a_duplicate_id_waits_for_a_reaper_but_not_for_a_live_cell(tmp_path: Path) -> None:
    from cellos.core.errors import HostError
    from cellos.hosts import state

    store = state.CellStore(str(tmp_path / "state"))
    held = store.acquire("dup", "cellos", {})
    begun = time.monotonic()
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\nfrom cellos.hosts.state import CellStore\n"
            "CellStore(sys.argv[1]).acquire('dup', 'cellos', {})",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert other.returncode != 0 and "already exists" in other.stderr
    assert time.monotonic() - begun < state.ACQUIRE_PATIENCE_SECONDS  # refused at once
    with pytest.raises(HostError, match="already exists"):
        store.acquire("dup", "cellos", {})
    store.release(held)


@pytest.mark.parametrize("backend", ["gvisor", "qemu"])
def test_one_cell_id_never_runs_twice_at_once(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    require_backend(backend)
    image = request.getfixturevalue("image_dir") if backend == "qemu" else None
    marker = unique_sleep()
    spec = write_doc(
        tmp_path / "c.yaml",
        doc("twice", argv=["/bin/sh", "-c", f"sleep {marker}"], run={"timeoutSeconds": 120}),
    )
    env = backend_env(tmp_path, backend, image)
    first = start_supervisor(spec, env)
    wait_for(lambda: started(tmp_path / "events.jsonl"), 60, "the first cell")
    second = run_cli("cellos.supervisor.cli", [str(spec)], env, timeout=120)
    assert second.code == 1, second
    assert "error: spec.id: a live cell with id 'twice' already exists" in second.stderr
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=60)
    assert first.returncode == 143


# -- a full state directory ---------------------------------------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    require_host(os.geteuid() == 0, "root (mounting a tmpfs)")
    mounted: list[Path] = []

    def mount(inodes: int) -> Path:
        where = tmp_path / f"tmpfs-{inodes}"
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size=1m,nr_inodes={inodes}", "tmpfs", str(where)],
            capture_output=True,
            check=False,
        )
        require_host(done.returncode == 0, f"tmpfs mount ({done.stderr!r})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_state_dir_that_fills_up_at_any_step_ends_in_a_clear_error(
    tmp_path: Path, tiny_tmpfs: Callable[[int], Path]
) -> None:
    """The state dir runs out of inodes at every step in turn (lock, record, workspace, the
    network slot claim, its record): never a traceback, never residue, and the failure is
    named after CELLOS_STATE_DIR (the slot claim included: its slot must not stay behind)."""
    require_sandbox()
    require_host(shutil.which("nft") is not None or os.path.exists("/usr/sbin/nft"), "nft")
    spec = write_doc(
        tmp_path / "c.yaml",
        doc(
            "full-cell",
            authority={"egressRules": [{"cidr": "10.250.0.0/30", "port": 9, "protocol": "tcp"}]},
        ),
    )
    failures = []
    for inodes in range(2, 14):
        state = tiny_tmpfs(inodes)
        env = backend_env(tmp_path, "cellos")
        env["CELLOS_STATE_DIR"] = str(state)
        result = run_cli("cellos.supervisor.cli", [str(spec)], env, timeout=60)
        assert "Traceback" not in result.stderr, result
        assert result.code in (0, 1), result
        left = [str(p.relative_to(state)) for p in state.rglob("*") if not p.is_dir()]
        assert left == [], (inodes, left)
        if result.code == 1:
            assert "error: CELLOS_STATE_DIR: " in result.stderr, result
            failures.append(result.stderr)
    assert any("network slot" in f or "network" in f for f in failures), failures
    assert any(f for f in failures)


def test_an_orphaned_slot_is_released_by_reap(tmp_path: Path) -> None:
    """A supervisor died right after claiming a slot, before its record named it."""
    from cellos.hosts import reaper, state

    root = tmp_path / "state"
    slots = root / "net" / "slots"
    slots.mkdir(parents=True)
    os.symlink("ghost", slots / "7")
    store = state.CellStore(str(root))
    live = store.acquire("owner", "cellos", {})
    os.symlink("owner", slots / "8")
    reaper.reap(store)
    assert sorted(os.listdir(slots)) == ["8"]  # the live cell's slot is kept
    os.unlink(slots / "8")
    store.release(live)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
@pytest.mark.parametrize("backend", ["cellos", "gvisor", "qemu"])
def test_a_signalled_egress_cell_leaves_no_network_behind(
    tmp_path: Path, backend: str, how: signal.Signals, request: pytest.FixtureRequest
) -> None:
    """SIGTERM used to leave the cgroups, netns, veth, nft table and state record behind; after
    a SIGKILL the reaper removes the network scope too (every backend's: a qemu guest's tap
    is in the cell's namespace and goes with its VMM and that namespace)."""
    require_backend(backend)
    require_host(os.geteuid() == 0, "root (network authority)")
    require_host(shutil.which("nft") is not None or os.path.exists("/usr/sbin/nft"), "nft")
    marker = unique_sleep()
    spec = write_doc(
        tmp_path / "c.yaml",
        doc(
            f"sig-net-{backend}",
            argv=["/bin/sh", "-c", f"sleep {marker}"],
            run={"timeoutSeconds": 120},
            authority={"egressRules": [{"cidr": "10.251.0.0/30", "port": 9, "protocol": "tcp"}]},
        ),
    )
    events = tmp_path / "events.jsonl"
    image = request.getfixturevalue("image_dir") if backend == "qemu" else None
    env = backend_env(tmp_path, backend, image)
    links_before = {n for n in os.listdir("/sys/class/net") if n.startswith("cvh")}
    proc = start_supervisor(spec, env)
    wait_for(lambda: started(events), 30, "process_spawned")
    if backend == "cellos":
        wait_for(lambda: sleeping(marker), 30, "the workload")
    else:
        wait_for(lambda: host_processes_under(tmp_path) != [], 30, "runsc or the VMM")
        time.sleep(1)
    netns = f"/run/netns/cellos-sig-net-{backend}"
    assert os.path.exists(netns)
    if backend == "qemu":
        # The guest's tap, inside the cell's namespace.
        links = subprocess.run(
            ["nsenter", f"--net={netns}", "--", "ip", "-o", "link", "show"],
            capture_output=True,
            text=True,
        ).stdout
        assert ": cvt" in links, links
    proc.send_signal(how)
    proc.communicate(timeout=30)
    if how == signal.SIGTERM:
        assert proc.returncode == 143
    else:
        reap = run_cli("cellos.cli", ["reap"], env)
        assert reap.code == 0, reap
    assert not os.path.exists(netns)
    tables = subprocess.run(
        [shutil.which("nft") or "/usr/sbin/nft", "list", "tables"], capture_output=True, text=True
    )
    assert f"cellos_sig_net_{backend}" not in tables.stdout
    if how == signal.SIGKILL:  # the reaper deletes the host's end of the link at once
        assert {n for n in os.listdir("/sys/class/net") if n.startswith("cvh")} <= links_before
    state = tmp_path / "state"
    assert os.listdir(state / "cells") == [] and os.listdir(state / "net" / "slots") == []
    assert read_events(events)[-2]["data"]["terminalState"] == "forced"
