#!/usr/bin/env python3
"""gVisor benchmark: how much does a full ``/bin/true`` cell on the ``gvisor`` backend cost
next to a bare ``runsc run`` of the same bundle?

Measured, interleaved in the same run (every round runs each of them once, in a freshly
shuffled order; the first rounds are warm-up and not recorded):

* ``gvisor/warm`` -- a full cell through one ``Supervisor`` built by ``build_supervisor(env)``
  with ``CELLOS_CELL_BACKEND=gvisor``: ``validate_document`` of the parsed document plus
  ``Supervisor.run`` (create with its bundle skeleton, ``runsc run``, wait, destroy, revoke,
  every event); unique cell id per cell, ``CELL_OS_USE_NOOP_SINK=1``, a temporary
  ``CELLOS_STATE_DIR``;
* ``bare runsc run`` (the baseline) -- ``runsc --root <state> --network=none run --bundle
  <bundle> <id>`` with a unique container id, of a bundle for the same ``/bin/true`` cell
  generated once, before the rounds, by the backend's own code path (its rootfs skeleton,
  ``build_config`` with the same ``BundleConfig`` and the ``env -u HOME --`` prefix
  ``GvisorBackend.run`` adds when the cell declares no ``HOME``). It is followed by ``runsc
  delete --force`` only if the container still exists after ``run`` returns, which is decided
  once, untimed, with ``runsc list`` after a first run;
* ``subprocess.run(["/bin/true"])``, for scale.

Before the rounds, untimed, the benchmark also runs one cell through the backend object itself
(``create`` / ``run`` / ``destroy``) and checks that the ``config.json`` and the rootfs
skeleton it writes are the baseline's, paths aside: the two then differ only by what the
supervisor and the backend do around ``runsc run``.

Reported: median, p90, and ``median(gvisor/warm) / median(bare runsc run)`` against the
target (<= 1.3x). It needs root (runsc cannot run rootless here) and runsc: without them it
exits 2. Everything lives in one temporary directory (state, bundle, runsc ``--root``), removed
at the end after any container left in it has been deleted.

Usage: ``python benchmarks/gvisor.py [--cells N] [--warmup W] [--seed S] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Shared with the lifecycle benchmark (same statistics, timing and round orchestration).
from lifecycle import (
    TRUE,
    BenchError,
    Progress,
    Series,
    Task,
    WarmVariant,
    _cellos_importable,
    cell_document,
    cell_id_for,
    median_ns,
    positive_or_zero,
    ratio_to,
    reference,
    render_table,
    residue,
    run_and_report,
    run_rounds,
    run_true,
)

VARIANT = "gvisor/warm"
BARE_NAME = "bare runsc run"
#: Acceptance: median(``gvisor/warm``) / median(bare runsc run) of the same run, at most this.
ACCEPTANCE_MAX_RATIO = 1.3
#: Forwarded to the supervisor when set, so that it measures the configured runsc.
FORWARDED_ENV = ("CELLOS_RUNSC", "CELLOS_ROOTFS", "CELLOS_GVISOR_PLATFORM")
EXIT_UNAVAILABLE = 2


def unavailable_reason() -> str | None:
    """Why this host cannot run the benchmark (None: it can)."""
    euid = os.geteuid()
    if euid != 0:
        return f"needs root (euid is {euid}): runsc cannot run rootless on this host"
    runsc = os.environ.get("CELLOS_RUNSC") or "runsc"
    if shutil.which(runsc) is None:
        return f"gVisor's runsc ({runsc!r}) is not installed or not on PATH"
    return None


def _run_quiet(argv: Sequence[str], what: str) -> str:
    """An untimed runsc call; its stdout, or BenchError with its stderr."""
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=60, check=False, env={}, cwd="/"
    )
    if proc.returncode != 0:
        raise BenchError(f"{what} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def skeleton_listing(root: Path) -> list[tuple[str, str]]:
    """The rootfs skeleton as (relative path, kind or symlink target), sorted."""
    entries: list[tuple[str, str]] = []
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            entries.append((rel, "-> " + os.readlink(path)))
        elif path.is_dir():
            entries.append((rel, "dir"))
        else:
            entries.append((rel, f"file {path.stat().st_size}"))
    return entries


class BareRunsc:
    """``runsc run`` of a ``/bin/true`` bundle built once, as ``GvisorBackend`` builds it, with
    nothing around it: no validation, state record, per-cell directories, pidfd loop, events,
    teardown or supervisor.
    """

    def __init__(self, backend: Any, base: Path, cell_id: str) -> None:
        from cellos.core.loading import validate_document
        from cellos.hosts.gvisor.bundle import BundleConfig, build_config, host_binds
        from cellos.hosts.process import ENV_PROGRAM

        self.spec = validate_document(cell_document(cell_id)).spec
        self.bundle = base / "bundle"
        self.workspace = base / "workspace"
        self.state = base / "runsc"
        base.mkdir(mode=0o700)
        for path in (self.bundle, self.workspace, self.state):
            path.mkdir(mode=0o700)
        # As GvisorBackend.create and .run: the skeleton only without CELLOS_ROOTFS.
        if backend.rootfs is None:
            backend._skeleton(str(self.bundle / "rootfs"), self.spec)
        rootfs = backend.rootfs or str(self.bundle / "rootfs")
        config = BundleConfig(
            rootfs=rootfs,
            workspace=str(self.workspace),
            host_binds=() if backend.rootfs else host_binds(),
        )
        # The supervisor's request: env = {**run.env, **secrets}, no secrets here.
        env = dict(self.spec.run.env)
        argv = list(self.spec.run.argv)
        if "HOME" not in env:
            argv = [ENV_PROGRAM, "-u", "HOME", "--", *argv]
        self.config: dict[str, Any] = build_config(self.spec, config, argv=argv, env=env)
        (self.bundle / "config.json").write_text(json.dumps(self.config), encoding="utf-8")
        self.runsc = [backend.runsc, "--root", str(self.state)]
        if backend.platform:
            self.runsc.append(f"--platform={backend.platform}")
        self.prefix = f"bench-{os.getpid()}-bare"
        self.count = 0
        #: Whether the container outlives ``runsc run`` (decided by :meth:`probe`).
        self.needs_delete = False
        self.last_command: list[str] = []

    def command(self, container_id: str) -> list[str]:
        return [*self.runsc, "--network=none", "run", "--bundle", str(self.bundle), container_id]

    def listed(self) -> list[str]:
        return _run_quiet([*self.runsc, "list", "--quiet"], "runsc list").split()

    def delete(self, container_id: str) -> None:
        _run_quiet([*self.runsc, "delete", "--force", container_id], "runsc delete")

    def run_once(self) -> str:
        """One ``runsc run`` (plus ``delete`` when needed); returns the container id."""
        self.count += 1
        container_id = f"{self.prefix}-{self.count}"
        self.last_command = self.command(container_id)
        # As the backend: empty environment, cwd "/", its own session.
        proc = subprocess.run(
            self.last_command,
            env={},
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            check=False,
        )
        if proc.returncode != 0:
            stderr = proc.stderr.decode(errors="replace").strip()
            raise BenchError(f"{BARE_NAME} exited {proc.returncode}: {stderr[-2000:]}")
        if self.needs_delete:
            self.delete(container_id)
        return container_id

    def __call__(self) -> None:
        self.run_once()

    def probe(self) -> None:
        """Untimed first run: fail now, with runsc's message, if it cannot run; then ask
        ``runsc list`` once whether ``run`` leaves the container behind."""
        container_id = self.run_once()
        self.needs_delete = container_id in self.listed()
        if self.needs_delete:
            self.delete(container_id)

    def cleanup(self) -> list[str]:
        """Delete any container left under this runsc root; return their ids."""
        if not self.state.is_dir() or not any(self.state.iterdir()):
            return []
        left = self.listed()
        for container_id in left:
            self.delete(container_id)
        return left


def check_same_bundle(backend: Any, bare: BareRunsc) -> dict[str, Any]:
    """Run the baseline's cell once through the backend (untimed) and compare what it wrote.

    ``config.json`` must equal the baseline's once the backend's per-cell rootfs and workspace
    paths are replaced by the baseline's; the skeletons must have the same entries.
    """
    from cellos.core.ports import WorkloadRequest

    spec = bare.spec
    handle = backend.create(spec)
    bundle = Path(handle.resources["bundle"])
    workspace = handle.resources["workspace"]
    try:
        result = backend.run(
            handle,
            WorkloadRequest(
                argv=spec.run.argv,
                env=dict(spec.run.env),
                working_directory=spec.run.working_directory,
                deadline_seconds=30.0,
                graceful_shutdown_seconds=5.0,
            ),
        )
        written: dict[str, Any] = json.loads((bundle / "config.json").read_text("utf-8"))
        skeleton = skeleton_listing(bundle / "rootfs") if backend.rootfs is None else []
    finally:
        teardown = backend.destroy(handle)
    if result.exit_code != 0:
        raise BenchError(
            f"the backend's own /bin/true cell exited {result.exit_code}"
            f" ({result.spawn_error or result.stderr.decode(errors='replace')[-500:]})"
        )
    if not teardown.destroyed:
        raise BenchError(f"the backend's own cell left residue: {list(teardown.residue)}")
    if backend.rootfs is None:
        written["root"]["path"] = bare.config["root"]["path"]
    for mount in written["mounts"]:
        if mount.get("source") == workspace:
            mount["source"] = bare.config["mounts"][-1]["source"]
    if written != bare.config:
        differing = sorted(
            k for k in {*written, *bare.config} if written.get(k) != bare.config.get(k)
        )
        raise BenchError(f"the baseline's config.json differs from the backend's in {differing}")
    if backend.rootfs is None and skeleton != skeleton_listing(bare.bundle / "rootfs"):
        raise BenchError("the baseline's rootfs skeleton differs from the backend's")
    return {"config_json_equal": True, "skeleton_entries": len(skeleton)}


def lingering_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (a runsc left running)."""
    found: list[str] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(cmdline.strip()[:200])
    return found


