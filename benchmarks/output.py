#!/usr/bin/env python3
"""Output benchmark: the live relay's throughput, and what live output adds to a ``true`` cell.

Throughput phase, each round in a shuffled order: ``bare`` runs ``sh -c 'cat /dev/zero | head
-c SIZE'`` with its stdout on /dev/null; ``stub/relay`` runs the same pipeline as a ``stub``
cell through one in-process ``Supervisor`` whose output goes where ``cellos-supervisor``'s goes
(redaction stage, sha256, the bounded durable log, the terminal relay's queue and writer
thread), with the relay writing to /dev/null. Throughput = SIZE / time; acceptance: the relay
keeps at least 0.5x the bare pipeline's throughput (time ratio <= 2).

``/bin/true`` phase: a ``cellos`` (default; ``--true-backend``) cell through a warm
supervisor, measured by two child processes in the same rounds: one importing this tree's
``src/`` and one importing ``--baseline-src`` (e.g. ``git archive`` of the commit before live
output, unpacked). Acceptance: p50(this tree) - p50(baseline) <= 0.3 ms.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import harness
from harness import BenchError, Series

BARE = "bare"
RELAY = "stub/relay"
TRUE_ADDED_MS = 0.3
THROUGHPUT_MIN = 0.5


@dataclasses.dataclass(frozen=True)
class Config:
    rounds: int
    warmup: int
    seed: int
    size: int
    true_rounds: int
    true_backend: str
    baseline_src: str | None


def pipeline(size: int) -> list[str]:
    return ["/bin/sh", "-c", f"cat /dev/zero | head -c {size}"]


def throughput(config: Config, tmp: Path) -> tuple[list[Series], dict[str, Any]]:
    from cellos.core.loading import validate_document
    from cellos.output.relay import TerminalRelay
    from cellos.supervisor.composition import build_supervisor

    env = {
        "CELLOS_CELL_BACKEND": "stub",
        "CELL_OS_USE_NOOP_SINK": "1",
        "CELLOS_STATE_DIR": str(tmp / "state"),
        "CELLOS_LOG_DIR": str(tmp / "logs"),
    }
    supervisor = build_supervisor(env)
    null = os.open(os.devnull, os.O_WRONLY)
    bare, relay = Series(BARE), Series(RELAY)
    sizes: list[int] = []

    def run_bare(_index: int, record: bool) -> None:
        started = time.perf_counter_ns()
        subprocess.run(pipeline(config.size), stdout=null, check=True)
        if record:
            bare.samples.append(time.perf_counter_ns() - started)

    def run_relay(index: int, record: bool) -> None:
        document = validate_document(
            harness.cell_document(
                f"out-{index}-{random.getrandbits(32):08x}", pipeline(config.size)
            )
        )
        sink = TerminalRelay({"stdout": null, "stderr": null})
        started = time.perf_counter_ns()
        outcome = supervisor.run(document, on_output=sink)
        sink.drain()
        elapsed = time.perf_counter_ns() - started
        if outcome.exit_code != 0 or outcome.errors:
            raise BenchError(f"{RELAY}: exit {outcome.exit_code}: {outcome.errors}")
        if sink.dropped():
            raise BenchError(f"{RELAY}: the relay dropped {sink.dropped()} (it must not here)")
        sizes.append(outcome.output["stdout"]["bytes"])
        if record:
            relay.samples.append(elapsed)

    try:
        harness.run_rounds(
            config.rounds,
            config.warmup,
            [run_bare, run_relay],
            random.Random(config.seed),
            "throughput",
        )
    finally:
        os.close(null)
        supervisor.close()
    if any(s != config.size for s in sizes):
        raise BenchError(f"{RELAY}: relayed {sizes} bytes, expected {config.size}")
    rates = {
        s.name: (config.size / (harness.p50(s.samples) / 1e9) / 1e6 if s.samples else None)
        for s in (bare, relay)
    }
    return [bare, relay], {"MB_per_s_p50": rates}


# -- /bin/true: this tree against a baseline, interleaved ------------------------------------

CHILD = r"""
import sys, time, random
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
import harness
harness.ensure_cellos_importable()
env = {"CELLOS_CELL_BACKEND": sys.argv[3], "CELL_OS_USE_NOOP_SINK": "1",
       "CELLOS_STATE_DIR": sys.argv[4], "CELLOS_LOG_DIR": sys.argv[4] + "/logs"}
cells = harness.WarmCells(sys.argv[3], env)
print("ready", flush=True)
for line in sys.stdin:
    cells.run(harness.cell_document(f"t-{random.getrandbits(40):010x}", ["/bin/true"]))
    print(cells.series.samples[-1], flush=True)
