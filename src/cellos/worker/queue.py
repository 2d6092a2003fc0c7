"""The work queue of cells on NATS JetStream: stream, consumer, submit, per-cell locks.

* Stream ``CELLOS_CELLS`` (work-queue retention, file storage) on
  ``cellos.cells.submit.<tenantId|default>`` (the tenant encoded by
  :func:`cellos.core.subjects.encode_token`). A message is one validated ExecutionCell document
  as RFC 8785 canonical JSON; its ``Nats-Msg-Id`` is the document's sha256 (the same digest as
  the ``specDigest`` of the run's events), so submitting the identical document twice within
  the stream's duplicate window (:data:`DUPLICATE_WINDOW_SECONDS`) queues it once.
* Durable pull consumer ``cellos-workers`` shared by every worker (on any host): explicit ack,
  ``ack_wait`` (a worker that stops answering loses its message after it, and the message is
  redelivered), ``max_deliver`` (a cell that keeps killing its worker is not retried forever).
  The first worker creates it with its own settings; later workers adopt the consumer's.
* Stream ``CELLOS_CELL_LOCKS`` (``cellos.cells.lock.<cellId>``, the id encoded likewise, one
  message per subject, per message TTL): a lease that keeps two workers from running the same
  cell id at the same time (a redelivery racing a slow worker, or the same id submitted
  twice). A lease is taken with ``Nats-Expected-Last-Subject-Sequence: 0``, renewed with the
  sequence it holds, and expires by itself (``Nats-TTL``) when its worker dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from cellos.core.canonical import canonical_bytes, sha256_hex
from cellos.core.errors import CellosError, InvalidSpec
from cellos.core.loading import MAX_DOCUMENT_BYTES, parse_document, validate_document
from cellos.core.log import get_logger
from cellos.core.spec import ExecutionCell, to_document
from cellos.core.subjects import encode_token
from cellos.natsconn import DEFAULT_URL, NatsUnavailable, connect, describe, ensure_stream

log = get_logger(__name__)

STREAM = "CELLOS_CELLS"
SUBJECT_PREFIX = "cellos.cells.submit"
SUBJECTS = f"{SUBJECT_PREFIX}.>"
CONSUMER = "cellos-workers"
LOCK_STREAM = "CELLOS_CELL_LOCKS"
LOCK_PREFIX = "cellos.cells.lock"
DUPLICATE_WINDOW_SECONDS = 120.0
DEFAULT_ACK_WAIT_SECONDS = 30.0
DEFAULT_MAX_DELIVER = 5
#: Header naming the cell of a queued document (for operators reading the stream).
HEADER_CELL_ID = "Cellos-Cell-Id"

_WRONG_LAST_SEQUENCE = (10071, 10164)


class QueueError(NatsUnavailable):
    """The work queue (NATS JetStream) could not be reached or refused a request."""


def queue_url(explicit: str | None, env: Mapping[str, str]) -> str:
    """``--nats`` wins, then ``CELLOS_NATS_URL``, then the local default."""
    return (explicit or "").strip() or env.get("CELLOS_NATS_URL", "").strip() or DEFAULT_URL


def tenant_of(document: ExecutionCell) -> str:
    corr = document.spec.correlation
    return corr.tenant_id if corr is not None and corr.tenant_id else "default"


def submit_subject(document: ExecutionCell) -> str:
    return f"{SUBJECT_PREFIX}.{encode_token(tenant_of(document))}"


def encode_document(document: ExecutionCell) -> tuple[bytes, str]:
    """The message body (canonical JSON of the validated document) and its sha256."""
    try:
        payload = canonical_bytes(to_document(document))
    except ValueError as exc:
        raise InvalidSpec("<document>", f"cannot be encoded as canonical JSON: {exc}") from None
    return payload, sha256_hex(payload)


def decode_document(data: bytes, source: str) -> ExecutionCell:
    """Parse and validate a queued document exactly as ``cellos validate`` would."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise InvalidSpec(source, f"document is larger than {MAX_DOCUMENT_BYTES} bytes")
    return validate_document(parse_document(data, source))


# -- connections and topology ----------------------------------------------------------------


__all__ = ["DEFAULT_URL", "QueueError", "connect", "ensure_stream"]


async def ensure_queue(js: JetStreamContext) -> None:
    await ensure_stream(
        js,
        StreamConfig(
            name=STREAM,
            description="CellOS work queue: validated ExecutionCell documents",
            subjects=[SUBJECTS],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
            max_msg_size=MAX_DOCUMENT_BYTES,
        ),
    )


async def ensure_locks(js: JetStreamContext) -> None:
    await ensure_stream(
        js,
        StreamConfig(
            name=LOCK_STREAM,
            description="CellOS: leases of the cell ids being run by workers",
            subjects=[f"{LOCK_PREFIX}.>"],
            storage=StorageType.FILE,
            max_msgs_per_subject=1,
            allow_msg_ttl=True,
        ),
    )