def runsc_version(runsc: str) -> str:
    proc = subprocess.run([runsc, "--version"], capture_output=True, text=True, check=False)
    return (proc.stdout.splitlines() or ["?"])[0]


@dataclass
class Config:
    cells: int
    warmup: int
    seed: int


def benchmark(config: Config) -> dict[str, Any]:
    _cellos_importable()
    import cellos

    cellos_file = cellos.__file__ or "?"
    started = time.perf_counter()
    rng = random.Random(config.seed)
    with tempfile.TemporaryDirectory(prefix="cellos-bench-gvisor-") as tmp_name:
        tmp = Path(tmp_name)
        state = tmp / "state"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp),
            "LANG": "C.UTF-8",
            "CELL_OS_USE_NOOP_SINK": "1",
            "CELLOS_CELL_BACKEND": "gvisor",
            "CELLOS_STATE_DIR": str(state),
            **{k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)},
        }
        cell = WarmVariant(VARIANT, "gvisor", "noop", env)
        bare: BareRunsc | None = None
        bundle_check: dict[str, Any] = {}
        true = Series("/bin/true")
        bare_series = Series(BARE_NAME)
        try:
            backend = cell.backend_object()
            if backend.name != "gvisor":
                raise BenchError(f"build_supervisor chose the {backend.name!r} backend")
            bare = BareRunsc(backend, tmp / "bare", cell_id_for("bare", 0))
            bare.probe()
            bundle_check = check_same_bundle(backend, bare)
            bare_task = reference(bare_series, bare)
            tasks: list[Task] = [cell.run_cell, bare_task, reference(true, run_true)]
            progress = Progress((config.cells + config.warmup) * len(tasks))
            try:
                run_rounds("round", config.cells, config.warmup, tasks, rng, progress)
            finally:
                progress.close()
        finally:
            cell.close()
            left_containers = bare.cleanup() if bare is not None else []
        runsc, gvisor_platform = backend.runsc, backend.platform
        left = residue([state])
        gvisor_root = state / "gvisor"
        if gvisor_root.is_dir():
            left += [str(p) for p in sorted(gvisor_root.iterdir())]
        left += [f"runsc container {c}" for c in left_containers]
        left += [f"process: {c}" for c in lingering_processes(str(tmp))]
        if left:
            raise BenchError(f"residue after the run: {left[:5]}")

    row: dict[str, Any] = {
        "variant": VARIANT,
        "backend": "gvisor",
        "mode": "warm",
        "events": "noop",
        **cell.cell.summary(),
        "events_per_cell": cell.events_per_cell,
        "ratio_vs_bare_runsc": ratio_to(cell.cell, bare_series),
        "ratio_vs_true": ratio_to(cell.cell, true),
    }
    references = [
        {
            "key": "true",
            "name": true.name,
            **true.summary(),
            "ratio_vs_true": 1.0 if true.samples else None,
            "ratio_vs_bare_runsc": None,  # for scale only
        },
        {
            "key": "bare-runsc",
            "name": BARE_NAME,
            "command": bare.last_command,
            "delete_after_run": bare.needs_delete,
            **bare_series.summary(),
            "ratio_vs_true": ratio_to(bare_series, true),
            "ratio_vs_bare_runsc": 1.0 if bare_series.samples else None,
        },
    ]
    ratio = row["ratio_vs_bare_runsc"]
    split = None
    if cell.cell.samples and bare_series.samples:
        cell_ms = median_ns(cell.cell.samples) / 1e6
        bare_ms = median_ns(bare_series.samples) / 1e6
        split = {
            "cell_median_ms": cell_ms,
            "bare_median_ms": bare_ms,
            "added_ms": cell_ms - bare_ms,
        }
    return {
        "benchmark": "cellos.gvisor",
        "config": {
            "cells": config.cells,
            "warmup": config.warmup,
            "seed": config.seed,
            "workload": TRUE,
        },
        "host": {
            "python": sys.version.split()[0],
            "executable": sys.executable,
            "cellos": str(Path(cellos_file).parent),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "runsc": runsc,
            "runsc_version": runsc_version(runsc),
            "runsc_platform": gvisor_platform or "runsc default",
        },
        "bundle_check": bundle_check,
        "references": references,
        "results": [row] if cell.cell.samples else [],
        "split": split,
        "acceptance": {
            "variant": VARIANT,
            "reference": BARE_NAME,
            "target_max_ratio": ACCEPTANCE_MAX_RATIO,
            "ratio": ratio,
            "met": None if ratio is None else ratio <= ACCEPTANCE_MAX_RATIO,
        },
        "elapsed_seconds": time.perf_counter() - started,
    }


