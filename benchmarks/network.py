#!/usr/bin/env python3
"""Network scope benchmark: what a cell's egress authority costs per cell, warm and cold.

A ``/bin/true`` workload on each backend (``cellos``, ``gvisor``, ``qemu``; ``--backend``),
three variants: ``no-network`` (``egressRules: []``: a fresh loopback-only namespace),
``egress`` (one CIDR rule: netns + veth + nft table + teardown; a tap device too on qemu) and
``egress+dns`` (plus a DNS authority: the in-namespace DNS proxy); on ``cellos`` also
``egress+dns+injection``. The qemu guest boots under TCG here (seconds per cell), so it gets
its own, smaller round count (``--vm-rounds``).

* warm: one ``Supervisor`` per variant, many cells (what a worker does), interleaved in
  shuffled rounds with the bare primitive ``unshare --pid --fork --mount --net --uts --ipc
  true``;
* cold: one ``cellos-supervisor FILE`` process per cell (what a one-shot CLI user pays:
  interpreter start, imports, the scope, teardown, exit), interleaved in shuffled rounds with
  ``python -c pass``.

Reported: p50, p90, their ratios to the reference and the p50 ratio to the backend's cell
without network, and, per phase and backend, how much the network scope adds at p50 (variant
p50 minus no-network p50, same run). Acceptance (issue 14): on ``cellos``, egress adds at most
15 ms at p50, warm and cold. Needs root (netns, veth, nftables). ``CELLOS_LAUNCHER``,
``CELLOS_RUNSC`` and the microVM settings are passed on when set.

    python benchmarks/network.py [--rounds N] [--cold-rounds N] [--backend B ...]
                                 [--vm-rounds N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import harness
from harness import BenchError, Series, WarmCells, cell_document, cell_id, timed

VARIANTS: dict[str, dict[str, Any]] = {
    "no-network": {},
    "egress": {"egressRules": [{"cidr": "192.0.2.0/24", "port": 443}]},
    "egress+dns": {
        "egressRules": [{"cidr": "192.0.2.0/24", "port": 443}],
        "dnsAuthority": {
            "hostnameAllowlist": ["example.test"],
            "resolvers": [{"resolverId": "r", "address": "127.0.0.1:53"}],
        },
    },
    # Plus one secretInjection entry: the per-cell CA, its bundle, the secret armed in the proxy.
    "egress+dns+injection": {
        "secretRefs": ["bench-token"],
        "egressRules": [{"cidr": "192.0.2.0/24", "port": 443}],
        "dnsAuthority": {
            "hostnameAllowlist": ["example.test"],
            "resolvers": [{"resolverId": "r", "address": "127.0.0.1:53"}],
        },
        "secretInjection": [
            {"secretRef": "bench-token", "host": "example.test", "header": "Authorization"}
        ],
    },
}
BACKENDS = ("cellos", "gvisor", "qemu")
#: Variants every backend runs (secret injection is the cellos backend's alone).
SHARED_VARIANTS = ("no-network", "egress", "egress+dns")
#: At most this much added per cell by egress authority, at p50, warm and cold (issue 14).
TARGET_ADDED_MS = 15.0
PYTHON_PASS = harness.PYTHON_PASS


def variants(backend: str) -> dict[str, dict[str, Any]]:
    return {n: a for n, a in VARIANTS.items() if backend == "cellos" or n in SHARED_VARIANTS}


def unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot be measured on this host (None: it can)."""
    if backend == "gvisor" and shutil.which(os.environ.get("CELLOS_RUNSC") or "runsc") is None:
        return "runsc is not installed"
    if backend == "qemu" and shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed"
    return None


