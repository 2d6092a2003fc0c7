"""Connecting to NATS and making sure a JetStream stream exists: one place for every client.

Used by the JetStream event sink, the work queue, ``cellos serve``, ``cellos events tail``
and the DLQ replayer; a further stream (e.g. ``CELLOS_LOGS``) is declared the same way::

    await ensure_stream(js, StreamConfig(name="CELLOS_LOGS", subjects=["cellos.logs.>"]))

**Clusters.** ``CELLOS_NATS_URL`` may list several servers separated by commas
(``nats://n1:4222,nats://n2:4222,nats://n3:4222``); the client connects to the first that
answers, in the order given (so hosts can list "their" node first), and fails over to the
others, and to any node the cluster announces, when it goes away. Streams created here get
``CELLOS_STREAM_REPLICAS`` replicas (default 1; 3 on a 3-node cluster keeps every stream
available, and every acked message kept, when one node is down). An existing stream's
settings are never changed: an operator's own configuration wins.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

import nats
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from cellos.core.errors import CellosError, InvalidSpec

log = logging.getLogger(__name__)

DEFAULT_URL = "nats://127.0.0.1:4222"
ENV_URL = "CELLOS_NATS_URL"
ENV_REPLICAS = "CELLOS_STREAM_REPLICAS"
MAX_REPLICAS = 5


class NatsUnavailable(CellosError):
    """NATS (JetStream) could not be reached, or refused a request."""


def server_urls(url: str) -> list[str]:
    """The servers of a ``CELLOS_NATS_URL`` value (comma-separated, blanks ignored)."""
    urls = [part.strip() for part in url.split(",") if part.strip()]
    if not urls:
        raise InvalidSpec(ENV_URL, "names no NATS server")
    return urls


def stream_replicas(env: Mapping[str, str] | None = None) -> int:
    """``CELLOS_STREAM_REPLICAS`` (1..5), the replicas of the streams CellOS creates."""
    text = (os.environ if env is None else env).get(ENV_REPLICAS, "").strip()
    if not text:
        return 1
    if not text.isdigit() or not 1 <= int(text) <= MAX_REPLICAS:
        raise InvalidSpec(ENV_REPLICAS, f"must be an integer from 1 to {MAX_REPLICAS}")
    return int(text)


async def _quiet_error(exc: Exception) -> None:
    # nats-py would log every connection error with a traceback; callers report their own.
    log.debug("nats client error: %s", exc)


async def _quiet_event() -> None:
    return None


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def connect(
    url: str,
    *,
    name: str,
    connect_timeout: float = 2.0,
    persistent: bool = False,
    max_reconnect_attempts: int | None = None,
) -> Client:
    """Connect to NATS (``url`` may list several servers).

    ``persistent`` clients (workers, the server) reconnect forever; the others give up after
    a few attempts so that their caller can fall back (a sink dead-letters, a CLI exits).
    """
    attempts = max_reconnect_attempts
    if attempts is None:
        attempts = -1 if persistent else 2
    try:
        return await nats.connect(
            server_urls(url),
            name=name,
            connect_timeout=connect_timeout,
            allow_reconnect=True,
            max_reconnect_attempts=attempts,
            reconnect_time_wait=0.5 if persistent else 0.2,
            # The operator's order: each host lists its nearest node first.
            dont_randomize=True,
            error_cb=_quiet_error,
            disconnected_cb=_quiet_event,
            closed_cb=_quiet_event,
        )
    except CellosError:
        raise
    except Exception as exc:  # noqa: BLE001 - every client error becomes one NatsUnavailable
        raise NatsUnavailable(ENV_URL, f"cannot connect to {url}: {describe(exc)}") from None


async def ensure_stream(
    js: JetStreamContext, config: StreamConfig, env: Mapping[str, str] | None = None
) -> None:
    """Create the stream unless it exists (an operator's own settings are never changed).

    ``num_replicas`` comes from ``CELLOS_STREAM_REPLICAS`` unless ``config`` sets it. A
    cluster that does not answer yet (a restarted node, a stream electing its leader) is
    asked again for up to :data:`JETSTREAM_READY_SECONDS`; then it is a clear error naming
    ``CELLOS_NATS_URL``, never a traceback.
    """
    import asyncio
    import time

    deadline = time.monotonic() + JETSTREAM_READY_SECONDS
    while True:
        try:
            await _ensure_stream_once(js, config, env)
            return
        except (
            nats.errors.TimeoutError,
            nats.errors.NoRespondersError,
            nats.js.errors.ServiceUnavailableError,
        ) as exc:
            if time.monotonic() >= deadline:
                raise NatsUnavailable(
                    ENV_URL,
                    f"JetStream did not answer for stream {config.name} within "
                    f"{JETSTREAM_READY_SECONDS:g} s: {describe(exc)}",
                ) from None
            await asyncio.sleep(0.5)


#: How long a JetStream that does not answer yet is asked again before giving up.
JETSTREAM_READY_SECONDS = 30.0


async def _ensure_stream_once(
    js: JetStreamContext, config: StreamConfig, env: Mapping[str, str] | None
) -> None:
    name = config.name
    assert name is not None
    try:
        await js.stream_info(name)
        return
    except nats.js.errors.NotFoundError:
        pass
    if config.num_replicas is None:
        config = dataclasses.replace(config, num_replicas=stream_replicas(env))
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        # Another process created it first (with other settings): use theirs.
        await js.stream_info(name)
