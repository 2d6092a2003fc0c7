"""The ``cellos-sandbox`` launcher: Landlock, the read-only root and /proc knobs, launcher
errors that a workload cannot forge, and how the binary is built, cached and trusted."""

from __future__ import annotations

import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from cellos.core.errors import HostError
from cellos.hosts.cellos import CellosBackend
from cellos.hosts.cellos import launcher as launcher_mod
from cellos.hosts.cellos.launcher import landlock_abi, launcher_path
from tests.conftest import require_host, require_sandbox
from tests.test_isolation import run_cell, sh


def test_landlock_refuses_writes_outside_the_workspace_tmp_and_dev(
    cellos_backend: CellosBackend,
) -> None:
    require_host(landlock_abi() > 0, "Landlock in the kernel")
    result = sh(
        cellos_backend,
        "{ echo x > /proc/self/comm; } 2>&1 || echo comm-refused; "
        "echo ok > /workspace/w && echo ws-ok; echo ok > /tmp/t && echo tmp-ok; "
        "echo ok > /dev/null && echo null-ok; echo ok > /dev/shm/s && echo shm-ok",
    )
    out = result.stdout.decode()
    # Without Landlock, a process may write its own comm; with it, /proc is read-only.
    assert "Permission denied" in out and "comm-refused" in out, out
    for ok in ("ws-ok", "tmp-ok", "null-ok", "shm-ok"):
        assert ok in out, out
    assert result.exit_code == 0


def test_the_landlock_abi_is_recorded_in_the_isolation_evidence(tmp_path: Path) -> None:
    require_sandbox()
    abi = landlock_abi()
    require_host(abi > 0, "Landlock in the kernel")
    from cellos.core.loading import validate_document
    from tests.conftest import doc

    backend = CellosBackend(state_root=str(tmp_path / "state"))
    handle = backend.create(validate_document(doc("ll-evidence")).spec)
    try:
        assert f"landlock:abi{abi}" in handle.isolation
        assert "landlock:unavailable" not in handle.isolation
    finally:
        backend.destroy(handle)


def test_root_and_proc_knobs_are_read_only(cellos_backend: CellosBackend) -> None:
    result = sh(
        cellos_backend,
        "touch /new-file 2>&1; mkdir /new-dir 2>&1; "
        "{ echo 1 > /proc/sys/kernel/ns_last_pid; } 2>&1; cat /proc/self/mountinfo",
    )
    out = result.stdout.decode()
    assert out.count("Read-only file system") >= 2, out  # the root tmpfs
    assert "ns_last_pid" in out  # refused, with a message
    # mountinfo: id, parent, dev, root, mount point, options, ...
    options = {
        fields[4]: fields[5].split(",")
        for fields in (line.split() for line in out.splitlines())
        if len(fields) > 5 and fields[4].startswith("/")
    }
    # (/proc/sysrq-trigger is covered too where the kernel has one; this one has not.)
    for point in ("/", "/proc/sys", "/usr"):
        assert "ro" in options[point], (point, options[point])
    assert "rw" in options["/workspace"] and "rw" in options["/tmp"]


def test_the_cells_pid_1_is_out_of_the_workloads_reach(cellos_backend: CellosBackend) -> None:
    """pid 1 runs outside the workload's seccomp and Landlock domain: it must hold no
    capabilities and its memory and environment must not be open to the workload."""
    result = sh(
        cellos_backend,
        "grep -E '^(CapEff|CapBnd):' /proc/1/status; "
        "{ head -c 1 /proc/1/environ; } 2>&1; { head -c 1 /proc/1/mem; } 2>&1",
    )
    out = result.stdout.decode()
    assert "CapEff:\t0000000000000000" in out and "CapBnd:\t0000000000000000" in out, out
    assert out.count("Permission denied") == 2, out


def test_a_root_supervisors_workload_runs_as_nobody(cellos_backend: CellosBackend) -> None:
    """uid 0 without capabilities still owns the host's root-only files in the binds
    (/etc/ssl/private holds TLS keys on Debian): the workload runs as 65534 instead, with no
    supplementary groups, and its workspace is its own."""
    if os.geteuid() != 0:
        pytest.skip("the workload keeps the supervisor's uid when the supervisor is not root")
    require_host(os.path.isdir("/etc/ssl/private"), "/etc/ssl/private (Debian's ssl-cert)")
    result = sh(
        cellos_backend,
        "id -u; id -g; grep '^Groups:' /proc/self/status; { ls /etc/ssl/private; } 2>&1; "
        "echo w > /workspace/w && stat -c '%u:%g' /workspace/w",
    )
    lines = result.stdout.decode().splitlines()
    assert lines[:2] == ["65534", "65534"] and lines[2].split() == ["Groups:"], lines
    assert "Permission denied" in lines[3]
    assert lines[4] == "65534:65534"


