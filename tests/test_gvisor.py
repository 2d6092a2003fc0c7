"""The ``gvisor`` backend: cells under runsc's user-space kernel (real runsc, no fakes)."""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from cellos.core.loading import load_document, validate_document
from cellos.hosts.gvisor.bundle import (
    BundleConfig,
    MissingArgv,
    MissingCellId,
    build_config,
    host_binds,
)
from tests.conftest import (
    OCI_SCHEMA_DIR,
    REPO,
    CliResult,
    base_env,
    doc,
    read_events,
    require_host,
    running_with,
    write_doc,
)

Run = Callable[..., CliResult]


@pytest.fixture
def gvisor_env(tmp_path: Path) -> dict[str, str]:
    require_host(shutil.which("runsc") is not None, "gVisor runsc")
    require_host(os.geteuid() == 0, "root (Debian's runsc cannot run rootless)")
    return base_env(
        tmp_path,
        CELLOS_CELL_BACKEND="gvisor",
        CELL_OS_JSONL_EVENTS=str(tmp_path / "events.jsonl"),
        CELLOS_EXPORT_DIR=str(tmp_path / "exports"),
    )


def gvisor_state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def assert_no_gvisor_residue(tmp_path: Path) -> None:
    state = gvisor_state(tmp_path)
    for sub in ("cells", "runsc"):
        left = os.listdir(state / sub) if (state / sub).exists() else []
        assert left == [], left
    # No runsc sandbox of this test is still running.
    assert running_with(str(state)) == []


def test_the_cell_runs_on_gvisors_kernel_and_sees_nothing_of_the_host(
    tmp_path: Path, gvisor_env: dict[str, str], supervisor_cli: Run
) -> None:
    host_file = tmp_path / "host-only"
    host_file.write_text("x")
    script = (
        f"uname -r; dmesg | head -1; echo /proc/[0-9]*; "
        f"for p in {host_file} /etc/passwd /root /home /work; do "
        "[ -e $p ] && echo visible $p; done; echo done"
    )
    spec = write_doc(tmp_path / "c.yaml", doc("gv-kernel", argv=["/bin/sh", "-c", script]))
    result = supervisor_cli(str(spec), gvisor_env)
    assert result.code == 0, result
    lines = result.stdout.splitlines()
    assert lines[0] != platform.release()  # gVisor's own kernel version, not the host's
    assert "gVisor" in lines[1]
    assert len(lines[2].split()) <= 3, lines[2]  # only the cell's own processes
    assert lines[3:] == ["done"], lines
    assert_no_gvisor_residue(tmp_path)


def test_exit_code_stdout_and_artifacts_come_back(
    tmp_path: Path, gvisor_env: dict[str, str], supervisor_cli: Run
) -> None:
    spec = write_doc(
        tmp_path / "c.yaml",
        doc(
            "gv-io",
            argv=["/bin/sh", "-c", "echo out; echo err >&2; printf report > r.txt; exit 3"],
            export={"artifacts": [{"name": "r.txt", "path": "/workspace/r.txt"}]},
        ),
    )
    result = supervisor_cli(str(spec), gvisor_env)
    assert (result.code, result.stdout) == (3, "out\n"), result
    assert "err" in result.stderr
    assert (tmp_path / "exports" / "gv-io" / "r.txt").read_text() == "report"
    started = read_events(tmp_path / "events.jsonl")[0]["data"]
    assert started["backend"] == "gvisor" and "gvisor:runsc" in started["isolation"]
    assert_no_gvisor_residue(tmp_path)


def test_the_longest_cell_id_runs(
    tmp_path: Path, gvisor_env: dict[str, str], supervisor_cli: Run
) -> None:
    """A cell id may have 128 characters; runsc's socket paths (108 bytes) and the kernel's
    hostnames (64) may not: the container id keeps a prefix, the hostname the first 64."""
    cell_id = "g" + "x" * 127
    spec = write_doc(tmp_path / "c.yaml", doc(cell_id, argv=["/bin/hostname"]))
    result = supervisor_cli(str(spec), gvisor_env)
    assert (result.code, result.stdout) == (0, cell_id[:64] + "\n"), result
    assert_no_gvisor_residue(tmp_path)


@pytest.mark.parametrize("bound", ["timeout", "ttl"])
def test_timeout_and_ttl_kill_the_sandbox_and_leave_nothing(
    tmp_path: Path, gvisor_env: dict[str, str], supervisor_cli: Run, bound: str
) -> None:
    run: dict[str, Any] = {"limits": {"gracefulShutdownSeconds": 1}}
    if bound == "timeout":
        run["timeoutSeconds"] = 2
    spec = write_doc(
        tmp_path / "c.yaml",
        doc(
            "gv-slow",
            argv=["/bin/sh", "-c", "trap '' TERM; sleep 300 & echo started; wait"],
            run=run,
            lifetime={"ttlSeconds": 2 if bound == "ttl" else 60},
        ),
    )
    result = supervisor_cli(str(spec), gvisor_env, timeout=90)
    assert result.code == 124, result
    assert result.stdout == "started\n"
    destroyed = next(
        e["data"]
        for e in read_events(tmp_path / "events.jsonl")
        if e["type"].endswith("lifecycle.v1.destroyed")
    )
    assert destroyed["terminalState"] == "forced" and destroyed["reason"] == bound
    assert "exitCode" not in destroyed
    assert_no_gvisor_residue(tmp_path)


