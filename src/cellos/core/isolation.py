"""The isolation evidence vocabulary (``lifecycle.v1.started.isolation``), one for every backend.

Each entry names one property the backend *applied* to the cell. The same property has the
same name on every backend, so that an auditor (or a policy) can ask "was the network
closed?" without knowing which backend ran the cell. docs/events.md lists every entry.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

# Namespaces (``ns:<kind>``) the cell's processes run in, new for the cell.
NS_PID: Final = "ns:pid"
NS_MOUNT: Final = "ns:mount"
NS_IPC: Final = "ns:ipc"
NS_UTS: Final = "ns:uts"
NS_NET: Final = "ns:net"
NS_CGROUP: Final = "ns:cgroup"
NS_USER: Final = "ns:user"

# Network: exactly one of these on every backend.
#: No route out of the cell: only its own loopback (no egress authority declared).
NETWORK_LOOPBACK_ONLY: Final = "network:loopback-only"
#: Default deny with the declared egress rules allowed (the cell's own netns, nft, proxies).
NETWORK_EGRESS_ALLOWLIST: Final = "network:egress-allowlist"
NETWORK_FEATURES: Final = frozenset({NETWORK_LOOPBACK_ONLY, NETWORK_EGRESS_ALLOWLIST})

# How a gVisor sandbox reaches the cell's network namespace (with egress authority only).
#: runsc's ``--network=host`` inside the cell's netns: the sandbox's sockets are host sockets
#: of that namespace (governed by the cell's nft table), not gVisor's own netstack.
GVISOR_NETWORK_HOST_IN_CELL_NETNS: Final = "gvisor:network=host-in-cell-netns"
#: How a qemu guest reaches the cell's network namespace (with egress authority only): its
#: one network device is a tap inside that namespace, routed (NATed as the cell's address)
#: through the cell's nft table; without egress authority the guest has no network device.
MICROVM_NETWORK_TAP_IN_CELL_NETNS: Final = "qemu:network=tap-in-cell-netns"

# Limits from ``run.limits`` that the backend enforces (``limit:<resource>``).
LIMIT_MEMORY: Final = "limit:memory"
LIMIT_PIDS: Final = "limit:pids"
LIMIT_CPU: Final = "limit:cpu"

# Privileges and environment of the workload.
ROOT_READ_ONLY: Final = "root:read-only"
CAPS_NONE: Final = "caps:none"
NO_NEW_PRIVS: Final = "no_new_privs"
ENV_DECLARED_ONLY: Final = "env:declared-only"
WORKSPACE_PRIVATE: Final = "workspace:private"

# Kernels other than the host's.
GVISOR_RUNSC: Final = "gvisor:runsc"
MICROVM_QEMU: Final = "microvm:qemu"
MICROVM_FIRECRACKER: Final = "microvm:firecracker"
GUEST_KERNEL: Final = "guest-kernel"
MANIFEST_VERIFIED: Final = "manifest:verified"
WORKLOAD_UNPRIVILEGED_IN_GUEST: Final = "workload:unprivileged-in-guest"


def network_enforced(features: Iterable[str]) -> bool:
    """True when the backend applied one of the network features (closed or allow-listed)."""
    return any(f in NETWORK_FEATURES for f in features)


def limit_features(memory: object, pids: object, cpu: object) -> list[str]:
    """``limit:*`` entries for the limits that are set (enforced by the caller's backend)."""
    return [
        name
        for name, value in ((LIMIT_MEMORY, memory), (LIMIT_PIDS, pids), (LIMIT_CPU, cpu))
        if value is not None
    ]
