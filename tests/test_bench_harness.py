"""The benchmark harness (benchmarks/harness.py): statistics, ratios, tables, acceptance lines."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the scripts import it as ``harness``
    spec.loader.exec_module(module)
    return module


harness = load("harness")


def test_p50_and_nearest_rank_p90() -> None:
    samples = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 9.0, 8.0, 7.0, 6.0]
    assert harness.p50(samples) == 5.5
    assert harness.p90(samples) == 9.0  # an observed sample, not an interpolation
    assert harness.p90([7.0]) == 7.0
    assert harness.p90(list(range(1, 21))) == 18


def test_ratio_rows_and_table() -> None:
    ref = harness.Series("ref", [1e6, 2e6, 3e6, 4e6, 100e6])
    cell = harness.Series("cell", [2e6, 4e6, 6e6, 8e6, 10e6])
    extra = harness.Series("extra", [0.5e6] * 3)
    missing = harness.Series("missing", unavailable="not root")
    rows = harness.ratio_rows([ref, cell, missing], ref, [extra])
    by = {r["name"]: r for r in rows}
    assert by["cell"]["p50_ms"] == 6.0 and by["cell"]["p90_ms"] == 10.0
    assert by["cell"]["ratio_p50"] == 2.0  # 6 / 3
    assert by["cell"]["ratio_p90"] == 0.1  # 10 / 100
    assert by["cell"]["extra_ratio_p50"] == {"extra": 12.0}
    assert by["ref"]["ratio_p50"] == 1.0
    assert by["missing"]["n"] == 0 and by["missing"]["ratio_p50"] is None
    lines = harness.ratio_table(rows, "ref")
    assert lines[0].split() == [
        "n",
        "p50",
        "ms",
        "p90",
        "ms",
        "x",
        "ref",
        "p50",
        "x",
        "ref",
        "p90",
        "x",
        "extra",
        "p50",
    ]
    cell_line = next(line for line in lines if line.startswith("cell"))
    assert cell_line.split() == ["cell", "5", "6.000", "10.000", "2.00x", "0.10x", "12.00x"]
    assert any("missing: not measured (not root)" in line for line in lines)


def test_acceptance_lines_end_in_met_or_not_met() -> None:
    ref = harness.Series("unshare", [1.0, 1.0, 1.0])
    fast = harness.Series("cellos/warm", [2.0, 2.0, 4.0])
    slow = harness.Series("cellos/cold", [9.0, 9.0, 9.0])
    met = harness.acceptance("cellos/warm <= 2.5x unshare", fast, ref, 2.5)
    assert met["met"] and met["ratio_p50"] == 2.0 and met["ratio_p90"] == 4.0
    line = harness.acceptance_line(met)
    assert line == "acceptance: cellos/warm <= 2.5x unshare: 2.00x at p50 (p90 4.00x): MET"
    not_met = harness.acceptance_line(harness.acceptance("c <= 5x u", slow, ref, 5.0))
    assert not_met.endswith(": NOT MET") and "9.00x" in not_met
    absent = harness.Series("unshare", unavailable="not root")
    unmeasured = harness.acceptance_line(harness.acceptance("c <= 2.5x u", fast, absent, 2.5))
    assert unmeasured.endswith("NOT MET") and "not root" in unmeasured


def test_rounds_interleave_shuffled_and_skip_warmup() -> None:
    calls: list[tuple[str, int, bool]] = []

    def task(name: str) -> harness.Task:
        return lambda index, record: calls.append((name, index, record))

    harness.run_rounds(3, 2, [task("a"), task("b"), task("c")], random.Random(1))
    assert len(calls) == 15
    for index in range(5):
        round_calls = [c for c in calls if c[1] == index]
        assert sorted(c[0] for c in round_calls) == ["a", "b", "c"]
        assert all(c[2] == (index >= 2) for c in round_calls)
    series = harness.Series("t")
    timed = harness.timed(series, lambda: None)
    timed(0, False)
    timed(1, True)
    assert len(series.samples) == 1 and series.samples[0] >= 0


def test_reference_command_probe() -> None:
    ok, ok_task = harness.command_reference("true", ["true"])
    assert ok.unavailable is None and ok_task is not None
    ok_task(0, True)
    assert len(ok.samples) == 1
    bad, bad_task = harness.command_reference("false", ["false"])
    assert bad_task is None and bad.unavailable and "exited 1" in bad.unavailable
    with pytest.raises(harness.BenchError, match="false exited 1"):
        harness.run_checked(["false"], "false")


@pytest.mark.parametrize(
    "script",
    ["lifecycle", "gvisor", "network", "work_queue", "microvm", "output", "secret_delivery"],
)
def test_benchmark_scripts_import_and_parse_help(script: str) -> None:
    module = load(script)
    with pytest.raises(SystemExit) as exited:
        module.main(["--help"])
    assert exited.value.code == 0


def test_an_added_milliseconds_claim_reads_the_same_in_every_benchmark() -> None:
    line = harness.added_acceptance_line
    assert line("adds <= 15 ms", 4.42, True) == "acceptance: adds <= 15 ms: +4.42 ms: MET"
    assert line("adds <= 2 ms", -0.5, True) == "acceptance: adds <= 2 ms: -0.50 ms: MET"
    assert line("adds <= 15 ms", None, False) == "acceptance: adds <= 15 ms: n/a: NOT MET"