cells.close()
"""


class TrueCells:
    """A child process running ``/bin/true`` cells on request, importing ``src``."""

    def __init__(self, name: str, src: Path, backend: str, state: Path) -> None:
        self.series = Series(name)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                str(src),
                str(Path(__file__).parent),
                backend,
                str(state),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(src)},
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise BenchError(f"{name}: the child did not start")

    def task(self, _index: int, record: bool) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise BenchError(f"{self.series.name}: the child failed")
        if record:
            self.series.samples.append(float(line))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(30)


def true_cost(config: Config, tmp: Path) -> tuple[list[Series], dict[str, Any]]:
    if config.baseline_src is None:
        unavailable = Series("baseline", unavailable="no --baseline-src given")
        return [unavailable], {}
    here = Path(__file__).resolve().parents[1] / "src"
    children = [
        TrueCells(f"{config.true_backend}/warm (this tree)", here, config.true_backend, tmp / "a"),
        TrueCells(
            f"{config.true_backend}/warm (baseline)",
            Path(config.baseline_src),
            config.true_backend,
            tmp / "b",
        ),
    ]
    try:
        harness.run_rounds(
            config.true_rounds,
            max(5, config.true_rounds // 10),
            [c.task for c in children],
            random.Random(config.seed),
            "true",
        )
    finally:
        for child in children:
            child.close()
    now, base = (harness.p50(c.series.samples) / 1e6 for c in children)
    return [c.series for c in children], {"added_ms_p50": now - base}


def benchmark(config: Config) -> dict[str, Any]:
    harness.ensure_cellos_importable()
    with harness.scratch("cellos-bench-out-") as tmp_name:
        tmp = Path(tmp_name)
        rows, rates = throughput(config, tmp)
        true_rows, added = true_cost(config, tmp) if config.true_rounds else ([], {})
    accept = [
        harness.acceptance(
            f"{RELAY} throughput >= {THROUGHPUT_MIN:g}x {BARE} (time <= {1 / THROUGHPUT_MIN:g}x)",
            rows[1],
            rows[0],
            1 / THROUGHPUT_MIN,
        )
    ]
    if "added_ms_p50" in added:
        accept.append(
            {
                "claim": f"/bin/true cell: live output adds <= {TRUE_ADDED_MS} ms at p50",
                "added_ms_p50": added["added_ms_p50"],
                "met": added["added_ms_p50"] <= TRUE_ADDED_MS,
            }
        )
    return {
        "benchmark": "cellos.output",
        "config": dataclasses.asdict(config),
        "host": harness.host_info(),
        "throughput": {"rows": harness.ratio_rows(rows, rows[0]), **rates},
        "true": {"rows": [{"name": s.name, **s.summary()} for s in true_rows], **added},
        "acceptance": accept,
    }


def show(report: dict[str, Any]) -> None:
    cfg = report["config"]
    print(f"throughput: {cfg['size']} bytes per run, {cfg['rounds']}+{cfg['warmup']} rounds")
    for line in harness.ratio_table(report["throughput"]["rows"], BARE):
        print("  " + line)
    for name, rate in report["throughput"]["MB_per_s_p50"].items():
        print(f"  {name}: {rate:.0f} MB/s at p50" if rate else f"  {name}: n/a")
    if report["true"]["rows"]:
        print(f"/bin/true cells ({cfg['true_rounds']} rounds, interleaved):")
        for row in report["true"]["rows"]:
            print(f"  {row['name']}: p50 {harness.fmt_ms(row['p50_ms'])} ms, "
                  f"p90 {harness.fmt_ms(row['p90_ms'])} ms")  # fmt: skip
    for acc in report["acceptance"]:
        if "added_ms_p50" in acc:
            print(harness.added_acceptance_line(acc["claim"], acc["added_ms_p50"], acc["met"]))
        else:
            print(harness.acceptance_line(acc))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_round_options(parser, rounds=5, warmup=1)
    parser.add_argument("--size", type=harness.nonnegative, default=500_000_000)
    parser.add_argument("--true-rounds", type=harness.nonnegative, default=200)
    parser.add_argument("--true-backend", default="cellos", choices=["stub", "cellos"])
    parser.add_argument("--baseline-src", help="src/ of the tree to compare /bin/true against")
    args = parser.parse_args(argv)
    config = Config(
        args.rounds, args.warmup, args.seed, args.size, args.true_rounds, args.true_backend,
        args.baseline_src,
    )  # fmt: skip
    return harness.emit(lambda: benchmark(config), args.json, show)


if __name__ == "__main__":
    raise SystemExit(main())
