"""The work queue and its workers, end to end: a real nats-server, real worker processes
(``python -m cellos.cli worker``), events counted in CELLOS_EVENTS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from cellos.core.loading import validate_document
from cellos.worker.queue import (
    CONSUMER,
    STREAM,
    connect,
    encode_document,
    ensure_queue,
    publish_document,
)
from tests.conftest import (
    CliResult,
    base_env,
    doc,
    require_sandbox,
    running_with,
    write_doc,
)

EVENTS = "CELLOS_EVENTS"
STARTED = "dev.cellos.events.cell.lifecycle.v1.started"
DESTROYED = "dev.cellos.events.cell.lifecycle.v1.destroyed"
SUMMARY = "dev.cellos.events.cell.compliance.v1.summary"
COMPLETED = "dev.cellos.events.cell.command.v1.completed"


# -- helpers ---------------------------------------------------------------------------------


def worker_env(tmp_path: Path, url: str, backend: str = "stub", **extra: str) -> dict[str, str]:
    return base_env(
        tmp_path,
        CELLOS_NATS_URL=url,
        CELLOS_CELL_BACKEND=backend,
        CELLOS_DLQ_DIR=str(tmp_path / "dlq"),
        CELLOS_LOG_LEVEL="INFO",
        **extra,
    )


class WorkerProc:
    """One ``cellos worker`` process; its stderr goes to a file the test reads."""

    def __init__(
        self,
        tmp_path: Path,
        url: str,
        name: str,
        *args: str,
        backend: str = "stub",
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = tmp_path / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cellos.cli", "worker", *args],
            env=worker_env(tmp_path, url, backend, **(env or {})),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log:
            if self.proc.poll() is not None:
                pytest.fail(f"worker {self.name} exited ({self.proc.returncode}):\n{self.log}")
            if time.monotonic() > deadline:
                pytest.fail(f"worker {self.name}: no {text!r} within {timeout} s:\n{self.log}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def workers(tmp_path: Path, nats_server: Any) -> Iterator[Callable[..., WorkerProc]]:
    started: list[WorkerProc] = []

    def start(name: str, *args: str, backend: str = "stub") -> WorkerProc:
        worker = WorkerProc(tmp_path, nats_server.url, name, *args, backend=backend)
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.stop()


def submit_all(url: str, documents: list[dict[str, Any]]) -> list[int]:
    """Queue documents through the library (one connection; the CLI is tested on its own)."""

    async def go() -> list[int]:
        nc = await connect(url, name="test-submit")
        try:
            js = nc.jetstream()
            await ensure_queue(js)
            return [
                (await publish_document(js, validate_document(d))).stream_seq for d in documents
            ]
        finally:
            await nc.close()

    return asyncio.run(go())


def _run(url: str, fn: Callable[[Any], Any]) -> Any:
    async def go() -> Any:
        nc = await nats.connect(url)
        try:
            return await fn(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(go())


def events(url: str) -> list[dict[str, Any]]:
    """Every event of CELLOS_EVENTS (signed envelopes unwrapped), in stream order."""

    async def fetch(js: Any) -> list[dict[str, Any]]:
        try:
            info = await js.stream_info(EVENTS)
        except nats.js.errors.NotFoundError:
            return []
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(EVENTS, seq)
            event = json.loads(msg.data)
            if event["type"] == "dev.cellos.events.signed_envelope.v1":
                event = event["data"]["event"]
            out.append(event)
        return out

    result: list[dict[str, Any]] = _run(url, fetch)
    return result


def count_events(url: str, phase: str) -> int:
    async def count(js: Any) -> int:
        try:
            info = await js.stream_info(EVENTS, subjects_filter=f"cellos.events.cell.*.*.{phase}")
        except nats.js.errors.NotFoundError:
            return 0
        return sum((info.state.subjects or {}).values())

    result: int = _run(url, count)
    return result


def queue_state(url: str) -> tuple[int, Any]:
    """(messages left in CELLOS_CELLS, consumer info or None)."""

    async def state(js: Any) -> tuple[int, Any]:
        try:
            messages = (await js.stream_info(STREAM)).state.messages
        except nats.js.errors.NotFoundError:
            return 0, None
        try:
            consumer = await js.consumer_info(STREAM, CONSUMER)
        except nats.js.errors.NotFoundError:
            consumer = None
        return messages, consumer

    result: tuple[int, Any] = _run(url, state)
    return result


def wait_until(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def of_cell(evs: list[dict[str, Any]], cell_id: str, event_type: str) -> list[dict[str, Any]]:
    return [e for e in evs if e["type"] == event_type and e["data"]["cellId"] == cell_id]


def marker_argv(seconds: int, before: str = "") -> tuple[list[str], str]:
    """A sleep whose duration is unique on this machine (to find leftovers by /proc)."""
    marker = f"{seconds}.{uuid.uuid4().int % 10**9:09d}"
    return ["/bin/sh", "-c", f"{before}exec /bin/sleep {marker}"], marker


def kill_leftovers(marker: str) -> None:
    for pid in running_with(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# -- the acceptance --------------------------------------------------------------------------


def test_two_workers_run_forty_cells_exactly_once(
    tmp_path: Path, nats_server: Any, workers: Callable[..., WorkerProc]
) -> None:
    pool = [workers(name, "--concurrency", "2", "--ack-wait", "5") for name in ("w1", "w2")]
    for worker in pool:
        worker.wait_for("ready:")
    ids = [f"q-{i:02d}" for i in range(40)]
    seqs = submit_all(nats_server.url, [doc(cell_id) for cell_id in ids])
    assert len(set(seqs)) == 40

    wait_until("40 compliance summaries", lambda: count_events(nats_server.url, "compliance") >= 40)
    wait_until("an empty queue", lambda: queue_state(nats_server.url)[0] == 0, timeout=10)

    evs = events(nats_server.url)
    digests = {i: encode_document(validate_document(doc(i)))[1] for i in ids}
    for cell_id in ids:
        started = of_cell(evs, cell_id, STARTED)
        destroyed = of_cell(evs, cell_id, DESTROYED)
        summaries = of_cell(evs, cell_id, SUMMARY)
        assert len(started) == len(destroyed) == len(summaries) == 1, cell_id
        assert summaries[0]["data"]["outcome"] == "succeeded"
        assert destroyed[0]["data"]["outcome"] == "succeeded"
        delivery = started[0]["data"]["delivery"]
        assert delivery["attempt"] == 1 and delivery["previousRunIds"] == []
        assert delivery["stream"] == STREAM and delivery["streamSeq"] in seqs
        assert summaries[0]["data"]["delivery"] == delivery
        # The message id (Nats-Msg-Id) of a queued document is the run's specDigest.
        assert started[0]["data"]["specDigest"] == digests[cell_id]
        # One run: every event of the cell carries the same run id.
        assert len({e["cellosrunid"] for e in evs if e["data"].get("cellId") == cell_id}) == 1
    assert len([e for e in evs if e["type"] == SUMMARY]) == 40
    # Both workers took part, and between them ran every cell once.
    ran = Counter(
        line.split("running cell ")[1].split()[0]
        for w in pool
        for line in w.log.splitlines()
        if "running cell " in line
    )
    assert sorted(ran) == ids and set(ran.values()) == {1}
    assert all("running cell" in w.log for w in pool), [w.log for w in pool]
    _, consumer = queue_state(nats_server.url)
    assert consumer.num_ack_pending == 0 and consumer.num_redelivered == 0


@pytest.mark.parametrize("backend", ["stub", "cellos"])
def test_killed_worker_cell_is_redelivered_and_names_the_first_run(
    tmp_path: Path, nats_server: Any, workers: Callable[..., WorkerProc], backend: str
) -> None:
    """kill -9 of the worker running a cell: the other worker (same host, same state
    directory) runs it again after the ack wait, and the new run names the first one."""
    if backend == "cellos":
        require_sandbox()
    pool = [workers(name, "--ack-wait", "2", backend=backend) for name in ("w1", "w2")]
    for worker in pool:
        worker.wait_for("ready:")
    argv, marker = marker_argv(3)
    try:
        submit_all(nats_server.url, [doc("long-1", argv=argv)])
        wait_until("the first run to start", lambda: count_events(nats_server.url, "started") == 1)
        victim = next(w for w in pool if "running cell long-1" in w.log)
        survivor = next(w for w in pool if w is not victim)
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)

        wait_until(
            "the redelivered run to complete",
            lambda: count_events(nats_server.url, "compliance") == 1,
            timeout=30,
        )
        wait_until("an empty queue", lambda: queue_state(nats_server.url)[0] == 0, timeout=10)
    finally:
        kill_leftovers(marker)

    evs = events(nats_server.url)
    first, second = of_cell(evs, "long-1", STARTED)
    assert first["data"]["delivery"]["attempt"] == 1
    assert second["data"]["delivery"] == {
        "attempt": 2,
        "stream": STREAM,
        "streamSeq": first["data"]["delivery"]["streamSeq"],
        "previousRunIds": [first["cellosrunid"]],
    }
    (summary,) = of_cell(evs, "long-1", SUMMARY)
    assert summary["cellosrunid"] == second["cellosrunid"]
    assert summary["data"]["outcome"] == "succeeded"
    assert summary["data"]["delivery"]["previousRunIds"] == [first["cellosrunid"]]
    assert "running cell long-1 (attempt 2" in survivor.log
    # The dead worker's run never finished: no destroyed event of its own (the cellos backend's
    # reaper reports the dead cell's remains under a run id of its own, reason "reaped").
    destroyed = of_cell(evs, "long-1", DESTROYED)
    finished = [e["cellosrunid"] for e in destroyed if e["data"].get("reason") != "reaped"]
    assert finished == [second["cellosrunid"]]
    assert not (tmp_path / "state" / "cells" / "long-1").exists()


def test_the_same_cell_id_never_runs_twice_at_once(
    tmp_path: Path, nats_server: Any, workers: Callable[..., WorkerProc]
) -> None:
    """Two different documents with one cell id, two idle workers: the runs do not overlap."""
    pool = [workers(name, "--ack-wait", "2") for name in ("w1", "w2")]
    for worker in pool:
        worker.wait_for("ready:")
    submit_all(
        nats_server.url,
        [doc("twin", argv=["/bin/sleep", "1"]), doc("twin", argv=["/bin/sleep", "1.0"])],
    )
    wait_until("both runs", lambda: count_events(nats_server.url, "compliance") == 2, timeout=20)
    evs = events(nats_server.url)
    started = of_cell(evs, "twin", STARTED)
    destroyed = of_cell(evs, "twin", DESTROYED)
    assert [e["data"]["outcome"] for e in of_cell(evs, "twin", SUMMARY)] == ["succeeded"] * 2
    first_end = next(e for e in destroyed if e["cellosrunid"] == started[0]["cellosrunid"])
    assert started[1]["time"] > first_end["time"], "the second run started before the first ended"
    assert any("twin is being run by" in w.log for w in pool), [w.log for w in pool]


def test_a_completed_but_unacked_cell_is_not_run_again(
    tmp_path: Path, nats_server: Any, workers: Callable[..., WorkerProc]
) -> None:
    """A worker that died between publishing the summary and acking: the redelivery is acked
    without a second run."""
    from cellos.worker.queue import ensure_consumer

    (seq,) = submit_all(nats_server.url, [doc("done-1")])

    async def half_done(js: Any) -> None:
        await ensure_consumer(js, ack_wait=1, max_deliver=5)
        sub = await js.pull_subscribe_bind(durable=CONSUMER, stream=STREAM)
        (msg,) = await sub.fetch(1, timeout=5)
        assert msg.metadata.num_delivered == 1
        await js.add_stream(name=EVENTS, subjects=["cellos.events.>"])
        delivery = {"attempt": 1, "stream": STREAM, "streamSeq": seq, "previousRunIds": []}
        for phase, event_type, extra in (
            ("started", STARTED, {}),
            ("compliance", SUMMARY, {"outcome": "succeeded"}),
        ):
            event = {
                "type": event_type,
                "id": str(uuid.uuid4()),
                "cellosrunid": "run-of-a-dead-worker",
                "data": {"cellId": "done-1", "delivery": delivery, **extra},
            }
            await js.publish(
                f"cellos.events.cell.default.done-1.{phase}", json.dumps(event).encode()
            )
        # No ack: the worker "died" here.

    _run(nats_server.url, half_done)
    worker = workers("w1", "--ack-wait", "2")
    wait_until("the redelivery to be settled", lambda: queue_state(nats_server.url)[0] == 0)
    assert "cell done-1 already ran to completion (run run-of-a-dead-worker)" in worker.log
    assert count_events(nats_server.url, "started") == 1  # only the dead worker's


# -- submit ----------------------------------------------------------------------------------


def test_submit_refuses_an_invalid_document_and_deduplicates(
    tmp_path: Path, nats_server: Any, cellos_cli: Callable[..., CliResult]
) -> None:
    env = base_env(tmp_path, CELLOS_NATS_URL=nats_server.url)
    bad = write_doc(tmp_path / "bad.yaml", doc("bad..id"))
    result = cellos_cli(["submit", str(bad)], env)
    assert result.code == 2, result
    assert result.stderr.startswith("error: spec.id: "), result
    assert result.stdout == ""
    assert queue_state(nats_server.url)[0] == 0
    # A document the run would refuse is refused before anything is queued.
    unsupported = write_doc(tmp_path / "rb.yaml", doc("rb-1", run={"secretDelivery": "bogus"}))
    result = cellos_cli(["submit", str(unsupported)], env)
    assert result.code == 2, result
    assert result.stderr.startswith(
        "error: spec.run.secretDelivery: must be 'env' or 'runtimeBroker' or 'runtimeLeasedBroker'"
    ), result
    assert queue_state(nats_server.url)[0] == 0

    good = write_doc(tmp_path / "good.yaml", doc("sub-1", correlation={"tenantId": "acme"}))
    first = cellos_cli(["submit", str(good), "--nats", nats_server.url], base_env(tmp_path))
    again = cellos_cli(["submit", str(good)], env)
    assert first.code == again.code == 0, (first, again)
    assert first.stdout.strip() == again.stdout.strip() == "1"
    assert "already queued" in again.stderr
    assert queue_state(nats_server.url)[0] == 1

    async def queued(js: Any) -> Any:
        return await js.get_msg(STREAM, 1)

    msg = _run(nats_server.url, queued)
    assert msg.subject == "cellos.cells.submit.acme"
    assert validate_document(json.loads(msg.data)).spec.id == "sub-1"


def test_submit_without_a_server_fails_cleanly(
    tmp_path: Path, cellos_cli: Callable[..., CliResult]
) -> None:
    from tests.nats_server import free_port

    good = write_doc(tmp_path / "good.yaml", doc("sub-2"))
    result = cellos_cli(
        ["submit", str(good), "--nats", f"nats://127.0.0.1:{free_port()}"], base_env(tmp_path)
    )
    assert result.code == 1, result
    assert result.stderr.startswith("error: CELLOS_NATS_URL: cannot connect to nats://"), result


def test_an_invalid_document_on_the_queue_is_terminated_not_retried(
    tmp_path: Path, nats_server: Any, workers: Callable[..., WorkerProc]
) -> None:
    async def put_junk(js: Any) -> None:
        await ensure_queue(js)
        await js.publish("cellos.cells.submit.default", b'{"apiVersion": "cellos.io/v1"}')

    _run(nats_server.url, put_junk)
    submit_all(nats_server.url, [doc("after-junk")])
    worker = workers("w1", "--ack-wait", "2")
    wait_until("the valid cell", lambda: count_events(nats_server.url, "compliance") == 1)
    wait_until("an empty queue", lambda: queue_state(nats_server.url)[0] == 0, timeout=10)
    assert "CELLOS_CELLS#1: invalid document, terminated" in worker.log
    time.sleep(2.5)  # longer than the ack wait: a retried message would be back by now
    messages, consumer = queue_state(nats_server.url)
    assert messages == 0
    assert consumer.num_redelivered == 0 and consumer.num_ack_pending == 0
    assert worker.log.count("invalid document") == 1


# -- graceful shutdown -----------------------------------------------------------------------


def test_sigterm_lets_an_in_flight_cell_finish(
    tmp_path: Path, nats_server: Any, workers: Callable[..., WorkerProc]
) -> None:
    worker = workers("w1", "--ack-wait", "2")
    worker.wait_for("ready:")
    submit_all(nats_server.url, [doc("graceful-1", argv=["/bin/sleep", "2"])])
    wait_until("the run to start", lambda: count_events(nats_server.url, "started") == 1)
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(20) == 0, worker.log
    assert "finishing 1 in-flight cell(s)" in worker.log

    evs = events(nats_server.url)
    (summary,) = of_cell(evs, "graceful-1", SUMMARY)
    assert summary["data"]["outcome"] == "succeeded"
    assert len(of_cell(evs, "graceful-1", DESTROYED)) == 1
    messages, consumer = queue_state(nats_server.url)
    assert messages == 0  # acked: gone from the work queue, never to be redelivered
    assert consumer.num_ack_pending == 0 and consumer.num_redelivered == 0


def test_a_cell_that_outlives_the_grace_goes_back_to_the_queue(
    tmp_path: Path, nats_server: Any, workers: Callable[..., WorkerProc]
) -> None:
    flag = tmp_path / "second-time"
    argv, marker = marker_argv(30, before=f"test -e {flag} && exit 0; ")
    try:
        first = workers("w1", "--ack-wait", "2", "--grace", "0.5")
        first.wait_for("ready:")
        submit_all(nats_server.url, [doc("slow-1", argv=argv)])
        wait_until("the run to start", lambda: count_events(nats_server.url, "started") == 1)
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(20) == 0, first.log
        assert "grace period over: stopping 1 cell(s) (slow-1)" in first.log
        assert running_with(marker) == []
        evs = events(nats_server.url)
        (interrupted,) = of_cell(evs, "slow-1", SUMMARY)
        assert interrupted["data"]["outcome"] == "failed"
        assert interrupted["data"]["terminalState"] == "forced"
        (stopped,) = of_cell(evs, "slow-1", COMPLETED)
        assert stopped["data"]["forced"] is True
        assert stopped["data"]["reason"] == "supervisor_signal"
        assert queue_state(nats_server.url)[0] == 1  # returned, not acked

        flag.touch()
        workers("w2", "--ack-wait", "2")
        wait_until("the second run", lambda: count_events(nats_server.url, "compliance") == 2)
    finally:
        kill_leftovers(marker)
    evs = events(nats_server.url)
    _, summary = of_cell(evs, "slow-1", SUMMARY)
    assert summary["data"]["outcome"] == "succeeded"
    assert summary["data"]["delivery"]["attempt"] == 2
    assert summary["data"]["delivery"]["previousRunIds"] == [interrupted["cellosrunid"]]
