"""Network scope benchmark: what a cell's egress authority costs per cell.

Warm mode (one Supervisor, many cells), ``cellos`` backend, a ``/bin/true`` workload:
``cellos/no-network`` (``egressRules: []``: a fresh loopback-only namespace) vs
``cellos/egress`` (one CIDR rule: netns + veth + nft table + teardown) vs
``cellos/egress+dns`` (plus a DNS authority: the in-namespace DNS proxy and L7 redirect).
Variants are interleaved in shuffled rounds and reported as medians and as ratios to the
cell without network measured in the same run. Needs root (netns, veth, nftables).

    python benchmarks/network.py [--cells N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

from cellos.core.loading import validate_document
from cellos.supervisor.composition import build_supervisor

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
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=60, help="cells per variant")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("nft") is None:
        print("error: needs root and nftables (nft)", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="cellos-bench-net-")
    try:
        supervisor = build_supervisor({"CELL_OS_USE_NOOP_SINK": "1", "CELLOS_STATE_DIR": tmp})
        samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
        rng = random.Random(0)
        for index in range(args.cells + 3):
            order = list(VARIANTS)
            rng.shuffle(order)
            for name in order:
                doc = validate_document(
                    {
                        "apiVersion": "cellos.io/v1",
                        "kind": "ExecutionCell",
                        "spec": {
                            "id": f"bn-{index}-{name.split('/')[1].replace('+', '-')}",
                            "authority": VARIANTS[name],
                            "run": {"argv": ["/bin/true"]},
                        },
                    }
                )
                start = time.perf_counter()
                out = supervisor.run(doc)
                elapsed = time.perf_counter() - start
                if out.exit_code != 0:
                    print(f"error: {name}: {[str(e) for e in out.errors]}", file=sys.stderr)
                    return 1
                if index >= 3:  # warm-up rounds are not recorded
                    samples[name].append(elapsed * 1000)
        base = statistics.median(samples["cellos/no-network"])
        report = {
            name: {
                "n": len(v),
                "median_ms": statistics.median(v),
                "p90_ms": sorted(v)[int(len(v) * 0.9) - 1],
                "ratio_vs_no_network": statistics.median(v) / base,
            }
            for name, v in samples.items()
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print("CellOS network scope: a /bin/true cell with and without egress authority (warm)")
    print(f"{'variant':<20} {'n':>4} {'median ms':>10} {'p90 ms':>8} {'x no-network':>13}")
    for name, r in report.items():
        print(
            f"{name:<20} {r['n']:>4} {r['median_ms']:>10.2f} {r['p90_ms']:>8.2f} "
            f"{r['ratio_vs_no_network']:>12.2f}x"
        )
    added = report["cellos/egress"]["median_ms"] - base
    print(f"network scope adds {added:.2f} ms per cell (netns, veth, nft table, teardown)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
