#!/usr/bin/env python3
"""Lifecycle benchmark: how much does a full ``/bin/true`` cell cost next to ``/bin/true``?

For each backend (``stub``, ``cellos``) a cell whose workload is ``/bin/true`` is timed in two
modes:

* **warm** -- in-process, many cells through one ``Supervisor`` instance (what a worker does):
  the time covers ``validate_document`` of the parsed document and ``Supervisor.run``
  (create, spawn, wait, destroy, revoke, every event);
* **cold** -- one CLI process per cell (``cellos-supervisor spec.json``, or
  ``python -m cellos.supervisor.cli spec.json``): the time covers the whole process
  (interpreter start, imports, reading the file, composition, the run, exit).

The machine is assumed to be noisy, so the reference measurements run in the same process,
interleaved with the cells: every round runs, in a shuffled order, each variant's cell and one
``subprocess.run(["/bin/true"])`` per variant (and, in the cold phase, one
``python -c pass`` per variant, the floor of any CLI run). Each warm round also runs, once:

* ``unshare --pid --fork --mount --net --uts --ipc true``, the bare isolation primitive (it
  needs root; when it fails it is reported as unavailable and not measured);
* the bare launch of a ``/bin/true`` cell by the sandbox launcher (``cellos-sandbox``): the
  exact command line the ``cellos`` backend builds (``launcher_argv`` of the same
  ``SandboxPlan``, for a temporary workspace, Landlock as on this kernel), with the seccomp
  program written to a pipe whose read end is passed to the launcher, as the backend does
  (no cgroup leaves). It separates the sandbox's cost from the supervisor's.

Reported per variant: median, p90, and the ratios ``median(cell) / median(reference)``; the
``cellos/warm`` ratio to ``unshare`` is checked against the target (<= 3x).

Cells use ``CELL_OS_USE_NOOP_SINK=1``, a temporary ``CELLOS_STATE_DIR``, a unique id per cell
and no exports. Two extra warm ``cellos`` variants write events to a JSONL file, unsigned and
ed25519-signed, so that the difference between them is the signing cost. Everything lives in
one temporary directory that is removed at the end.

Usage: ``python benchmarks/lifecycle.py [--cells N] [--cold-cells M] [--json]``
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import random
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parents[1]
TRUE = "/bin/true"
BACKENDS = ("stub", "cellos")
#: The bare isolation primitive the acceptance ratio is taken against (``true`` from PATH).
UNSHARE_ARGV = ("unshare", "--pid", "--fork", "--mount", "--net", "--uts", "--ipc", "true")
UNSHARE_NAME = " ".join(UNSHARE_ARGV)
#: Acceptance: median(``cellos/warm``) / median(unshare) of the same run must not exceed this.
ACCEPTANCE_VARIANT = "cellos/warm"
ACCEPTANCE_MAX_RATIO = 3.0


class BenchError(RuntimeError):
    """A measured run did not do what it should (non-zero exit, errors, residue)."""


def _cellos_importable() -> bool:
    """Make ``cellos`` importable; return True when ``src/`` had to be put on the path."""
    if importlib.util.find_spec("cellos") is not None:
        return False
    sys.path.insert(0, str(REPO / "src"))
    if importlib.util.find_spec("cellos") is None:
        raise BenchError(f"cannot import cellos (not installed, and not in {REPO / 'src'})")
    return True


# -- statistics ------------------------------------------------------------------------------


def median_ns(samples: Sequence[int]) -> float:
    return float(statistics.median(samples))


def p90_ns(samples: Sequence[int]) -> float:
    """Nearest-rank 90th percentile (an observed sample, never an interpolation)."""
    ordered = sorted(samples)
    return float(ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)])


@dataclass
class Series:
    """Samples of one measured thing, in nanoseconds."""

    name: str
    samples: list[int] = field(default_factory=list)
    #: Why the thing could not be measured on this host (None: it was measured).
    unavailable: str | None = None

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"n": 0, "median_ms": None, "p90_ms": None, "min_ms": None}
        return {
            "n": len(self.samples),
            "median_ms": median_ns(self.samples) / 1e6,
            "p90_ms": p90_ns(self.samples) / 1e6,
            "min_ms": min(self.samples) / 1e6,
        }


# -- the measured operations -----------------------------------------------------------------


def time_ns(action: Callable[[], None]) -> int:
    start = time.perf_counter_ns()
    action()
    return time.perf_counter_ns() - start


def run_true() -> None:
    """The baseline, exactly as the issue states it.

    No ``timeout=``: with one, ``Popen.wait`` polls with growing sleeps (up to 50 ms) instead
    of blocking in ``waitpid``, which would inflate every measured child. Cells are bounded by
    their own ``timeoutSeconds`` / ``ttlSeconds``.
    """
    proc = subprocess.run([TRUE], check=False)
    if proc.returncode != 0:
        raise BenchError(f"{TRUE} exited {proc.returncode}")


def run_child(argv: Sequence[str], env: Mapping[str, str], cwd: Path, what: str) -> None:
    """A CLI-like child: no stdin, stdout discarded, stderr kept for the error message."""
    proc = subprocess.run(
        list(argv),
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
    )
    if proc.returncode != 0:
        stderr = proc.stderr.decode(errors="replace").strip()
        raise BenchError(f"{what} exited {proc.returncode}: {stderr[-2000:]}")


def run_unshare() -> None:
    """The bare isolation primitive, run like the ``/bin/true`` baseline (no redirection)."""
    proc = subprocess.run(UNSHARE_ARGV, check=False)
    if proc.returncode != 0:
        raise BenchError(f"{UNSHARE_NAME} exited {proc.returncode}")


def probe_unshare() -> str | None:
    """Run ``unshare`` once, untimed: None if it works, else why it is unavailable."""
    if shutil.which(UNSHARE_ARGV[0]) is None:
        return f"{UNSHARE_ARGV[0]} is not on PATH"
    proc = subprocess.run(
        UNSHARE_ARGV,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
    )
    if proc.returncode == 0:
        return None
    stderr = proc.stderr.decode(errors="replace").strip().splitlines()
    why = f"exited {proc.returncode}" + (f": {stderr[-1]}" if stderr else "")
    euid = os.geteuid()
    if euid != 0:
        return f"not root (euid {euid}); it needs root to create the namespaces ({why})"
    return why


class LauncherLaunch:
    """The bare launch of a ``/bin/true`` cell by ``cellos-sandbox``, exactly as the
    ``cellos`` backend builds it (same launcher binary, rootfs, user-namespace choice, Landlock
    and working directory; the seccomp program written to a pipe whose read end the launcher
    reads), without the supervisor around it: no validation, state record, cgroups, pidfd
    loop, events or teardown.
    """

    def __init__(self, backend: Any, workspace: Path, cell_id: str) -> None:
        from cellos.core.loading import validate_document
        from cellos.hosts.cellos.sandbox import SandboxPlan, launcher_argv
        from cellos.hosts.cellos.seccomp_filter import workload_filter_bpf

        document = validate_document(cell_document(cell_id))
        self.argv = list(document.spec.run.argv)
        # The cell's environment is exactly the declared one (empty here), as in the backend.
        self.env = dict(document.spec.run.env)
        workspace.mkdir(parents=True, exist_ok=True)
        self.plan = SandboxPlan(
            cell_id=cell_id,
            workspace=str(workspace),
            working_directory=document.spec.run.working_directory,
            rootfs=backend.rootfs,
            user_namespace=backend.user_namespace,
            landlock_abi=backend.landlock_abi,
        )
        self.launcher: str = backend.launcher
        self._launcher_argv = launcher_argv
        self._filter = workload_filter_bpf
        self._filter()  # compiled once per process (cached), as in the backend
        self.last_command: list[str] = []

    def command(self, seccomp_fd: int) -> list[str]:
        return self._launcher_argv(
            dataclasses.replace(self.plan, seccomp_fd=seccomp_fd), self.argv, self.launcher
        )

    def __call__(self) -> None:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            os.write(write_fd, self._filter())
            os.close(write_fd)
            write_fd = -1
            self.last_command = self.command(read_fd)
            proc = subprocess.run(
                self.last_command,
                env=self.env,
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(read_fd,),
                start_new_session=True,
                check=False,
            )
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
        if proc.returncode != 0:
            stderr = proc.stderr.decode(errors="replace").strip()
            raise BenchError(f"bare launcher launch exited {proc.returncode}: {stderr[-2000:]}")


def cell_id_for(key: str, index: int) -> str:
    """A unique, valid cell id: pid, variant and index."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"bench-{os.getpid()}-{key}-{index}")