# -- output ----------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if value < 100 else f"{value:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


HEADERS = ("variant", "n", "median ms", "p90 ms", "x /bin/true", "x bare runsc run")


def table_rows(report: Mapping[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for r in [*report["references"], *report["results"]]:
        rows.append(
            (
                r.get("variant") or r["name"],
                str(r["n"]),
                _ms(r["median_ms"]),
                _ms(r["p90_ms"]),
                _ratio(r["ratio_vs_true"]),
                _ratio(r["ratio_vs_bare_runsc"]),
            )
        )
    return rows


def footer(report: Mapping[str, Any]) -> list[str]:
    cfg, host = report["config"], report["host"]
    bare = next(r for r in report["references"] if r["key"] == "bare-runsc")
    lines = [
        f"bare runsc run: {' '.join(bare['command'])}"
        + (
            " + runsc delete --force (runsc list showed the container after run)"
            if bare["delete_after_run"]
            else " (no delete: runsc list showed no container after run)"
        ),
        f"bundle: config.json and {report['bundle_check']['skeleton_entries']} skeleton entries"
        " identical to the backend's own (paths aside)",
        f"{host['runsc_version']} ({host['runsc']}, platform: {host['runsc_platform']}); "
        f"cellos from {host['cellos']}",
        f"python {host['python']} on {host['platform']}, {host['cpus']} cpu(s); "
        f"{cfg['cells']} rounds + {cfg['warmup']} warm-up, seed {cfg['seed']}; "
        f"{report['elapsed_seconds']:.1f} s",
    ]
    split = report["split"]
    if split is not None:
        lines.append(
            f"{VARIANT} {_ms(split['cell_median_ms'])} ms = bare runsc run "
            f"{_ms(split['bare_median_ms'])} ms + {_ms(split['added_ms'])} ms supervisor and "
            "backend (difference of medians)"
        )
    acc = report["acceptance"]
    target = f"target <= {acc['target_max_ratio']:g}x"
    head = f"acceptance: {acc['variant']} vs {acc['reference']}"
    if acc["ratio"] is None:
        lines.append(f"{head}: NOT MEASURED (--cells 0); {target}")
    else:
        verdict = "MET" if acc["met"] else "NOT MET"
        lines.append(f"{head}: {acc['ratio']:.2f}x ({target}): {verdict}")
    return lines


def print_table(report: Mapping[str, Any]) -> None:
    title = "CellOS gvisor: a full /bin/true cell vs a bare runsc run of the same bundle"
    render_table(title, HEADERS, table_rows(report), footer(report), len(report["references"]))


# -- CLI -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/gvisor.py",
        description="Median time of a full /bin/true cell on the gvisor backend as a ratio "
        "against a bare 'runsc run' of the same bundle, measured in the same run.",
    )
    parser.add_argument(
        "--cells", type=positive_or_zero, default=40, help="measured rounds (one cell each)"
    )
    parser.add_argument(
        "--warmup", type=positive_or_zero, default=3, help="unrecorded rounds first"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the round order shuffle")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    why = unavailable_reason()
    if why is not None:
        print(f"gvisor benchmark not run: {why}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    config = Config(cells=args.cells, warmup=args.warmup, seed=args.seed)
    return run_and_report(lambda: benchmark(config), args.json, print_table)


if __name__ == "__main__":
    raise SystemExit(main())
