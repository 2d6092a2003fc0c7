"""``cellos submit`` and ``cellos worker`` (registered into the ``cellos`` CLI).

The NATS client and the supervisor are imported inside the handlers: ``cellos --help`` and the
other subcommands must not pay for them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

# Kept here (not imported from queue.py) so that building the parser imports nothing heavy.
_DEFAULT_ACK_WAIT = 30.0
_DEFAULT_MAX_DELIVER = 5
_DEFAULT_GRACE = 30.0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _seconds(minimum: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not value >= minimum or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number >= {minimum:g}")
        return value

    return parse


def _cmd_submit(args: argparse.Namespace) -> int:
    from cellos.core.loading import load_document
    from cellos.worker.queue import queue_url, submit_document

    # Validated before anything is sent: an invalid document never reaches the queue.
    document = load_document(args.file, sys.stdin.buffer)
    result = submit_document(document, queue_url(args.nats, os.environ))
    print(result.stream_seq)
    if result.duplicate:
        print(
            f"cellos submit: {document.spec.id}: the identical document was already queued "
            f"as #{result.stream_seq} (within the duplicate window); not queued again",
            file=sys.stderr,
        )
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from cellos.worker.queue import queue_url
    from cellos.worker.worker import WorkerConfig, run_worker

    config = WorkerConfig(
        url=queue_url(args.nats, os.environ),
        concurrency=args.concurrency,
        ack_wait=args.ack_wait,
        max_deliver=args.max_deliver,
        grace_seconds=args.grace,
    )
    return run_worker(config, os.environ)


def register(subparsers: Subparsers) -> None:
    """Add ``submit`` and ``worker`` to the ``cellos`` command."""
    nats_help = "NATS server URL (default: $CELLOS_NATS_URL, else nats://127.0.0.1:4222)"

    p = subparsers.add_parser(
        "submit",
        help="validate a document and put it on the CELLOS_CELLS work queue",
        description="Validate FILE (YAML or JSON; - for stdin) and put it on the CELLOS_CELLS "
        "work-queue stream; print its stream sequence. An invalid document is never queued "
        "(exit 2). The identical document submitted again within the duplicate window "
        "(2 min) is queued once.",
    )
    p.add_argument("file")
    p.add_argument("--nats", metavar="URL", help=nats_help)
    p.set_defaults(func=_cmd_submit)

    p = subparsers.add_parser(
        "worker",
        help="run cells from the CELLOS_CELLS work queue (SIGTERM: graceful stop)",
        description="Pull cells from the CELLOS_CELLS work queue and run each through one "
        "warm supervisor configured by the CELLOS_* variables; events go to JetStream "
        "(CELLOS_NATS_URL, by default the queue's server). SIGTERM or SIGINT: stop pulling, "
        "finish in-flight cells within --grace, return the others to the queue.",
    )
    p.add_argument(
        "--concurrency",
        type=_positive_int,
        default=1,
        metavar="N",
        help="cells run at the same time (default 1)",
    )
    p.add_argument(
        "--ack-wait",
        type=_seconds(1.0),
        default=_DEFAULT_ACK_WAIT,
        metavar="S",
        help="seconds without a sign of life after which a cell's message is redelivered "
        "(the ack wait of the shared consumer: set by the worker that creates it, adopted "
        f"by the others; default {_DEFAULT_ACK_WAIT:g})",
    )
    p.add_argument(
        "--max-deliver",
        type=_positive_int,
        default=_DEFAULT_MAX_DELIVER,
        metavar="N",
        help="deliveries of one message at most (like --ack-wait, a setting of the shared "
        f"consumer; default {_DEFAULT_MAX_DELIVER})",
    )
    p.add_argument(
        "--grace",
        type=_seconds(0.0),
        default=_DEFAULT_GRACE,
        metavar="S",
        help="on SIGTERM/SIGINT, seconds in-flight cells get to finish before they are "
        f"stopped and returned to the queue (default {_DEFAULT_GRACE:g})",
    )
    p.add_argument("--nats", metavar="URL", help=nats_help)
    p.set_defaults(func=_cmd_worker)