def cell_document(cell_id: str) -> dict[str, Any]:
    return {
        "apiVersion": "cellos.io/v1",
        "kind": "ExecutionCell",
        "spec": {
            "id": cell_id,
            "lifetime": {"ttlSeconds": 60},
            "run": {"argv": [TRUE], "timeoutSeconds": 30},
        },
    }


class Variant(Protocol):
    key: str
    backend: str
    mode: str
    events: str
    cell: Series

    def run_cell(self, index: int, record: bool) -> None: ...

    def close(self) -> None: ...


@dataclass
class WarmVariant:
    """Many cells through one ``Supervisor`` built by ``build_supervisor(env)``."""

    key: str
    backend: str
    events: str
    env: dict[str, str]
    mode: str = "warm"
    cell: Series = field(init=False)
    events_per_cell: int = 0
    _supervisor: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        from cellos.core.errors import CellosError
        from cellos.supervisor.composition import build_supervisor

        self.cell = Series(self.key)
        try:
            self._supervisor = build_supervisor(self.env)
        except CellosError as exc:
            raise BenchError(f"{self.key}: {exc.path}: {exc.reason}") from None

    def run_cell(self, index: int, record: bool) -> None:
        from cellos.core.errors import CellosError
        from cellos.core.loading import validate_document

        data = cell_document(cell_id_for(self.key, index))
        supervisor = self._supervisor
        outcomes: list[Any] = []

        def once() -> None:
            outcomes.append(supervisor.run(validate_document(data)))

        try:
            elapsed = time_ns(once)
        except CellosError as exc:
            raise BenchError(f"{self.key}: {exc.path}: {exc.reason}") from None
        outcome = outcomes[0]
        if outcome.exit_code != 0 or outcome.errors or outcome.lost_events:
            errors = "; ".join(f"{e.path}: {e.reason}" for e in outcome.errors)
            raise BenchError(
                f"{self.key}: cell {outcome.cell_id} exited {outcome.exit_code}"
                f" (lost events: {outcome.lost_events}) {errors}"
            )
        self.events_per_cell = len(outcome.events)
        if record:
            self.cell.samples.append(elapsed)

    def backend_object(self) -> Any:
        """The supervisor's backend object (the ``cellos`` one holds the sandbox settings)."""
        return self._supervisor.backend

    def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.close()
            self._supervisor = None


