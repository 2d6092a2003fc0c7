#!/usr/bin/env python3
"""MicroVM benchmark: a ``/bin/true`` cell on the ``qemu`` backend, cold and from the warm pool.

Rows: bare QEMU boot, cold cell, pool-hit cell from a pool of booted guests and from a
``--snapshot`` pool of restored guests, and the refill time of each pool (spawn to idle, the
manifest and snapshot verification included).

Each round runs, in a shuffled order, one cold cell (one ``Supervisor`` for every cell: boot,
workload, power-off, teardown, events), one pool-hit cell (the same, with
``CELLOS_MICROVM_POOL``: a booted, idle guest of a ``cellos microvm pool`` manager receives
the request on its channel) and one bare QEMU boot of the same image running ``/bin/true``
with no supervisor (the bare primitive); ratios are against the bare boot. Before every
sample the pool is full again (its refill boots are not timed, and do not run during another
sample). The bare boot is split at the guest init's first channel line (``CELLOS:READY``):
guest boot (VMM start + kernel + init) and the rest (workload and power-off). The Firecracker
driver is reported as not measured where no binary exists. Needs root and qemu-system-x86_64.

    sudo python benchmarks/microvm.py [--image DIR] [--rounds N] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import harness
from harness import BenchError, Series, Task, WarmCells, cell_document, cell_id


def bare_boot(image: Path, accel: str) -> tuple[int, int]:
    """(ns to CELLOS:READY, ns to QEMU exit) of one bare boot running /bin/true."""
    from cellos.hosts.microvm.image import MANIFEST_NAME
    from cellos.hosts.microvm.manifest import load_manifest
    from cellos.hosts.microvm.qemu_probe import kernel_append, qemu_command, request_params

    manifest = load_manifest(image / MANIFEST_NAME)
    cmd = qemu_command(
        manifest.vmm.path,
        image,
        kernel_append(request_params(["/bin/true"], {}, [])),
        accel,
        manifest.kernel.path,
        manifest.initrd.path,
    )
    start = time.perf_counter_ns()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    ready = None
    buf = b""
    while True:
        select.select([proc.stdout], [], [], 60)
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        buf += chunk
        if ready is None and b"CELLOS:READY" in buf:
            ready = time.perf_counter_ns()
    if proc.wait() != 0:
        raise BenchError(f"bare qemu boot exited {proc.returncode}")
    end = time.perf_counter_ns()
    return (ready or end) - start, end - start


def bare_task(image: Path, accel: str, total: Series, ready: Series) -> Task:
    def task(_index: int, record: bool) -> None:
        to_ready, elapsed = bare_boot(image, accel)
        if record:
            total.samples.append(elapsed)
            ready.samples.append(to_ready)

    return task


def start_pool(env: Mapping[str, str], size: int, *args: str) -> subprocess.Popen[bytes]:
    """A ``cellos microvm pool`` manager of ``size`` guests (the state dir of ``env``)."""
    return subprocess.Popen(
        [sys.executable, "-m", "cellos.cli", "microvm", "pool", "--size", str(size), *args],
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_pool(manager: subprocess.Popen[bytes], env: Mapping[str, str]) -> None:
    subprocess.run(
        [sys.executable, "-m", "cellos.cli", "microvm", "pool", "stop"],
        env=dict(env),
        capture_output=True,
        check=False,
    )
    try:
        manager.wait(timeout=30)
    except subprocess.TimeoutExpired:
        manager.kill()
        manager.wait()


def benchmark(
    image_dir: str | None, rounds: int, warmup: int, seed: int, pool_size: int = 1
) -> dict[str, Any]:
    harness.ensure_cellos_importable()
    from cellos.hosts.microvm.backend import MicrovmBackend
    from cellos.hosts.microvm.firecracker import find_firecracker
    from cellos.hosts.microvm.image import MANIFEST_NAME, build_image
    from cellos.hosts.microvm.manifest import load_manifest
    from cellos.hosts.microvm.pool import wait_ready
    from cellos.hosts.microvm.qemu_probe import default_machine

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cellos-bench-vm-") as tmp_name:
        tmp = Path(tmp_name)
        image = Path(image_dir) if image_dir else tmp / "image"
        if not image_dir:
            qemu = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
            build_image(str(image), vmm=qemu)
        manifest = load_manifest(image / MANIFEST_NAME)
        accel = MicrovmBackend(image_dir=str(image), allow_tcg=True).accel(manifest)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp),
            "LANG": "C.UTF-8",
            "CELLOS_CELL_BACKEND": "qemu",
            "CELLOS_MICROVM_IMAGE": str(image),
            "CELLOS_MICROVM_ALLOW_TCG": "1",
            "CELL_OS_USE_NOOP_SINK": "1",
            "CELLOS_STATE_DIR": str(tmp / "state"),
        }
        cells = WarmCells("cold cell", env)
        pool_env = {**env, "CELLOS_STATE_DIR": str(tmp / "pool"), "CELLOS_MICROVM_POOL": "1"}
        snap_env = {**pool_env, "CELLOS_STATE_DIR": str(tmp / "snap")}
        managers = [
            (start_pool(pool_env, pool_size), pool_env),
            (start_pool(snap_env, pool_size, "--snapshot"), snap_env),
        ]
        pooled = WarmCells("pool-hit cell (booted guest)", pool_env)
        restored = WarmCells("pool-hit cell (restored guest)", snap_env)
        bare, ready = Series("bare qemu boot"), Series("  of which guest boot")
        refill = {
            "boot": Series("pool refill: boot to idle"),
            "snapshot": Series("pool refill: snapshot restore to idle"),
        }
        seen: set[str] = set()

        def note_refills(state: Path, record: bool) -> None:
            """readyMs of every guest the managers made ready (verification included)."""
            guests = state / "microvm-pool" / "guests"
            for guest in guests.iterdir() if guests.is_dir() else []:
                if guest.name in seen:
                    continue
                try:
                    info = json.loads((guest / "ready").read_text())
                except (OSError, ValueError):
                    continue
                seen.add(guest.name)
                if record:
                    refill[info["from"]].samples.append(int(info["readyMs"] * 1e6))

        def full(task: Task) -> Task:
            def run(index: int, record: bool) -> None:
                for state in (tmp / "pool", tmp / "snap"):
                    if wait_ready(str(state), pool_size, 300) < pool_size:
                        raise BenchError(f"the pool in {state} did not refill within 300 s")
                    note_refills(state, record)
                task(index, record)

            return run

        def hit(cells: WarmCells, source: str) -> Task:
            def run(index: int, record: bool) -> None:
                cells.run(cell_document(cell_id("pool", source, index)), record)
                resources = cells.last_outcome.events[0]["data"]["resources"]
                if resources.get("pool") != "hit" or resources.get("poolGuestFrom") != source:
                    raise BenchError(f"a pool cell missed the pool: {resources}")

            return run

        try:
            tasks = [
                full(cells.task(lambda i: cell_document(cell_id("vm", i)))),
                full(hit(pooled, "boot")),
                full(hit(restored, "snapshot")),
                full(bare_task(image, accel, bare, ready)),
            ]
            harness.run_rounds(rounds, warmup, tasks, random.Random(seed))
            snapshot_meta = json.loads(
                (tmp / "snap" / "microvm-pool" / "snapshot" / "snapshot.json").read_text()
            )
        finally:
            cells.close()
            pooled.close()
            restored.close()
            for manager, menv in managers:
                stop_pool(manager, menv)
        left = harness.residue([tmp / "state", tmp / "pool", tmp / "snap"])
        for state in (tmp / "pool", tmp / "snap"):
            if (state / "microvm-pool").exists():
                left.append(str(state / "microvm-pool"))
        if left:
            raise BenchError(f"cells left residue in their state directory: {left[:5]}")
        load = os.getloadavg()
    hit_p50 = harness.p50(pooled.series.samples) / 1e6 if pooled.series.samples else None
    rest = None
    if bare.samples:
        rest = (harness.p50(bare.samples) - harness.p50(ready.samples)) / 1e6
    return {
        "benchmark": "cellos.microvm",
        "config": {"rounds": rounds, "warmup": warmup, "seed": seed, "image": image_dir},
        "host": harness.host_info(),
        "driver": "qemu",
        "machine": default_machine(accel),
        "accel": accel,
        "rows": harness.ratio_rows(
            [
                bare,
                ready,
                cells.series,
                pooled.series,
                restored.series,
                refill["boot"],
                refill["snapshot"],
            ],
            bare,
        ),
        "snapshot": {
            "sizeBytes": snapshot_meta["sizeBytes"],
            "madeInMs": snapshot_meta["madeInMs"],
        },
        "workload_and_poweroff_p50_ms": rest,
        "pool_size": pool_size,
        "pool_hit_target": {
            "claim": "pool-hit /bin/true cell (booted guest) p50 <= 150 ms",
            "p50_ms": hit_p50,
            "met": hit_p50 is not None and hit_p50 <= 150,
        },
        "loadavg_at_end": load,
        "firecracker": find_firecracker() or "not measured: no firecracker binary",
        "elapsed_seconds": time.perf_counter() - started,
    }


def show(report: Mapping[str, Any]) -> None:
    print(f"CellOS microVM: a /bin/true cell, qemu {report['machine']}, accel={report['accel']}")
    print("\n".join(harness.ratio_table(report["rows"], "bare boot")))
    target = report["pool_hit_target"]
    if target["p50_ms"] is not None:
        print(
            f"{target['claim']}: {target['p50_ms']:.0f} ms "
            f"({'met' if target['met'] else 'NOT met'}; pool of {report['pool_size']})"
        )
    snap = report["snapshot"]
    print(
        f"snapshot of an idle guest: {snap['sizeBytes'] / 1e6:.0f} MB, made in "
        f"{snap['madeInMs']} ms (its sha256 is verified before every restore; refill rows "
        "include the verification)"
    )
    print("load average at the end: " + " ".join(f"{x:.2f}" for x in report["loadavg_at_end"]))
    if report["workload_and_poweroff_p50_ms"] is not None:
        print(f"bare boot after CELLOS:READY: {report['workload_and_poweroff_p50_ms']:.0f} ms p50")
    cfg = report["config"]
    print(
        f"firecracker: {report['firecracker']}; {cfg['rounds']}+{cfg['warmup']} rounds, "
        f"seed {cfg['seed']}; {report['elapsed_seconds']:.1f} s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/microvm.py",
        description="p50/p90 of a full /bin/true cell on the qemu backend as ratios against a "
        "bare qemu boot of the same image in the same run (needs root and qemu).",
    )
    parser.add_argument("--image", help="an image built by `cellos microvm build-image`")
    harness.add_round_options(parser, rounds=5, warmup=1)
    parser.add_argument("--quick", action="store_true", help="2 rounds, no warm-up")
    parser.add_argument("--pool-size", type=int, default=1, help="warm guests (default 1)")
    args = parser.parse_args(argv)
    if shutil.which("qemu-system-x86_64") is None or os.geteuid() != 0:
        print("microvm benchmark not run: needs root and qemu-system-x86_64", file=sys.stderr)
        return 2
    rounds, warmup = (2, 0) if args.quick else (args.rounds, args.warmup)
    return harness.emit(
        lambda: benchmark(args.image, rounds, warmup, args.seed, args.pool_size), args.json, show
    )


if __name__ == "__main__":
    raise SystemExit(main())
