#!/usr/bin/env python3
"""Secret delivery benchmark: what ``secretDelivery: runtimeBroker`` adds to a ``/bin/true``
cell on the ``cellos`` backend, next to the same cell with ``secretDelivery: env``.

Warm cells (one ``Supervisor`` per variant, many cells, the noop sink), each round in a
freshly shuffled order:

* ``cellos/env``: two secrets (``CELLOS_BROKER=env``) delivered as environment variables
  (the reference: what delivery cost before files existed);
* ``cellos/runtimeBroker``: the same two secrets as files: a sealed memfd written by the
  supervisor, read by the cell's pid 1, a tmpfs mounted on ``/run/secrets`` in the cell's
  mount namespace, one 0400 file per secret;
* ``cellos/no-secrets``: the same cell without secrets (for scale).

Acceptance: p50(runtimeBroker) - p50(env) <= 2 ms (the added cost of file delivery, measured
in the same run).
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
from harness import BenchError, Series, WarmCells, cell_document, cell_id

#: Added cost of runtimeBroker over env delivery, p50, in milliseconds.
TARGET_ADDED_MS = 2.0
KEYS = ("bench-token", "bench-db-pass")
VARIANTS = ("cellos/env", "cellos/runtimeBroker", "cellos/no-secrets")
EXIT_UNAVAILABLE = 2


@dataclass(frozen=True)
class Config:
    rounds: int
    warmup: int
    seed: int


def unavailable_reason() -> str | None:
    if os.geteuid() != 0 and shutil.which("unshare") is None:
        return "the cellos backend needs root or user namespaces"
    return None


def _document(variant: str, index: int) -> dict[str, Any]:
    cid = cell_id(variant.replace("/", "-"), index)
    if variant == "cellos/no-secrets":
        return cell_document(cid)
    delivery = variant.split("/", 1)[1]
    doc = cell_document(cid, authority={"secretRefs": list(KEYS)})
    doc["spec"]["run"]["secretDelivery"] = delivery
    return doc


def benchmark(config: Config) -> dict[str, Any]:
    harness.ensure_cellos_importable()
    started = time.monotonic()
    with harness.scratch("cellos-bench-secrets-") as tmp:
        base = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "CELLOS_CELL_BACKEND": "cellos",
            "CELL_OS_USE_NOOP_SINK": "1",
            "CELLOS_BROKER": "env",
            "CELLOS_LOG_DIR": str(Path(tmp) / "logs"),
            **{
                "CELLOS_SECRET_" + k.replace("-", "_").upper(): secrets.token_urlsafe(24)
                for k in KEYS
            },
        }
        cells: list[WarmCells] = []
        states: list[Path] = []
        try:
            for variant in VARIANTS:
                state = Path(tmp) / variant.replace("/", "-")
                states.append(state)
                cells.append(WarmCells(variant, {**base, "CELLOS_STATE_DIR": str(state)}))
            tasks = [
                c.task(lambda i, v=c.series.name: _document(v, i))  # type: ignore[misc]
                for c in cells
            ]
            harness.run_rounds(config.rounds, config.warmup, tasks, random.Random(config.seed))
        finally:
            for c in cells:
                c.close()
        left = harness.residue(states)
        if left:
            raise BenchError(f"cells left state behind: {left}")
    series: dict[str, Series] = {c.series.name: c.series for c in cells}
    env, files = series["cellos/env"], series["cellos/runtimeBroker"]
    added_p50 = (harness.p50(files.samples) - harness.p50(env.samples)) / 1e6
    added_p90 = (harness.p90(files.samples) - harness.p90(env.samples)) / 1e6
    load = os.getloadavg()
    return {
        "rows": harness.ratio_rows(list(series.values()), env),
        "added_ms_p50": added_p50,
        "added_ms_p90": added_p90,
        "acceptance": [
            {
                "claim": f"runtimeBroker adds <= {TARGET_ADDED_MS:g} ms over env delivery (p50)",
                "target_max_added_ms": TARGET_ADDED_MS,
                "added_ms_p50": added_p50,
                "met": added_p50 <= TARGET_ADDED_MS,
            }
        ],
        "host": {**harness.host_info(), "loadavg": list(load)},
        "config": {"rounds": config.rounds, "warmup": config.warmup, "seed": config.seed},
        "elapsed_seconds": time.monotonic() - started,
    }


def show(report: Mapping[str, Any]) -> None:
    print("CellOS secret delivery: a /bin/true cell with 2 secrets, files vs environment")
    print("\n".join(harness.ratio_table(report["rows"], "env")))
    print(
        f"added by runtimeBroker: {report['added_ms_p50']:+.3f} ms at p50, "
        f"{report['added_ms_p90']:+.3f} ms at p90"
    )
    host, cfg = report["host"], report["config"]
    print(
        f"python {host['python']}, {host['cpus']} cpu(s), load "
        f"{' '.join(f'{x:.2f}' for x in host['loadavg'])}; {cfg['rounds']}+{cfg['warmup']} "
        f"rounds, seed {cfg['seed']}; {report['elapsed_seconds']:.1f} s"
    )
    for acc in report["acceptance"]:
        print(harness.added_acceptance_line(acc["claim"], acc["added_ms_p50"], acc["met"]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/secret_delivery.py",
        description="p50/p90 of a /bin/true cell with secrets delivered as files "
        "(runtimeBroker) vs as environment variables, cellos backend, same run.",
    )
    harness.add_round_options(parser, rounds=30, warmup=3)
    args = parser.parse_args(argv)
    why = unavailable_reason()
    if why is not None:
        print(f"secret delivery benchmark not run: {why}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    config = Config(rounds=args.rounds, warmup=args.warmup, seed=args.seed)
    return harness.emit(lambda: benchmark(config), args.json, show)


if __name__ == "__main__":
    raise SystemExit(main())