@dataclass
class ColdVariant:
    """One CLI process per cell."""

    key: str
    backend: str
    command: list[str]
    env: dict[str, str]
    spec_dir: Path
    cwd: Path
    events: str = "noop"
    mode: str = "cold"
    cell: Series = field(init=False)

    def __post_init__(self) -> None:
        self.cell = Series(self.key)
        self.spec_dir.mkdir(parents=True, exist_ok=True)

    def run_cell(self, index: int, record: bool) -> None:
        cell_id = cell_id_for(self.key, index)
        spec = self.spec_dir / f"{cell_id}.json"
        spec.write_text(json.dumps(cell_document(cell_id)), encoding="utf-8")
        argv = [*self.command, str(spec)]
        elapsed = time_ns(lambda: run_child(argv, self.env, self.cwd, f"{self.key} ({cell_id})"))
        if record:
            self.cell.samples.append(elapsed)

    def close(self) -> None:
        pass


# -- orchestration ---------------------------------------------------------------------------


class Progress:
    """Progress on stderr when it is a terminal (rich if installed); silent otherwise.

    Redrawn only between measurements and at most every 0.2 s, from the measuring thread: a
    background refresh thread would compete with the cells for the GIL and the CPUs.
    """

    INTERVAL_SECONDS = 0.2

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.enabled = sys.stderr.isatty()
        self._last = 0.0
        self._rich: Any = None
        self._task: Any = None
        if not self.enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import Progress as RichProgress
        except ImportError:
            return
        self._rich = RichProgress(console=Console(stderr=True), auto_refresh=False, transient=True)
        self._task = self._rich.add_task("cells", total=total)
        self._rich.start()

    def advance(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < self.INTERVAL_SECONDS and self.done != self.total:
            return
        self._last = now
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done, description=label)
            self._rich.refresh()
        else:
            sys.stderr.write(f"\r{label}: {self.done}/{self.total}".ljust(60))
            sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.stop()
        else:
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()


