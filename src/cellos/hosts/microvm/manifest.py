"""The sha256 manifest of a microVM guest image, and its verification before boot.

``manifest.json`` (written by :func:`cellos.hosts.microvm.image.build_image`)::

    {"version": 1,
     "kernel": {"path": "vmlinuz", "sha256": "<hex>"},
     "initrd": {"path": "initrd.cpio.gz", "sha256": "<hex>"},
     "vmm": {"path": "/usr/bin/qemu-system-x86_64", "sha256": "<hex>"},
     "vmlinux": {"path": "vmlinux", "sha256": "<hex>"},   (a Firecracker image only)
     "source": {"kernelPackage": "<name>=<version>", "busyboxPackage": "<name>=<version>"}}

Kernel and initrd paths are relative to the image directory (no ``..``, no absolute path); the
VMM path is absolute. Every file is read with ``O_NOFOLLOW`` so a symlink planted in place of
an artifact is refused instead of followed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cellos.core.errors import HostError, InvalidSpec

MANIFEST_VERSION = 1
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ManifestMismatch(HostError):
    """A boot artifact's sha256 differs from the one the manifest records."""

    def __init__(self, path: str, expected: str, actual: str, hint: str = "") -> None:
        super().__init__(
            path, f"sha256 mismatch: manifest says {expected}, file has {actual}{hint}"
        )
        self.expected = expected
        self.actual = actual


@dataclass(frozen=True)
class Artifact:
    """One file of the image: its path (relative to the image dir, or absolute for the VMM)."""

    path: str
    sha256: str


@dataclass(frozen=True)
class Manifest:
    kernel: Artifact
    initrd: Artifact
    vmm: Artifact
    source: dict[str, str] = field(default_factory=dict)
    version: int = MANIFEST_VERSION
    #: The kernel as an uncompressed ELF (Firecracker boots nothing else on x86_64); only in
    #: images built for Firecracker (``cellos microvm build-image --firecracker``).
    vmlinux: Artifact | None = None

    def roles(self) -> list[tuple[str, Artifact]]:
        """Every file the manifest pins, by role (what ``verify`` checks before a boot)."""
        found = [("kernel", self.kernel), ("initrd", self.initrd), ("vmm", self.vmm)]
        return found + ([("vmlinux", self.vmlinux)] if self.vmlinux is not None else [])

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {"version": self.version}
        for role, art in self.roles():
            doc[role] = {"path": art.path, "sha256": art.sha256}
        doc["source"] = dict(sorted(self.source.items()))
        return doc


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 hex of a regular file, opened with O_NOFOLLOW (HostError when unreadable)."""
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise HostError(name, f"cannot open boot artifact: {exc.strerror}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise HostError(name, "boot artifact is not a regular file")
        digest = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
        return digest.hexdigest()
    finally:
        os.close(fd)


def _artifact(doc: dict[str, object], key: str, where: str, *, absolute: bool) -> Artifact:
    entry = doc.get(key)
    if not isinstance(entry, dict):
        raise InvalidSpec(f"{where}: {key}", "missing or not an object")
    path = entry.get("path")
    digest = entry.get("sha256")
    if not isinstance(path, str) or not path:
        raise InvalidSpec(f"{where}: {key}.path", "missing or not a non-empty string")
    if absolute and not os.path.isabs(path):
        raise InvalidSpec(f"{where}: {key}.path", "must be an absolute path")
    if not absolute and (os.path.isabs(path) or ".." in Path(path).parts):
        raise InvalidSpec(f"{where}: {key}.path", "must be relative to the image directory")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise InvalidSpec(f"{where}: {key}.sha256", "missing or not 64 lowercase hex digits")
    return Artifact(path, digest)


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Parse ``manifest.json``.

    HostError if unreadable; InvalidSpec whose path names the file and field if malformed.
    """
    where = os.fspath(path)
    try:
        fd = os.open(where, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise HostError(where, f"cannot read manifest: {exc.strerror}") from exc
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidSpec(where, f"not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidSpec(where, "manifest must be a JSON object")
    if doc.get("version") != MANIFEST_VERSION:
        raise InvalidSpec(f"{where}: version", f"must be {MANIFEST_VERSION}")
    source = doc.get("source", {})
    if not isinstance(source, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in source.items()
    ):
        raise InvalidSpec(f"{where}: source", "must be an object of strings")
    return Manifest(
        kernel=_artifact(doc, "kernel", where, absolute=False),
        initrd=_artifact(doc, "initrd", where, absolute=False),
        vmm=_artifact(doc, "vmm", where, absolute=True),
        source=dict(source),
        vmlinux=_artifact(doc, "vmlinux", where, absolute=False) if "vmlinux" in doc else None,
    )


def verify(
    manifest: Manifest,
    image_dir: str | os.PathLike[str],
    known: dict[str, str] | None = None,
) -> dict[str, str]:
    """Recompute kernel, initrd, VMM (and vmlinux) digests (``known``: ``{path: sha256}`` the
    caller has just computed of the same file, e.g. the VMM digest that chose the cached image).

    Returns ``{"kernel": hex, "initrd": hex, "vmm": hex}`` (and ``"vmlinux"``); raises
    ManifestMismatch naming the file whose digest differs (and HostError when one cannot be
    read).
    """
    base = Path(image_dir)
    found: dict[str, str] = {}
    for role, art in manifest.roles():
        file = art.path if role == "vmm" else str(base / art.path)
        actual = (known or {}).get(file) or sha256_file(file)
        if actual != art.sha256:
            raise ManifestMismatch(file, art.sha256, actual)
        found[role] = actual
    return found
