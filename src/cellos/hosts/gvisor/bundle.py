"""The OCI bundle of a gVisor cell: a pure function from the document (+ host config) to
``config.json`` (OCI runtime-spec 1.0).

The root filesystem is read-only: either a rootfs directory, or an empty per-cell skeleton onto
which the host's ``/usr``, ``/lib*`` ... are bound read-only (as the ``cellos`` backend does).
The workspace is the only writable, persistent mount. The process gets exactly the declared
environment, no capabilities, ``noNewPrivileges`` and modest rlimits; ``memoryMaxBytes`` and
``cpuMax`` become ``linux.resources`` (enforced on the host cgroup of the whole sandbox, named
by ``linux.cgroupsPath`` when the backend gives one), ``pidsMax`` becomes ``RLIMIT_NPROC``
enforced by gVisor's kernel: a host pids limit would count the Sentry's own threads (dozens
for an idle sandbox) and the sandbox dies when it cannot create one. No user namespace:
Debian's runsc cannot start its gofer inside one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cellos.core.errors import InvalidSpec
from cellos.core.spec import SECRETS_DIRECTORY, CellSpec
from cellos.hosts.host_root import HOSTNAME_MAX, host_binds, host_symlinks

__all__ = [
    "BundleConfig",
    "MissingArgv",
    "MissingCellId",
    "build_config",
    "host_binds",
    "host_symlinks",
]

OCI_VERSION = "1.0.2"


class MissingCellId(InvalidSpec):
    def __init__(self) -> None:
        super().__init__("spec.id", "a cell id is required to build a bundle")


class MissingArgv(InvalidSpec):
    def __init__(self) -> None:
        super().__init__("spec.run.argv", "a non-empty argv is required to build a bundle")


@dataclass(frozen=True)
class BundleConfig:
    #: Host path of the root filesystem (read-only).
    rootfs: str
    #: Host directory mounted read-write at ``run.workingDirectory``.
    workspace: str
    #: Host paths bound read-only into the root (empty when ``rootfs`` is complete). Host
    #: symlinks such as ``/bin -> usr/bin`` are not bound: the skeleton holds them as symlinks.
    host_binds: tuple[str, ...] = ()
    #: Extra environment (e.g. delivered secrets), merged over ``run.env``.
    extra_env: Mapping[str, str] = field(default_factory=dict)
    #: A network namespace to join (egress authority); None means runsc's ``--network=none``.
    netns_path: str | None = None
    #: Host file bound read-only at /etc/resolv.conf (the cell's DNS proxy).
    resolv_conf: str | None = None
    uid: int = 0
    gid: int = 0
    nofile: int = 1024
    #: ``linux.cgroupsPath``: where runsc puts the sandbox in every cgroup hierarchy (None:
    #: runsc's default, a cgroup named after the container at the root of each hierarchy).
    cgroups_path: str | None = None
    tmp_size_bytes: int = 64 << 20
    #: A host directory holding the secret files (``runtimeBroker``), bound read-only at
    #: ``/run/secrets``; None: no secrets as files.
    secrets_dir: str | None = None


def _mounts(spec: CellSpec, config: BundleConfig) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/tmp",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=1777", f"size={config.tmp_size_bytes}"],
        },
    ]
    for path in config.host_binds:
        mounts.append(
            {
                "destination": path,
                "type": "bind",
                "source": path,
                "options": ["rbind", "ro", "nosuid", "nodev"],
            }
        )
    if config.resolv_conf:
        mounts.append(
            {
                "destination": "/etc/resolv.conf",
                "type": "bind",
                "source": config.resolv_conf,
                "options": ["bind", "ro", "nosuid", "nodev"],
            }
        )
    mounts.append(
        {
            "destination": spec.working_directory,
            "type": "bind",
            "source": config.workspace,
            "options": ["rbind", "rw", "nosuid", "nodev"],
        }
    )
    if config.secrets_dir is not None:
        mounts.append(
            {
                "destination": SECRETS_DIRECTORY,
                "type": "bind",
                "source": config.secrets_dir,
                "options": ["rbind", "ro", "nosuid", "nodev", "noexec"],
            }
        )
    return mounts


def _resources(spec: CellSpec) -> dict[str, Any]:
    limits = spec.limits
    resources: dict[str, Any] = {}
    if limits is None:
        return resources
    if limits.memory_max_bytes is not None:
        resources["memory"] = {"limit": limits.memory_max_bytes, "swap": limits.memory_max_bytes}
    if limits.cpu_max is not None:
        resources["cpu"] = {
            "quota": limits.cpu_max.quota_micros,
            "period": limits.cpu_max.period_micros,
        }
    return resources


def build_config(
    spec: CellSpec,
    config: BundleConfig,
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``config.json`` for ``spec``; raises :class:`MissingCellId` / :class:`MissingArgv`."""
    if not spec.id:
        raise MissingCellId()
    args = list(argv if argv is not None else spec.run.argv if spec.run else ())
    if not args or not args[0]:
        raise MissingArgv()
    declared = spec.run.env if spec.run else {}
    environment = {**(env if env is not None else declared), **config.extra_env}
    namespaces: list[dict[str, str]] = [
        {"type": "pid"},
        {"type": "ipc"},
        {"type": "uts"},
        {"type": "mount"},
        {"type": "network", "path": config.netns_path}
        if config.netns_path
        else {"type": "network"},
    ]
    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
        "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"],
    }
    resources = _resources(spec)
    if resources:
        linux["resources"] = resources
    if config.cgroups_path:
        linux["cgroupsPath"] = config.cgroups_path
    rlimits = [{"type": "RLIMIT_NOFILE", "hard": config.nofile, "soft": config.nofile}]
    if spec.limits is not None and spec.limits.pids_max is not None:
        # Counts the sandbox's processes (the workload, pid 1 in gVisor, included), as
        # pidsMax counts the workload's on the cellos backend.
        nproc = spec.limits.pids_max
        rlimits.append({"type": "RLIMIT_NPROC", "hard": nproc, "soft": nproc})
    no_caps: list[str] = []
    return {
        "ociVersion": OCI_VERSION,
        "hostname": spec.id[:HOSTNAME_MAX],
        "root": {"path": config.rootfs, "readonly": True},
        "process": {
            "terminal": False,
            "user": {"uid": config.uid, "gid": config.gid},
            "args": args,
            "env": [f"{k}={v}" for k, v in sorted(environment.items())],
            "cwd": spec.working_directory,
            "capabilities": {
                k: no_caps for k in ("bounding", "effective", "inheritable", "permitted", "ambient")
            },
            "rlimits": rlimits,
            "noNewPrivileges": True,
        },
        "mounts": _mounts(spec, config),
        "linux": linux,
    }