#: One measurement: called with the round index and whether the round is recorded.
Task = Callable[[int, bool], None]


def run_rounds(
    phase: str,
    rounds: int,
    warmup: int,
    tasks: Sequence[Task],
    rng: random.Random,
    progress: Progress,
) -> None:
    """Run every task once per round, in a fresh shuffled order; the first rounds are warm-up."""
    order = list(tasks)
    for index in range(warmup + rounds):
        rng.shuffle(order)
        label = f"{phase} round {index + 1}/{warmup + rounds}"
        for task in order:
            task(index, index >= warmup)
            progress.advance(label)


def reference(series: Series, action: Callable[[], None]) -> Callable[[int, bool], None]:
    def task(_index: int, record: bool) -> None:
        elapsed = time_ns(action)
        if record:
            series.samples.append(elapsed)

    return task


def cli_command(launcher: str) -> tuple[list[str], str]:
    script = Path(sys.executable).with_name("cellos-supervisor")
    use_script = launcher == "script" or (
        launcher == "auto" and script.is_file() and os.access(script, os.X_OK)
    )
    if use_script:
        if not (script.is_file() and os.access(script, os.X_OK)):
            raise BenchError(f"no cellos-supervisor entry point at {script}")
        return [str(script)], f"{script} SPEC"
    return (
        [sys.executable, "-m", "cellos.supervisor.cli"],
        f"{sys.executable} -m cellos.supervisor.cli SPEC",
    )


def residue(state_dirs: Sequence[Path]) -> list[str]:
    """Whatever a cell left in its state directory (there must be nothing)."""
    left: list[str] = []
    for root in state_dirs:
        cells = root / "cells"
        if cells.is_dir():
            left += [str(p) for p in sorted(cells.iterdir())]
    return left


@dataclass
class Config:
    cells: int
    cold_cells: int
    warmup: int
    cold_warmup: int
    backends: list[str]
    launcher: str
    seed: int
    signing: bool


