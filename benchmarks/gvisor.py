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

Reported: p50, p90, and ``p50(gvisor/warm) / p50(bare runsc run)`` against the
target (<= 1.3x). It needs root (runsc cannot run rootless here) and runsc: without them it
exits 2. Everything lives in one temporary directory (state, bundle, runsc ``--root``), removed
at the end after any container left in it has been deleted.

Usage: ``python benchmarks/gvisor.py [--rounds N] [--warmup W] [--seed S] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
from harness import TRUE, BenchError, Series, WarmCells, cell_document, cell_id, timed

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
    rounds: int
    warmup: int
    seed: int


def benchmark(config: Config) -> dict[str, Any]:
    harness.ensure_cellos_importable()
    import cellos

    started = time.perf_counter()
    rng = random.Random(config.seed)
    with harness.scratch("cellos-bench-gvisor-") as tmp_name:
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
        cells = WarmCells(VARIANT, env)
        bare: BareRunsc | None = None
        true, bare_series = Series("/bin/true"), Series(BARE_NAME)
        try:
            backend = cells.backend
            if backend.name != "gvisor":
                raise BenchError(f"build_supervisor chose the {backend.name!r} backend")
            bare = BareRunsc(backend, tmp / "bare", cell_id("bare"))
            bare.probe()
            bundle_check = check_same_bundle(backend, bare)
            tasks = [
                cells.task(lambda i: cell_document(cell_id("gvisor", i))),
                timed(bare_series, bare),
                timed(true, harness.run_true),
            ]
            harness.run_rounds(config.rounds, config.warmup, tasks, rng)
        finally:
            cells.close()
            left_containers = bare.cleanup() if bare is not None else []
        left = harness.residue([state])
        gvisor_root = state / "gvisor"
        if gvisor_root.is_dir():
            left += [str(p) for p in sorted(gvisor_root.iterdir())]
        left += [f"runsc container {c}" for c in left_containers]
        left += [f"process: {c}" for c in lingering_processes(str(tmp))]
        if left:
            raise BenchError(f"residue after the run: {left[:5]}")

    return {
        "benchmark": "cellos.gvisor",
        "config": {**vars(config), "workload": TRUE},
        "host": {
            **harness.host_info(),
            "cellos": str(Path(cellos.__file__ or "?").parent),
            "runsc": backend.runsc,
            "runsc_version": runsc_version(backend.runsc),
            "runsc_platform": backend.platform or "runsc default",
        },
        "bare_command": bare.last_command,
        "delete_after_run": bare.needs_delete,
        "bundle_check": bundle_check,
        "rows": harness.ratio_rows([true, bare_series, cells.series], bare_series, [true]),
        "events_per_cell": cells.events_per_cell,
        "acceptance": [
            harness.acceptance(
                f"{VARIANT} <= {ACCEPTANCE_MAX_RATIO:g}x {BARE_NAME}",
                cells.series,
                bare_series,
                ACCEPTANCE_MAX_RATIO,
            )
        ],
        "elapsed_seconds": time.perf_counter() - started,
    }


def show(report: Mapping[str, Any]) -> None:
    print("CellOS gvisor: a full /bin/true cell vs a bare runsc run of the same bundle")
    print("\n".join(harness.ratio_table(report["rows"], "bare runsc")))
    delete = (
        " + runsc delete --force (runsc list showed the container after run)"
        if report["delete_after_run"]
        else " (no delete needed: runsc list showed no container after run)"
    )
    host, cfg = report["host"], report["config"]
    print(f"bare runsc run: {' '.join(report['bare_command'])}{delete}")
    print(
        f"bundle: config.json and {report['bundle_check']['skeleton_entries']} skeleton entries"
        " identical to the backend's own (paths aside)"
    )
    print(
        f"{host['runsc_version']} ({host['runsc']}, platform: {host['runsc_platform']}); "
        f"python {host['python']}, {host['cpus']} cpu(s); {cfg['rounds']}+{cfg['warmup']} "
        f"rounds, seed {cfg['seed']}; {report['elapsed_seconds']:.1f} s"
    )
    for acc in report["acceptance"]:
        print(harness.acceptance_line(acc))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/gvisor.py",
        description="p50/p90 of a full /bin/true cell on the gvisor backend as ratios against "
        "a bare 'runsc run' of the same bundle, measured in the same run (needs root, runsc).",
    )
    harness.add_round_options(parser, rounds=15, warmup=2)
    args = parser.parse_args(argv)
    why = unavailable_reason()
    if why is not None:
        print(f"gvisor benchmark not run: {why}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    config = Config(rounds=args.rounds, warmup=args.warmup, seed=args.seed)
    return harness.emit(lambda: benchmark(config), args.json, show)


if __name__ == "__main__":
    raise SystemExit(main())
