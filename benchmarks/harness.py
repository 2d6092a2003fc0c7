"""What every CellOS benchmark shares: rounds, statistics, references, output, errors.

A benchmark times its subject and the bare primitive it is built on (``unshare``, ``runsc
run``, a bare QEMU boot, ``python -c pass``, a raw ``js.publish``) in the same run,
interleaved in freshly shuffled rounds, so that machine noise hits both alike; it then
reports, per measured thing, p50 and p90 and the ratios of each to the reference's.

Imported by the scripts beside it as ``import harness`` (a script's own directory is on
``sys.path``); ``tests/test_bench_harness.py`` loads it by path.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRUE = "/bin/true"


class BenchError(RuntimeError):
    """A measured run did not do what it should (non-zero exit, errors, residue)."""


def ensure_cellos_importable() -> bool:
    """Make ``cellos`` importable; return True when ``src/`` had to be put on ``sys.path``
    (children started by a benchmark then need it on ``PYTHONPATH`` too)."""
    if importlib.util.find_spec("cellos") is not None:
        return False
    sys.path.insert(0, str(REPO / "src"))
    if importlib.util.find_spec("cellos") is None:
        raise BenchError(f"cannot import cellos (not installed, and not in {REPO / 'src'})")
    return True


# -- statistics ------------------------------------------------------------------------------


#: The cold phases' reference: the same interpreter started for nothing.
PYTHON_PASS = "python -c pass"


def cli_command() -> list[str]:
    """The ``cellos-supervisor`` entry point next to the interpreter, else ``-m``."""
    script = Path(sys.executable).with_name("cellos-supervisor")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "cellos.supervisor.cli"]


def child_env(home: Path, src_added: bool) -> dict[str, str]:
    """The environment of a benchmark's child processes: nothing inherited but PATH, events
    to the noop sink, and the same cellos as this process (PYTHONPATH kept, ``src/`` added
    when :func:`ensure_cellos_importable` had to)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "CELL_OS_USE_NOOP_SINK": "1",
    }
    path = [str(REPO / "src")] if src_added else []
    path += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if path:
        env["PYTHONPATH"] = os.pathsep.join(path)
    return env


def scratch(prefix: str) -> tempfile.TemporaryDirectory[str]:
    """A temporary directory beside CellOS's default state root (``/run`` as root, the user's
    runtime directory otherwise), so cells keep their state where a real deployment keeps it:
    the same directory operations on ``/tmp`` can cost several times more (measured here: a
    cell directory's removal 2.2 ms on ``/tmp`` vs 0.3 ms on ``/run``, same disk)."""
    from cellos.hosts.state import default_state_root

    parent = os.path.dirname(default_state_root())
    usable = os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)
    return tempfile.TemporaryDirectory(prefix=prefix, dir=parent if usable else None)


def p50(samples: Sequence[float]) -> float:
    return float(statistics.median(samples))


def p90(samples: Sequence[float]) -> float:
    """Nearest-rank 90th percentile: an observed sample, never an interpolation."""
    ordered = sorted(samples)
    return float(ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)])


@dataclass
class Series:
    """Samples of one measured thing, in nanoseconds (or any unit: ratios do not care)."""

    name: str
    samples: list[float] = field(default_factory=list)
    #: Why it could not be measured on this host (None: it was, or will be).
    unavailable: str | None = None

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"n": 0, "p50_ms": None, "p90_ms": None, "min_ms": None}
        return {
            "n": len(self.samples),
            "p50_ms": p50(self.samples) / 1e6,
            "p90_ms": p90(self.samples) / 1e6,
            "min_ms": min(self.samples) / 1e6,
        }


def ratio(
    series: Series, base: Series, stat: Callable[[Sequence[float]], float] = p50
) -> float | None:
    """stat(series) / stat(base), or None when either has no samples."""
    if not series.samples or not base.samples:
        return None
    return stat(series.samples) / stat(base.samples)


def ratio_rows(
    measured: Sequence[Series], reference: Series, extra: Sequence[Series] = ()
) -> list[dict[str, Any]]:
    """One row per series: p50/p90 and their ratios to the reference's p50/p90 (and the p50
    ratio to each extra reference). Series never measured are listed with why."""
    rows = []
    for s in measured:
        rows.append(
            {
                "name": s.name,
                **s.summary(),
                "unavailable": s.unavailable if not s.samples else None,
                "reference": reference.name,
                "ratio_p50": ratio(s, reference),
                "ratio_p90": ratio(s, reference, p90),
                "extra_ratio_p50": {e.name: ratio(s, e) for e in extra},
            }
        )
    return rows


# -- measuring -------------------------------------------------------------------------------


def time_ns(action: Callable[[], object]) -> int:
    start = time.perf_counter_ns()
    action()
    return time.perf_counter_ns() - start


