"""What a cell can leave on the host, as one snapshot to compare before and after a test.

Covers processes (sandbox launchers, runsc, VMMs), cgroups in every hierarchy, mounts, network
namespaces, links, nft tables, the cell-state store (records, locks, slots, runsc roots) and
CellOS's temp dirs. The snapshot is host-wide: a test compares its own before and after, so
that only what appeared during the test counts (another run on the machine at the same time
can still interfere; CI runs one suite at a time).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

#: Command-line markers of the host processes a cell's backend starts.
PROCESS_MARKERS = (b"cellos-sandbox", b"runsc", b"qemu-system")
DEFAULT_STATE_ROOT = "/run/cellos"


@dataclass(frozen=True)
class Snapshot:
    processes: frozenset[str]
    cgroups: frozenset[str]
    mounts: frozenset[str]
    netns: frozenset[str]
    links: frozenset[str]
    nft_tables: frozenset[str]
    state: frozenset[str]
    temp_dirs: frozenset[str]


def _processes() -> frozenset[str]:
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != b"Z" and any(m in cmdline for m in PROCESS_MARKERS):
            shown = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.add(f"{entry}:{shown}")
    return frozenset(found)


def _cgroups() -> frozenset[str]:
    """Directories named after cells (``cellos-*``, runsc's ``cellos-*`` containers) at the
    first two levels of every mounted hierarchy."""
    found = set()
    roots = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        parts = line.split()
        fstype = parts[parts.index("-") + 1]
        if fstype in ("cgroup", "cgroup2"):
            roots.add(parts[4])
    for root in roots:
        for level1 in _subdirs(root):
            if os.path.basename(level1).startswith("cellos"):
                found.add(level1)
            for level2 in _subdirs(level1):
                if os.path.basename(level2).startswith("cellos"):
                    found.add(level2)
    return frozenset(found)


def _subdirs(path: str) -> list[str]:
    try:
        return [e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _mounts() -> frozenset[str]:
    return frozenset(
        line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
    )


def _listdir(path: str) -> frozenset[str]:
    try:
        return frozenset(os.listdir(path))
    except OSError:
        return frozenset()


def _nft_tables() -> frozenset[str]:
    nft = shutil.which("nft") or ("/usr/sbin/nft" if os.path.exists("/usr/sbin/nft") else None)
    if nft is None or os.geteuid() != 0:
        return frozenset()
    out = subprocess.run([nft, "list", "tables"], capture_output=True, text=True, check=False)
    return frozenset(line for line in out.stdout.splitlines() if "cellos" in line)


def _state(roots: tuple[str, ...]) -> frozenset[str]:
    found = set()
    for root in roots:
        for sub in ("cells", "runsc", "net/slots", "microvm-pool", "microvm-pool/guests"):
            found |= {f"{root}/{sub}/{name}" for name in _listdir(os.path.join(root, sub))}
    return frozenset(found)


def snapshot(state_roots: tuple[str, ...] = ()) -> Snapshot:
    roots = (DEFAULT_STATE_ROOT, *state_roots)
    return Snapshot(
        processes=_processes(),
        cgroups=_cgroups(),
        mounts=_mounts(),
        netns=_listdir("/run/netns"),
        links=frozenset(n for n in _listdir("/sys/class/net") if n.startswith("cv")),
        nft_tables=_nft_tables(),
        state=_state(roots),
        temp_dirs=frozenset(n for n in _listdir(tempfile.gettempdir()) if n.startswith("cellos")),
    )


def left_behind(
    before: Snapshot, after: Snapshot, foreign: tuple[str, ...] = ()
) -> dict[str, set[str]]:
    """What appeared between the two snapshots, by kind (empty: nothing), except what
    mentions one of the ``foreign`` paths (e.g. another pytest session's temp dir)."""
    found = {}
    for f in fields(Snapshot):
        if SHARED_HOST and f.name in HOST_WIDE:
            continue
        new = {
            item
            for item in set(getattr(after, f.name)) - set(getattr(before, f.name))
            if not any(path in item for path in foreign)
            # A named netns is a mount too: host-wide like ``netns`` on a shared host.
            and not (SHARED_HOST and f.name == "mounts" and item.startswith("/run/netns/"))
        }
        if new:
            found[f.name] = new
    return found


#: Set on a development machine where other suites run at the same time: only what names this
#: session's own paths is compared (cgroups, nft tables, links cannot be told apart). CI never
#: sets it.
SHARED_HOST = os.environ.get("CELLOS_TEST_SHARED_HOST") == "1"
HOST_WIDE = ("cgroups", "mounts", "netns", "links", "nft_tables", "processes", "temp_dirs")


def other_sessions(basetemp: Path) -> tuple[str, ...]:
    """Temp dirs of other pytest sessions running on this machine at the same time."""
    parent = basetemp.parent
    return tuple(str(p) + "/" for p in parent.glob("pytest-*") if p != basetemp)


def assert_nothing_left(
    before: Snapshot, state_roots: tuple[str, ...] = (), foreign: tuple[str, ...] = ()
) -> None:
    """Fails naming every kind of residue that appeared since ``before``. Processes may take a
    moment to be gone after their killer returned: they get a short wait."""
    import time

    deadline = time.monotonic() + 3.0
    while True:
        found = left_behind(before, snapshot(state_roots), foreign)
        if not found or time.monotonic() > deadline or set(found) != {"processes"}:
            break
        time.sleep(0.05)
    assert not found, f"residue left behind: {found}"
