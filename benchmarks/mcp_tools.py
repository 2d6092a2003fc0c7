#!/usr/bin/env python3
"""MCP benchmark: what a ``run_command(["/bin/true"])`` tool call adds over the same cell.

(Not named mcp.py: in this directory that name would shadow the SDK.)

Measured in the same run, interleaved in shuffled rounds:

* ``direct``: the cell document the MCP server builds for that call (same limits, same
  signed JSONL log configuration), validated and run by a warm in-process ``Supervisor``;
* ``mcp/stdio``: the tool call through the official SDK's ``ClientSession`` to a ``cellos
  mcp`` server process over stdio (JSON-RPC both ways, argument checks, document build and
  validation, the thread hop, progress plumbing, the evidence verdict of the run's signed
  events), timed from ``call_tool`` to its result.

Acceptance: p50(mcp/stdio) - p50(direct) <= 5 ms. Backend: ``cellos`` (``--backend``).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path
from typing import Any

import harness
from harness import BenchError, Series

ADDED_MS_MAX = 5.0


def _env(tmp: Path, backend: str, name: str) -> dict[str, str]:
    from cellos.keygen import write_keypair

    keys = write_keypair(str(tmp / f"keys-{name}"), "bench")
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp),
        "LANG": "C.UTF-8",
        "CELLOS_CELL_BACKEND": backend,
        "CELLOS_STATE_DIR": str(tmp / f"state-{name}"),
        "CELLOS_LOG_DIR": str(tmp / f"logs-{name}"),
        "CELLOS_MCP_DATA_DIR": str(tmp / f"mcp-{name}"),
        "CELLOS_EVENT_SIGNING": "ed25519",
        "CELLOS_EVENT_SIGNING_KID": "bench",
        "CELLOS_EVENT_SIGNING_KEY_BASE64": Path(keys.key_path).read_text().strip(),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    added_path = harness.ensure_cellos_importable()
    import anyio
    from anyio.from_thread import start_blocking_portal
    from mcp.client.session import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    from cellos.core.loading import validate_document
    from cellos.core.spec import to_document
    from cellos.mcp import documents
    from cellos.mcp.runner import CellRunner
    from cellos.mcp.settings import read_settings

    direct, mcp = Series("direct"), Series("mcp/stdio")
    with harness.scratch("cellos-bench-mcp-") as raw:
        tmp = Path(raw)
        direct_env = _env(tmp, args.backend, "direct")
        server_env = _env(tmp, args.backend, "server")
        if added_path:
            server_env["PYTHONPATH"] = str(harness.REPO / "src")
        settings = read_settings(direct_env)
        runner = CellRunner(settings, direct_env)  # the same composition the server uses

        def run_direct() -> None:
            call = documents.build(settings, tool="run_command", argv=[harness.TRUE])
            parsed = to_document(call.document)
            outcome = runner.supervisor.run(validate_document(parsed))
            if outcome.exit_code != 0 or outcome.errors:
                raise BenchError(f"direct: exit {outcome.exit_code}: {outcome.errors}")

        params = StdioServerParameters(
            command=sys.executable, args=["-m", "cellos.cli", "mcp"], env=server_env
        )
        holder: dict[str, Any] = {}

        async def connect(ready: Any, stop: Any) -> None:
            async with (
                stdio_client(params) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                holder["session"] = session
                ready.set()
                await stop.wait()

        async def one_call() -> None:
            result = await holder["session"].call_tool("run_command", {"argv": [harness.TRUE]})
            content = result.structured_content or {}
            if result.is_error or content.get("exitCode") != 0:
                raise BenchError(f"mcp/stdio: {result.content}")
            if not content["evidence"]["ok"]:
                raise BenchError(f"mcp/stdio: evidence {content['evidence']}")

        try:
            with start_blocking_portal() as portal:
                ready, stop = portal.call(lambda: _events(anyio))
                future = portal.start_task_soon(connect, ready, stop)
                portal.call(ready.wait)
                try:
                    tasks = [
                        harness.timed(direct, run_direct),
                        harness.timed(mcp, lambda: portal.call(one_call)),
                    ]
                    harness.run_rounds(args.rounds, args.warmup, tasks, random.Random(args.seed))
                finally:
                    portal.call(stop.set)
                    future.result()
        finally:
            runner.close()
    added = (harness.p50(mcp.samples) - harness.p50(direct.samples)) / 1e6
    return {
        "benchmark": "mcp",
        "backend": args.backend,
        "host": harness.host_info(),
        "rows": harness.ratio_rows([direct, mcp], direct),
        "added_p50_ms": added,
        "acceptance": {
            "claim": f"mcp run_command(/bin/true) adds <= {ADDED_MS_MAX} ms at p50 over direct",
            "added_p50_ms": added,
            "met": added <= ADDED_MS_MAX,
        },
    }


def _events(anyio: Any) -> tuple[Any, Any]:
    return anyio.Event(), anyio.Event()


def show(report: dict[str, Any]) -> None:
    print(f"backend: {report['backend']}")
    for line in harness.ratio_table(report["rows"], "direct"):
        print(line)
    acc = report["acceptance"]
    print(harness.added_acceptance_line(acc["claim"], acc["added_p50_ms"], acc["met"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_round_options(parser, rounds=100, warmup=10)
    parser.add_argument("--backend", default="cellos", help="CELLOS_CELL_BACKEND (cellos)")
    args = parser.parse_args()
    return harness.emit(lambda: measure(args), args.json, show)


if __name__ == "__main__":
    raise SystemExit(main())
