"""The launcher command line of a cell (a pure function of the plan).

``cellos-sandbox`` (see ``cellos-sandbox.c`` and :mod:`launcher`) does the namespace and mount
work in one process: it joins the cell's cgroup leaves, enters new pid/mount/ipc/uts/cgroup/net
(and, when not root, user) namespaces, builds a root of read-only binds on a tmpfs and enters it
with ``pivot_root``, mounts a fresh ``/proc`` (kernel knobs covered read-only), a minimal
``/dev``, a private ``/tmp`` and the workspace, then runs a pid 1 that reaps orphans while the
workload, pid 2 in its own session, gets ``no_new_privs``, no capabilities, Landlock and the
seccomp filter, and nothing but stdio open.

The environment is not put on the command line (it would show in ``/proc/<pid>/cmdline``):
the launcher passes its own environment, which is exactly the declared one, to the workload.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import msgspec

from cellos.core import isolation as iso
from cellos.hosts.host_root import HOSTNAME_MAX, host_binds, host_symlinks

#: Where a cell with ``secretInjection`` finds the CAs it trusts (host CAs + its own CA).
CA_BUNDLE_PATH = "/etc/cellos/ca-bundle.pem"


class SandboxPlan(msgspec.Struct, frozen=True):
    cell_id: str
    #: Host directory mounted read-write at ``working_directory``.
    workspace: str
    working_directory: str
    #: A root filesystem directory to use instead of host binds.
    rootfs: str | None = None
    user_namespace: bool = False
    #: A prepared network namespace to join instead of a new empty one (the egress scope).
    netns_path: str | None = None
    #: Host file bound read-only at /etc/resolv.conf (the cell's DNS proxy).
    resolv_conf: str | None = None
    #: Host file bound read-only at :data:`CA_BUNDLE_PATH` (the cell's CA bundle when the
    #: cell's L7 proxy injects secrets).
    ca_bundle: str | None = None
    #: ``cgroup.procs`` files of the cell's leaves, joined before any namespace exists.
    cgroup_procs: tuple[str, ...] = ()
    #: The Landlock ABI the kernel offers (0: none; then no Landlock is applied).
    landlock_abi: int = 0
    #: (uid, gid) the workload runs as; None: the supervisor's own (mapped in its user namespace).
    workload_user: tuple[int, int] | None = None
    seccomp_fd: int | None = None
    error_fd: int | None = None
    #: A sealed memfd of secrets for /run/secrets (``secret_files.sealed_memfd``).
    secrets_fd: int | None = None
    #: Seconds after the workload's start when the cell's pid 1 removes the secret files.
    secret_lease_seconds: int | None = None
    tmp_size_bytes: int = 64 << 20


def _host_root_args() -> list[str]:
    args: list[str] = []
    for path, target in host_symlinks().items():
        # Merged-/usr hosts: /bin -> usr/bin and friends stay symlinks inside the cell.
        args += ["--symlink", target, path]
    for path in host_binds():
        args += ["--ro-bind", path, path]
    return args


#: Processes of a cell that are the launcher's, not the workload's: the outer process (outside
#: the cell's pid namespace) and the cell's pid 1. They live in the cell's cgroup leaves.
LAUNCHER_PROCESSES = 2


def launcher_argv(plan: SandboxPlan, argv: Sequence[str], launcher: str) -> list[str]:
    # The supervisor's pid: a launcher whose supervisor died before it started does nothing.
    args = [launcher, "--parent", str(os.getpid()), "--hostname", plan.cell_id[:HOSTNAME_MAX]]
    for procs in plan.cgroup_procs:
        args += ["--cgroup", procs]
    if plan.netns_path:
        args += ["--netns", plan.netns_path]
    if plan.user_namespace:
        args.append("--userns")
    args += ["--rootfs", plan.rootfs] if plan.rootfs else _host_root_args()
    if plan.resolv_conf:
        args += ["--ro-bind", plan.resolv_conf, "/etc/resolv.conf"]
    if plan.ca_bundle:
        args += ["--ro-bind", plan.ca_bundle, CA_BUNDLE_PATH]
    args += ["--tmp-size", str(plan.tmp_size_bytes)]
    args += ["--workspace", plan.workspace, plan.working_directory]
    if plan.landlock_abi:
        args.append("--landlock")
    if plan.workload_user is not None:
        args += ["--user", str(plan.workload_user[0]), str(plan.workload_user[1])]
    if plan.seccomp_fd is not None:
        args += ["--seccomp", str(plan.seccomp_fd)]
    if plan.error_fd is not None:
        args += ["--error-fd", str(plan.error_fd)]
    if plan.secrets_fd is not None:
        args += ["--secrets", str(plan.secrets_fd)]
        if plan.secret_lease_seconds is not None:
            args += ["--secret-lease", str(plan.secret_lease_seconds)]
    return [*args, "--", *argv]


def isolation_features(plan: SandboxPlan) -> list[str]:
    """What the plan applies, for the ``lifecycle.v1.started`` evidence."""
    features = [iso.NS_PID, iso.NS_MOUNT, iso.NS_IPC, iso.NS_UTS, iso.NS_CGROUP, iso.NS_NET]
    features.append(iso.NETWORK_EGRESS_ALLOWLIST if plan.netns_path else iso.NETWORK_LOOPBACK_ONLY)
    if plan.user_namespace:
        features.append(iso.NS_USER)
    if plan.workload_user is not None:
        features.append(f"user:{plan.workload_user[0]}")
    features += [
        "pivot_root",
        "rootfs:" + ("directory" if plan.rootfs else "host-ro-binds"),
        iso.ROOT_READ_ONLY,
        "proc:fresh",
        "proc:knobs-read-only",
        "dev:minimal",
        "tmp:private",
        iso.WORKSPACE_PRIVATE,
        iso.NO_NEW_PRIVS,
        iso.CAPS_NONE,
        "pid1:reaper",
        iso.ENV_DECLARED_ONLY,
        "fds:closed",
    ]
    if plan.landlock_abi:
        features.append(f"landlock:abi{plan.landlock_abi}")
    if plan.seccomp_fd is not None:
        features.append("seccomp:deny-list")
    return features
