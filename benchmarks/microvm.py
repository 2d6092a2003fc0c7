"""MicroVM benchmark: boot-to-exit time of a ``true`` cell per driver and acceleration.

For each boot the time is split at the guest init's first channel line (``CELLOS:READY``):
``boot`` = VMM start + kernel boot + init start, ``run`` = the workload and power-off.
Measured against a bare QEMU boot of the same image (no supervisor) in the same run; the
Firecracker driver is reported as not measured where no binary exists.

    sudo python benchmarks/microvm.py [--image DIR] [--boots N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cellos.core.loading import validate_document
from cellos.hosts.microvm.backend import MicrovmBackend
from cellos.hosts.microvm.firecracker import find_firecracker
from cellos.hosts.microvm.image import MANIFEST_NAME, build_image
from cellos.hosts.microvm.manifest import load_manifest
from cellos.hosts.microvm.qemu_probe import default_machine, kernel_append, qemu_command
from cellos.supervisor.composition import build_supervisor


def bare_boot(image: Path, accel: str) -> tuple[float, float]:
    """(ms to CELLOS:READY, ms to QEMU exit) of one bare boot running /bin/true."""
    manifest = load_manifest(image / MANIFEST_NAME)
    cmd = qemu_command(
        manifest.vmm.path,
        image,
        kernel_append(["/bin/true"], {}, []),
        accel,
        manifest.kernel.path,
        manifest.initrd.path,
    )
    start = time.perf_counter()
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
            ready = time.perf_counter()
    proc.wait()
    end = time.perf_counter()
    return ((ready or end) - start) * 1000, (end - start) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", help="an image built by `cellos microvm build-image`")
    parser.add_argument("--boots", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None or os.geteuid() != 0:
        print("error: needs root and qemu-system-x86_64", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="cellos-bench-vm-")
    try:
        image = Path(args.image) if args.image else Path(tmp, "image")
        if not args.image:
            build_image(str(image), vmm=qemu)
        accel = MicrovmBackend(image_dir=str(image), allow_tcg=True).accel(
            load_manifest(image / MANIFEST_NAME)
        )
        supervisor = build_supervisor(
            {
                "CELLOS_CELL_BACKEND": "qemu",
                "CELLOS_MICROVM_IMAGE": str(image),
                "CELLOS_MICROVM_ALLOW_TCG": "1",
                "CELL_OS_USE_NOOP_SINK": "1",
                "CELLOS_STATE_DIR": tmp,
            }
        )
        cell, bare, ready = [], [], []
        for index in range(args.boots + 1):
            doc = validate_document(
                {
                    "apiVersion": "cellos.io/v1",
                    "kind": "ExecutionCell",
                    "spec": {"id": f"bvm-{index}", "run": {"argv": ["/bin/true"]}},
                }
            )
            start = time.perf_counter()
            out = supervisor.run(doc)
            elapsed = (time.perf_counter() - start) * 1000
            if out.exit_code != 0:
                print(f"error: cell failed: {[str(e) for e in out.errors]}", file=sys.stderr)
                return 1
            to_ready, total = bare_boot(image, accel)
            if index:  # the first round warms the page cache
                cell.append(elapsed)
                bare.append(total)
                ready.append(to_ready)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "driver": "qemu",
        "accel": accel,
        "boots": args.boots,
        "cell_median_ms": statistics.median(cell),
        "bare_qemu_median_ms": statistics.median(bare),
        "guest_boot_median_ms": statistics.median(ready),
        "workload_and_poweroff_median_ms": statistics.median(bare) - statistics.median(ready),
        "ratio_cell_vs_bare": statistics.median(cell) / statistics.median(bare),
        "firecracker": find_firecracker() or "not measured: no firecracker binary",
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"CellOS microVM: a /bin/true cell, qemu {default_machine(accel)}, accel={accel}, "
        f"{args.boots} boots"
    )
    print(f"  full cell (supervisor + boot + teardown)  {report['cell_median_ms']:8.0f} ms")
    print(
        f"  bare qemu boot of the same image          {report['bare_qemu_median_ms']:8.0f} ms"
        f"   (cell = {report['ratio_cell_vs_bare']:.2f}x)"
    )
    print(f"    of which guest boot (to CELLOS:READY)   {report['guest_boot_median_ms']:8.0f} ms")
    print(
        f"    workload + power-off                    "
        f"{report['workload_and_poweroff_median_ms']:8.0f} ms"
    )
    print(f"  firecracker: {report['firecracker']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