def run_checked(
    argv: Sequence[str],
    what: str,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    **popen: Any,
) -> None:
    """Run a measured child: no stdin, stdout discarded, stderr kept for the error message.

    No ``timeout=`` on purpose: with one, ``Popen.wait`` polls with growing sleeps (up to
    50 ms) instead of blocking in ``waitpid``, which would inflate every sample.
    """
    proc = subprocess.run(
        list(argv),
        env=None if env is None else dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
        **popen,
    )
    if proc.returncode != 0:
        stderr = proc.stderr.decode(errors="replace").strip()
        raise BenchError(f"{what} exited {proc.returncode}: {stderr[-2000:]}")


def run_true() -> None:
    """``subprocess.run(["/bin/true"])``: what starting any process costs, for scale."""
    if subprocess.run([TRUE], check=False).returncode != 0:
        raise BenchError(f"{TRUE} failed")


def probe(argv: Sequence[str], what: str, **run: Any) -> str | None:
    """Run a reference command once, untimed: None when it works, else why it does not."""
    try:
        run_checked(argv, what, **run)
    except (BenchError, OSError) as exc:
        return str(exc).splitlines()[-1] if str(exc) else type(exc).__name__
    return None


#: The bare isolation primitive (new pid, mount, net, uts and ipc namespaces; needs root).
UNSHARE_ARGV = ("unshare", "--pid", "--fork", "--mount", "--net", "--uts", "--ipc", "true")


def command_reference(name: str, argv: Sequence[str], **run: Any) -> tuple[Series, Task | None]:
    """A reference command, probed once untimed: its series and the round task timing it, or
    no task (and the series marked unavailable, with why) when it does not run here."""
    import os

    series = Series(name)
    why = probe(argv, name, **run)
    if why is not None:
        series.unavailable = why if os.geteuid() == 0 else f"not root: {why}"
        return series, None
    return series, timed(series, lambda: run_checked(argv, name, **run))


#: One measurement of a round: called with the round index and whether it is recorded.
Task = Callable[[int, bool], None]


def timed(series: Series, action: Callable[[], object]) -> Task:
    """A task that times ``action`` and records it into ``series`` outside warm-up."""

    def task(_index: int, record: bool) -> None:
        elapsed = time_ns(action)
        if record:
            series.samples.append(elapsed)

    return task


def run_rounds(
    rounds: int, warmup: int, tasks: Sequence[Task], rng: random.Random, label: str = "round"
) -> None:
    """Run every task once per round, in a freshly shuffled order; the first ``warmup``
    rounds are not recorded. Progress goes to stderr when it is a terminal."""
    order = list(tasks)
    show = sys.stderr.isatty()
    total = warmup + rounds
    for index in range(total):
        rng.shuffle(order)
        if show:
            sys.stderr.write(f"\r{label} {index + 1}/{total}".ljust(40))
            sys.stderr.flush()
        for task in order:
            task(index, index >= warmup)
    if show:
        sys.stderr.write("\r" + " " * 40 + "\r")
        sys.stderr.flush()


# -- acceptance ------------------------------------------------------------------------------


def acceptance(claim: str, subject: Series, reference: Series, target: float) -> dict[str, Any]:
    """``p50(subject) / p50(reference) <= target``, with the p90 ratio alongside."""
    r50, r90 = ratio(subject, reference), ratio(subject, reference, p90)
    why = None
    if r50 is None:
        missing = subject if not subject.samples else reference
        why = f"{missing.name} not measured" + (
            f": {missing.unavailable}" if missing.unavailable else ""
        )
    return {
        "claim": claim,
        "target_max_ratio": target,
        "ratio_p50": r50,
        "ratio_p90": r90,
        "met": r50 is not None and r50 <= target,
        "not_measured": why,
    }


def acceptance_line(acc: Mapping[str, Any]) -> str:
    """One line ending in MET or NOT MET (a claim that could not be measured is NOT MET)."""
    verdict = "MET" if acc["met"] else "NOT MET"
    if acc["ratio_p50"] is None:
        return f"acceptance: {acc['claim']}: not measured ({acc['not_measured']}): {verdict}"
    return (
        f"acceptance: {acc['claim']}: {acc['ratio_p50']:.2f}x at p50 "
        f"(p90 {acc['ratio_p90']:.2f}x): {verdict}"
    )


def added_acceptance_line(claim: str, added_ms: float | None, met: bool) -> str:
    """One line for a claim on milliseconds added per cell (None: not measured)."""
    value = "n/a" if added_ms is None else f"{added_ms:+.2f} ms"
    return f"acceptance: {claim}: {value}: {'MET' if met else 'NOT MET'}"


