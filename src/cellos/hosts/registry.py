"""Choosing a backend by name (``CELLOS_CELL_BACKEND``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from cellos.core.errors import PolicyRefused
from cellos.core.ports import CellBackend, ReapedCell

if TYPE_CHECKING:
    from cellos.hosts.microvm.backend import MicrovmCellBackend

KNOWN = ("cellos", "firecracker", "gvisor", "qemu", "stub")


def make_reaper(env: Mapping[str, str]) -> Callable[[], list[ReapedCell]]:
    """Reaps the host's cell-state store (``CELLOS_STATE_DIR``): the cells of every backend,
    whichever one this supervisor runs."""

    def reap() -> list[ReapedCell]:
        from cellos.hosts.reaper import reap
        from cellos.hosts.state import CellStore

        return reap(CellStore(env.get("CELLOS_STATE_DIR") or None))

    return reap


def make_backend(name: str | None, env: Mapping[str, str]) -> CellBackend:
    name = (name or "cellos").strip() or "cellos"
    if name == "stub":
        from cellos.hosts.stub import StubBackend

        return StubBackend()
    if name == "cellos":
        from cellos.hosts.cellos import CellosBackend

        return CellosBackend(
            state_root=env.get("CELLOS_STATE_DIR") or None,
            cgroup_parent=env.get("CELLOS_CGROUP_PARENT") or None,
            rootfs=env.get("CELLOS_ROOTFS") or None,
            launcher=env.get("CELLOS_LAUNCHER") or None,
            network_pool=_network_pool(env),
            injection_upstream_ca=env.get("CELLOS_INJECTION_UPSTREAM_CA") or None,
        )
    if name == "gvisor":
        from cellos.hosts.gvisor import GvisorBackend

        return GvisorBackend(
            state_root=env.get("CELLOS_STATE_DIR") or None,
            rootfs=env.get("CELLOS_ROOTFS") or None,
            runsc=env.get("CELLOS_RUNSC") or None,
            platform=env.get("CELLOS_GVISOR_PLATFORM") or None,
            network_pool=_network_pool(env),
        )
    if name in ("qemu", "firecracker"):
        return make_microvm_backend(name, env)
    raise PolicyRefused(
        "CELLOS_CELL_BACKEND", f"unknown backend {name!r} (expected one of: {', '.join(KNOWN)})"
    )


def make_microvm_backend(name: str, env: Mapping[str, str]) -> MicrovmCellBackend:
    """The ``qemu`` or ``firecracker`` backend (they share the image, pool and accel
    settings). Firecracker without its binary or a KVM device is refused here, before
    anything runs."""
    image_dir = env.get("CELLOS_MICROVM_IMAGE") or None
    state_root = env.get("CELLOS_STATE_DIR") or None
    accel = env.get("CELLOS_MICROVM_ACCEL") or None
    pool_size = microvm_pool_size(env)
    if name == "firecracker":
        from cellos.hosts.microvm.fc_backend import FirecrackerBackend

        return FirecrackerBackend(
            image_dir=image_dir,
            state_root=state_root,
            accel=accel,
            pool_size=pool_size,
            firecracker=env.get("CELLOS_FIRECRACKER") or None,
        )
    from cellos.hosts.microvm.backend import MicrovmBackend

    return MicrovmBackend(
        image_dir=image_dir,
        state_root=state_root,
        allow_tcg=env.get("CELLOS_MICROVM_ALLOW_TCG", "").strip() in {"1", "true", "yes"},
        accel=accel,
        pool_size=pool_size,
        network_pool=_network_pool(env),
    )


def microvm_pool_size(env: Mapping[str, str]) -> int:
    """``CELLOS_MICROVM_POOL``: how many warm guests (0 or unset: none)."""
    raw = (env.get("CELLOS_MICROVM_POOL") or "0").strip()
    if not raw.isdigit() or int(raw) > 64:
        raise PolicyRefused(
            "CELLOS_MICROVM_POOL", f"must be a number of guests from 0 to 64 (got {raw!r})"
        )
    return int(raw)


def _network_pool(env: Mapping[str, str]) -> str | None:
    """``CELLOS_NETWORK_POOL``, refused at start rather than when the first cell with egress
    authority needs it."""
    pool = env.get("CELLOS_NETWORK_POOL") or None
    if pool is not None:
        from cellos.network.scope import parse_pool

        parse_pool(pool)
    return pool
