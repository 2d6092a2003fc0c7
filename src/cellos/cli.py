"""``cellos``: schema, validate, run, keygen, events verify."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from cellos.core.errors import CellosError
from cellos.core.loading import load_document
from cellos.core.spec import json_schema
from cellos.mcp.cli import register as register_mcp_commands
from cellos.server.cli import register as register_server_commands
from cellos.supervisor.cli import configure_logging, print_error, run_spec
from cellos.worker.cli import register as register_worker_commands


def _cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2, sort_keys=True))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    document = load_document(args.file, sys.stdin.buffer)
    print(f"ok: {document.spec.id}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    return run_spec(args.file)


def _cmd_keygen(args: argparse.Namespace) -> int:
    from cellos.keygen import write_keypair

    result = write_keypair(args.out_dir, args.kid, args.alg)
    print(f"private key:  {result.key_path}")
    print(f"verify keys:  {result.verify_keys_path}")
    for line in result.env_lines:
        print(f"  {line}")
    return 0


def _cmd_events_verify(args: argparse.Namespace) -> int:
    from cellos.verify import load_verify_keys, verify_events_file

    keys = load_verify_keys(args.keys) if args.keys else None
    report = verify_events_file(args.file, keys, require_complete=not args.allow_incomplete)
    if report.ok:
        signed = "signed, " if keys else ""
        print(f"ok: {report.events} events in {report.runs} run(s), {signed}chain intact")
        return 0
    assert report.first_error is not None
    line, reason = report.first_error
    print(f"error: {args.file}:{line}: {reason}", file=sys.stderr)
    return 1


def _cmd_logs_verify(args: argparse.Namespace) -> int:
    from cellos.output.verify import verify_log
    from cellos.verify import load_verify_keys

    keys = load_verify_keys(args.keys) if args.keys else None
    check = verify_log(args.log, args.events, args.cell, args.stream, args.run, keys)
    if check.ok:
        print(check.message)
        return 0
    print(f"error: {check.message}", file=sys.stderr)
    return 1


def _cmd_doctor(args: argparse.Namespace) -> int:
    from cellos.doctor import run_checks

    checks = run_checks(refresh_microvm_probe=args.refresh_microvm_probe)
    if args.json:
        print(
            json.dumps(
                [{"feature": c.feature, "ok": c.ok, "detail": c.detail} for c in checks], indent=2
            )
        )
    else:
        width = max(len(c.feature) for c in checks)
        for c in checks:
            print(f"{c.feature:<{width}}  {'ok     ' if c.ok else 'MISSING'}  {c.detail}")
    # The default backend needs the sandbox; everything else is optional.
    return 0 if checks[0].ok else 1


def _cmd_reap(args: argparse.Namespace) -> int:
    import os

    from cellos.supervisor.composition import build_supervisor

    supervisor = build_supervisor(os.environ)
    try:
        reaped = supervisor.reap_stale()
    finally:
        supervisor.close()
    for cell in reaped:
        print(
            f"reaped {cell.cell_id}: removed {', '.join(cell.removed) or 'nothing'}"
            + (f"; residue {', '.join(cell.residue)}" if cell.residue else "")
        )
    if not reaped:
        print("nothing to reap")
    return 1 if any(cell.residue for cell in reaped) else 0


def _cmd_microvm_build_image(args: argparse.Namespace) -> int:
    import shutil

    from cellos.hosts.microvm.image import build_image
    from cellos.hosts.microvm.image_cache import ensure_image
    from cellos.hosts.microvm.manifest import load_manifest

    if args.firecracker:
        from cellos.hosts.microvm.firecracker import find_firecracker

        vmm = args.vmm or find_firecracker()
        if vmm is None:
            print(
                "error: --vmm: firecracker not found (set CELLOS_FIRECRACKER or put it on PATH)",
                file=sys.stderr,
            )
            return 2
        if args.dir is None:
            # The cache holds the qemu backend's default image only.
            print("error: --firecracker: an output directory is required", file=sys.stderr)
            return 2
    else:
        vmm = args.vmm or shutil.which("qemu-system-x86_64")
    if vmm is None:
        print(
            "error: --vmm: qemu-system-x86_64 not found (apt-get install qemu-system-x86)",
            file=sys.stderr,
        )
        return 2
    if args.dir is None:
        # The per-user cached image the qemu backend uses without CELLOS_MICROVM_IMAGE.
        found = ensure_image(vmm, refresh=args.refresh)
        assert found is not None
        directory = found[0]
        manifest = load_manifest(f"{directory}/manifest.json")
    else:
        directory = args.dir
        manifest = build_image(directory, vmm=vmm, elf_kernel=args.firecracker)
    print(f"image: {directory}")
    for name, item in manifest.roles():
        print(f"  {name:<7} {item.sha256}  {item.path}")
    return 0


def _cmd_microvm_pool(args: argparse.Namespace) -> int:
    import signal

    from cellos.hosts.microvm import pool
    from cellos.hosts.registry import make_microvm_backend, microvm_pool_size
    from cellos.hosts.state import default_state_root

    env = os.environ
    state_root = env.get("CELLOS_STATE_DIR") or default_state_root()
    if args.action == "stop":
        stopped = pool.stop_pool(state_root)
        print("pool stopped" if stopped else "no pool running")
        return 0
    if args.action == "status":
        settings = pool.live_pool(state_root)
        if settings is None:
            print("no pool running")
            return 1
        ready = pool.wait_ready(state_root, 0, 0)
        print(
            f"pool: pid {settings.get('pid')}, size {settings.get('size')}, "
            f"{settings.get('memoryMiB')} MiB x {settings.get('vcpus')} vCPU, "
            f"accel {settings.get('accel')}, {ready} idle, image {settings.get('image')}"
        )
        if settings.get("error"):
            print(f"error: the pool cannot boot guests: {settings['error']}", file=sys.stderr)
            return 1
        return 0
    size = args.size if args.size is not None else microvm_pool_size(env) or 1
    for option, value, low, high in (
        ("--size", size, 1, 64),
        ("--vcpus", args.vcpus, 1, 32),
        ("--memory-mib", args.memory_mib, 256, 1 << 20),
    ):
        if value is not None and not low <= value <= high:
            print(f"error: {option}: must be from {low} to {high} (got {value})", file=sys.stderr)
            return 2
    if args.max_age <= 0:
        print(
            f"error: --max-age: must be a positive number of seconds (got {args.max_age:g})",
            file=sys.stderr,
        )
        return 2
    # The guests are those of the microVM backend chosen for cells (qemu unless firecracker).
    vmm_name = env.get("CELLOS_CELL_BACKEND", "").strip()
    backend = make_microvm_backend(
        vmm_name if vmm_name in ("qemu", "firecracker") else "qemu",
        {**env, "CELLOS_MICROVM_POOL": "0", "CELLOS_STATE_DIR": state_root},
    )
    shape = pool.Shape(
        memory_mib=max(type(backend).shape_of(None).memory_mib, args.memory_mib or 0),
        vcpus=args.vcpus or 1,
    )
    manager = pool.PoolManager(
        state_root,
        size,
        shape,
        backend,
        max_age=args.max_age,
        snapshot=args.snapshot,
    )
    stop = []
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda n, _f: stop.append(n))
    manager.open()
    try:
        print(
            f"cellos: microVM pool of {size} ({shape.memory_mib} MiB, {shape.vcpus} vCPU) "
            f"in {manager.root}; stop with: cellos microvm pool stop",
            file=sys.stderr,
            flush=True,
        )
        manager.run(lambda: bool(stop))
    finally:
        manager.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellos", description="CellOS execution-cell runner")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("schema", help="print the JSON Schema of the ExecutionCell document")
    p.set_defaults(func=_cmd_schema)

    p = sub.add_parser("validate", help="validate a document (YAML or JSON; - for stdin)")
    p.add_argument("file")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("run", help="run a document (same as cellos-supervisor FILE)")
    p.add_argument("file")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("keygen", help="write a signing key and its verify-keys JSON")
    p.add_argument("--kid", required=True, help="key id recorded in every signed event")
    p.add_argument("--alg", choices=["ed25519", "hmac"], default="ed25519")
    p.add_argument(
        "--out-dir", default=".", help="directory for <kid>.key and <kid>.verify-keys.json"
    )
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser("doctor", help="report which isolation features this host supports")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--refresh-microvm-probe",
        action="store_true",
        help="probe again whether KVM can boot the microVM guest (the decision is cached)",
    )
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("reap", help="remove what crashed supervisors left (emits an event each)")
    p.set_defaults(func=_cmd_reap)

    events = sub.add_parser("events", help="work with event logs").add_subparsers(
        dest="events_command", required=True
    )
    p = events.add_parser("verify", help="verify signatures and the run chain of a JSONL log")
    p.add_argument("file")
    p.add_argument("--keys", help="verify-keys JSON (every event must then be signed)")
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="accept runs that do not end with a compliance summary (live logs)",
    )
    p.set_defaults(func=_cmd_events_verify)
    logs = sub.add_parser("logs", help="work with workload output logs").add_subparsers(
        dest="logs_command", required=True
    )
    p = logs.add_parser(
        "verify", help="check a captured output log against the run's signed completed event"
    )
    p.add_argument("log", help="the captured log (e.g. <CELLOS_LOG_DIR>/<cell>/<run>.stdout.log)")
    p.add_argument("--events", required=True, help="the events JSONL holding the run")
    p.add_argument("--cell", required=True, help="the cell id")
    p.add_argument("--stream", choices=["stdout", "stderr"], default="stdout")
    p.add_argument("--run", help="the run id (default: the cell's last run in the file)")
    p.add_argument("--keys", help="verify-keys JSON: the events file must verify first")
    p.set_defaults(func=_cmd_logs_verify)
    microvm = sub.add_parser("microvm", help="microVM guest images").add_subparsers(
        dest="microvm_command", required=True
    )
    p = microvm.add_parser("build-image", help="build the guest kernel + initrd and its manifest")
    p.add_argument(
        "dir",
        nargs="?",
        help="output directory (vmlinuz, initrd.cpio.gz, manifest.json); default: the per-user "
        "cached image the qemu backend uses when CELLOS_MICROVM_IMAGE is unset",
    )
    p.add_argument(
        "--refresh",
        action="store_true",
        help="rebuild the cached image even when present (e.g. one refused as corrupted)",
    )
    p.add_argument("--vmm", help="VMM binary recorded in the manifest (default: qemu on PATH)")
    p.add_argument(
        "--firecracker",
        action="store_true",
        help="an image for the firecracker backend: also the uncompressed ELF kernel (vmlinux) "
        "Firecracker boots, and firecracker (CELLOS_FIRECRACKER or PATH) as the VMM",
    )
    p.set_defaults(func=_cmd_microvm_build_image)
    p = microvm.add_parser(
        "pool",
        help="keep warm, single-use microVM guests booted and idle (run: in the foreground "
        "until SIGTERM/SIGINT; stop: stop the running pool; status)",
    )
    p.add_argument("action", nargs="?", choices=["run", "stop", "status"], default="run")
    p.add_argument(
        "--size", type=int, help="idle guests to keep (default: CELLOS_MICROVM_POOL, else 1)"
    )
    p.add_argument(
        "--max-age",
        type=float,
        default=600.0,
        help="seconds an idle guest may wait before it is replaced (default 600)",
    )
    p.add_argument("--memory-mib", type=int, help="guest memory (default 256, the minimum)")
    p.add_argument("--vcpus", type=int, help="guest vCPUs (default 1)")
    p.add_argument(
        "--snapshot",
        action="store_true",
        help="refill by restoring a snapshot of an idle guest (made at start, digest verified "
        "before every restore) instead of booting each guest",
    )
    p.set_defaults(func=_cmd_microvm_pool)
    register_worker_commands(sub)
    register_server_commands(sub)
    register_mcp_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        code: int = args.func(args)
    except CellosError as exc:
        print_error(exc)
        return exc.exit_code
    return code


if __name__ == "__main__":
    raise SystemExit(main())