def test_a_cell_id_longer_than_a_hostname_runs_with_its_first_64_characters(
    cellos_backend: CellosBackend,
) -> None:
    """Cell ids may have 128 characters, the kernel's hostnames 64."""
    cell_id = "long-" + "x" * 120
    result = run_cell(cellos_backend, ["/bin/hostname"], cell_id=cell_id)
    assert result.exit_code == 0, result
    assert result.stdout.decode().strip() == cell_id[:64]


def test_a_workload_cannot_forge_a_launcher_error(cellos_backend: CellosBackend) -> None:
    """Exit 125 with a launcher-looking message is the workload's own result, not a failed
    start: launcher errors come only through the close-on-exec pipe."""
    result = sh(cellos_backend, "echo 'cellos-sandbox: cannot create namespaces' >&2; exit 125")
    assert result.exit_code == 125
    assert result.reason != "spawn_failed" and result.spawn_error is None
    assert b"cannot create namespaces" in result.stderr


def test_a_missing_program_is_a_spawn_failure_naming_it(cellos_backend: CellosBackend) -> None:
    result = run_cell(cellos_backend, ["/no/such/program", "x"])
    assert result.exit_code is None and result.reason == "spawn_failed"
    assert result.spawn_error == (
        "cannot start: cannot execute /no/such/program: No such file or directory"
    )


def _dash_rootfs(root: Path, *dirs: str) -> Path:
    """A minimal root filesystem: dash, the libraries it links, and the given directories."""
    for host_file in (
        "/usr/bin/dash",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/ld-linux-x86-64.so.2",
    ):
        require_host(os.path.exists(host_file), host_file)
        target = root / host_file.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(host_file, target)
    (root / "bin").symlink_to("usr/bin")
    for name in dirs:
        (root / name).mkdir()
    return root


def test_a_launcher_setup_failure_is_a_spawn_failure(tmp_path: Path) -> None:
    """A rootfs without the working directory: the launcher refuses to create it (it never
    writes into the operator's rootfs) and says so; nothing runs."""
    require_sandbox()
    from cellos.core.loading import validate_document
    from cellos.core.ports import WorkloadRequest
    from tests.conftest import doc

    root = _dash_rootfs(tmp_path / "rootfs", "proc", "dev", "tmp")
    backend = CellosBackend(state_root=str(tmp_path / "state"), rootfs=str(root))
    spec = validate_document(doc("ll-setup", argv=["/bin/dash", "-c", "true"])).spec
    handle = backend.create(spec)
    try:
        result = backend.run(
            handle,
            WorkloadRequest(
                argv=spec.run.argv,
                env={},
                working_directory="/workspace",
                deadline_seconds=30,
                graceful_shutdown_seconds=1,
            ),
        )
    finally:
        backend.destroy(handle)
    assert result.reason == "spawn_failed" and result.exit_code is None
    assert result.spawn_error == (
        "cannot start: cannot create /workspace: Read-only file system"
    ), result
    assert sorted(p.name for p in root.iterdir()) == [
        "bin",
        "dev",
        "lib",
        "lib64",
        "proc",
        "tmp",
        "usr",
    ]


@pytest.mark.parametrize(
    "working_directory", ["/usr/local/cellos-wd", "/usr", "/bin/x", "/etc/ssl/x", "/proc/x", "/dev"]
)
def test_a_working_directory_in_the_cells_fixed_tree_is_refused(
    cellos_backend: CellosBackend, working_directory: str
) -> None:
    """The workspace's mount point would have to be created inside a read-only host bind
    (that is, in the host's own tree) or in /proc or /dev: refused before anything exists."""
    from cellos.core.errors import PolicyRefused
    from cellos.core.loading import validate_document
    from tests.conftest import doc

    spec = validate_document(doc("wd-1", run={"workingDirectory": working_directory})).spec
    with pytest.raises(PolicyRefused) as caught:
        cellos_backend.create(spec)
    assert caught.value.path == "spec.run.workingDirectory"
    assert working_directory in caught.value.reason
    assert not os.path.exists("/usr/local/cellos-wd")


def test_the_launcher_never_creates_a_mount_point_in_a_host_bind(tmp_path: Path) -> None:
    """Below the backend's check: the launcher makes every host bind read-only before it
    creates any mount point, so a workspace under /usr fails instead of appearing on the
    host."""
    require_sandbox()
    import subprocess

    from cellos.hosts.cellos.sandbox import SandboxPlan, launcher_argv

    workspace = tmp_path / "ws"
    workspace.mkdir()
    plan = SandboxPlan(
        cell_id="ll-mp", workspace=str(workspace), working_directory="/usr/local/cellos-mp"
    )
    done = subprocess.run(
        launcher_argv(plan, ["/bin/true"], launcher_path()),
        capture_output=True,
        text=True,
        env={},
        check=False,
        timeout=30,
    )
    assert done.returncode == 125
    assert "cannot create /usr/local/cellos-mp: Read-only file system" in done.stderr
    assert not os.path.exists("/usr/local/cellos-mp")