def benchmark(config: Config) -> dict[str, Any]:
    added_src = _cellos_importable()
    import cellos

    cellos_file = cellos.__file__ or "?"
    from cellos.core.signing import b64url_encode

    signing_seed = secrets.token_bytes(32)

    started = time.perf_counter()
    rng = random.Random(config.seed)
    with tempfile.TemporaryDirectory(prefix="cellos-bench-") as tmp_name:
        tmp = Path(tmp_name)
        child_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp),
            "LANG": "C.UTF-8",
            "CELL_OS_USE_NOOP_SINK": "1",
        }
        # Children import the same cellos as this process: keep PYTHONPATH, add src/ if needed.
        python_path = [str(REPO / "src")] if added_src else []
        python_path += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if python_path:
            child_env["PYTHONPATH"] = os.pathsep.join(python_path)
        state_dirs: list[Path] = []

        def env_for(backend: str, name: str, **extra: str) -> dict[str, str]:
            state = tmp / "state" / name
            state_dirs.append(state)
            return {
                **child_env,
                "CELLOS_CELL_BACKEND": backend,
                "CELLOS_STATE_DIR": str(state),
                **extra,
            }

        warm: list[WarmVariant] = [
            WarmVariant(f"{b}/warm", b, "noop", env_for(b, f"{b}-warm")) for b in config.backends
        ]
        jsonl_files: dict[str, Path] = {}
        if config.signing and "cellos" in config.backends:
            plain = tmp / "events-unsigned.jsonl"
            signed = tmp / "events-signed.jsonl"
            jsonl_files = {"cellos/warm+jsonl": plain, "cellos/warm+jsonl+ed25519": signed}
            # The noop flag is dropped: a JSONL sink replaces the noop sink.
            jsonl_env = env_for("cellos", "jsonl")
            jsonl_env.pop("CELL_OS_USE_NOOP_SINK")
            signed_env = env_for("cellos", "signed")
            signed_env.pop("CELL_OS_USE_NOOP_SINK")
            warm.append(
                WarmVariant(
                    "cellos/warm+jsonl",
                    "cellos",
                    "jsonl",
                    {**jsonl_env, "CELL_OS_JSONL_EVENTS": str(plain)},
                )
            )
            warm.append(
                WarmVariant(
                    "cellos/warm+jsonl+ed25519",
                    "cellos",
                    "jsonl+ed25519",
                    {
                        **signed_env,
                        "CELL_OS_JSONL_EVENTS": str(signed),
                        "CELLOS_EVENT_SIGNING": "ed25519",
                        "CELLOS_EVENT_SIGNING_KID": "bench",
                        # A throw-away key that exists only in this process and its temp dir.
                        "CELLOS_EVENT_SIGNING_KEY_BASE64": b64url_encode(signing_seed),
                    },
                )
            )
        command, command_text = cli_command(config.launcher)
        cold: list[ColdVariant] = [
            ColdVariant(
                f"{b}/cold",
                b,
                command,
                env_for(b, f"{b}-cold"),
                spec_dir=tmp / "specs",
                cwd=tmp,
            )
            for b in config.backends
        ]

        warm_true = Series("/bin/true (warm phase)")
        cold_true = Series("/bin/true (cold phase)")
        python_pass = Series("python -c pass")
        pass_argv = [sys.executable, "-c", "pass"]
        pass_env = {**child_env}

        def python_floor() -> None:
            run_child(pass_argv, pass_env, tmp, "python -c pass")

        warm_tasks: list[Task] = []
        for v in warm:
            warm_tasks += [v.run_cell, reference(warm_true, run_true)]
        # The sandbox references run once per warm round (not once per variant): they are
        # compared with every warm row, and a sandbox launch is not cheap.
        unshare = Series(f"{UNSHARE_NAME} (warm phase)")
        launcher_ref = Series("bare cellos-sandbox launch of the /bin/true cell (warm phase)")
        launcher_command: list[str] | None = None
        cellos_warm = next((v for v in warm if v.key == ACCEPTANCE_VARIANT), None)
        if config.cells == 0:
            unshare.unavailable = launcher_ref.unavailable = "no warm phase (--cells 0)"
        else:
            unshare.unavailable = probe_unshare()
            if unshare.unavailable is None:
                warm_tasks.append(reference(unshare, run_unshare))
            if cellos_warm is None:
                launcher_ref.unavailable = "the cellos backend is not selected"
            else:
                try:
                    launch = LauncherLaunch(
                        cellos_warm.backend_object(),
                        tmp / "launcher-workspace",
                        cell_id_for("launcher", 0),
                    )
                    launch()  # untimed: fail now, with the launcher's message, if it cannot run
                except BaseException:
                    for v in warm:
                        v.close()
                    raise
                launcher_command = launch.last_command  # as run (the seccomp fd number varies)
                warm_tasks.append(reference(launcher_ref, launch))
        cold_tasks: list[Task] = []
        for c in cold:
            cold_tasks += [
                c.run_cell,
                reference(cold_true, run_true),
                reference(python_pass, python_floor),
            ]
        total = 0
        if config.cells > 0:
            total += (config.cells + config.warmup) * len(warm_tasks)
        if config.cold_cells > 0:
            total += (config.cold_cells + config.cold_warmup) * len(cold_tasks)
        progress = Progress(total)
        try:
            if config.cells > 0:
                run_rounds("warm", config.cells, config.warmup, warm_tasks, rng, progress)
            if config.cold_cells > 0:
                run_rounds("cold", config.cold_cells, config.cold_warmup, cold_tasks, rng, progress)
        finally:
            progress.close()
            for v in warm:
                v.close()
            for c in cold:
                c.close()

        left = residue(state_dirs)
        if left:
            raise BenchError(f"cells left residue in their state directories: {left[:5]}")
        event_lines = {
            key: len(path.read_text(encoding="utf-8").splitlines())
            for key, path in jsonl_files.items()
            if path.exists()
        }
        signed_path = jsonl_files.get("cellos/warm+jsonl+ed25519")
        verified = verify_signed(signed_path, signing_seed) if signed_path else None

    results: list[dict[str, Any]] = []
    all_variants: list[Variant] = [*warm, *cold]
    for variant in all_variants:
        if not variant.cell.samples:
            continue
        base = warm_true if variant.mode == "warm" else cold_true
        row: dict[str, Any] = {
            "variant": variant.key,
            "backend": variant.backend,
            "mode": variant.mode,
            "events": variant.events,
            **variant.cell.summary(),
            "baseline": base.name,
            "ratio_vs_true": ratio_to(variant.cell, base),
            "ratio_vs_unshare": ratio_to(variant.cell, unshare) if variant.mode == "warm" else None,
            "ratio_vs_python": None,
        }
        if variant.mode == "cold":
            row["ratio_vs_python"] = median_ns(variant.cell.samples) / median_ns(
                python_pass.samples
            )
        if isinstance(variant, WarmVariant):
            row["events_per_cell"] = variant.events_per_cell
            if variant.key in event_lines:
                row["jsonl_lines_written"] = event_lines[variant.key]
        results.append(row)

    def plain_reference(key: str, phase: str, series: Series) -> list[dict[str, Any]]:
        if not series.samples:
            return []
        return [{"key": key, "name": series.name, "phase": phase, **series.summary()}]

    def sandbox_reference(key: str, series: Series, cmd: list[str] | None) -> dict[str, Any]:
        """Listed even when not measured (with why), whenever there was a warm phase."""
        return {
            "key": key,
            "name": series.name,
            "phase": "warm",
            "available": series.unavailable is None,
            "unavailable_reason": series.unavailable,
            "command": cmd,
            **series.summary(),
            "ratio_vs_true": ratio_to(series, warm_true),
            "ratio_vs_unshare": ratio_to(series, unshare) if series is not unshare else None,
        }

    references = plain_reference("true-warm", "warm", warm_true)
    if config.cells > 0:
        references += [
            sandbox_reference("unshare", unshare, list(UNSHARE_ARGV)),
            sandbox_reference("launcher", launcher_ref, launcher_command),
        ]
    references += plain_reference("true-cold", "cold", cold_true)
    references += plain_reference("python-pass", "cold", python_pass)
    return {
        "benchmark": "cellos.lifecycle",
        "config": {
            "cells": config.cells,
            "cold_cells": config.cold_cells,
            "warmup": config.warmup,
            "cold_warmup": config.cold_warmup,
            "backends": config.backends,
            "seed": config.seed,
            "cold_command": command_text,
            "workload": TRUE,
        },
        "host": {
            "python": sys.version.split()[0],
            "executable": sys.executable,
            "cellos": str(Path(cellos_file).parent),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "references": references,
        "results": results,
        "acceptance": acceptance(results, unshare),
        "sandbox_split": sandbox_split(results, launcher_ref, unshare),
        "signing_cost": signing_cost(results),
        "signed_events_verified": verified,
        "elapsed_seconds": time.perf_counter() - started,
    }


def verify_signed(path: Path, seed: bytes) -> dict[str, int]:
    """Check (untimed) that the signed variant wrote evidence that verifies."""
    from cellos.core.signing import Ed25519Signer, VerifyKeys, verify_keys_document
    from cellos.verify import verify_events_file

    keys = VerifyKeys.from_document(verify_keys_document([Ed25519Signer("bench", seed)]))
    report = verify_events_file(str(path), keys)
    if not report.ok:
        raise BenchError(f"signed events do not verify: {report.first_error}")
    return {"events": report.events, "runs": report.runs}


def ratio_to(series: Series, base: Series) -> float | None:
    """median(series) / median(base), or None when either was not measured."""
    if not series.samples or not base.samples:
        return None
    return median_ns(series.samples) / median_ns(base.samples)


def acceptance(results: Sequence[Mapping[str, Any]], unshare: Series) -> dict[str, Any]:
    """The acceptance point: median(cellos/warm) / median(unshare), target <= 3x."""
    row = next((r for r in results if r["variant"] == ACCEPTANCE_VARIANT), None)
    ratio = row["ratio_vs_unshare"] if row is not None else None
    reason: str | None = None
    if row is None:
        reason = f"{ACCEPTANCE_VARIANT} was not measured"
    elif ratio is None:
        reason = f"unshare reference unavailable: {unshare.unavailable}"
    return {
        "variant": ACCEPTANCE_VARIANT,
        "reference": UNSHARE_NAME,
        "target_max_ratio": ACCEPTANCE_MAX_RATIO,
        "ratio": ratio,
        "met": None if ratio is None else ratio <= ACCEPTANCE_MAX_RATIO,
        "not_measured_reason": reason,
    }


def sandbox_split(
    results: Sequence[Mapping[str, Any]], launcher_ref: Series, unshare: Series
) -> dict[str, Any] | None:
    """Split median(cellos/warm) into the bare sandbox launch and what the supervisor adds.

    Differences of medians: an estimate of where the time goes, not an exact decomposition.
    """
    row = next((r for r in results if r["variant"] == ACCEPTANCE_VARIANT), None)
    if row is None or not launcher_ref.samples:
        return None
    cell_ms = row["median_ms"]
    launcher_ms = median_ns(launcher_ref.samples) / 1e6
    unshare_ms = median_ns(unshare.samples) / 1e6 if unshare.samples else None
    return {
        "variant": ACCEPTANCE_VARIANT,
        "cell_median_ms": cell_ms,
        "launcher_median_ms": launcher_ms,
        "unshare_median_ms": unshare_ms,
        "supervisor_ms": cell_ms - launcher_ms,
        "sandbox_share": launcher_ms / cell_ms,
        "launcher_over_unshare_ms": launcher_ms - unshare_ms if unshare_ms is not None else None,
    }


def signing_cost(results: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    by_key = {r["variant"]: r for r in results}
    plain = by_key.get("cellos/warm+jsonl")
    signed = by_key.get("cellos/warm+jsonl+ed25519")
    if plain is None or signed is None:
        return None
    per_cell = signed["median_ms"] - plain["median_ms"]
    events = signed.get("events_per_cell") or 0
    return {
        "per_cell_ms": per_cell,
        "events_per_cell": events,
        "per_event_us": per_cell * 1000 / events if events else None,
    }


# -- output ----------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 100 else f"{value:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x"


HEADERS = (
    "variant",
    "n",
    "median ms",
    "p90 ms",
    "x /bin/true",
    "x unshare",
    "x python -c pass",
)


def table_rows(report: Mapping[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for ref in report["references"]:
        if not ref["n"]:
            rows.append((ref["name"], "-", "n/a", "n/a", "", "", ""))
            continue
        # Only the sandbox references carry ratios (they are not baselines of the cells).
        ratios = ("ratio_vs_true", "ratio_vs_unshare")
        rows.append(
            (
                ref["name"],
                str(ref["n"]),
                _ms(ref["median_ms"]),
                _ms(ref["p90_ms"]),
                *(_ratio(ref[k]) if ref.get(k) is not None else "" for k in ratios),
                "",
            )
        )
    for r in report["results"]:
        rows.append(
            (
                r["variant"],
                str(r["n"]),
                _ms(r["median_ms"]),
                _ms(r["p90_ms"]),
                _ratio(r["ratio_vs_true"]),
                _ratio(r["ratio_vs_unshare"]),
                _ratio(r["ratio_vs_python"]),
            )
        )
    return rows


def footer(report: Mapping[str, Any]) -> list[str]:
    cfg = report["config"]
    host = report["host"]
    lines = [
        f"cold command: {cfg['cold_command']}; cellos from {host['cellos']}",
        f"python {host['python']} on {host['platform']}, {host['cpus']} cpu(s); "
        f"seed {cfg['seed']}; {report['elapsed_seconds']:.1f} s",
    ]
    for ref in report["references"]:
        if ref.get("available") is False:
            lines.append(f"{ref['key']} reference not measured: {ref['unavailable_reason']}")
    split = report["sandbox_split"]
    if split is not None:
        unshare_part = (
            f", of which unshare's namespaces {_ms(split['unshare_median_ms'])} ms"
            if split["unshare_median_ms"] is not None
            else ""
        )
        lines.append(
            f"{split['variant']} {_ms(split['cell_median_ms'])} ms = bare launcher "
            f"{_ms(split['launcher_median_ms'])} ms (sandbox, {split['sandbox_share']:.0%}"
            f"{unshare_part}) + {_ms(split['supervisor_ms'])} ms supervisor "
            "(difference of medians)"
        )
    lines.append(acceptance_line(report["acceptance"]))
    cost = report["signing_cost"]
    if cost is not None:
        per_event = cost["per_event_us"]
        lines.append(
            f"ed25519 signing: {cost['per_cell_ms']:+.3f} ms/cell over unsigned JSONL"
            + (
                f" ({per_event:+.0f} us/event, {cost['events_per_cell']} events/cell)"
                if per_event is not None
                else ""
            )
        )
    verified = report.get("signed_events_verified")
    if verified is not None:
        lines.append(
            f"signed JSONL verified: {verified['events']} events in {verified['runs']} runs"
        )
    return lines


def acceptance_line(acc: Mapping[str, Any]) -> str:
    target = f"target <= {acc['target_max_ratio']:g}x"
    head = f"acceptance: {acc['variant']} vs {acc['reference']}"
    if acc["ratio"] is None:
        return f"{head}: NOT MEASURED ({acc['not_measured_reason']}); {target}"
    verdict = "MET" if acc["met"] else "NOT MET"
    return f"{head}: {acc['ratio']:.2f}x ({target}): {verdict}"


def render_table(
    title: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    footer_lines: Sequence[str],
    references: int,
) -> None:
    """The result table: rich when installed, plain text otherwise; reference rows first."""
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

        def line(cells: Sequence[str]) -> str:
            first = cells[0].ljust(widths[0])
            rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
            return "  ".join([first, *rest]).rstrip()

        print(title)
        print(line(headers))
        print(line(["-" * w for w in widths]))
        for row in rows:
            print(line(row))
        for text in footer_lines:
            print(text)
        return
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column(headers[0], no_wrap=True)
    for header in headers[1:]:
        table.add_column(header, justify="right")
    for index, row in enumerate(rows):
        table.add_row(*row, end_section=index == references - 1)
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # a pipe or a file: do not wrap at rich's default 80
    console.print(table)
    for text in footer_lines:
        console.print(text, highlight=False, soft_wrap=True)


def print_table(report: Mapping[str, Any]) -> None:
    title = "CellOS lifecycle: a full /bin/true cell vs subprocess.run(['/bin/true']) and unshare"
    render_table(title, HEADERS, table_rows(report), footer(report), len(report["references"]))


# -- CLI -------------------------------------------------------------------------------------


def run_and_report(
    produce: Callable[[], dict[str, Any]],
    as_json: bool,
    show: Callable[[Mapping[str, Any]], None],
) -> int:
    """Run a benchmark and print its report (JSON or table); exit status 1 on failure."""
    try:
        report = produce()
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ImportError as exc:
        print(
            f"error: {exc}; run with the project's environment (pip install -e .)", file=sys.stderr
        )
        return 1
    if as_json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        show(report)
    return 0


def positive_or_zero(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/lifecycle.py",
        description="Median time of a full /bin/true cell per backend, warm and cold, "
        "as a ratio against subprocess.run(['/bin/true']) (and, warm, against "
        f"'{UNSHARE_NAME}' and the bare sandbox launcher) measured in the same run.",
    )
    parser.add_argument(
        "--cells", type=positive_or_zero, default=200, help="measured warm cells per variant"
    )
    parser.add_argument(
        "--cold-cells",
        type=positive_or_zero,
        default=20,
        help="measured cold (one CLI process each) cells per backend",
    )
    parser.add_argument(
        "--warmup", type=positive_or_zero, default=10, help="unrecorded warm rounds first"
    )
    parser.add_argument(
        "--cold-warmup", type=positive_or_zero, default=2, help="unrecorded cold rounds first"
    )
    parser.add_argument(
        "--backend",
        dest="backends",
        action="append",
        choices=BACKENDS,
        help="backend to measure (repeatable; default: all of stub, cellos)",
    )
    parser.add_argument(
        "--launcher",
        choices=("auto", "script", "module"),
        default="auto",
        help="cold mode: the cellos-supervisor entry point next to sys.executable (script), "
        "python -m cellos.supervisor.cli (module), or script when present (auto)",
    )
    parser.add_argument(
        "--no-signing", action="store_true", help="skip the JSONL / ed25519 warm variants"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the round order shuffle")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = Config(
        cells=args.cells,
        cold_cells=args.cold_cells,
        warmup=args.warmup,
        cold_warmup=args.cold_warmup,
        backends=list(dict.fromkeys(args.backends or BACKENDS)),
        launcher=args.launcher,
        seed=args.seed,
        signing=not args.no_signing,
    )
    return run_and_report(lambda: benchmark(config), args.json, print_table)


if __name__ == "__main__":
    raise SystemExit(main())
