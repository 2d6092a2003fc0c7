#!/usr/bin/env python3
"""Network scope benchmark: what a cell's egress authority costs per cell.

Warm cells (one ``Supervisor`` per variant, many cells), ``cellos`` backend, a ``/bin/true``
workload: ``cellos/no-network`` (``egressRules: []``: a fresh loopback-only namespace),
``cellos/egress`` (one CIDR rule: netns + veth + nft table + teardown), ``cellos/egress+dns``
(plus a DNS authority: the in-namespace DNS proxy and L7 redirect) and
``cellos/egress+dns+injection`` (plus one ``secretInjection`` entry: the per-cell CA, its
bundle, the secret resolved and the proxy armed), interleaved in shuffled rounds with the bare
primitive ``unshare --pid --fork --mount --net --uts --ipc true``. Reported: p50, p90, their
ratios to ``unshare`` and the p50 ratio to the cell without network. Needs root (netns, veth,
nftables).

    python benchmarks/network.py [--rounds N] [--warmup W] [--json]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import harness
from harness import BenchError, WarmCells, cell_document, cell_id

VARIANTS: dict[str, dict[str, Any]] = {
    "cellos/no-network": {},
    "cellos/egress": {"egressRules": [{"cidr": "192.0.2.0/24", "port": 443}]},
    "cellos/egress+dns": {
        "egressRules": [{"cidr": "192.0.2.0/24", "port": 443}],
        "dnsAuthority": {
            "hostnameAllowlist": ["example.test"],
            "resolvers": [{"resolverId": "r", "address": "127.0.0.1:53"}],
        },
    },
    "cellos/egress+dns+injection": {
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


def benchmark(rounds: int, warmup: int, seed: int) -> dict[str, Any]:
    harness.ensure_cellos_importable()
    started = time.perf_counter()
    cells: list[WarmCells] = []
    with tempfile.TemporaryDirectory(prefix="cellos-bench-net-") as tmp_name:
        tmp = Path(tmp_name)
        state_dirs = []
        try:
            for index, name in enumerate(VARIANTS):
                state = tmp / f"state-{index}"
                state_dirs.append(state)
                env = {
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "HOME": str(tmp),
                    "LANG": "C.UTF-8",
                    "CELL_OS_USE_NOOP_SINK": "1",
                    "CELLOS_CELL_BACKEND": "cellos",
                    "CELLOS_STATE_DIR": str(state),
                    "CELLOS_BROKER": "env",
                    "CELLOS_SECRET_BENCH_TOKEN": "bench-secret-value",
                }
                if os.environ.get("CELLOS_LAUNCHER"):  # a prebuilt launcher, if given
                    env["CELLOS_LAUNCHER"] = os.environ["CELLOS_LAUNCHER"]
                cells.append(WarmCells(name, env))
            tasks = [
                c.task(lambda i, n=n, a=a: cell_document(cell_id(n, i), authority=a))
                for c, (n, a) in zip(cells, VARIANTS.items(), strict=True)
            ]
            unshare, unshare_task = harness.command_reference("unshare", harness.UNSHARE_ARGV)
            tasks += [unshare_task] if unshare_task else []
            harness.run_rounds(rounds, warmup, tasks, random.Random(seed))
        finally:
            for c in cells:
                c.close()
        left = harness.residue(state_dirs)
        if left:
            raise BenchError(f"cells left residue in their state directories: {left[:5]}")
    no_network = cells[0].series
    rows = harness.ratio_rows([unshare, *(c.series for c in cells)], unshare, [no_network])
    added = None
    if no_network.samples and cells[1].series.samples:
        added = (harness.p50(cells[1].series.samples) - harness.p50(no_network.samples)) / 1e6
    injection_added = None
    if cells[2].series.samples and cells[3].series.samples:
        injection_added = (
            harness.p50(cells[3].series.samples) - harness.p50(cells[2].series.samples)
        ) / 1e6
    return {
        "benchmark": "cellos.network",
        "config": {"rounds": rounds, "warmup": warmup, "seed": seed},
        "host": harness.host_info(),
        "unshare": " ".join(harness.UNSHARE_ARGV),
        "rows": rows,
        "egress_added_ms": added,
        "injection_added_ms": injection_added,
        "elapsed_seconds": time.perf_counter() - started,
    }


def show(report: Mapping[str, Any]) -> None:
    print("CellOS network scope: a /bin/true cell with and without egress authority (warm)")
    print("\n".join(harness.ratio_table(report["rows"], "unshare")))
    if report["egress_added_ms"] is not None:
        print(
            f"egress authority adds {report['egress_added_ms']:.2f} ms per cell at p50 "
            "(netns, veth, nft table, teardown)"
        )
    if report.get("injection_added_ms") is not None:
        print(
            f"secret injection adds {report['injection_added_ms']:.2f} ms per cell at p50 "
            "(per-cell CA, CA bundle, arming the proxy)"
        )
    cfg = report["config"]
    print(
        f"unshare = {report['unshare']}; {cfg['rounds']}+{cfg['warmup']} rounds, "
        f"seed {cfg['seed']}; {report['elapsed_seconds']:.1f} s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/network.py",
        description="p50/p90 of warm cellos cells with and without egress authority, as "
        "ratios against unshare measured in the same run (needs root and nft).",
    )
    harness.add_round_options(parser, rounds=20, warmup=3)
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("nft") is None:
        print("network benchmark not run: needs root and nftables (nft)", file=sys.stderr)
        return 2
    return harness.emit(lambda: benchmark(args.rounds, args.warmup, args.seed), args.json, show)


if __name__ == "__main__":
    raise SystemExit(main())
