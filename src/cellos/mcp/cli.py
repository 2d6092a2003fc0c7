"""``cellos mcp``: serve the MCP tools on stdio (default) or streamable HTTP (``--http``).

The SDK is imported only when the subcommand runs (``cellos`` and ``cellos-supervisor`` keep
their start time). On stdio, stdout is the protocol: nothing else may be written there, so
events go to the server's log file and diagnostics to stderr.
"""

from __future__ import annotations

import argparse
import os
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "mcp", help="serve run_code / run_command / get_run as an MCP server (stdio or HTTP)"
    )
    p.add_argument("--http", action="store_true", help="streamable HTTP instead of stdio")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="HTTP port (0: any free port)")
    p.add_argument("--token-file", help="bearer token for --http (default: $CELLOS_API_TOKEN)")
    p.add_argument(
        "--data-dir",
        help="events.jsonl and exports/ (default: $CELLOS_MCP_DATA_DIR, else the state dir)",
    )
    p.set_defaults(func=_cmd_mcp)


def _cmd_mcp(args: argparse.Namespace) -> int:
    from cellos.core.errors import InvalidSpec
    from cellos.mcp.settings import read_settings

    if args.http and not 0 <= args.port <= 65535:
        raise InvalidSpec("--port", "must be from 0 to 65535")
    token = None
    if args.http:
        from cellos.server.cli import _read_token

        token = _read_token(args)  # checked before anything starts
    settings = read_settings(os.environ, args.data_dir)
    os.makedirs(settings.data_dir, mode=0o700, exist_ok=True)

    from cellos.mcp.runner import CellRunner
    from cellos.mcp.server import create_server

    runner = CellRunner(settings, os.environ)
    try:
        server = create_server(settings, runner)
        if token is not None:
            from cellos.mcp.http import serve_http

            serve_http(server, token, args.host, args.port)
        else:
            server.run("stdio")
    except KeyboardInterrupt:
        pass
    finally:
        runner.close()
    return 0