def consumer_config(ack_wait: float, max_deliver: int) -> ConsumerConfig:
    return ConsumerConfig(
        name=CONSUMER,
        durable_name=CONSUMER,
        description="CellOS workers",
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=max_deliver,
        filter_subject=SUBJECTS,
    )


async def ensure_consumer(js: JetStreamContext, ack_wait: float, max_deliver: int) -> ConsumerInfo:
    """Create the shared durable consumer unless it exists, and return its info.

    An existing consumer keeps its settings: a worker started with another ``--ack-wait``
    must not shorten the ack wait under the feet of workers that heartbeat at the old pace.
    The caller adopts what the consumer says (an operator changes a running fleet's settings
    by editing the consumer)."""
    try:
        info: ConsumerInfo = await js.consumer_info(STREAM, CONSUMER)
        return info
    except nats.js.errors.NotFoundError:
        pass
    try:
        return await js.add_consumer(STREAM, consumer_config(ack_wait, max_deliver))
    except nats.js.errors.BadRequestError:
        # Another worker created it at the same moment, with other settings.
        info = await js.consumer_info(STREAM, CONSUMER)
        return info


# -- submit ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submitted:
    stream_seq: int
    #: True when the identical document was already queued within the duplicate window.
    duplicate: bool
    digest: str
    subject: str


async def publish_document(
    js: JetStreamContext, document: ExecutionCell, timeout: float = 5.0
) -> Submitted:
    payload, digest = encode_document(document)
    subject = submit_subject(document)
    ack = await js.publish(
        subject,
        payload,
        timeout=timeout,
        stream=STREAM,
        headers={"Nats-Msg-Id": digest, HEADER_CELL_ID: document.spec.id},
    )
    return Submitted(
        stream_seq=ack.seq, duplicate=bool(ack.duplicate), digest=digest, subject=subject
    )


def submit_document(document: ExecutionCell, url: str) -> Submitted:
    """Put one validated document on the queue (creating the stream when needed)."""

    async def go() -> Submitted:
        nc = await connect(url, name="cellos-submit")
        try:
            js = nc.jetstream(timeout=5.0)
            await ensure_queue(js)
            return await publish_document(js, document)
        finally:
            await nc.close()

    try:
        return asyncio.run(go())
    except CellosError:
        raise
    except Exception as exc:  # noqa: BLE001 - every client error becomes one QueueError
        raise QueueError(STREAM, f"submit to {url} failed: {describe(exc)}") from None


# -- per-cell leases -------------------------------------------------------------------------


def lock_subject(cell_id: str) -> str:
    return f"{LOCK_PREFIX}.{encode_token(cell_id)}"


def holder_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Lease:
    cell_id: str
    #: Stream sequence of the lock message this lease holds (changes at every renewal).
    seq: int
    lost: bool = False


class CellLocks:
    """At most one live lease per cell id across every worker of the queue."""

    def __init__(self, js: JetStreamContext, lease_seconds: float, holder: str) -> None:
        self.js = js
        # Nats-TTL has whole seconds; a lease shorter than 1 s is not expressible.
        self.lease_seconds = max(1, math.ceil(lease_seconds))
        self.holder = holder

    def _body(self, cell_id: str, info: Mapping[str, Any]) -> bytes:
        return json.dumps(
            {"cellId": cell_id, "holder": self.holder, "renewedAt": time.time(), **info},
            separators=(",", ":"),
        ).encode()

    async def _publish(self, cell_id: str, expected: int, info: Mapping[str, Any]) -> int | None:
        try:
            ack = await self.js.publish(
                lock_subject(cell_id),
                self._body(cell_id, info),
                stream=LOCK_STREAM,
                headers={
                    "Nats-Expected-Last-Subject-Sequence": str(expected),
                    "Nats-TTL": f"{self.lease_seconds}s",
                },
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                return None
            raise
        return ack.seq

    async def acquire(self, cell_id: str, info: Mapping[str, Any]) -> Lease | None:
        """Take the lease, or None when another worker holds a live one."""
        seq = await self._publish(cell_id, 0, info)
        return None if seq is None else Lease(cell_id, seq)

    async def renew(self, lease: Lease, info: Mapping[str, Any]) -> bool:
        """Extend the lease; False (and ``lease.lost``) when it expired and was taken."""
        seq = await self._publish(lease.cell_id, lease.seq, info)
        if seq is None:
            lease.lost = True
            return False
        lease.seq = seq
        return True

    async def holder_of(self, cell_id: str) -> str | None:
        try:
            msg = await self.js.get_msg(LOCK_STREAM, subject=lock_subject(cell_id))
        except nats.js.errors.NotFoundError:
            return None
        try:
            body = json.loads(msg.data or b"{}")
        except ValueError:
            return "?"
        holder = body.get("holder") if isinstance(body, dict) else None
        return str(holder) if holder else "?"

    async def release(self, lease: Lease) -> None:
        if lease.lost:
            return
        with contextlib.suppress(nats.js.errors.NotFoundError):  # expired: nothing to release
            await self.js.delete_msg(LOCK_STREAM, lease.seq)
