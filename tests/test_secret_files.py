"""Secrets delivered as files (``secretDelivery: runtimeBroker`` / ``runtimeLeasedBroker``).

Real backends, real supervisor CLI, the ``file`` broker (so that no process of the test holds
a secret in its environment): each secret is ``/run/secrets/<key>`` inside the cell (mode
0400, the workload's uid, its content intact), the workload's environment and
``/proc/self/environ`` hold only the declared variables, no event, log, output or error
carries a value, and nothing of the cell (its tmpfs included) is left on the host.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cellos.brokers.memory import MemoryBroker
from cellos.core.loading import validate_document
from cellos.supervisor.lifecycle import Supervisor
from tests.conftest import (
    CliResult,
    base_env,
    doc,
    read_events,
    require_host,
    require_sandbox,
    short_types,
    unique_sleep,
    write_doc,
)

Run = Callable[..., CliResult]

#: Values that are easy to find anywhere: in events, logs, /proc, base64 or hex forms.
SECRETS = {
    "npm-token": "npm_Zq8tS3cr3tV4lu3-9f2c",
    "db.pass": "pw with spaces\nand a second line\u00e9",
}
#: What the workload sees as its uid (root supervisors: nobody on cellos; gVisor's root).
WORKLOAD_UID = {"cellos": 65534, "gvisor": 0}

INSPECT = r"""
import hashlib, json, os, sys
d = "/run/secrets"
out = {"uid": os.getuid(), "files": {}, "env": dict(os.environ)}
out["environ"] = open("/proc/self/environ", "rb").read().decode("utf-8", "replace")
for key in sorted(os.listdir(d)):
    st = os.stat(os.path.join(d, key))
    with open(os.path.join(d, key), "rb") as fh:
        data = fh.read()
    out["files"][key] = [st.st_mode & 0o7777, st.st_uid, hashlib.sha256(data).hexdigest()]
try:
    open(os.path.join(d, "new"), "w")
    out["writable"] = True
except OSError:
    out["writable"] = False
