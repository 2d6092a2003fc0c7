"""The ``cellos serve`` and ``cellos events tail`` subcommands.

:func:`register` adds them to ``cellos``'s parser; aiohttp and nats are imported only by the
handlers, so ``cellos validate`` and friends start as fast as before.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from cellos.core.errors import InvalidSpec

ENV_TOKEN = "CELLOS_API_TOKEN"
NATS_HELP = (
    "NATS server URL(s), comma-separated for a cluster "
    "(default: $CELLOS_NATS_URL, else nats://127.0.0.1:4222)"
)
DLQ_HELP = "DLQ directory (default: $CELLOS_DLQ_DIR, else the supervisor's default)"


def _nats_url(explicit: str | None) -> str:
    from cellos.worker.queue import queue_url

    return queue_url(explicit, os.environ)


def _dlq_dir(explicit: str | None) -> str:
    from cellos.supervisor.composition import default_dlq_dir

    return (
        (explicit or "").strip()
        or os.environ.get("CELLOS_DLQ_DIR", "").strip()
        or (default_dlq_dir())
    )


def _cmd_events_replay_dlq(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from cellos.natsconn import connect
    from cellos.sinks.replay import replay_dlq

    directory = _dlq_dir(args.dlq_dir)
    url = _nats_url(args.nats)

    async def go() -> Any:
        nc = await connect(url, name="cellos-replay-dlq")
        try:
            return await replay_dlq(nc.jetstream(timeout=5.0), directory)
        finally:
            await nc.close()

    report = asyncio.run(go())
    if args.json:
        print(json.dumps({"dlqDir": directory, **report.as_dict()}))
    else:
        print(f"{directory}: {report.summary()}", file=sys.stderr)
    return 1 if report.errors or report.busy else 0


def _read_token(args: argparse.Namespace) -> str:
    from cellos.server.auth import check_token

    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                text = f.read(4096)
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "is not UTF-8"
            raise InvalidSpec("--token-file", f"cannot read {args.token_file}: {reason}") from None
        return check_token(text, "--token-file")
    token = os.environ.get(ENV_TOKEN)
    if token is None:
        raise InvalidSpec(
            ENV_TOKEN,
            "not set; cellos serve refuses to start without a bearer token "
            f"(set {ENV_TOKEN} or pass --token-file)",
        )
    return check_token(token, ENV_TOKEN)


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from cellos.server.app import ServeConfig, serve
    from cellos.sinks.replay import replay_interval
    from cellos.verify import load_verify_keys

    token = _read_token(args)
    if not 0 <= args.port <= 65535:
        raise InvalidSpec("--port", "must be between 0 and 65535")
    keys = load_verify_keys(args.keys) if args.keys else None
    config = ServeConfig(
        nats_url=_nats_url(args.nats),
        token=token,
        host=args.host,
        port=args.port,
        keys=keys,
        dlq_dir=_dlq_dir(args.dlq_dir),
        dlq_replay_seconds=replay_interval(os.environ),
    )

    def ready(message: str) -> None:
        print(f"cellos: {message}", file=sys.stderr, flush=True)

    asyncio.run(serve(config, ready))
    return 0


def _cmd_events_tail(args: argparse.Namespace) -> int:
    from cellos.server.tail import TailOptions, run_tail
    from cellos.verify import load_verify_keys

    if args.since < 0:
        raise InvalidSpec("--since", "must be a stream sequence >= 0")
    keys = load_verify_keys(args.keys) if args.keys else None
    options = TailOptions(
        url=_nats_url(args.nats),
        keys=keys,
        since=args.since,
        cell=args.cell,
        follow=args.follow,
        json_lines=args.json,
    )
    return run_tail(options, sys.stdout, sys.stderr)


def _subparsers_of(parser: argparse.ArgumentParser) -> Any:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def register(subparsers: Any) -> None:
    """Add ``serve`` and ``events tail`` to ``cellos``'s subcommands (``subparsers`` is the
    object ``ArgumentParser.add_subparsers`` returned)."""
    p = subparsers.add_parser(
        "serve",
        help="HTTP API over the cell-state projection of CELLOS_EVENTS",
        description=(
            "Serve the CellOS HTTP API. Requires a bearer token: CELLOS_API_TOKEN or "
            "--token-file (at least 16 characters)."
        ),
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (8080; 0: any)")
    p.add_argument("--token-file", help="file holding the bearer token (else CELLOS_API_TOKEN)")
    p.add_argument("--nats", metavar="URL", help=NATS_HELP)
    p.add_argument(
        "--keys",
        help="verify-keys JSON: fold only events signed by these keys into the projection",
    )
    p.add_argument("--dlq-dir", help=DLQ_HELP + "; replayed on start and periodically")
    p.set_defaults(func=_cmd_serve)

    events = subparsers.choices.get("events")
    if events is None:
        events = subparsers.add_parser("events", help="work with event logs")
    events_sub = _subparsers_of(events)
    if events_sub is None:
        events_sub = events.add_subparsers(dest="events_command", required=True)
    p = events_sub.add_parser(
        "tail",
        help="follow CELLOS_EVENTS, verifying signatures and run chains as it prints",
        description=(
            "Print one line per event of the JetStream stream CELLOS_EVENTS, verifying each "
            "(signature with --keys, run chain always). Exits 1 naming the stream sequence of "
            "the first event that fails."
        ),
    )
    p.add_argument("--keys", help="verify-keys JSON (every event must then be signed)")
    p.add_argument(
        "--since", type=int, default=0, help="start after this stream sequence (0: from the start)"
    )
    p.add_argument("--cell", help="only the events of this cell id")
    p.add_argument(
        "--follow",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep following new events (default); --no-follow stops at the current end",
    )
    p.add_argument("--json", action="store_true", help="print the events themselves (JSONL)")
    p.add_argument("--nats", metavar="URL", help=NATS_HELP)
    p.set_defaults(func=_cmd_events_tail)

    p = events_sub.add_parser(
        "replay-dlq",
        help="publish the events the JetStream sink dead-lettered, then remove them",
        description=(
            "Publish <DLQ>/jetstream/*.json to CELLOS_EVENTS run by run in chain order, each "
            "with Nats-Msg-Id = the event id (a re-publish is de-duplicated), removing a file "
            "only after its ack. Idempotent; stops at the first failure (kept for next time). "
            "Exit 1 if something was left because of an error."
        ),
    )
    p.add_argument("--dlq-dir", help=DLQ_HELP)
    p.add_argument("--nats", metavar="URL", help=NATS_HELP)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_events_replay_dlq)