def test_bad_input_fails_before_runsc_starts(
    tmp_path: Path, gvisor_env: dict[str, str], supervisor_cli: Run
) -> None:
    for bad in (doc("gv-bad", argv=[]), doc("../evil")):
        spec = write_doc(tmp_path / "bad.yaml", bad)
        result = supervisor_cli(str(spec), gvisor_env)
        assert result.code == 2, result
        assert result.stderr.startswith("error: spec.")
    assert not gvisor_state(tmp_path).exists()


def test_bundle_errors_are_typed() -> None:
    good = validate_document(doc("gv-typed")).spec
    config = BundleConfig(rootfs="/nonexistent-root", workspace="/nonexistent-ws")
    with pytest.raises(MissingCellId):
        build_config(msgspec.structs.replace(good, id=""), config)
    with pytest.raises(MissingArgv):
        build_config(good, config, argv=[])
    assert issubclass(MissingArgv, Exception) and MissingArgv().path == "spec.run.argv"


def _oci_validator() -> jsonschema.Draft4Validator:
    resources = []
    for path in OCI_SCHEMA_DIR.glob("*.json"):
        contents = json.loads(path.read_text())
        # The schema files refer to each other by file name ("defs.json#/...").
        resources.append(
            (path.name, Resource.from_contents(contents, default_specification=DRAFT4))
        )
    registry: Registry[Any] = Registry().with_resources(resources)
    schema = json.loads((OCI_SCHEMA_DIR / "config-schema.json").read_text())
    return jsonschema.Draft4Validator(schema, registry=registry)


