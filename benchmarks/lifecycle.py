#!/usr/bin/env python3
"""Lifecycle benchmark: what a full ``/bin/true`` cell costs next to the bare primitives.

Warm phase (one ``Supervisor`` in-process running many cells, per backend), each round in a
shuffled order: ``stub/warm``, ``cellos/warm``, ``cellos/warm+jsonl`` and
``cellos/warm+jsonl+ed25519`` (events to a JSONL file, unsigned and signed: their difference
is the signing cost), and the references ``unshare --pid --fork --mount --net --uts --ipc
true`` (the bare isolation primitive, needs root), the bare ``cellos-sandbox`` launch of the
same cell (the backend's exact command line and seccomp pipe, nothing around it) and
``/bin/true``. Ratios against ``unshare``.

Cold phase (one ``cellos-supervisor FILE`` process per cell, noop sink): ``stub/cold``,
``cellos/cold`` and the references ``python -c pass`` (same interpreter and environment) and
``/bin/true``. Ratios against ``python -c pass``.

Acceptance (p50 ratios of the same run): cellos/warm <= 2.5x unshare, cellos/cold <= 5x
python -c pass, stub/cold <= 4x python -c pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec.structs

import harness
from harness import BenchError, Series, WarmCells, cell_document, cell_id, timed

BACKENDS = ("stub", "cellos")
UNSHARE_ARGV = harness.UNSHARE_ARGV
UNSHARE = "unshare"
PYTHON_PASS = harness.PYTHON_PASS
#: (subject, reference, target): p50(subject) / p50(reference) <= target.
TARGETS = (
    ("cellos/warm", UNSHARE, 2.5),
    ("cellos/cold", PYTHON_PASS, 5.0),
    ("stub/cold", PYTHON_PASS, 4.0),
)


class LauncherLaunch:
    """The bare launch of a ``/bin/true`` cell by ``cellos-sandbox``, exactly as the
    ``cellos`` backend builds it (launcher, rootfs, user namespace, Landlock, working
    directory; the seccomp program written to a pipe whose read end the launcher reads),
    without the supervisor: no validation, state record, cgroups, pidfd loop, events or
    teardown."""

    def __init__(self, backend: Any, workspace: Path) -> None:
        from cellos.core.loading import validate_document
        from cellos.hosts.cellos.sandbox import SandboxPlan, launcher_argv
        from cellos.hosts.cellos.seccomp_filter import workload_filter_bpf

        run = validate_document(cell_document(cell_id("launcher"))).spec.run
        self.argv, self.env = list(run.argv), dict(run.env)
        workspace.mkdir(parents=True, exist_ok=True)
        self.plan = SandboxPlan(
            cell_id=cell_id("launcher"),
            workspace=str(workspace),
            working_directory=run.working_directory,
            rootfs=backend.rootfs,
            user_namespace=backend.user_namespace,
            landlock_abi=backend.landlock_abi,
        )
        self.launcher: str = backend.launcher
        self._argv, self._filter = launcher_argv, workload_filter_bpf
        self._filter()  # compiled once per process (cached), as in the backend
        self.last_command: list[str] = []

    def __call__(self) -> None:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            os.write(write_fd, self._filter())
            os.close(write_fd)
            write_fd = -1
            plan = msgspec.structs.replace(self.plan, seccomp_fd=read_fd)
            self.last_command = self._argv(plan, self.argv, self.launcher)
            harness.run_checked(
                self.last_command,
                "bare launcher launch",
                env=self.env,
                cwd="/",
                pass_fds=(read_fd,),
                start_new_session=True,
            )
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)


@dataclass
class Config:
    rounds: int
    cold_rounds: int
    warmup: int
    cold_warmup: int
    backends: list[str]
    seed: int
    signing: bool


class Run:
    """One benchmark run, inside a temporary directory removed at the end."""

    def __init__(self, config: Config, tmp: Path, src_added: bool) -> None:
        self.config, self.tmp = config, tmp
        self.rng = random.Random(config.seed)
        self.state_dirs: list[Path] = []
        self.child_env = harness.child_env(tmp, src_added)
        self.signing_seed = secrets.token_bytes(32)
        self.jsonl: dict[str, Path] = {}
        self.events_per_cell: dict[str, int] = {}
        self.launcher_command: list[str] | None = None

    def env_for(self, backend: str, name: str, **extra: str) -> dict[str, str]:
        state = self.tmp / "state" / name
        self.state_dirs.append(state)
        env = {**self.child_env, "CELLOS_CELL_BACKEND": backend, "CELLOS_STATE_DIR": str(state)}
        return {**env, **extra}

    def warm_cells(self) -> list[WarmCells]:
        from cellos.core.signing import b64url_encode

        specs = [(f"{b}/warm", b, {}) for b in self.config.backends]
        if self.config.signing and "cellos" in self.config.backends:
            plain, signed = self.tmp / "events.jsonl", self.tmp / "events-signed.jsonl"
            self.jsonl = {"cellos/warm+jsonl": plain, "cellos/warm+jsonl+ed25519": signed}
            specs.append(("cellos/warm+jsonl", "cellos", {"CELL_OS_JSONL_EVENTS": str(plain)}))
            specs.append(
                (
                    "cellos/warm+jsonl+ed25519",
                    "cellos",
                    {
                        "CELL_OS_JSONL_EVENTS": str(signed),
                        "CELLOS_EVENT_SIGNING": "ed25519",
                        "CELLOS_EVENT_SIGNING_KID": "bench",
                        # A throw-away key that exists only in this process and its temp dir.
                        "CELLOS_EVENT_SIGNING_KEY_BASE64": b64url_encode(self.signing_seed),
                    },
                )
            )
        cells: list[WarmCells] = []
        try:
            for key, backend, extra in specs:
                env = self.env_for(backend, key.replace("/", "-"), **extra)
                if extra:
                    env.pop("CELL_OS_USE_NOOP_SINK")  # the JSONL sink replaces the noop sink
                cells.append(WarmCells(key, env))
        except BaseException:
            for c in cells:
                c.close()
            raise
        return cells

    def warm(self) -> tuple[list[Series], Series, Series]:
        """The warm phase: (rows, unshare, /bin/true)."""
        true = Series("/bin/true")
        launcher = Series("bare cellos-sandbox launch")
        cells = self.warm_cells()
        try:
            tasks = []
            for c in cells:
                key = c.series.name
                tasks += [
                    c.task(lambda i, key=key: cell_document(cell_id(key, i))),
                    timed(true, harness.run_true),
                ]
            unshare, unshare_task = harness.command_reference(UNSHARE, UNSHARE_ARGV)
            tasks += [unshare_task] if unshare_task else []
            cellos = next((c for c in cells if c.series.name == "cellos/warm"), None)
            if cellos is None:
                launcher.unavailable = "the cellos backend is not selected"
            else:
                launch = LauncherLaunch(cellos.backend, self.tmp / "launcher-workspace")
                launch()  # untimed: fail now, with the launcher's message, if it cannot run
                self.launcher_command = launch.last_command
                tasks.append(timed(launcher, launch))
            harness.run_rounds(self.config.rounds, self.config.warmup, tasks, self.rng, "warm")
        finally:
            for c in cells:
                c.close()
        self.events_per_cell = {c.series.name: c.events_per_cell for c in cells}
        return [true, unshare, launcher, *(c.series for c in cells)], unshare, true

    def cold(self) -> tuple[list[Series], Series, Series]:
        """The cold phase: (rows, python -c pass, /bin/true)."""
        true, python = Series("/bin/true"), Series(PYTHON_PASS)
        command = harness.cli_command()
        spec_dir = self.tmp / "specs"
        spec_dir.mkdir()
        pass_argv = [sys.executable, "-c", "pass"]
        tasks = []
        rows = [true, python]
        for backend in self.config.backends:
            key = f"{backend}/cold"
            env = self.env_for(backend, f"{backend}-cold")
            series = Series(key)
            rows.append(series)

            def one(
                index: int,
                record: bool,
                key: str = key,
                env: Mapping[str, str] = env,
                series: Series = series,
            ) -> None:
                cid = cell_id(key, index)
                spec = spec_dir / f"{cid}.json"
                spec.write_text(json.dumps(cell_document(cid)), encoding="utf-8")
                argv = [*command, str(spec)]
                timed(series, lambda: harness.run_checked(argv, key, env=env, cwd=self.tmp))(
                    index, record
                )

            tasks += [
                one,
                timed(true, harness.run_true),
                timed(
                    python,
                    lambda: harness.run_checked(
                        pass_argv, PYTHON_PASS, env=self.child_env, cwd=self.tmp
                    ),
                ),
            ]
        harness.run_rounds(
            self.config.cold_rounds, self.config.cold_warmup, tasks, self.rng, "cold"
        )
        return rows, python, true

    def verify_signed(self) -> dict[str, int] | None:
        """Check (untimed) that the signed variant wrote evidence that verifies."""
        path = self.jsonl.get("cellos/warm+jsonl+ed25519")
        if path is None or not path.exists():
            return None
        from cellos.core.signing import Ed25519Signer, VerifyKeys, verify_keys_document
        from cellos.verify import verify_events_file

        signer = Ed25519Signer("bench", self.signing_seed)
        keys = VerifyKeys.from_document(verify_keys_document([signer]))
        report = verify_events_file(str(path), keys)
        if not report.ok:
            raise BenchError(f"signed events do not verify: {report.first_error}")
        return {"events": report.events, "runs": report.runs}


def benchmark(config: Config) -> dict[str, Any]:
    src_added = harness.ensure_cellos_importable()
    import cellos

    started = time.perf_counter()
    phases: dict[str, Any] = {}
    found: dict[str, Series] = {}
    with harness.scratch("cellos-bench-") as tmp_name:
        run = Run(config, Path(tmp_name), src_added)
        if config.rounds:
            rows, unshare, true = run.warm()
            phases["warm"] = harness.ratio_rows(rows, unshare, [true])
            found.update({s.name: s for s in rows if s.name != "/bin/true"})
        if config.cold_rounds:
            rows, python, true = run.cold()
            phases["cold"] = harness.ratio_rows(rows, python, [true])
            found.update({s.name: s for s in rows if s.name != "/bin/true"})
        left = harness.residue(run.state_dirs)
        if left:
            raise BenchError(f"cells left residue in their state directories: {left[:5]}")
        verified = run.verify_signed()
    accept = [
        harness.acceptance(
            f"{subject} <= {target:g}x {reference}",
            found.get(subject, Series(subject, unavailable="not selected")),
            found.get(reference, Series(reference, unavailable="its phase did not run")),
            target,
        )
        for subject, reference, target in TARGETS
    ]
    return {
        "benchmark": "cellos.lifecycle",
        "config": dataclasses.asdict(config),
        "host": {**harness.host_info(), "cellos": str(Path(cellos.__file__ or "?").parent)},
        "references": {
            UNSHARE: " ".join(UNSHARE_ARGV),
            "bare cellos-sandbox launch": run.launcher_command,
            PYTHON_PASS: f"{sys.executable} -c pass",
            "cold command": " ".join([*harness.cli_command(), "SPEC"]),
        },
        "phases": phases,
        "acceptance": accept,
        "events_per_cell": run.events_per_cell,
        "signing_cost": signing_cost(found, run.events_per_cell),
        "signed_events_verified": verified,
        "elapsed_seconds": time.perf_counter() - started,
    }


def signing_cost(found: Mapping[str, Series], events: Mapping[str, int]) -> dict[str, Any] | None:
    plain, signed = found.get("cellos/warm+jsonl"), found.get("cellos/warm+jsonl+ed25519")
    if plain is None or signed is None or not plain.samples or not signed.samples:
        return None
    per_cell_ms = (harness.p50(signed.samples) - harness.p50(plain.samples)) / 1e6
    count = events.get("cellos/warm+jsonl+ed25519", 0)
    return {
        "per_cell_ms": per_cell_ms,
        "events_per_cell": count,
        "per_event_us": per_cell_ms * 1000 / count if count else None,
    }


def show(report: Mapping[str, Any]) -> None:
    labels = {"warm": UNSHARE, "cold": PYTHON_PASS}
    titles = {
        "warm": "warm: one Supervisor in-process, many /bin/true cells",
        "cold": "cold: one cellos-supervisor FILE process per cell, noop sink",
    }
    print("CellOS lifecycle: a full /bin/true cell vs the bare primitives, same run")
    for phase, rows in report["phases"].items():
        print(f"\n{titles[phase]}")
        print("\n".join(harness.ratio_table(rows, labels[phase])))
    refs = report["references"]
    print(f"\n{UNSHARE} = {refs[UNSHARE]}; cold command = {refs['cold command']}")
    cost = report["signing_cost"]
    if cost is not None and cost["per_event_us"] is not None:
        print(
            f"ed25519 signing: {cost['per_cell_ms']:+.3f} ms/cell over unsigned JSONL "
            f"({cost['per_event_us']:+.0f} us/event, {cost['events_per_cell']} events/cell)"
        )
    verified = report["signed_events_verified"]
    if verified is not None:
        print(f"signed JSONL verified: {verified['events']} events in {verified['runs']} runs")
    host, cfg = report["host"], report["config"]
    print(
        f"python {host['python']}, {host['cpus']} cpu(s), cellos from {host['cellos']}; "
        f"{cfg['rounds']}+{cfg['warmup']} warm and {cfg['cold_rounds']}+{cfg['cold_warmup']} "
        f"cold rounds, seed {cfg['seed']}; {report['elapsed_seconds']:.1f} s"
    )
    for acc in report["acceptance"]:
        print(harness.acceptance_line(acc))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/lifecycle.py",
        description="p50/p90 of a full /bin/true cell per backend, warm and cold, as ratios "
        "against unshare (warm) and python -c pass (cold) measured in the same run.",
    )
    harness.add_round_options(parser, rounds=40, warmup=5)
    parser.add_argument(
        "--cold-rounds",
        type=harness.nonnegative,
        default=30,
        help="measured cold rounds (default 30)",
    )
    parser.add_argument(
        "--cold-warmup", type=harness.nonnegative, default=2, help="unrecorded cold rounds"
    )
    parser.add_argument(
        "--backend",
        dest="backends",
        action="append",
        choices=BACKENDS,
        help="backend to measure (repeatable; default: stub and cellos)",
    )
    parser.add_argument(
        "--no-signing", action="store_true", help="skip the JSONL / ed25519 warm variants"
    )
    args = parser.parse_args(argv)
    config = Config(
        rounds=args.rounds,
        cold_rounds=args.cold_rounds,
        warmup=args.warmup,
        cold_warmup=args.cold_warmup,
        backends=list(dict.fromkeys(args.backends or BACKENDS)),
        seed=args.seed,
        signing=not args.no_signing,
    )
    return harness.emit(lambda: benchmark(config), args.json, show)


if __name__ == "__main__":
    raise SystemExit(main())