def base_env(tmp: Path, state: Path, src_added: bool, backend: str = "cellos") -> dict[str, str]:
    env = {
        **harness.child_env(tmp, src_added),
        "CELLOS_CELL_BACKEND": backend,
        "CELLOS_STATE_DIR": str(state),
        "CELLOS_LOG_DIR": str(tmp / "logs"),
        # The injection variant's secret (never a real one).
        "CELLOS_BROKER": "env",
        "CELLOS_SECRET_BENCH_TOKEN": "bench-secret-value",
    }
    for name in ("CELLOS_LAUNCHER", "CELLOS_RUNSC", "CELLOS_MICROVM_IMAGE", "CELLOS_MICROVM_ACCEL"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    if backend == "qemu":
        # Measured where it runs: under TCG on a host whose KVM cannot boot the guest.
        env["CELLOS_MICROVM_ALLOW_TCG"] = "1"
    return env


def added_ms(series: Mapping[str, Series], phase: str, backend: str) -> dict[str, float | None]:
    """Per variant with network: its p50 minus the no-network p50 of the same phase and
    backend (ms)."""
    base = series[f"{phase}/{backend}/no-network"]
    found: dict[str, float | None] = {}
    for name in variants(backend):
        if name == "no-network":
            continue
        s = series[f"{phase}/{backend}/{name}"]
        found[name] = (
            (harness.p50(s.samples) - harness.p50(base.samples)) / 1e6
            if s.samples and base.samples
            else None
        )
    return found


def warm_phase(
    tmp: Path, backend: str, rounds: int, warmup: int, rng: random.Random, src_added: bool
) -> tuple[list[Series], Series | None, list[Path]]:
    """The backend's variants in one Supervisor each; with ``unshare`` on ``cellos``."""
    cells: list[WarmCells] = []
    state_dirs = []
    unshare: Series | None = None
    try:
        for name in variants(backend):
            state = tmp / f"state-warm-{backend}-{name}"
            state_dirs.append(state)
            env = base_env(tmp, state, src_added, backend)
            cells.append(WarmCells(f"warm/{backend}/{name}", env))
        tasks = [
            c.task(lambda i, n=n, a=a: cell_document(cell_id("w", n, i), authority=a))
            for c, (n, a) in zip(cells, variants(backend).items(), strict=True)
        ]
        if backend == "cellos":
            unshare, unshare_task = harness.command_reference("unshare", harness.UNSHARE_ARGV)
            tasks += [unshare_task] if unshare_task else []
        harness.run_rounds(rounds, warmup, tasks, rng, f"warm {backend}")
    finally:
        for c in cells:
            c.close()
    rows = [c.series for c in cells]
    return ([unshare, *rows] if unshare else rows), unshare, state_dirs


def cold_phase(
    tmp: Path, backend: str, rounds: int, warmup: int, rng: random.Random, src_added: bool
) -> tuple[list[Series], Series | None, list[Path]]:
    """A process per cell for each variant; with ``python -c pass`` on ``cellos``."""
    command = harness.cli_command()
    specs = tmp / f"specs-{backend}"
    specs.mkdir()
    tasks: list[harness.Task] = []
    rows: list[Series] = []
    python: Series | None = None
    if backend == "cellos":
        python = Series(PYTHON_PASS)
        pass_env = base_env(tmp, tmp / "unused", src_added)
        tasks.append(
            timed(
                python,
                lambda: harness.run_checked(
                    [sys.executable, "-c", "pass"], PYTHON_PASS, env=pass_env, cwd=tmp
                ),
            )
        )
        rows.append(python)
    state_dirs = []
    for name, authority in variants(backend).items():
        state = tmp / f"state-cold-{backend}-{name}"
        state_dirs.append(state)
        env = base_env(tmp, state, src_added, backend)
        series = Series(f"cold/{backend}/{name}")
        rows.append(series)

        def one(
            index: int,
            record: bool,
            name: str = name,
            authority: dict[str, Any] = authority,
            env: Mapping[str, str] = env,
            series: Series = series,
        ) -> None:
            cid = cell_id("c", backend, name, index)
            spec = specs / f"{cid}.json"
            spec.write_text(json.dumps(cell_document(cid, authority=authority)), encoding="utf-8")
            argv = [*command, str(spec)]
            what = series.name
            timed(series, lambda: harness.run_checked(argv, what, env=env, cwd=tmp))(index, record)

        tasks.append(one)
    harness.run_rounds(rounds, warmup, tasks, rng, f"cold {backend}")
    return rows, python, state_dirs


def benchmark(
    rounds: int,
    warmup: int,
    cold_rounds: int,
    cold_warmup: int,
    seed: int,
    backends: Sequence[str] = BACKENDS,
    vm_rounds: int = 3,
) -> dict[str, Any]:
    src_added = harness.ensure_cellos_importable()
    started = time.perf_counter()
    rng = random.Random(seed)
    load_before = os.getloadavg()
    phases: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    series: dict[str, Series] = {}
    with harness.scratch("cellos-bench-net-") as tmp_name:
        tmp = Path(tmp_name)
        state_dirs: list[Path] = []
        for backend in backends:
            why = unavailable(backend)
            if why is not None:
                skipped[backend] = why
                continue
            # A TCG guest boot takes seconds: the VM gets its own round count.
            n_warm, n_cold = (
                (min(rounds, vm_rounds), min(cold_rounds, vm_rounds))
                if backend == "qemu"
                else (rounds, cold_rounds)
            )
            for phase, n, w, run_phase in (
                ("warm", n_warm, min(warmup, 1) if backend == "qemu" else warmup, warm_phase),
                ("cold", n_cold, min(cold_warmup, 1) if backend == "qemu" else cold_warmup,
                 cold_phase),
            ):  # fmt: skip
                if not n:
                    continue
                rows, reference, dirs = run_phase(tmp, backend, n, w, rng, src_added)
                state_dirs += dirs
                series.update({s.name: s for s in rows})
                base = series[f"{phase}/{backend}/no-network"]
                phases[f"{phase}/{backend}"] = {
                    "reference": (reference or base).name,
                    # Without a bare primitive in the phase, the backend's own cell without
                    # network is the reference (and not repeated as an extra column).
                    "rows": harness.ratio_rows(
                        rows, reference or base, [base] if reference else []
                    ),
                    "added_ms": added_ms(series, phase, backend),
                }
        left = harness.residue(state_dirs)
        if left:
            raise BenchError(f"cells left residue in their state directories: {left[:5]}")
    acceptance = {
        phase: {
            "claim": f"{phase}: egress adds <= {TARGET_ADDED_MS:g} ms per cell at p50",
            "added_ms": phases[key]["added_ms"]["egress"] if key in phases else None,
            "met": key in phases
            and phases[key]["added_ms"]["egress"] is not None
            and phases[key]["added_ms"]["egress"] <= TARGET_ADDED_MS,
        }
        for phase, key in (("warm", "warm/cellos"), ("cold", "cold/cellos"))
        if key in phases
    }
    return {
        "benchmark": "cellos.network",
        "config": {
            "rounds": rounds,
            "warmup": warmup,
            "cold_rounds": cold_rounds,
            "cold_warmup": cold_warmup,
            "vm_rounds": vm_rounds,
            "backends": list(backends),
            "seed": seed,
        },
        "host": {
            **harness.host_info(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "unshare": " ".join(harness.UNSHARE_ARGV),
        "cold_command": " ".join([*harness.cli_command(), "SPEC"]),
        "phases": phases,
        "not_measured": skipped,
        "acceptance": acceptance,
        "elapsed_seconds": time.perf_counter() - started,
    }


def show(report: Mapping[str, Any]) -> None:
    titles = {
        "warm": "warm: one Supervisor per variant, many cells",
        "cold": "cold: one cellos-supervisor FILE process per cell",
    }
    print("CellOS network scope: a /bin/true cell with and without egress authority")
    for phase, data in report["phases"].items():
        kind, backend = phase.split("/")
        print(f"\n{backend} {titles[kind]}")
        print("\n".join(harness.ratio_table(data["rows"], data["reference"])))
        for name, value in data["added_ms"].items():
            shown = "n/a" if value is None else f"{value:.2f} ms"
            print(f"{phase}: {name} adds {shown} per cell at p50 (over {phase}/no-network)")
    for backend, why in report["not_measured"].items():
        print(f"\n{backend}: not measured: {why}")
    print()
    for acc in report["acceptance"].values():
        print(harness.added_acceptance_line(acc["claim"], acc["added_ms"], acc["met"]))
    cfg, host = report["config"], report["host"]
    load = " ".join(f"{x:.2f}" for x in host["loadavg_before"])
    load_after = " ".join(f"{x:.2f}" for x in host["loadavg_after"])
    print(
        f"unshare = {report['unshare']}; cold = {report['cold_command']}; "
        f"{cfg['rounds']}+{cfg['warmup']} warm and {cfg['cold_rounds']}+{cfg['cold_warmup']} "
        f"cold rounds (qemu: at most {cfg['vm_rounds']}), seed {cfg['seed']}; "
        f"load average {load} -> {load_after} "
        f"({host['cpus']} cpus); {report['elapsed_seconds']:.1f} s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/network.py",
        description="p50/p90 of cells with and without egress authority, warm (one "
        "supervisor) and cold (a cellos-supervisor process per cell), against unshare and "
        "python -c pass measured in the same run (needs root and nft).",
    )
    harness.add_round_options(parser, rounds=20, warmup=3)
    parser.add_argument(
        "--cold-rounds",
        type=harness.nonnegative,
        default=30,
        help="measured cold rounds (default 30: a cold cell varies by +-15 ms between "
        "runs; 0 skips the cold phase)",
    )
    parser.add_argument(
        "--cold-warmup",
        type=harness.nonnegative,
        default=2,
        help="unrecorded cold rounds run first (default 2)",
    )
    parser.add_argument(
        "--backend",
        action="append",
        choices=BACKENDS,
        help="backend to measure (repeatable; default: all three, each where available)",
    )
    parser.add_argument(
        "--vm-rounds",
        type=harness.nonnegative,
        default=3,
        help="measured rounds of the qemu backend, warm and cold (default 3: a TCG boot "
        "takes seconds)",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("nft") is None:
        print("network benchmark not run: needs root and nftables (nft)", file=sys.stderr)
        return 2
    return harness.emit(
        lambda: benchmark(
            args.rounds,
            args.warmup,
            args.cold_rounds,
            args.cold_warmup,
            args.seed,
            tuple(args.backend or BACKENDS),
            args.vm_rounds,
        ),
        args.json,
        show,
    )


if __name__ == "__main__":
    raise SystemExit(main())
