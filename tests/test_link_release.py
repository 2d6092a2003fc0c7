"""Deleting a cell's veth pair at teardown (``cellos.network.link_release``): the link is gone
from the host's view when teardown returns, whoever issued the deletion, and the helper that
issues it gets nothing of the supervisor but the nftables socket it holds on to."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from cellos.core.spec import EgressRule
from cellos.hosts.procfs import is_running, iter_procs
from cellos.network import link_release, nft, nft_netlink, scope
from cellos.network.netlink import NETLINK_NETFILTER
from tests.conftest import require_host
from tests.test_network import _ready, network_residue


@pytest.fixture
def scope_net(tmp_path: Path) -> Iterator[scope.CellNetwork]:
    """A real scope (namespace, veth pair, table) with one CIDR rule; removed afterwards
    if the test did not."""
    _ready()
    before = network_residue()
    rules = scope.resolve_rules([msgspec.convert({"cidr": "192.0.2.0/24", "port": 9}, EgressRule)])
    net = scope.plan(f"lr-{os.getpid()}", rules, str(tmp_path / "state"), scope.DEFAULT_POOL)
    scope.create(net)
    try:
        yield net
    finally:
        scope.destroy(net.record(), delete_link=True)
    assert network_residue() == before


def _helper_of(parent: int) -> int:
    """The pid of ``ip -force -batch -`` started by ``parent`` (from a thread of its own, so
    it may take a moment to appear)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for proc in iter_procs():
            if proc.ppid != parent:
                continue
            try:
                argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[1:4] == [b"-force", b"-batch", b"-"]:
                return proc.pid
        time.sleep(0.005)
    raise AssertionError("no link helper was started with the scope")


def _netfilter_inodes() -> set[int]:
    inodes = set()
    for line in Path("/proc/net/netlink").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1]) == NETLINK_NETFILTER:
            inodes.add(int(fields[-1]))
    return inodes


def _process_sockets() -> list[int]:
    """This process's descriptors that are sockets."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                found.append(int(name))
        except OSError:
            continue  # the listing's own descriptor, closed since
    return found


def test_the_helper_gets_no_environment_and_no_descriptor_but_the_netfilter_socket(
    scope_net: scope.CellNetwork,
) -> None:
    """The helper runs as root: it must not see the supervisor's environment (secrets can be
    there) or any descriptor of it (state files, pipes of the cell) but the netfilter socket
    that wrote the table and deletes it, close-on-exec in the supervisor."""
    require_host(link_release.ip_binary() is not None, "iproute2 ip (scripts/setup.sh)")
    ours = {nft_netlink.socket_fd()}
    assert not any(os.get_inheritable(fd) for fd in ours)
    assert _netfilter_inodes() & {os.fstat(fd).st_ino for fd in _process_sockets()} == {
        os.fstat(fd).st_ino for fd in ours
    }, "the process has a netfilter socket beside the one the helper holds"
    our_inodes = {os.fstat(fd).st_ino for fd in ours}
    assert our_inodes <= _netfilter_inodes()
    pid = _helper_of(os.getpid())
    assert Path(f"/proc/{pid}/environ").read_bytes() == b""
    fds, inodes = _descriptors_once_ready(pid, our_inodes)
    assert fds.pop(0).startswith("pipe:")
    assert fds.pop(1) == fds.pop(2) == "/dev/null"
    assert all(target.startswith("socket:[") for target in fds.values()), fds
    # Beside ours, only iproute2's own rtnetlink socket.
    assert our_inodes <= inodes and len(inodes - our_inodes) == 1, fds
    assert not (inodes - our_inodes) & _netfilter_inodes()

    assert scope.destroy(scope_net.record()) == []
    assert not os.path.exists(f"/sys/class/net/{scope_net.host_if}")
    _wait_ended(pid)


def test_a_helper_is_not_left_idle_when_its_link_is_gone_already(
    scope_net: scope.CellNetwork,
) -> None:
    """A link that vanished before teardown (deleted by someone else) is not this process's
    to delete: its helper is told to end, not left idle for the supervisor's life."""
    pid = _helper_of(os.getpid())
    assert scope_net.host_index is not None
    scope.host_rtnl().delete_link(scope_net.host_index, scope_net.host_if)
    assert scope.destroy(scope_net.record()) == []
    _wait_ended(pid)


def _descriptors_once_ready(pid: int, ours: set[int]) -> tuple[dict[int, str], set[int]]:
    """The helper's descriptors (number: target) and socket inodes, once iproute2 has opened
    its own rtnetlink socket (it does so after its exec, before it reads its batch)."""
    deadline = time.monotonic() + 5
    while True:
        fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        inodes = {int(t[len("socket:[") : -1]) for t in fds.values() if t.startswith("socket:[")}
        if inodes - ours or time.monotonic() >= deadline:
            return fds, inodes
        time.sleep(0.005)


def _wait_ended(pid: int) -> None:
    """Until the helper is gone or a zombie (this process's reaper thread collects it)."""
    deadline = time.monotonic() + 10
    while is_running(pid):
        assert time.monotonic() < deadline, f"the link helper {pid} did not end"
        time.sleep(0.01)


@pytest.mark.parametrize(
    "binaries",
    [("/nonexistent/ip",), ("/bin/false",)],
    ids=["no-iproute2", "helper-fails"],
)
def test_the_link_is_gone_when_teardown_returns_whoever_deletes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, binaries: tuple[str, ...]
) -> None:
    """Without iproute2 a thread of the supervisor deletes the link; a helper that fails
    (here ``false``, which exits at once) is replaced by a deletion in the caller. Either
    way nothing is reported left and the host shows no link the moment teardown returns."""
    _ready()
    assert os.access(binaries[0], os.X_OK) or not os.path.exists(binaries[0])
    monkeypatch.setattr(link_release, "IP_BINARIES", binaries)
    before = network_residue()
    rules = scope.resolve_rules([msgspec.convert({"cidr": "192.0.2.0/24", "port": 9}, EgressRule)])
    net = scope.plan(f"lr-f-{os.getpid()}", rules, str(tmp_path / "state"), scope.DEFAULT_POOL)
    try:
        scope.create(net)
        assert stat.S_ISDIR(os.stat(f"/sys/class/net/{net.host_if}").st_mode)
    except BaseException:
        scope.destroy(net.record(), delete_link=True)
        raise
    assert scope.destroy(net.record()) == []
    assert network_residue() == before


def test_a_scope_whose_table_fails_leaves_no_link_once_undone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The table is written after the link exists; when writing it fails (injected: a real
    nftables failure cannot be provoked reliably), undoing the scope deletes that link too,
    and nothing is left the moment the undo returns."""
    _ready()
    from cellos.core.errors import HostError

    before = network_residue()
    rules = scope.resolve_rules([msgspec.convert({"cidr": "192.0.2.0/24", "port": 9}, EgressRule)])
    net = scope.plan(f"lr-t-{os.getpid()}", rules, str(tmp_path / "state"), scope.DEFAULT_POOL)

    def failing_run(commands: list[object], netns: str | None = None) -> None:
        raise HostError("nftables", "injected: the table cannot be written")

    monkeypatch.setattr(nft, "run", failing_run)
    with pytest.raises(HostError, match="injected"):
        scope.create(net)
    assert scope.destroy(net.record()) == []
    assert network_residue() == before
