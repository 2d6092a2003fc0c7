"""The qemu backend without configuration: the per-user cached default image (built on first
use, trusted only when ours, refused when corrupted) and the cached KVM/TCG probe."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cellos.core.errors import HostError
from cellos.hosts.microvm.accel import CACHE_NAME, kvm_identity
from cellos.hosts.microvm.backend import MicrovmBackend
from cellos.hosts.microvm.image_cache import image_key
from cellos.hosts.microvm.manifest import load_manifest, sha256_file
from tests.conftest import (
    CliResult,
    base_env,
    doc,
    read_events,
    require_host,
    run_cli,
    running_with,
    short_types,
    write_doc,
)

QEMU = shutil.which("qemu-system-x86_64")


def default_env(tmp_path: Path, cache: Path, **extra: str) -> dict[str, str]:
    """A qemu cell with nothing configured but the cache location (kept out of /var/cache)."""
    return base_env(
        tmp_path,
        CELLOS_CELL_BACKEND="qemu",
        CELLOS_MICROVM_CACHE=str(cache),
        CELLOS_MICROVM_ALLOW_TCG="1",
        CELL_OS_JSONL_EVENTS=str(tmp_path / "ev.jsonl"),
        CELLOS_EXPORT_DIR=str(tmp_path / "x"),
        **extra,
    )


def vmm_and_key() -> tuple[str, str]:
    require_host(QEMU is not None, "qemu-system-x86_64")
    assert QEMU is not None
    vmm = os.path.realpath(QEMU)
    return vmm, image_key(vmm, sha256_file(vmm))


@pytest.fixture
def seeded(tmp_path: Path, image_dir: Path) -> Path:
    """A cache holding the default image under its key (a copy of the session's image, which
    the same builder sources produced byte for byte)."""
    _, key = vmm_and_key()
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    shutil.copytree(image_dir, cache / key)
    os.chmod(cache / key, 0o700)
    return cache / key


def supervise(tmp_path: Path, name: str, env: dict[str, str], argv: list[str]) -> CliResult:
    spec = write_doc(tmp_path / f"{name}.yaml", doc(name, argv=argv))
    return run_cli("cellos.supervisor.cli", [str(spec)], env, timeout=240)


def started_events(tmp_path: Path) -> list[dict[str, Any]]:
    return [
        e["data"]
        for e in read_events(tmp_path / "ev.jsonl")
        if e["type"].endswith("lifecycle.v1.started")
    ]


def test_default_image_is_used_and_the_second_cell_does_not_probe(
    tmp_path: Path, seeded: Path
) -> None:
    env = default_env(tmp_path, seeded.parent)
    first = supervise(tmp_path, "vm-d1", env, ["/bin/sh", "-c", "echo one"])
    assert first.code == 0 and first.stdout == "one\n", first
    assert "building" not in first.stderr  # the cache held it
    cache_file = tmp_path / "state" / CACHE_NAME
    decided = cache_file.read_bytes() if cache_file.exists() else b""
    second = supervise(tmp_path, "vm-d2", env, ["/bin/true"])
    assert second.code == 0, second
    one, two = started_events(tmp_path)
    manifest = load_manifest(seeded / "manifest.json")
    for started in (one, two):
        assert started["resources"]["image"] == str(seeded)
        assert started["resources"]["accel"] == "tcg"
        assert started["digests"]["initrdSha256"] == manifest.initrd.sha256
    if kvm_identity() is None:  # nothing to probe on this host: no /dev/kvm
        assert one["resources"]["accelDecidedBy"] == two["resources"]["accelDecidedBy"] == "no-kvm"
        return
    assert one["resources"]["accelDecidedBy"] == "probe"
    assert two["resources"]["accelDecidedBy"] == "cache"
    assert cache_file.read_bytes() == decided  # not probed (nor rewritten) by the second cell
    assert running_with(str(seeded)) == []


def test_first_use_builds_once_for_concurrent_cells(tmp_path: Path) -> None:
    """Two cells start together on an empty cache: one builds (progress on stderr), the other
    waits for it; both boot the same image and no partial build is left."""
    require_host(os.geteuid() == 0, "root (the image build fetches Debian packages)")
    require_host(
        all(shutil.which(t) for t in ("gcc", "apt-get", "dpkg-deb")), "gcc, apt-get, dpkg-deb"
    )
    _, key = vmm_and_key()
    cache = tmp_path / "cache"
    procs = []
    for n in (1, 2):
        work = tmp_path / f"c{n}"
        work.mkdir()
        env = default_env(work, cache, CELLOS_MICROVM_ACCEL="tcg")
        spec = write_doc(work / "c.yaml", doc(f"vm-first-{n}", argv=["/bin/true"]))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "cellos.supervisor.cli", str(spec)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    stderr = "".join(err for _, err in results)
    assert stderr.count("cellos: building the microVM guest image into") == 1, stderr
    assert "microVM guest image ready" in stderr
    assert sorted(os.listdir(cache)) == sorted([key, f".{key}.lock"])
    for n in (1, 2):
        started = started_events(tmp_path / f"c{n}")[0]
        assert started["resources"]["image"] == str(cache / key)
    mode = os.stat(cache).st_mode & 0o777
    assert mode == 0o700, oct(mode)


def test_a_corrupted_cached_image_is_refused_and_rebuilt_only_on_request(
    tmp_path: Path, seeded: Path
) -> None:
    initrd = seeded / "initrd.cpio.gz"
    expected = sha256_file(initrd)
    data = bytearray(initrd.read_bytes())
    data[len(data) // 2] ^= 0x01
    initrd.write_bytes(bytes(data))
    actual = sha256_file(initrd)
    env = default_env(tmp_path, seeded.parent)
    result = supervise(tmp_path, "vm-corrupt", env, ["/bin/true"])
    assert result.code == 1, result
    assert result.stderr.startswith(f"error: {initrd}: sha256 mismatch"), result.stderr
    assert expected in result.stderr and actual in result.stderr
    assert "cellos microvm build-image --refresh" in result.stderr
    assert "Traceback" not in result.stderr
    events = read_events(tmp_path / "ev.jsonl")
    assert short_types(events) == ["lifecycle.v1.destroyed", "compliance.v1.summary"]
    assert events[0]["data"]["reason"] == "create_failed"
    # Not silently rebuilt: the corrupted file is still there, the cell never booted.
    assert sha256_file(initrd) == actual
    assert running_with(str(seeded)) == []
    # On request it is rebuilt (a real build) and verifies again.
    require_host(os.geteuid() == 0, "root (the image build fetches Debian packages)")
    rebuilt = run_cli("cellos.cli", ["microvm", "build-image", "--refresh"], env, timeout=600)
    assert rebuilt.code == 0, rebuilt
    assert f"image: {seeded}" in rebuilt.stdout
    assert sha256_file(initrd) == expected  # reproducible build: the original bytes
    assert sorted(os.listdir(seeded.parent)) == sorted([seeded.name, f".{seeded.name}.lock"])


@pytest.mark.parametrize("flaw", ["cache-mode", "image-file-mode", "foreign-owner", "symlink"])
def test_an_untrusted_cache_is_refused(tmp_path: Path, seeded: Path, flaw: str) -> None:
    if flaw == "cache-mode":
        os.chmod(seeded.parent, 0o777)
        victim = seeded.parent
    elif flaw == "image-file-mode":
        victim = seeded / "vmlinuz"
        os.chmod(victim, 0o666)
    elif flaw == "foreign-owner":
        require_host(os.geteuid() == 0, "root (to give the image to another user)")
        victim = seeded
        os.chown(victim, 65534, 65534)
    else:
        real = tmp_path / "elsewhere"
        seeded.rename(real)
        seeded.symlink_to(real)
        victim = seeded
    env = default_env(tmp_path, seeded.parent)
    result = supervise(tmp_path, "vm-untrusted", env, ["/bin/true"])
    assert result.code == 1, result
    assert result.stderr.startswith(f"error: {victim}: refusing the microVM image cache"), result
    assert "not writable by group or others" in result.stderr
    assert "Traceback" not in result.stderr
    assert running_with(str(seeded)) == []


def probe_backend(tmp_path: Path, image: Path) -> MicrovmBackend:
    require_host(kvm_identity() is not None, "/dev/kvm (the KVM probe needs a device to probe)")
    return MicrovmBackend(image_dir=str(image), state_root=str(tmp_path / "state"), allow_tcg=True)


def test_the_probe_is_cached_per_boot_and_reprobed_when_its_key_changes(
    tmp_path: Path, image_dir: Path
) -> None:
    backend = probe_backend(tmp_path, image_dir)
    manifest, _ = backend.load_image()
    first = backend.decide_accel(manifest)
    assert first.decided_by == "probe" and first.probe_ms is not None
    assert first.probe_ms < 15_000  # bounded (5 s boot, then kill)
    cache_file = tmp_path / "state" / CACHE_NAME
    assert os.stat(cache_file).st_mode & 0o777 == 0o600
    again = backend.decide_accel(manifest)
    assert again.decided_by == "cache" and again.accel == first.accel
    assert again.probed_at == first.probed_at
    # A decision of another boot (or kernel) does not apply: probe again, drop the old boot's.
    for field, fake in (("bootId", "00000000-0000-0000-0000-000000000000"), ("kvm", "0:0:0")):
        data = json.loads(cache_file.read_text())
        for entry in data["entries"]:
            entry["key"][field] = fake
        cache_file.write_text(json.dumps(data))
        redo = backend.decide_accel(manifest)
        assert redo.decided_by == "probe", field
        keys = [e["key"] for e in json.loads(cache_file.read_text())["entries"]]
        assert all(k[field] != fake for k in keys) or field == "kvm", keys
    assert backend.decide_accel(manifest, refresh=True).decided_by == "probe"
    # A torn cache file is probed over; one others may write is refused.
    cache_file.write_text("{not json")
    assert backend.decide_accel(manifest).decided_by == "probe"
    os.chmod(cache_file, 0o666)
    with pytest.raises(HostError, match="refusing the KVM probe cache"):
        backend.decide_accel(manifest)
    # The operator's override never probes.
    forced = MicrovmBackend(
        image_dir=str(image_dir), state_root=str(tmp_path / "state2"), accel="tcg"
    )
    assert forced.decide_accel(manifest).decided_by == "CELLOS_MICROVM_ACCEL"
    assert not (tmp_path / "state2" / CACHE_NAME).exists()


def test_a_probe_boot_that_hangs_is_killed_in_time(tmp_path: Path, image_dir: Path) -> None:
    """The probe's bound: a guest that does not finish is killed at the timeout (shown with
    TCG and a timeout shorter than its boot, the same kill path as a KVM guest that hangs)."""
    require_host(QEMU is not None, "qemu-system-x86_64")
    backend = MicrovmBackend(image_dir=str(image_dir), state_root=str(tmp_path / "state"))
    manifest, _ = backend.load_image()
    started = time.monotonic()
    result = backend.boot_true(manifest, "tcg", str(tmp_path), 0.5, grace=0.2)
    assert result.forced and result.exit_code is None
    assert time.monotonic() - started < 3.0
    assert running_with(str(image_dir)) == []


def test_doctor_shows_the_cached_decision_and_refreshes_it(tmp_path: Path, seeded: Path) -> None:
    require_host(kvm_identity() is not None, "/dev/kvm (the KVM probe needs a device to probe)")
    env = default_env(tmp_path, seeded.parent)

    def accel_line(args: list[str]) -> str:
        result = run_cli("cellos.cli", ["doctor", "--json", *args], env, timeout=300)
        checks = {c["feature"]: c for c in json.loads(result.stdout)}
        assert checks["microvm:qemu"]["ok"], checks["microvm:qemu"]
        assert str(seeded) in checks["microvm:qemu"]["detail"]
        return str(checks["microvm:accel"]["detail"])

    first = accel_line([])
    assert "probed now" in first and "--refresh-microvm-probe" in first, first
    cached = accel_line([])
    assert "cached probe" in cached, cached
    stamp = json.loads((tmp_path / "state" / CACHE_NAME).read_text())["entries"][0]["probedAt"]
    assert stamp in cached
    assert "probed now" in accel_line(["--refresh-microvm-probe"])


def test_a_full_disk_during_the_build_fails_cleanly(tmp_path: Path) -> None:
    """The cache on a 2 MiB tmpfs: the kernel does not fit. The error names the file and the
    reason, no traceback, and no partial image is left (the next use builds again)."""
    require_host(os.geteuid() == 0, "root (to mount a small tmpfs)")
    require_host(
        all(shutil.which(t) for t in ("gcc", "apt-get", "dpkg-deb")), "gcc, apt-get, dpkg-deb"
    )
    _, key = vmm_and_key()
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(small)], check=True
    )
    try:
        env = default_env(tmp_path, small)
        result = run_cli("cellos.cli", ["microvm", "build-image"], env, timeout=600)
        assert result.code == 1, result
        assert "No space left on device" in result.stderr, result.stderr
        assert result.stderr.splitlines()[-1].startswith(f"error: {small}/.build-{key}-")
        assert "Traceback" not in result.stderr
        assert sorted(os.listdir(small)) == [f".{key}.lock"]
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_the_cache_location_follows_the_user(tmp_path: Path) -> None:
    """Root: /var/cache/cellos/microvm; anyone else: $XDG_CACHE_HOME (or ~/.cache)/cellos/microvm
    (checked as uid 65534 in a real process); CELLOS_MICROVM_CACHE overrides both."""
    from cellos.hosts.microvm.image_cache import cache_dir

    assert cache_dir({"CELLOS_MICROVM_CACHE": "/srv/images"}) == "/srv/images"
    if os.geteuid() != 0:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        assert cache_dir({}) == f"{base}/cellos/microvm"
        return
    assert cache_dir({}) == "/var/cache/cellos/microvm"
    require_host(shutil.which("setpriv") is not None, "setpriv (util-linux)")
    code = "from cellos.hosts.microvm.image_cache import cache_dir; print(cache_dir())"
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nohome", "PYTHONPATH": os.pathsep.join(sys.path)}
    for extra, expected in (({"XDG_CACHE_HOME": "/x/cache"}, "/x/cache"), ({}, "/nohome/.cache")):
        out = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             sys.executable, "-c", code],
            env={**env, **extra}, capture_output=True, text=True, check=True, cwd="/",
        )  # fmt: skip
        assert out.stdout.strip() == f"{expected}/cellos/microvm", out
