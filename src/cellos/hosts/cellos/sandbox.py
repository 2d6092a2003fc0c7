"""The bubblewrap command line of a cell (a pure function of the plan).

bubblewrap (Debian's ``bubblewrap``) does the namespace and mount work that every sandbox
needs and that is easy to get subtly wrong by hand: new pid/mount/ipc/uts/net (and, when not
root, user) namespaces, a tmpfs root built from read-only binds and entered with
``pivot_root``, a fresh ``/proc``, a minimal ``/dev``, a private ``/tmp``, ``no_new_privs``,
all capabilities dropped, a seccomp filter, and a minimal pid 1 that reaps orphans while the
workload runs as pid 2. ``--die-with-parent`` ties the whole cell to the supervisor.

The environment is not put on the command line (it would show in ``/proc/<pid>/cmdline``):
bubblewrap passes its own environment, which is exactly the declared one, to the workload.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cellos.hosts.host_root import host_binds, host_symlinks
from cellos.hosts.process import ENV_PROGRAM


@dataclass(frozen=True)
class SandboxPlan:
    cell_id: str
    #: Host directory mounted read-write at ``working_directory``.
    workspace: str
    working_directory: str
    #: A root filesystem directory to use instead of host binds.
    rootfs: str | None = None
    user_namespace: bool = False
    network_namespace: bool = True
    #: A prepared network namespace to join instead (the cell's egress scope).
    netns_path: str | None = None
    #: Host file bound read-only at /etc/resolv.conf (the cell's DNS proxy).
    resolv_conf: str | None = None
    seccomp_fd: int | None = None
    tmp_size_bytes: int = 64 << 20


def _host_root_args() -> list[str]:
    args: list[str] = []
    for path, target in host_symlinks().items():
        # Merged-/usr hosts: /bin -> usr/bin and friends stay symlinks inside the cell.
        args += ["--symlink", target, path]
    for path in host_binds():
        args += ["--ro-bind", path, path]
    return args


NSENTER = "/usr/bin/nsenter"


def bwrap_argv(plan: SandboxPlan, argv: Sequence[str], bwrap: str = "bwrap") -> list[str]:
    # A cell with egress authority runs in its prepared network namespace: nsenter(1) moves
    # the launcher there first, and bubblewrap then keeps that namespace instead of a new one.
    args = [NSENTER, f"--net={plan.netns_path}", "--", bwrap] if plan.netns_path else [bwrap]
    args += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if plan.network_namespace and not plan.netns_path:
        args.append("--unshare-net")
    if plan.user_namespace:
        args.append("--unshare-user")
    args += ["--die-with-parent", "--new-session", "--cap-drop", "ALL", "--hostname", plan.cell_id]
    if plan.rootfs:
        args += ["--ro-bind", plan.rootfs, "/"]
    else:
        args += _host_root_args()
    if plan.resolv_conf:
        args += ["--ro-bind", plan.resolv_conf, "/etc/resolv.conf"]
    args += ["--proc", "/proc", "--dev", "/dev"]
    args += ["--size", str(plan.tmp_size_bytes), "--perms", "1777", "--tmpfs", "/tmp"]
    args += ["--bind", plan.workspace, plan.working_directory, "--chdir", plan.working_directory]
    if plan.seccomp_fd is not None:
        args += ["--seccomp", str(plan.seccomp_fd)]
    # bubblewrap always sets PWD; env(1) removes it so the workload's environment is exactly
    # the declared one. (env would read a first word containing '=' as an assignment, so the
    # backend refuses such an argv[0] before it gets here.)
    args += ["--", ENV_PROGRAM, "-u", "PWD", "--", *argv]
    return args


def isolation_features(plan: SandboxPlan) -> list[str]:
    """What the plan applies, for the ``lifecycle.v1.started`` evidence."""
    features = ["ns:pid", "ns:mount", "ns:ipc", "ns:uts", "ns:cgroup"]
    if plan.netns_path:
        features += ["ns:net", "network:egress-allowlist"]
    elif plan.network_namespace:
        features += ["ns:net", "network:loopback-only"]
    if plan.user_namespace:
        features.append("ns:user")
    features += [
        "pivot_root",
        "rootfs:" + ("directory" if plan.rootfs else "host-ro-binds"),
        "proc:fresh",
        "dev:minimal",
        "tmp:private",
        "workspace:private",
        "no_new_privs",
        "caps:none",
        "pid1:reaper",
        "env:declared-only",
        "fds:closed",
    ]
    if plan.seccomp_fd is not None:
        features.append("seccomp:deny-list")
    return features