def test_a_launcher_whose_supervisor_is_gone_runs_nothing(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG cannot fire for a parent that died before the launcher set it: the
    launcher compares its parent with the supervisor's pid it was given and stops."""
    require_sandbox()
    import subprocess

    from cellos.hosts.cellos.sandbox import SandboxPlan, launcher_argv

    workspace = tmp_path / "ws"
    workspace.mkdir()
    argv = launcher_argv(
        SandboxPlan(cell_id="ll-orphan", workspace=str(workspace), working_directory="/w"),
        ["/bin/sh", "-c", "echo ran > /w/ran"],
        launcher_path(),
    )
    assert argv[1:3] == ["--parent", str(os.getpid())]
    argv[2] = "1"  # as if the supervisor had died and the launcher been adopted by init
    done = subprocess.run(argv, capture_output=True, text=True, env={}, check=False, timeout=30)
    assert done.returncode == 125 and "the supervisor (pid 1) is gone" in done.stderr
    assert not (workspace / "ran").exists()


# -- the binary ---------------------------------------------------------------------------


def _needs_compiler() -> None:
    require_host(shutil.which("cc") is not None or shutil.which("gcc") is not None, "gcc")


def test_the_launcher_is_built_once_per_source_into_a_private_cache(tmp_path: Path) -> None:
    _needs_compiler()
    cache = tmp_path / "cache"
    first = launcher_path(cache_dir=str(cache))
    assert Path(first).parent == cache and Path(first).name.startswith("cellos-sandbox-")
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    inode = Path(first).stat().st_ino
    launcher_mod._built.clear()
    assert launcher_path(cache_dir=str(cache)) == first  # found, not rebuilt (same file)
    assert Path(first).stat().st_ino == inode
    assert [p.name for p in cache.iterdir()] == [Path(first).name]  # no partial builds left


def test_a_cache_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    _needs_compiler()
    cache = tmp_path / "shared"
    cache.mkdir()
    cache.chmod(0o777)
    with pytest.raises(HostError) as caught:
        launcher_path(cache_dir=str(cache))
    assert "not writable by others" in caught.value.reason
    assert list(cache.iterdir()) == []
    # Also when a good build is already there: anyone could swap it before the next exec.
    private = tmp_path / "private"
    built = launcher_path(cache_dir=str(private))
    private.chmod(0o777)
    launcher_mod._built.clear()
    with pytest.raises(HostError):
        launcher_path(cache_dir=str(private))
    assert Path(built).exists()


def test_a_configured_launcher_must_be_trusted(tmp_path: Path) -> None:
    require_sandbox()
    copy = tmp_path / "cellos-sandbox"
    shutil.copy(launcher_path(), copy)
    copy.chmod(0o775)  # group-writable: anyone in the group could swap what root runs
    with pytest.raises(HostError) as caught:
        launcher_path(str(copy))
    assert caught.value.path == "CELLOS_LAUNCHER" and str(copy) in caught.value.reason
    copy.chmod(0o755)
    assert launcher_path(str(copy)) == str(copy)


def test_no_compiler_and_no_binary_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(HostError) as caught:
        launcher_path(cache_dir=str(tmp_path / "cache"))
    assert caught.value.path == "CELLOS_LAUNCHER"
    assert "no C compiler" in caught.value.reason and "scripts/setup.sh" in caught.value.reason


def test_a_rootfs_directory_is_the_cells_read_only_root(tmp_path: Path) -> None:
    """``CELLOS_ROOTFS``: a directory (here: dash and the libraries it links) bound read-only
    at ``/`` instead of the host binds; the launcher adds /proc, /dev, /tmp and the
    workspace, and nothing of the host's tree is visible."""
    require_sandbox()
    root = _dash_rootfs(tmp_path / "rootfs", "proc", "dev", "tmp", "workspace")
    backend = CellosBackend(state_root=str(tmp_path / "state"), rootfs=str(root))
    result = run_cell(
        backend,
        [
            "/bin/dash",
            "-c",
            "cd /; echo *; { echo x > /usr/x; } 2>&1; echo w > /workspace/w && echo ws-ok; "
            "read -r line < /proc/self/status && echo $line",
        ],
    )
    out = result.stdout.decode().splitlines()
    assert result.exit_code == 0, result
    assert out[0].split() == ["bin", "dev", "lib", "lib64", "proc", "tmp", "usr", "workspace"]
    assert "Read-only file system" in out[1]
    assert out[2:] == ["ws-ok", "Name: dash"]
    assert not (root / "usr" / "x").exists()


def test_a_changed_source_gets_a_new_binary_and_only_stale_ones_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two versions share the cache (an upgrade rolling through workers): building one must
    not delete the other's binary, which its running supervisors still start cells from.
    Only a build nobody used for STALE_SECONDS is pruned."""
    _needs_compiler()
    cache = tmp_path / "cache"
    old = launcher_path(cache_dir=str(cache))
    stale = cache / "cellos-sandbox-0123456789abcdef"
    shutil.copy(old, stale)
    long_ago = time.time() - launcher_mod.STALE_SECONDS - 60
    os.utime(stale, (long_ago, long_ago))
    changed = tmp_path / "cellos-sandbox.c"
    changed.write_text(Path(launcher_mod.SOURCE).read_text() + "\n/* changed */\n")
    monkeypatch.setattr(launcher_mod, "SOURCE", changed)
    launcher_mod._built.clear()
    new = launcher_path(cache_dir=str(cache))
    assert new != old
    assert sorted(p.name for p in cache.iterdir()) == sorted([Path(new).name, Path(old).name])


def test_the_seccomp_program_is_cached_privately_and_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One-shot supervisors reuse the compiled program; a cached one that others could have
    written, or that is not a whole BPF program, is never used."""
    from cellos.hosts.cellos import launcher, seccomp_filter

    cache = tmp_path / "cache"
    monkeypatch.setattr(launcher, "default_cache_dir", lambda: str(cache))
    seccomp_filter.workload_filter_bpf.cache_clear()
    compiled = seccomp_filter._compile()
    assert seccomp_filter.workload_filter_bpf() == compiled
    (cached,) = cache.glob("seccomp-*.bpf")
    assert stat.S_IMODE(cached.stat().st_mode) == 0o600

    cached.write_bytes(b"\0" * 8)  # a program that allows everything
    seccomp_filter.workload_filter_bpf.cache_clear()
    assert seccomp_filter.workload_filter_bpf() == b"\0" * 8  # ours and private: trusted
    for tamper in ("group-writable", "not-bpf"):
        if tamper == "group-writable":
            cached.chmod(0o620)
        else:
            cached.write_bytes(b"\0" * 7)
        seccomp_filter.workload_filter_bpf.cache_clear()
        assert seccomp_filter.workload_filter_bpf() == compiled, tamper
        assert cached.read_bytes() == compiled and stat.S_IMODE(cached.stat().st_mode) == 0o600
    seccomp_filter.workload_filter_bpf.cache_clear()


def test_the_landlock_abi_is_cached_for_this_boot_and_checked(tmp_path: Path) -> None:
    """A one-shot supervisor reads the kernel's Landlock ABI from the private cache (no
    ctypes load); a cached answer others could have written is never used."""
    from cellos.hosts.cellos import launcher

    cache = tmp_path / "cache"
    probed = launcher._probe_landlock_abi()
    launcher.landlock_abi.cache_clear()
    assert launcher.landlock_abi(str(cache)) == probed
    (cached,) = cache.glob("landlock-*")
    assert cached.read_text() == str(probed) and stat.S_IMODE(cached.stat().st_mode) == 0o600

    cached.write_text("99")  # ours and private: trusted (the cache is the point)
    launcher.landlock_abi.cache_clear()
    assert launcher.landlock_abi(str(cache)) == 99
    cached.chmod(0o622)  # writable by others: ignored, probed again and rewritten
    launcher.landlock_abi.cache_clear()
    assert launcher.landlock_abi(str(cache)) == probed
    assert cached.read_text() == str(probed) and stat.S_IMODE(cached.stat().st_mode) == 0o600
    launcher.landlock_abi.cache_clear()


def test_doctor_says_whether_cgroup_joins_wait_for_rcu(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cgroup:favordynmods`` follows the cgroup2 mount's options (this host's, then made up)."""
    from cellos.doctor import check_cgroups
    from cellos.hosts.cellos import cgroups

    mounts = Path("/proc/self/mounts").read_text().splitlines()
    on_host = any(
        f.split()[2] == "cgroup2" and "favordynmods" in f.split()[3].split(",") for f in mounts
    )
    (check,) = [c for c in check_cgroups() if c.feature == "cgroup:favordynmods"]
    assert check.ok is on_host

    made_up = [("/sys/fs/cgroup/pids", "cgroup", "rw,pids"), ("/u", "cgroup2", "rw")]
    monkeypatch.setattr(cgroups, "_mounts", lambda: made_up)
    (check,) = [c for c in check_cgroups() if c.feature == "cgroup:favordynmods"]
    assert not check.ok and "mount -o remount,favordynmods /u" in check.detail
    made_up[1] = ("/u", "cgroup2", "rw,nsdelegate,favordynmods")
    (check,) = [c for c in check_cgroups() if c.feature == "cgroup:favordynmods"]
    assert check.ok and "/u" in check.detail
