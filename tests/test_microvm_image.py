"""microVM guest image: reproducible build, sha256 manifest verification, one TCG boot."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from cellos.core.errors import HostError, InvalidSpec
from cellos.hosts.microvm.image import build_image
from cellos.hosts.microvm.manifest import ManifestMismatch, load_manifest, verify
from cellos.hosts.microvm.qemu_probe import boot_once, parse_channel
from tests.conftest import require_host

QEMU = shutil.which("qemu-system-x86_64")


def _can_build() -> bool:
    return all(shutil.which(t) for t in ("gcc", "apt-get", "dpkg-deb"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    require_host(_can_build(), "gcc, apt-get and dpkg-deb to build the microVM image")
    # The manifest records a VMM digest; any stable binary stands in when QEMU is absent.
    vmm = QEMU or "/bin/true"
    a, b = tmp_path_factory.mktemp("img-a"), tmp_path_factory.mktemp("img-b")
    build_image(str(a), vmm=vmm)
    build_image(str(b), vmm=vmm)
    return a, b


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_build_is_reproducible(images: tuple[Path, Path]) -> None:
    a, b = images
    for name in ("vmlinuz", "initrd.cpio.gz", "manifest.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    doc = json.loads((a / "manifest.json").read_text())
    assert doc["version"] == 1
    assert doc["kernel"]["path"] == "vmlinuz" and doc["initrd"]["path"] == "initrd.cpio.gz"
    assert doc["vmm"]["path"].startswith("/")
    assert doc["source"]["kernelPackage"].startswith("linux-image-")
    assert "-cloud-amd64=" in doc["source"]["kernelPackage"]
    assert doc["source"]["busyboxPackage"].startswith("busybox-static=")


def test_manifest_verifies(images: tuple[Path, Path]) -> None:
    a, _ = images
    manifest = load_manifest(a / "manifest.json")
    digests = verify(manifest, a)
    assert digests == {
        "kernel": manifest.kernel.sha256,
        "initrd": manifest.initrd.sha256,
        "vmm": manifest.vmm.sha256,
    }


@pytest.mark.parametrize("name", ["vmlinuz", "initrd.cpio.gz"])
def test_flipped_byte_is_a_mismatch(images: tuple[Path, Path], tmp_path: Path, name: str) -> None:
    img = _copy(images[0], tmp_path / "img")
    target = img / name
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    manifest = load_manifest(img / "manifest.json")
    with pytest.raises(ManifestMismatch) as info:
        verify(manifest, img)
    assert isinstance(info.value, HostError)
    assert info.value.path == str(target)
    assert (
        info.value.expected == getattr(manifest, "kernel" if name == "vmlinuz" else "initrd").sha256
    )
    assert info.value.actual in str(info.value) and info.value.expected in str(info.value)


def test_symlinked_artifact_is_refused(images: tuple[Path, Path], tmp_path: Path) -> None:
    img = _copy(images[0], tmp_path / "img")
    (img / "vmlinuz").rename(img / "real")
    (img / "vmlinuz").symlink_to(img / "real")
    with pytest.raises(HostError, match="vmlinuz"):
        verify(load_manifest(img / "manifest.json"), img)


@pytest.mark.parametrize(
    ("drop", "field"),
    [
        (("kernel", "sha256"), "kernel.sha256"),
        (("initrd",), "initrd"),
        (("vmm", "path"), "vmm.path"),
    ],
)
def test_missing_manifest_field_is_typed(
    images: tuple[Path, Path], tmp_path: Path, drop: tuple[str, ...], field: str
) -> None:
    doc: dict[str, Any] = json.loads((images[0] / "manifest.json").read_text())
    parent = doc
    for key in drop[:-1]:
        parent = parent[key]
    del parent[drop[-1]]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(InvalidSpec) as info:
        load_manifest(path)
    assert info.value.path == f"{path}: {field}"


def test_unreadable_manifest_is_host_error(tmp_path: Path) -> None:
    with pytest.raises(HostError, match=r"manifest\.json"):
        load_manifest(tmp_path / "manifest.json")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(InvalidSpec, match=r"manifest\.json"):
        load_manifest(tmp_path / "manifest.json")


def test_channel_parser_checks_artifact_digest() -> None:
    lines = ["noise", "CELLOS:READY", "CELLOS:ART:L3g:aGk=", "CELLOS:ARTEND:L3g:" + "0" * 64]
    with pytest.raises(HostError, match="/x"):
        parse_channel(lines)


def test_boot_once_under_tcg(images: tuple[Path, Path]) -> None:
    require_host(QEMU is not None, "qemu-system-x86_64 (apt-get install qemu-system-x86)")
    result = boot_once(
        str(images[0]),
        ["/bin/sh", "-c", "echo hi; uname -r; echo oops >&2; printf 'a\\000b' > out.bin; exit 3"],
        env={"PATH": "/bin"},
        artifacts=["/workspace/out.bin", "/workspace/absent"],
        timeout=120,
        accel="tcg",
    )
    uname = result["uname"]
    assert uname and uname.endswith("-cloud-amd64")
    assert result["stdout"] == f"hi\n{uname}\n".encode()
    assert result["stderr"] == b"oops\n"
    assert result["exit_code"] == 3
    assert result["artifacts"] == {"/workspace/out.bin": b"a\0b", "/workspace/absent": None}
    assert "CELLOS:READY" in result["raw_log"].splitlines()
    assert result["ready"]
    assert result["boot_ms"] > 0


def test_boot_env_privileges_and_spawn_error(images: tuple[Path, Path]) -> None:
    require_host(QEMU is not None, "qemu-system-x86_64 (apt-get install qemu-system-x86)")
    script = 'echo "$FOO"; id -u; (echo forged > /dev/ttyS0) 2>/dev/null || echo denied'
    result = boot_once(
        str(images[0]), ["sh", "-c", script], env={"FOO": 'a "b" ä', "PATH": "/bin"}, timeout=120
    )
    assert result["stdout"] == 'a "b" ä\n65534\ndenied\n'.encode()
    assert result["exit_code"] == 0
    missing = boot_once(str(images[0]), ["/nonexistent"], timeout=120)
    assert missing["exit_code"] == 127
    assert "/nonexistent" in missing["spawn_error"]