def example_documents() -> list[Path]:
    return sorted((REPO / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", example_documents(), ids=lambda p: p.name)
def test_every_example_bundle_validates_against_the_oci_schema(path: Path) -> None:
    spec = load_document(str(path)).spec
    config = BundleConfig(
        rootfs="/var/lib/cellos/rootfs",
        workspace="/run/cellos/ws",
        host_binds=host_binds(),
        extra_env={"SECRET_X": "v"},
    )
    bundle = build_config(spec, config)
    _oci_validator().validate(bundle)
    assert bundle["process"]["noNewPrivileges"] is True
    assert all(v == [] for v in bundle["process"]["capabilities"].values())
    assert bundle["process"]["env"] == sorted(
        [f"{k}={v}" for k, v in spec.run.env.items()] + ["SECRET_X=v"]
    )
    assert bundle["root"]["readonly"] is True
    assert bundle["hostname"] == spec.id[:64]


def test_limits_become_oci_resources_and_the_schema_catches_a_broken_bundle() -> None:
    spec = validate_document(
        doc(
            "gv-limits",
            run={
                "limits": {
                    "memoryMaxBytes": 256 << 20,
                    "pidsMax": 64,
                    "cpuMax": {"quotaMicros": 50000, "periodMicros": 100000},
                }
            },
        )
    ).spec
    bundle = build_config(
        spec, BundleConfig(rootfs="/r", workspace="/w", cgroups_path="/cellos/cellos-x-1")
    )
    assert bundle["linux"]["resources"] == {
        "memory": {"limit": 256 << 20, "swap": 256 << 20},
        "cpu": {"quota": 50000, "period": 100000},
    }
    assert bundle["linux"]["cgroupsPath"] == "/cellos/cellos-x-1"
    # pidsMax is enforced by gVisor's kernel: a host pids limit counts the Sentry's threads.
    assert {"type": "RLIMIT_NPROC", "hard": 64, "soft": 64} in bundle["process"]["rlimits"]
    validator = _oci_validator()
    validator.validate(bundle)
    broken = {**bundle, "process": {**bundle["process"], "args": "not-a-list"}}
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)


def test_examples_exist() -> None:
    assert example_documents(), "examples/*.yaml is empty"
    for path in example_documents():
        assert yaml.safe_load(path.read_text())["kind"] == "ExecutionCell"


def test_doctor_runs_a_real_gvisor_container(gvisor_env: dict[str, str], cellos_cli: Run) -> None:
    result = cellos_cli(["doctor", "--json"], gvisor_env)
    checks = {c["feature"]: c for c in json.loads(result.stdout)}
    assert checks["gvisor"]["ok"], checks["gvisor"]
    assert "one-shot container ran, guest kernel" in checks["gvisor"]["detail"]
    assert "platform " in checks["gvisor"]["detail"]


def sandbox_cgroups_left(container_prefix: str) -> list[str]:
    """Cgroups of this test's sandboxes still present in any hierarchy (runsc's default place,
    the hierarchy root, and CellOS's, /cellos)."""
    from cellos.hosts.gvisor.evidence import cgroup_mounts

    found = []
    for mount in cgroup_mounts():
        for base in (Path(mount), Path(mount) / "cellos"):
            if base.is_dir():
                found += [str(p) for p in base.glob(f"{container_prefix}*") if p.is_dir()]
    return found


def completed(tmp_path: Path) -> dict[str, Any]:
    return next(
        e["data"]
        for e in read_events(tmp_path / "events.jsonl")
        if e["type"].endswith("command.v1.completed")
    )


def test_a_memory_hog_is_reported_as_oom_killed(
    tmp_path: Path, gvisor_env: dict[str, str], supervisor_cli: Run
) -> None:
    """300 MiB under memoryMaxBytes 64 MiB: the host kernel's OOM killer acts in the
    sandbox's cgroup, and its counter (read before the cgroup is removed) says so."""
    spec = write_doc(
        tmp_path / "c.yaml",
        doc(
            "gv-oom",
            argv=["/usr/bin/python3", "-c", "b = bytearray(300 << 20); print('survived')"],
            run={"timeoutSeconds": 60, "limits": {"memoryMaxBytes": 64 << 20}},
        ),
    )
    result = supervisor_cli(str(spec), gvisor_env, timeout=120)
    assert "survived" not in result.stdout, result
    data = completed(tmp_path)
    assert data["reason"] == "oom_killed", data
    assert data["limits"]["oomKills"] >= 1, data
    assert data["forced"] is False
    assert_no_gvisor_residue(tmp_path)
    assert sandbox_cgroups_left("cellos-gv-oom-") == []


def test_a_fork_bomb_is_bounded_by_pids_max_and_reported(
    tmp_path: Path, gvisor_env: dict[str, str], supervisor_cli: Run
) -> None:
    """pidsMax 16: gVisor's kernel refuses the 16th process (the workload counts), the run
    says pids_limit_reached with the number of refused forks."""
    bomb = "i=0; while [ $i -lt 40 ]; do sleep 3 & i=$((i+1)); done; echo spawned $i"
    spec = write_doc(
        tmp_path / "c.yaml",
        doc(
            "gv-pids",
            argv=["/bin/sh", "-c", bomb],
            run={"timeoutSeconds": 30, "limits": {"pidsMax": 16}},
        ),
    )
    result = supervisor_cli(str(spec), gvisor_env, timeout=90)
    assert result.code != 0 and "fork" in result.stderr.lower(), result
    data = completed(tmp_path)
    assert data["reason"] == "pids_limit_reached", data
    assert data["limits"]["pidsLimitHits"] >= 1, data
    assert_no_gvisor_residue(tmp_path)
    assert sandbox_cgroups_left("cellos-gv-pids-") == []


def test_within_its_limits_a_cell_ends_normally_with_zero_counters(
    tmp_path: Path, gvisor_env: dict[str, str], supervisor_cli: Run
) -> None:
    """15 processes under pidsMax 16 (the workload and 14 children... plus one to spare),
    a little memory under 256 MiB: exit 0, no reason, counters 0."""
    script = "i=0; while [ $i -lt 14 ]; do sleep 1 & i=$((i+1)); done; wait; echo ok"
    spec = write_doc(
        tmp_path / "c.yaml",
        doc(
            "gv-fits",
            argv=["/bin/sh", "-c", script],
            run={"limits": {"pidsMax": 16, "memoryMaxBytes": 256 << 20}},
        ),
    )
    result = supervisor_cli(str(spec), gvisor_env, timeout=90)
    assert (result.code, result.stdout) == (0, "ok\n"), result
    data = completed(tmp_path)
    assert data["reason"] is None
    assert data["limits"] == {"oomKills": 0, "pidsLimitHits": 0}
    assert sandbox_cgroups_left("cellos-gv-fits-") == []


def test_a_killed_sandbox_leaves_no_cgroup(
    tmp_path: Path, gvisor_env: dict[str, str], supervisor_cli: Run
) -> None:
    """runsc removes its cgroups only when the container ends by itself."""
    spec = write_doc(
        tmp_path / "c.yaml",
        doc(
            "gv-killed",
            argv=["/bin/sleep", "300"],
            run={"timeoutSeconds": 2, "limits": {"gracefulShutdownSeconds": 0}},
        ),
    )
    result = supervisor_cli(str(spec), gvisor_env, timeout=90)
    assert result.code == 124, result
    assert sandbox_cgroups_left("cellos-gv-killed-") == []
    assert_no_gvisor_residue(tmp_path)
