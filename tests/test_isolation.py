"""Issue 3: the default ``cellos`` backend is a real sandbox (namespaces, private root,
seccomp, no capabilities, limits, cell-wide kill, no residue)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from cellos.core.loading import validate_document
from cellos.core.ports import WorkloadRequest, WorkloadResult
from cellos.hosts.cellos import CellosBackend, cgroups
from tests.conftest import (
    doc,
    require_host,
    require_sandbox,
    run_cli,
    running_with,
    short_types,
    unique_sleep,
)


def _host_ready() -> None:
    require_sandbox()


def _limits_ready(*controllers: str) -> None:
    _host_ready()
    why = cgroups.usable(cgroups.detect(), cgroups.DEFAULT_PARENT, ["pids", *controllers])
    require_host(why is None, f"writable cgroups for {controllers or 'pids'} ({why})")


@pytest.fixture
def backend(cellos_backend: CellosBackend) -> CellosBackend:
    return cellos_backend


def run_cell(
    backend: CellosBackend,
    argv: list[str],
    *,
    cell_id: str = "iso-1",
    env: dict[str, str] | None = None,
    deadline: float = 60,
    limits: dict[str, object] | None = None,
) -> WorkloadResult:
    run: dict[str, object] = {"argv": argv}
    if limits:
        run["limits"] = limits
    spec = validate_document(doc(cell_id, run=run)).spec
    handle = backend.create(spec)
    try:
        return backend.run(
            handle,
            WorkloadRequest(
                argv=argv,
                env=env or {},
                working_directory="/workspace",
                deadline_seconds=deadline,
                graceful_shutdown_seconds=1,
            ),
        )
    finally:
        backend.destroy(handle)


def sh(backend: CellosBackend, script: str, **kw: object) -> WorkloadResult:
    return run_cell(backend, ["/bin/sh", "-c", script], **kw)  # type: ignore[arg-type]


def test_only_the_cells_processes_are_visible(backend: CellosBackend) -> None:
    result = sh(backend, "echo $$; ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' '")
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "2"  # pid 1 is the cell's reaper, the workload is never pid 1
    pids = [int(p) for p in lines[1].split()]
    assert max(pids) < 10 and 1 in pids, pids
    assert str(os.getpid()) not in lines[1].split() or os.getpid() < 10


def test_host_files_outside_the_binds_are_invisible(backend: CellosBackend, tmp_path: Path) -> None:
    secret = tmp_path / "host-only"
    secret.write_text("x")
    result = sh(
        backend,
        f"for p in {secret} /root /home /etc/passwd /etc/shadow /work /run "
        "/var /sys/fs/cgroup; do [ -e $p ] && echo visible $p; done; ls /",
    )
    out = result.stdout.decode()
    assert "visible" not in out, out
    assert set(out.split()) <= {
        "bin",
        "dev",
        "etc",
        "lib",
        "lib32",
        "lib64",
        "libx32",
        "proc",
        "sbin",
        "tmp",
        "usr",
        "workspace",
    }


def test_read_only_binds_cannot_be_written(backend: CellosBackend) -> None:
    result = sh(
        backend,
        "touch /usr/cellos-x 2>&1; touch /etc/ssl/x 2>&1; "
        "echo ok > /workspace/w && echo ws-ok; echo ok > /tmp/t && echo tmp-ok",
    )
    out = result.stdout.decode()
    assert out.count("Read-only file system") == 2, out
    assert "ws-ok" in out and "tmp-ok" in out
    assert not Path("/usr/cellos-x").exists()


def test_hostname_privileges_and_seccomp(backend: CellosBackend) -> None:
    result = sh(
        backend,
        "hostname; "
        "grep -E '^(NoNewPrivs|CapEff|CapPrm|CapInh|CapAmb|CapBnd|Seccomp):' /proc/self/status",
        cell_id="iso-host",
    )
    lines = result.stdout.decode().split("\n")
    assert lines[0] == "iso-host"
    status = dict(line.split(":\t") for line in lines[1:] if line)
    zero = "0000000000000000"
    assert status == {
        "NoNewPrivs": "1",
        "CapEff": zero,
        "CapPrm": zero,
        "CapInh": zero,
        "CapAmb": zero,
        "CapBnd": zero,
        "Seccomp": "2",
    }


def test_forbidden_syscalls_fail(backend: CellosBackend) -> None:
    probe = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def errno_of(rc): return os.strerror(ctypes.get_errno()) if rc < 0 else 'allowed'\n"
        "print('mount', errno_of(libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)))\n"
        "print('unshare', errno_of(libc.unshare(0x10000000)))\n"
        "print('ptrace', errno_of(libc.ptrace(16, 1, 0, 0)))\n"
        "print('bpf', errno_of(libc.syscall(321, 0, 0, 0)))\n"
        "print('keyctl', errno_of(libc.syscall(250, 0, 0, 0)))\n"
    )
    result = run_cell(backend, ["/usr/bin/python3", "-c", probe])
    lines = dict(line.split(" ", 1) for line in result.stdout.decode().splitlines())
    assert lines == {
        k: "Operation not permitted" for k in ("mount", "unshare", "ptrace", "bpf", "keyctl")
    }, result


def test_environment_and_fds_seen_from_the_host(backend: CellosBackend) -> None:
    """Read /proc/<pid>/environ and /proc/<pid>/fd of the running workload from outside."""
    marker = unique_sleep()
    leaked = os.open("/", os.O_RDONLY)
    os.set_inheritable(leaked, True)
    seen: dict[str, object] = {}

    def watch() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            # The launcher's command line names the marker too: pick the workload itself.
            pids = [
                p
                for p in running_with(marker)
                if Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"/bin/sleep\0")
            ]
            if pids:
                pid = pids[0]
                seen["environ"] = Path(f"/proc/{pid}/environ").read_bytes()
                seen["fds"] = sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
                os.kill(pid, 15)
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        run_cell(backend, ["/bin/sleep", marker], env={"ONLY": "this", "AND": "that one"})
    finally:
        watcher.join()
        os.close(leaked)
    assert sorted(seen["environ"].split(b"\0")[:-1]) == [b"AND=that one", b"ONLY=this"]  # type: ignore[union-attr]
    assert seen["fds"] == [0, 1, 2]


def test_fork_bomb_stops_at_pids_max(backend: CellosBackend) -> None:
    _limits_ready()
    # First a bounded burst proves the limit holds before anything unbounded runs.
    burst = sh(
        backend,
        "for i in $(seq 1 60); do sleep 5 & done 2>/dev/null; echo $(jobs -p | wc -l)",
        limits={"pidsMax": 20},
        deadline=10,
    )
    assert burst.reason == "pids_limit_reached", burst
    assert burst.limits["pidsLimitHits"] > 0
    marker = unique_sleep()
    bomb = sh(
        backend,
        f"bomb() {{ bomb | bomb & }}; bomb; sleep {marker}",
        limits={"pidsMax": 64},
        deadline=3,
    )
    assert bomb.forced and bomb.reason == "timeout", bomb
    assert bomb.limits["pidsLimitHits"] > 0
    assert running_with(marker) == []


def test_pids_max_counts_the_workloads_processes_not_the_launchers(
    backend: CellosBackend,
) -> None:
    """pidsMax: N lets the workload have N processes (itself and N-1 children), no matter
    how many processes the sandbox launcher needs around it."""
    _limits_ready()
    probe = (
        "import os, time\n"
        "children = 0\n"
        "while True:\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except BlockingIOError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
        "    children += 1\n"
        "print(children)\n"
    )
    result = run_cell(
        backend, ["/usr/bin/python3", "-c", probe], limits={"pidsMax": 12}, deadline=20
    )
    assert result.stdout.decode().strip() == "11", result
    assert result.limits["pidsLimitHits"] > 0


def test_memory_hog_is_killed_at_memory_max(backend: CellosBackend) -> None:
    _limits_ready("memory")
    hog = ["/usr/bin/python3", "-c", "b = []\nwhile True: b.append(bytearray(8 << 20))"]
    result = run_cell(backend, hog, limits={"memoryMaxBytes": 64 << 20}, deadline=30)
    assert result.reason == "oom_killed", result
    assert result.limits["oomKills"] >= 1
    assert result.exit_code == 137


def test_cpu_spinner_is_throttled_to_cpu_max(backend: CellosBackend) -> None:
    _limits_ready("cpu")
    spin = [
        "/usr/bin/python3",
        "-c",
        "import os, time\nt = time.monotonic()\nwhile time.monotonic() - t < 2: pass\n"
        "c = os.times()\nprint(c.user + c.system)",
    ]
    limited = run_cell(
        backend, spin, limits={"cpuMax": {"quotaMicros": 20000, "periodMicros": 100000}}
    )
    free = run_cell(backend, spin)
    used_limited = float(limited.stdout)
    used_free = float(free.stdout)
    # 20% of one CPU over 2 s is 0.4 s; allow for the interpreter start and scheduling noise.
    assert 0.2 <= used_limited <= 0.75, used_limited
    assert used_free > 1.5, used_free


def test_kill_9_of_the_supervisor_is_cleaned_by_reap(tmp_path: Path) -> None:
    import json
    import signal
    import subprocess
    import sys

    from tests.conftest import base_env, read_events, write_doc

    _limits_ready()
    marker = unique_sleep()
    parent = f"cellos-reap-{os.getpid()}"
    events = tmp_path / "events.jsonl"
    env = base_env(tmp_path, CELL_OS_JSONL_EVENTS=str(events), CELLOS_CGROUP_PARENT=parent)
    spec = write_doc(
        tmp_path / "c.yaml",
        doc(
            "doomed-1",
            argv=["/bin/sleep", marker],
            run={"limits": {"pidsMax": 50}},
            correlation={"tenantId": "acme", "externalRunId": "r-7"},
        ),
    )
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "cellos.supervisor.cli", str(spec)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def workload_running() -> bool:
            # The launcher's command line names the marker too: wait for the workload itself.
            return any(
                Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"/bin/sleep\0")
                for p in running_with(marker)
            )

        deadline = time.monotonic() + 20
        while not workload_running() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert workload_running(), "the cell never started"
        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait()
        record = json.loads((tmp_path / "state" / "cells" / "doomed-1" / "record.json").read_text())
        leaves = record["cgroups"]
        assert leaves and all(Path(p).is_dir() for p in leaves)
        # The launcher's PDEATHSIG takes the workload down with its supervisor ...
        deadline = time.monotonic() + 5
        while running_with(marker) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert running_with(marker) == []
        # ... but the cgroup leaf and the state directory stay until reaped.
        reap = run_cli("cellos.cli", ["reap"], env)
        assert reap.code == 0, reap
        assert reap.stdout.startswith("reaped doomed-1: removed cgroup:")
        assert not any(Path(p).exists() for p in leaves)
        assert os.listdir(tmp_path / "state" / "cells") == []
        reaped = [e for e in read_events(events) if e["data"].get("reason") == "reaped"]
        assert short_types(reaped) == ["lifecycle.v1.destroyed", "compliance.v1.summary"]
        assert reaped[0]["data"]["cellId"] == "doomed-1"
        # The reap events belong to the dead cell's tenant and run, like its own events did.
        own = next(e for e in read_events(events) if e["type"].endswith("lifecycle.v1.started"))
        assert own["data"]["correlation"]["tenantId"] == "acme"
        for event in reaped:
            assert event["data"]["correlation"] == own["data"]["correlation"]
        again = run_cli("cellos.cli", ["reap"], env)
        assert again.stdout == "nothing to reap\n"
    finally:
        supervisor.kill()
        for hierarchy in {h.mount for h in cgroups.detect().by_controller.values()}:
            base = Path(hierarchy) / parent
            if base.is_dir():
                base.rmdir()


def test_started_event_records_the_isolation_applied(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import base_env, read_events, write_doc

    _limits_ready("memory", "cpu")
    events = tmp_path / "events.jsonl"
    spec = write_doc(
        tmp_path / "c.yaml",
        doc(
            "evidence-1",
            run={
                "limits": {
                    "memoryMaxBytes": 256 << 20,
                    "pidsMax": 100,
                    "cpuMax": {"quotaMicros": 50000},
                }
            },
        ),
    )
    result = subprocess.run(
        [sys.executable, "-m", "cellos.supervisor.cli", str(spec)],
        env=base_env(tmp_path, CELL_OS_JSONL_EVENTS=str(events)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result
    started = read_events(events)[0]["data"]
    isolation = set(started["isolation"])
    assert {
        "ns:pid",
        "ns:mount",
        "ns:net",
        "ns:uts",
        "ns:ipc",
        "pivot_root",
        "no_new_privs",
        "caps:none",
        "seccomp:deny-list",
        "user:65534",
        "limit:memory",
        "limit:pids",
        "limit:cpu",
    } <= isolation, isolation
    assert any(f.startswith("cgroup:") for f in isolation)


def test_doctor_reports_this_hosts_features() -> None:
    import json
    import subprocess
    import sys

    _host_ready()
    result = subprocess.run(
        [sys.executable, "-m", "cellos.cli", "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result
    checks = {c["feature"]: c for c in json.loads(result.stdout)}
    assert {
        "namespaces",
        "user-namespaces",
        "cgroup:pids",
        "cgroup:memory",
        "cgroup:cpu",
        "seccomp",
        "landlock",
        "nftables",
        "gvisor",
        "kvm",
    } <= set(checks)
    assert checks["namespaces"]["ok"] and checks["seccomp"]["ok"]
    assert checks["cgroup:memory"]["detail"].startswith(("v1 ", "v2 "))