# -- output ----------------------------------------------------------------------------------


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if value < 100 else f"{value:.1f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Plain-text columns: the first left-aligned, the others right-aligned."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def ratio_table(
    rows: Sequence[Mapping[str, Any]], ref_label: str, unit: str = "ms", scale: float = 1.0
) -> list[str]:
    """The rows of :func:`ratio_rows` as a table: p50, p90 (in ``unit``: milliseconds times
    ``scale``), x reference at p50 and at p90, then the p50 ratio to each extra reference."""
    extras = list(rows[0]["extra_ratio_p50"]) if rows else []
    headers = [
        "",
        "n",
        f"p50 {unit}",
        f"p90 {unit}",
        f"x {ref_label} p50",
        f"x {ref_label} p90",
        *(f"x {e} p50" for e in extras),
    ]
    cells = [
        [
            r["name"],
            str(r["n"]),
            fmt_ms(None if r["p50_ms"] is None else r["p50_ms"] * scale),
            fmt_ms(None if r["p90_ms"] is None else r["p90_ms"] * scale),
            fmt_ratio(r["ratio_p50"]),
            fmt_ratio(r["ratio_p90"]),
            *(fmt_ratio(r["extra_ratio_p50"][e]) for e in extras),
        ]
        for r in rows
    ]
    lines = table(headers, cells)
    lines += [f"  {r['name']}: not measured ({r['unavailable']})" for r in rows if r["unavailable"]]
    return lines


def emit(
    produce: Callable[[], dict[str, Any]], as_json: bool, show: Callable[[dict[str, Any]], None]
) -> int:
    """Run a benchmark and print its report (JSON or text); exit status 1 on failure."""
    try:
        report = produce()
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ImportError as exc:
        print(f"error: {exc}; run with the project's environment (.venv)", file=sys.stderr)
        return 1
    if as_json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        show(report)
    return 0


def nonnegative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def add_round_options(parser: argparse.ArgumentParser, rounds: int, warmup: int) -> None:
    """``--rounds``, ``--warmup``, ``--seed`` and ``--json``, with the script's defaults."""
    parser.add_argument(
        "--rounds", type=nonnegative, default=rounds, help=f"measured rounds (default {rounds})"
    )
    parser.add_argument(
        "--warmup",
        type=nonnegative,
        default=warmup,
        help=f"unrecorded rounds run first (default {warmup})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the round order shuffle")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def host_info() -> dict[str, Any]:
    import os
    import platform

    return {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }


# -- cells -----------------------------------------------------------------------------------


def cell_id(*parts: object) -> str:
    """A unique, valid cell id from this process and ``parts``."""
    import os
    import re

    return re.sub(r"[^A-Za-z0-9_-]+", "-", "-".join(["bench", str(os.getpid()), *map(str, parts)]))


def cell_document(cid: str, argv: Sequence[str] = (TRUE,), **spec: Any) -> dict[str, Any]:
    """A parsed ExecutionCell document: ``argv`` (``/bin/true``) and no exports."""
    return {
        "apiVersion": "cellos.io/v1",
        "kind": "ExecutionCell",
        "spec": {
            "id": cid,
            "lifetime": {"ttlSeconds": 60},
            "run": {"argv": list(argv), "timeoutSeconds": 30},
            **spec,
        },
    }


class WarmCells:
    """Many cells through one ``Supervisor`` built by ``build_supervisor(env)`` (what a
    worker does). One sample = ``validate_document`` of the parsed document plus
    ``Supervisor.run`` (create, spawn, wait, destroy, revoke, every event)."""

    def __init__(self, name: str, env: Mapping[str, str]) -> None:
        from cellos.core.errors import CellosError
        from cellos.supervisor.composition import build_supervisor

        self.series = Series(name)
        self.events_per_cell = 0
        #: The last cell's outcome (its events say e.g. whether a pool was hit).
        self.last_outcome: Any = None
        try:
            self._supervisor: Any = build_supervisor(dict(env))
        except CellosError as exc:
            raise BenchError(f"{name}: {exc.path}: {exc.reason}") from None

    @property
    def backend(self) -> Any:
        """The supervisor's backend object (it holds the backend's settings)."""
        return self._supervisor.backend

    def run(self, document: Mapping[str, Any], record: bool = True) -> None:
        from cellos.core.errors import CellosError
        from cellos.core.loading import validate_document

        supervisor = self._supervisor
        outcomes: list[Any] = []
        try:
            elapsed = time_ns(lambda: outcomes.append(supervisor.run(validate_document(document))))
        except CellosError as exc:
            raise BenchError(f"{self.series.name}: {exc.path}: {exc.reason}") from None
        outcome = outcomes[0]
        self.last_outcome = outcome
        if outcome.exit_code != 0 or outcome.errors or outcome.lost_events:
            errors = "; ".join(f"{e.path}: {e.reason}" for e in outcome.errors)
            raise BenchError(
                f"{self.series.name}: cell {outcome.cell_id} exited {outcome.exit_code}"
                f" (lost events: {outcome.lost_events}) {errors}"
            )
        self.events_per_cell = len(outcome.events)
        if record:
            self.series.samples.append(elapsed)

    def task(self, document: Callable[[int], Mapping[str, Any]]) -> Task:
        """A round task running the cell ``document(round index)``."""
        return lambda index, record: self.run(document(index), record)

    def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.close()
            self._supervisor = None


def residue(state_dirs: Sequence[Path]) -> list[str]:
    """Whatever cells left in their state directories (there must be nothing)."""
    left: list[str] = []
    for root in state_dirs:
        cells = root / "cells"
        if cells.is_dir():
            left += [str(p) for p in sorted(cells.iterdir())]
    return left