print(json.dumps(out))
sys.stdout.write(open(os.path.join(d, "npm-token")).read())  # relayed output is redacted
"""

LEASED = r"""
import hashlib, os, sys, time
p = "/run/secrets/npm-token"
fh = open(p, "rb")
print("before", hashlib.sha256(open(p, "rb").read()).hexdigest(), flush=True)
time.sleep(float(sys.argv[1]))
print("after", "present" if os.path.exists(p) else "gone", os.listdir("/run/secrets"))
print("held", len(fh.read()))
print("still running")
"""


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def forms(value: str) -> list[bytes]:
    """The value as it could leak: raw, base64 (the microVM channel), hex, JSON-escaped."""
    import base64

    raw = value.encode()
    return [
        raw,
        base64.b64encode(raw),
        base64.urlsafe_b64encode(raw).rstrip(b"="),
        raw.hex().encode(),
        json.dumps(value)[1:-1].encode(),
    ]


def leaks(data: bytes) -> list[str]:
    return [key for key, value in SECRETS.items() for f in forms(value) if f in data]


def require_backend(backend: str) -> None:
    if backend == "cellos":
        require_sandbox()
    elif backend == "gvisor":
        require_host(shutil.which("runsc") is not None, "gVisor runsc")
        require_host(os.geteuid() == 0, "root (Debian's runsc cannot run rootless)")


@pytest.fixture(params=["cellos", "gvisor"])
def backend(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    require_backend(name)
    return name


@pytest.fixture
def secret_files(tmp_path: Path) -> dict[str, str]:
    """``CELLOS_BROKER=file`` variables naming one host file per secret (the operator's)."""
    folder = tmp_path / "operator-secrets"
    folder.mkdir(mode=0o700)
    env = {"CELLOS_BROKER": "file"}
    for key, value in SECRETS.items():
        path = folder / key
        path.write_text(value, encoding="utf-8")
        env["CELLOS_SECRET_FILE_" + key.replace("-", "_").replace(".", "_").upper()] = str(path)
    return env


def cell_env(tmp_path: Path, backend: str, secret_files: dict[str, str]) -> dict[str, str]:
    return base_env(
        tmp_path,
        CELLOS_CELL_BACKEND=backend,
        CELL_OS_JSONL_EVENTS=str(tmp_path / "events.jsonl"),
        **secret_files,
    )


def secret_doc(cell_id: str, argv: list[str], **run: Any) -> dict[str, Any]:
    return doc(
        cell_id,
        argv=argv,
        authority={"secretRefs": list(SECRETS)},
        run={"env": {"CI": "true"}, **run},
    )


def everything_written(tmp_path: Path, result: CliResult) -> bytes:
    """Events, output, errors, logs and whatever else the run wrote under the test's dir,
    except the operator's own secret files."""
    parts = [result.stdout.encode(), result.stderr.encode()]
    for root, _, files in os.walk(tmp_path):
        if "operator-secrets" in root:
            continue
        for name in files:
            path = os.path.join(root, name)
            if os.path.isfile(path) and not os.path.islink(path):
                parts.append(Path(path).read_bytes())
    return b"\n".join(parts)


def assert_cell_gone(tmp_path: Path) -> None:
    cells = tmp_path / "state" / "cells"
    assert not cells.exists() or os.listdir(cells) == []
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(tmp_path) not in mounts, "a mount of the cell is still there"


# -- runtimeBroker -------------------------------------------------------------------------


def test_runtime_broker_delivers_files_and_nothing_else(
    tmp_path: Path, backend: str, secret_files: dict[str, str], supervisor_cli: Run
) -> None:
    env = cell_env(tmp_path, backend, secret_files)
    spec = write_doc(
        tmp_path / "c.yaml",
        secret_doc(
            f"rb-{backend}", ["/usr/bin/python3", "-c", INSPECT], secretDelivery="runtimeBroker"
        ),
    )
    result = supervisor_cli(str(spec), env)
    assert result.code == 0, result
    report_line, _, rest = result.stdout.partition("\n")
    report = json.loads(report_line)
    uid = WORKLOAD_UID[backend] if os.geteuid() == 0 else os.geteuid()
    assert report["uid"] == uid
    assert report["files"] == {key: [0o400, uid, sha(value)] for key, value in SECRETS.items()}
    assert report["writable"] is False
    # Exactly the declared environment: no secret variable, nothing in /proc/self/environ.
    # (Python itself adds LC_CTYPE to its os.environ under the C locale, PEP 538.)
    assert {k: v for k, v in report["env"].items() if k != "LC_CTYPE"} == {"CI": "true"}
    assert report["environ"] == "CI=true\0"
    # The workload printed a secret: what was relayed (and logged) is redacted.
    assert rest == "[REDACTED]"
    assert leaks(everything_written(tmp_path, result)) == []

    events = read_events(tmp_path / "events.jsonl")
    started = next(e for e in events if e["type"].endswith("lifecycle.v1.started"))
    assert started["data"]["secrets"] == {
        "mode": "runtimeBroker",
        "keys": list(SECRETS),
        "directory": "/run/secrets",
        "variables": None,
        "leaseSeconds": None,
        "injected": [],
    }
    summary = events[-1]["data"]
    assert summary["secretDeliveryMode"] == "runtimeBroker"
    assert summary["errors"] == []
    # (tests/conftest.py's autouse check compares a host-wide residue snapshot too)
    assert_cell_gone(tmp_path)


def test_no_host_process_ever_holds_a_secret_in_argv_or_environment(
    tmp_path: Path, secret_files: dict[str, str]
) -> None:
    """While the cell runs, no process on the host (launcher, pid 1, workload, supervisor)
    carries a value on its command line or in its environment."""
    require_sandbox()
    marker = unique_sleep()
    argv = ["/bin/sh", "-c", f"cat /run/secrets/npm-token > /dev/null && exec sleep {marker}"]
    spec = write_doc(
        tmp_path / "c.yaml", secret_doc("rb-proc", argv, secretDelivery="runtimeBroker")
    )
    env = cell_env(tmp_path, "cellos", secret_files)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cellos.supervisor.cli", str(spec)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        found: list[str] = []
        seen_workload = False
        while time.monotonic() < deadline and not seen_workload:
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                    environ = Path(f"/proc/{entry}/environ").read_bytes()
                except OSError:
                    continue
                seen_workload = seen_workload or marker.encode() in cmdline
                found += [f"{entry}:{k}" for k in leaks(cmdline + b"\0" + environ)]
            time.sleep(0.05)
        assert seen_workload, "the workload never started"
        assert found == []
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert_cell_gone(tmp_path)


# -- runtimeLeasedBroker ---------------------------------------------------------------------


def test_leased_files_are_gone_after_the_lease_while_the_workload_runs_on(
    tmp_path: Path, backend: str, secret_files: dict[str, str], supervisor_cli: Run
) -> None:
    env = cell_env(tmp_path, backend, secret_files)
    spec = write_doc(
        tmp_path / "c.yaml",
        secret_doc(
            f"lease-{backend}",
            ["/usr/bin/python3", "-c", LEASED, "3"],
            secretDelivery="runtimeLeasedBroker",
            secretLeaseSeconds=1,
        ),
    )
    result = supervisor_cli(str(spec), env)
    assert result.code == 0, result
    assert result.stdout.splitlines() == [
        f"before {sha(SECRETS['npm-token'])}",
        "after gone []",
        # A descriptor opened before the lease ended reads nothing either (emptied first).
        "held 0",
        "still running",
    ]
    events = read_events(tmp_path / "events.jsonl")
    completed = next(e for e in events if e["type"].endswith("command.v1.completed"))
    assert completed["data"]["forced"] is False and completed["data"]["exitCode"] == 0
    started = next(e for e in events if e["type"].endswith("lifecycle.v1.started"))
    assert started["data"]["secrets"]["leaseSeconds"] == 1
    assert leaks(everything_written(tmp_path, result)) == []
    assert_cell_gone(tmp_path)


# -- refusals and the profile ----------------------------------------------------------------


def test_validation_names_the_lease_field(
    tmp_path: Path, cellos_cli: Callable[..., CliResult]
) -> None:
    env = base_env(tmp_path)
    missing = write_doc(
        tmp_path / "a.yaml", doc("l-1", run={"secretDelivery": "runtimeLeasedBroker"})
    )
    result = cellos_cli(["validate", str(missing)], env)
    assert result.code == 2, result
    assert (
        "spec.run.secretLeaseSeconds: required when secretDelivery is 'runtimeLeasedBroker'"
        in result.stderr
    )
    assert "Traceback" not in result.stderr
    stray = write_doc(tmp_path / "b.yaml", doc("l-2", run={"secretLeaseSeconds": 5}))
    result = cellos_cli(["validate", str(stray)], env)
    assert result.code == 2, result
    assert "spec.run.secretLeaseSeconds: only allowed with secretDelivery" in result.stderr
    good = write_doc(
        tmp_path / "c.yaml",
        doc("l-3", run={"secretDelivery": "runtimeLeasedBroker", "secretLeaseSeconds": 5}),
    )
    assert cellos_cli(["validate", str(good)], env).code == 0


def test_the_stub_backend_refuses_secret_files_before_anything_runs(
    tmp_path: Path, secret_files: dict[str, str], supervisor_cli: Run
) -> None:
    env = cell_env(tmp_path, "stub", secret_files)
    marker = tmp_path / "ran"
    spec = write_doc(
        tmp_path / "c.yaml",
        secret_doc("stub-rb", ["/bin/sh", "-c", f"touch {marker}"], secretDelivery="runtimeBroker"),
    )
    result = supervisor_cli(str(spec), env)
    assert result.code == 2, result
    assert result.stderr.startswith(
        "error: spec.run.secretDelivery: 'runtimeBroker': the stub backend isolates nothing"
    ), result
    assert not marker.exists()
    types = short_types(read_events(tmp_path / "events.jsonl"))
    assert "lifecycle.v1.started" not in types and types[-1] == "compliance.v1.summary"


def test_a_working_directory_over_the_secrets_is_refused(
    tmp_path: Path, secret_files: dict[str, str], supervisor_cli: Run
) -> None:
    require_sandbox()
    env = cell_env(tmp_path, "cellos", secret_files)
    spec = write_doc(
        tmp_path / "c.yaml",
        secret_doc("wd-rb", ["/bin/true"], secretDelivery="runtimeBroker", workingDirectory="/run"),
    )
    result = supervisor_cli(str(spec), env)
    assert result.code == 2, result
    assert result.stderr.startswith("error: spec.run.workingDirectory: /run overlaps /run/secrets")


@pytest.fixture
def hardened(tmp_path: Path) -> Iterator[Callable[[str], Any]]:
    from cellos.hosts.cellos import CellosBackend

    require_sandbox()
    backend = CellosBackend(state_root=str(tmp_path / "state"))

    def run(delivery: str) -> Any:
        supervisor = Supervisor(
            backend=backend,
            sinks=[],
            broker=MemoryBroker({"tok": "hardened-secret-value"}),
            exporter=None,
            profile="hardened",
        )
        document = doc(
            f"hard-{delivery.lower()}",
            argv=["/bin/sh", "-c", "test -r /run/secrets/tok"],
            authority={"secretRefs": ["tok"]},
            run={"secretDelivery": delivery}
            | ({"secretLeaseSeconds": 60} if delivery == "runtimeLeasedBroker" else {}),
        )
        return supervisor.run(validate_document(document))

    yield run


@pytest.mark.parametrize("delivery", ["runtimeBroker", "runtimeLeasedBroker"])
def test_the_hardened_profile_accepts_secret_files(
    hardened: Callable[[str], Any], delivery: str
) -> None:
    out = hardened(delivery)
    assert out.exit_code == 0, out.errors
    assert b"hardened-secret-value" not in json.dumps(out.events).encode()


def test_the_hardened_profile_refuses_env_delivery(hardened: Callable[[str], Any]) -> None:
    out = hardened("env")
    assert out.exit_code == 2
    assert out.errors[0].path == "spec.run.secretDelivery"
    assert "refuses secretDelivery 'env'" in out.errors[0].reason
    assert "lifecycle.v1.started" not in short_types(out.events)


def test_secrets_too_large_for_files_are_refused_without_their_value(tmp_path: Path) -> None:
    from cellos.hosts.cellos import CellosBackend

    require_sandbox()
    big = "v" * ((1 << 20) + 1)
    supervisor = Supervisor(
        backend=CellosBackend(state_root=str(tmp_path / "state")),
        sinks=[],
        broker=MemoryBroker({"big": big}),
        exporter=None,
    )
    document = doc(
        "too-big",
        authority={"secretRefs": ["big"]},
        run={"secretDelivery": "runtimeBroker"},
    )
    out = supervisor.run(validate_document(document))
    assert out.exit_code == 1
    assert out.errors[0].path == "spec.authority.secretRefs"
    assert "at most 1048576" in out.errors[0].reason
    assert big[:64].encode() not in json.dumps(out.events).encode()
    assert_cell_gone(tmp_path)


# -- qemu: the secrets travel on the guest channel -------------------------------------------

QEMU_INSPECT = (
    "id -u; ls -ln /run/secrets/npm-token /run/secrets/db.pass; "
    "sha256sum /run/secrets/npm-token /run/secrets/db.pass; "
    "echo environ; tr '\\0' '\\n' < /proc/self/environ; echo env; env; "
    "touch /run/secrets/new 2>/dev/null && echo writable || echo read-only; "
    "echo output; cat /run/secrets/npm-token"
)


def qemu_env(tmp_path: Path, image: Path, secret_files: dict[str, str]) -> dict[str, str]:
    return {
        **cell_env(tmp_path, "qemu", secret_files),
        "CELLOS_MICROVM_IMAGE": str(image),
        "CELLOS_MICROVM_ALLOW_TCG": "1",
    }


def test_qemu_runtime_broker_files_come_over_the_guest_channel(
    tmp_path: Path, image_dir: Path, secret_files: dict[str, str], supervisor_cli: Run
) -> None:
    env = qemu_env(tmp_path, image_dir, secret_files)
    spec = write_doc(
        tmp_path / "c.yaml",
        secret_doc("rb-qemu", ["/bin/sh", "-c", QEMU_INSPECT], secretDelivery="runtimeBroker"),
    )
    # The kernel command line the VMM gets is watched for the whole run.
    seen: list[bytes] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                    environ = Path(f"/proc/{entry}/environ").read_bytes()
                except OSError:
                    continue
                if str(image_dir).encode() in cmdline:
                    seen.append(cmdline + b"\0" + environ)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = supervisor_cli(str(spec), env, timeout=300)
    finally:
        stop.set()
        watcher.join()
    assert result.code == 0, result
    assert seen, "the VMM was never seen running"
    # (an acceleration probe may boot the image too, without secrets)
    assert any(b"cellos.secrets=" in s for s in seen)
    assert [leaks(s) for s in seen if leaks(s)] == []
    lines = result.stdout.splitlines()
    assert lines[0] == "65534"
    listing = {line.split()[-1]: (line.split()[0], line.split()[2]) for line in lines[1:3]}
    assert listing == {f"/run/secrets/{k}": ("-r--------", "65534") for k in SECRETS}
    hashes = {line.split()[1]: line.split()[0] for line in lines[3:5]}
    assert hashes == {f"/run/secrets/{k}": sha(v) for k, v in SECRETS.items()}
    # The workload's real environment is the declared one; busybox sh itself adds SHLVL,
    # PATH and PWD to what env(1) sees.
    shell_vars = ("SHLVL=", "PATH=", "PWD=")
    rest = [line for line in lines[5:] if not line.startswith(shell_vars)]
    assert rest == ["environ", "CI=true", "env", "CI=true", "read-only", "output", "[REDACTED]"]
    assert leaks(everything_written(tmp_path, result)) == []
    events = read_events(tmp_path / "events.jsonl")
    started = next(e for e in events if e["type"].endswith("lifecycle.v1.started"))
    assert started["data"]["secrets"]["mode"] == "runtimeBroker"
    assert_cell_gone(tmp_path)


def test_qemu_leased_files_are_gone_after_the_lease(
    tmp_path: Path, image_dir: Path, secret_files: dict[str, str], supervisor_cli: Run
) -> None:
    env = qemu_env(tmp_path, image_dir, secret_files)
    script = (
        "exec 3< /run/secrets/npm-token; sha256sum /run/secrets/npm-token; sleep 3; "
        "test -e /run/secrets/npm-token && echo present || echo gone; ls /run/secrets; "
        "echo held $(cat <&3 | wc -c); echo still running"
    )
    spec = write_doc(
        tmp_path / "c.yaml",
        secret_doc(
            "lease-qemu",
            ["/bin/sh", "-c", script],
            secretDelivery="runtimeLeasedBroker",
            secretLeaseSeconds=1,
        ),
    )
    result = supervisor_cli(str(spec), env, timeout=300)
    assert result.code == 0, result
    assert result.stdout.splitlines() == [
        f"{sha(SECRETS['npm-token'])}  /run/secrets/npm-token",
        "gone",
        "held 0",
        "still running",
    ]
    assert leaks(everything_written(tmp_path, result)) == []
    assert_cell_gone(tmp_path)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_gvisor_secrets_tmpfs_is_gone_after_a_killed_supervisor(
    tmp_path: Path, secret_files: dict[str, str], how: signal.Signals
) -> None:
    """The host tmpfs of a gVisor cell's secrets is recorded before it is mounted: a
    signalled supervisor unmounts it itself, a SIGKILLed one leaves it to ``cellos reap``."""
    require_backend("gvisor")
    env = cell_env(tmp_path, "gvisor", secret_files)
    spec = write_doc(
        tmp_path / "c.yaml",
        secret_doc(
            f"gv-kill-{how.name.lower()}",
            ["/bin/sh", "-c", "echo up; sleep 240"],
            secretDelivery="runtimeBroker",
            limits={"gracefulShutdownSeconds": 1},
        ),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "cellos.supervisor.cli", str(spec)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    secrets_mount = str(tmp_path / "state" / "cells")
    deadline = time.monotonic() + 60
    while secrets_mount not in Path("/proc/self/mountinfo").read_text():
        assert time.monotonic() < deadline, "the secrets tmpfs was never mounted"
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(1)
    proc.send_signal(how)
    out, err = proc.communicate(timeout=60)
    if how == signal.SIGKILL:
        # Nothing ran in the killed supervisor: the tmpfs is still there until the reaper.
        assert secrets_mount in Path("/proc/self/mountinfo").read_text()
        reap = subprocess.run(
            [sys.executable, "-m", "cellos.cli", "reap"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert reap.returncode == 0, reap
    else:
        assert proc.returncode == 128 + how, err
    assert leaks(out + err) == []
    assert_cell_gone(tmp_path)


def test_an_unprivileged_supervisor_delivers_files_in_its_user_namespace() -> None:
    """Not root: the cell's user namespace owns its mount namespace, so the launcher mounts
    the tmpfs there too; the files belong to the supervisor's uid (the workload's)."""
    from cellos.core.ports import WorkloadRequest
    from cellos.hosts.cellos import CellosBackend
    from tests.test_unprivileged import NOBODY, as_nobody

    # Imported before the drop to nobody (who may not read the interpreter's files).
    codecs.lookup("ascii")
    value = SECRETS["npm-token"]
    script = (
        "id -u; stat -c '%a %u' /run/secrets/npm-token; sha256sum < /run/secrets/npm-token; "
        "touch /run/secrets/x 2>/dev/null && echo writable || echo read-only; "
        "sleep 2; test -e /run/secrets/npm-token && echo present || echo gone"
    )

    def work(home: str) -> dict[str, Any]:
        backend = CellosBackend(state_root=os.path.join(home, "state"))
        spec = validate_document(doc("unpriv-secrets", argv=["/bin/sh", "-c", script])).spec
        handle = backend.create(spec)
        try:
            result = backend.run(
                handle,
                WorkloadRequest(
                    argv=spec.run.argv if spec.run else [],
                    env={},
                    working_directory="/workspace",
                    deadline_seconds=30,
                    graceful_shutdown_seconds=1,
                    secret_files={"npm-token": value.encode()},
                    secret_lease_seconds=1,
                ),
            )
        finally:
            backend.destroy(handle)
        return {
            "exit": result.exit_code,
            "stdout": result.stdout.decode(),
            "err": result.stderr.decode(),
        }

    out = as_nobody(work)
    assert out["exit"] == 0, out
    assert out["stdout"].splitlines() == [
        str(NOBODY),
        f"400 {NOBODY}",
        f"{sha(value)}  -",
        "read-only",
        "gone",
    ]


@pytest.mark.parametrize("delivery", ["runtimeBroker", "env"])
def test_a_hardened_supervisor_runs_file_delivery_and_refuses_env(
    tmp_path: Path,
    nats_server: Any,
    secret_files: dict[str, str],
    supervisor_cli: Run,
    cellos_cli: Run,
    delivery: str,
) -> None:
    """The whole hardened composition (cellos backend, signed events, JetStream required):
    file delivery runs, env delivery is refused before the cell exists; every event verifies
    and none carries a value."""
    require_sandbox()
    keys = tmp_path / "keys"
    keygen = cellos_cli(["keygen", "--kid", "hard", "--out-dir", str(keys)], base_env(tmp_path))
    assert keygen.code == 0, keygen
    env = {
        **cell_env(tmp_path, "cellos", secret_files),
        "CELLOS_DEPLOYMENT_PROFILE": "hardened",
        "CELLOS_EVENT_SIGNING": "ed25519",
        "CELLOS_EVENT_SIGNING_KID": "hard",
        "CELLOS_EVENT_SIGNING_KEY_BASE64": (keys / "hard.key").read_text().strip(),
        "CELL_OS_REQUIRE_JETSTREAM": "1",
        "CELLOS_NATS_URL": nats_server.url,
    }
    spec = write_doc(
        tmp_path / "c.yaml",
        secret_doc(
            f"hardened-{delivery.lower()}",
            ["/bin/sh", "-c", "cat /run/secrets/npm-token > /dev/null"],
            secretDelivery=delivery,
        ),
    )
    result = supervisor_cli(str(spec), env)
    types = short_types(read_events(tmp_path / "events.jsonl"))
    if delivery == "env":
        assert result.code == 2, result
        assert result.stderr.startswith(
            "error: spec.run.secretDelivery: the hardened profile refuses secretDelivery 'env'"
        ), result
        assert "lifecycle.v1.started" not in types
    else:
        assert result.code == 0, result
        assert "lifecycle.v1.started" in types
    verify = cellos_cli(
        [
            "events",
            "verify",
            str(tmp_path / "events.jsonl"),
            "--keys",
            str(keys / "hard.verify-keys.json"),
        ],
        base_env(tmp_path),
    )
    assert verify.code == 0, verify
    assert leaks(everything_written(tmp_path, result)) == []
    assert_cell_gone(tmp_path)


def test_files_and_injection_combine_one_rule_per_secret() -> None:
    """A cell may inject one secret through its proxy and receive another as a file: the
    injected one reaches the cell only as a placeholder, the other only as a file."""
    from cellos.supervisor.secret_delivery import deliver

    spec = validate_document(
        doc(
            "combo",
            run={"secretDelivery": "runtimeBroker"},
            authority={
                "secretRefs": ["api-token", "db-pass"],
                "egressRules": [{"host": "api.test", "port": 443, "protocol": "tcp"}],
                "secretInjection": [
                    {"secretRef": "api-token", "host": "api.test", "header": "Authorization"}
                ],
            },
        )
    ).spec
    out = deliver(spec, {"api-token": "tok-123", "db-pass": "pw-456"})
    assert out.files == {"db-pass": b"pw-456"}
    assert list(out.env) == ["CELLOS_SECRET_PLACEHOLDER_API_TOKEN"]
    assert "tok-123" not in out.env.values() and "pw-456" not in out.env.values()
    assert [s.secret_ref for s in out.injected] == ["api-token"]
    assert sorted(out.values) == ["pw-456", "tok-123"]  # both redacted from output
