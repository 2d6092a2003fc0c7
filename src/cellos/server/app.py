"""``cellos serve``: the HTTP API over the cell-state projection (DESIGN.md §1, L7).

The server owns no state of its own. On start it replays ``CELLOS_EVENTS`` from the first
sequence into a :class:`~cellos.server.projection.Projection` (it listens only once the replay
has caught up), keeps it current with an ordered push consumer, and reads the documents still
waiting in the work queue (``CELLOS_CELLS``) to know which cells are PENDING. A restarted server
therefore answers exactly what it answered before.

Endpoints (all under bearer-token auth; ``GET /healthz`` is the only open one):

* ``POST /v1/cells`` -- validate a document (JSON or YAML) and put it on the work queue
  (``cellos.worker.queue.publish_document``); 202 with the cell's record.
* ``GET /v1/cells[?state=S&tenant=T]``, ``GET /v1/cells/{id}`` -- projected records.
* ``GET /v1/cells/{id}/events?since=SEQ&limit=N`` -- the cell's stream messages after ``SEQ``.
* ``GET /v1/cells/{id}/logs?stream=stdout&follow=true&offset=N`` -- the cell's output, live
  (SSE; :mod:`cellos.server.logs`).
* ``GET /v1/cells/{id}/events/stream?since=SEQ`` and ``GET /v1/events/stream?since=SEQ`` --
  Server-Sent Events: replay after ``SEQ`` (or the ``Last-Event-ID`` header), then follow.
  Each SSE ``id`` is the stream sequence, so a reconnecting client resumes where it stopped.

``since`` is exclusive: the last stream sequence the client has already seen (0: everything).
Every error is an RFC 9457 ``application/problem+json`` body (``type``, ``title``, ``status``,
``detail``, ``instance``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import signal
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import nats
import nats.errors
import nats.js.errors
from aiohttp import web
from aiohttp.typedefs import Handler
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from cellos.core.canonical import strict_loads
from cellos.core.chain import RUN_ID_ATTR, SEQ_ATTR
from cellos.core.errors import CellosError, InvalidSpec
from cellos.core.events import SIGNED_ENVELOPE
from cellos.core.loading import MAX_DOCUMENT_BYTES, parse_document, validate_document
from cellos.core.log import get_logger
from cellos.core.signing import SignatureInvalid, VerifyKeys, unwrap_signed
from cellos.server.projection import TERMINAL, CellState, Projection, cell_id_of, unwrap
from cellos.sinks.jetstream import STREAM, SUBJECTS, ensure_stream
from cellos.worker import queue

log = get_logger(__name__)

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8080
#: Shortest accepted API token: anything shorter is guessable.
MIN_TOKEN_CHARS: Final = 16
#: SSE comment sent when nothing else was, so proxies and clients see a live connection.
KEEPALIVE_SECONDS: Final = 15.0
DEFAULT_EVENTS_LIMIT: Final = 1000
MAX_EVENTS_LIMIT: Final = 10000
PROBLEM_JSON: Final = "application/problem+json"
_PROBLEM_PREFIX: Final = "urn:cellos:problem:"
_DOCUMENT_TYPES: Final = frozenset(
    {"application/json", "application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"}
)


def rfc3339(moment: datetime) -> str:
    """The event time format (microseconds, ``Z``), so times compare as the events' do."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def check_token(token: str, source: str) -> str:
    """The token, or ``InvalidSpec(source, reason)`` (exit 2) if it is unusable."""
    token = token.strip()
    if not token:
        raise InvalidSpec(source, "is empty; cellos serve requires a bearer token")
    if len(token) < MIN_TOKEN_CHARS:
        raise InvalidSpec(source, f"must be at least {MIN_TOKEN_CHARS} characters")
    if not token.isascii() or not token.isprintable() or " " in token:
        raise InvalidSpec(source, "must be printable ASCII without spaces")
    return token


# -- problem details ------------------------------------------------------------------------


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    kind: str,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> web.Response:
    """An RFC 9457 problem details response."""
    body: dict[str, Any] = {
        "type": _PROBLEM_PREFIX + kind,
        "title": title,
        "status": status,
        "detail": detail,
    }
    if instance is not None:
        body["instance"] = instance
    body.update(extensions)
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type=PROBLEM_JSON,
        headers=headers,
    )


class Problem(Exception):
    """Raised by handlers; rendered by the middleware as problem details."""

    def __init__(self, status: int, title: str, detail: str, kind: str, **ext: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.kind = kind
        self.ext = ext


_KIND_BY_STATUS: Final = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    406: "not-acceptable",
    409: "conflict",
    413: "payload-too-large",
    415: "unsupported-media-type",
    422: "invalid-document",
    503: "unavailable",
}


# -- the stream side ------------------------------------------------------------------------


def _decode(data: bytes | None) -> Any:
    if not data:
        return None
    try:
        return strict_loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None


def event_item(
    seq: int, subject: str | None, data: bytes | None, rejected: str | None = None
) -> dict[str, Any]:
    """One stream message as the API shows it: the wire event plus what a client filters on."""
    payload = _decode(data)
    inner = unwrap(payload)
    item: dict[str, Any] = {
        "seq": seq,
        "subject": subject,
        "cellId": cell_id_of(inner) if inner is not None else None,
        "type": inner.get("type") if inner is not None else None,
        "time": inner.get("time") if inner is not None else None,
        "runId": inner.get(RUN_ID_ATTR) if inner is not None else None,
        "runSeq": inner.get(SEQ_ATTR) if inner is not None else None,
        "signed": isinstance(payload, dict) and payload.get("type") == SIGNED_ENVELOPE,
        "event": payload,
    }
    if payload is None:
        item["rejected"] = "not a JSON event"
    elif rejected is not None:
        item["rejected"] = rejected
    return item


@dataclass(frozen=True)
class ServeConfig:
    nats_url: str
    token: str
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    #: When set, only events signed by one of these keys are folded into the projection.
    keys: VerifyKeys | None = None


class Hub:
    """The NATS side: projection follower, event reads, queue submissions, SSE consumers."""

    def __init__(self, nats_url: str, keys: VerifyKeys | None = None) -> None:
        self.nats_url = nats_url
        self.keys = keys
        self.projection = Projection()
        #: Stream sequences not folded because they failed verification, with the reason.
        self.rejected: dict[int, str] = {}
        self.closing = asyncio.Event()
        self._applied = asyncio.Condition()
        self._caught_up = asyncio.Event()
        self._scan_lock = asyncio.Lock()
        self._queue_scanned = 0
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._subs: list[Subscription] = []
        self._scan_task: asyncio.Task[None] | None = None
        self._scan_wanted = asyncio.Event()

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("hub not started")
        return self._js

    async def start(self) -> None:
        """Connect, replay ``CELLOS_EVENTS`` until caught up, then read the queue."""
        # Fail fast when NATS is not there at start (a persistent connection would wait for
        # it forever); once serving, reconnect forever.
        probe = await queue.connect(self.nats_url, name="cellos-serve-probe")
        await probe.close()
        self._nc = await queue.connect(self.nats_url, name="cellos-serve", persistent=True)
        self._js = self._nc.jetstream(timeout=5.0)
        await ensure_stream(self._js)
        info = await self._js.stream_info(STREAM)
        target = info.state.last_seq if info.state.messages else 0
        sub = await self._js.subscribe(
            SUBJECTS,
            stream=STREAM,
            cb=self._on_event,
            ordered_consumer=True,
            # Missed heartbeats are how a restarted nats-server is noticed: keep it short.
            idle_heartbeat=2.0,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )
        self._subs.append(sub)
        if target:
            caught_up = asyncio.create_task(self._caught_up.wait())
            reached = asyncio.create_task(self.wait_applied(target, timeout=None))
            try:
                await asyncio.wait({caught_up, reached}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                caught_up.cancel()
                reached.cancel()
        await queue.ensure_queue(self._js)
        await self.scan_queue()
        # Submissions by anyone (``cellos submit``, another server): a plain subscription
        # on the queue's subjects only says "look again"; what counts is the stream.
        self._subs.append(await self._nc.subscribe(queue.SUBJECTS, cb=self._on_submit))
        self._scan_task = asyncio.create_task(self._scan_loop())

    async def close(self) -> None:
        self.closing.set()
        if self._scan_task is not None:
            self._scan_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scan_task
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self._nc is not None and not self._nc.is_closed:
            try:
                await asyncio.wait_for(self._nc.drain(), 5)
            except Exception:  # noqa: BLE001 - closing a dead connection may fail
                await self._nc.close()

    # -- projection follower -----------------------------------------------------------------

    def _verify(self, payload: Any) -> str | None:
        if payload is None:
            return "not a JSON event"
        if self.keys is None:
            return None
        if not isinstance(payload, dict) or payload.get("type") != SIGNED_ENVELOPE:
            return "unsigned event, but verify keys were given"
        try:
            unwrap_signed(payload, self.keys)
        except SignatureInvalid as exc:
            return exc.reason
        return None

    async def _on_event(self, msg: Msg) -> None:
        meta = msg.metadata
        seq = meta.sequence.stream
        if seq > self.projection.last_seq:
            payload = _decode(msg.data)
            reason = self._verify(payload)
            if reason is not None:
                self.rejected[seq] = reason
                self.projection.skip(seq, payload)
                log.warning("stream seq %d not folded: %s", seq, reason)
            else:
                self.projection.apply(seq, payload, msg.subject)
        if meta.num_pending == 0:
            self._caught_up.set()
        async with self._applied:
            self._applied.notify_all()

    async def wait_applied(self, seq: int, timeout: float | None = 30.0) -> bool:
        """Wait until the projection has folded stream sequence ``seq``."""

        async def reached() -> None:
            async with self._applied:
                await self._applied.wait_for(lambda: self.projection.last_seq >= seq)

        try:
            await asyncio.wait_for(reached(), timeout)
        except TimeoutError:
            return False
        return True

    # -- reading events ----------------------------------------------------------------------

    async def fetch(self, seq: int) -> dict[str, Any] | None:
        try:
            msg = await self.js.get_msg(STREAM, seq)
        except nats.js.errors.NotFoundError:
            return None  # expired or deleted
        return event_item(seq, msg.subject, msg.data, self.rejected.get(seq))

    async def fetch_many(self, seqs: list[int]) -> list[dict[str, Any]]:
        gate = asyncio.Semaphore(16)

        async def one(seq: int) -> dict[str, Any] | None:
            async with gate:
                return await self.fetch(seq)

        items = await asyncio.gather(*(one(s) for s in seqs))
        return [item for item in items if item is not None]

    async def follow(self, start: int) -> Subscription:
        """An ordered consumer of ``CELLOS_EVENTS`` from stream sequence ``start``."""
        return await self.js.subscribe(
            SUBJECTS,
            stream=STREAM,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, start)
            ),
        )

    # -- the work queue ----------------------------------------------------------------------

    async def _on_submit(self, msg: Msg) -> None:
        self._scan_wanted.set()

    async def _scan_loop(self) -> None:
        while not self.closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._scan_wanted.wait(), 30)
            self._scan_wanted.clear()
            # Let a burst of submissions land before looking.
            await asyncio.sleep(0.05)
            try:
                await self.scan_queue()
            except Exception:  # NATS away for a moment: the next scan retries
                log.debug("queue scan failed", exc_info=True)

    async def scan_queue(self) -> None:
        """Fold the documents still waiting in ``CELLOS_CELLS`` after the last one seen."""
        async with self._scan_lock:
            seq = self._queue_scanned + 1
            while True:
                try:
                    msg = await self.js.get_msg(
                        queue.STREAM, seq, subject=queue.SUBJECTS, next=True
                    )
                except nats.js.errors.NotFoundError:
                    return
                if msg.seq is None:
                    return
                self._apply_submission(msg.seq, msg.data, msg.time)
                self._queue_scanned = msg.seq
                seq = msg.seq + 1

    def _apply_submission(self, seq: int, data: bytes | None, when: datetime | None) -> None:
        try:
            document = queue.decode_document(data or b"", f"{queue.STREAM}:{seq}")
        except CellosError as exc:
            log.warning("queue message %d is not a valid document: %s", seq, exc)
            return
        self.projection.apply_submission(
            document.spec.id,
            rfc3339(when or datetime.now(UTC)),
            tenant=queue.tenant_of(document),
            queue_seq=seq,
        )

    async def submit(self, data: bytes) -> tuple[int, dict[str, Any], bool]:
        """Validate and queue a document: (HTTP status, cell record, duplicate)."""
        document = validate_document(parse_document(data, "<request body>"))
        cell_id = document.spec.id
        current = self.projection.cells.get(cell_id)
        if current is not None and current.state not in TERMINAL:
            raise Problem(
                409,
                "Conflict",
                f"cell {cell_id} is {current.state.value}; submit it again once it has finished",
                "conflict",
            )
        submitted = await queue.publish_document(self.js, document)
        if not submitted.duplicate:
            await self.scan_queue()
        view = self.projection.get(cell_id)
        if view is None:
            # Picked up and acknowledged before we looked: its events are on their way.
            view = {"id": cell_id, "tenant": queue.tenant_of(document), "state": "PENDING"}
        return (200 if submitted.duplicate else 202), view, submitted.duplicate


# -- HTTP -----------------------------------------------------------------------------------

HUB: Final = web.AppKey("hub", Hub)
TOKEN: Final = web.AppKey("token", str)


@web.middleware
async def problems_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as exc:
        headers = {"WWW-Authenticate": 'Bearer realm="cellos"'} if exc.status == 401 else None
        return problem(
            exc.status,
            exc.title,
            exc.detail,
            kind=exc.kind,
            instance=request.path,
            headers=headers,
            **exc.ext,
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else None
        if exc.status == 404:
            detail = f"no such resource: {request.path}"
        elif exc.status == 405:
            detail = f"{request.method} is not allowed on {request.path}"
        elif exc.status == 413:
            detail = f"the request body is larger than {MAX_DOCUMENT_BYTES} bytes"
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow",)}
        return problem(
            exc.status,
            exc.reason,
            detail or exc.reason,
            kind=_KIND_BY_STATUS.get(exc.status, "error"),
            instance=request.path,
            headers=headers,
        )
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        log.warning("NATS request failed: %s", exc)
        return problem(
            503,
            "Service Unavailable",
            f"JetStream did not answer: {type(exc).__name__}",
            kind="unavailable",
            instance=request.path,
        )
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return problem(
            500,
            "Internal Server Error",
            "the server failed to handle the request; see its log",
            kind="internal",
            instance=request.path,
        )


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path == "/healthz":
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, credentials = header.partition(" ")
    expected = request.app[TOKEN].encode()
    if scheme.lower() != "bearer" or not credentials.strip():
        raise Problem(
            401,
            "Unauthorized",
            "a bearer token is required (Authorization: Bearer <token>)",
            "unauthorized",
        )
    # Constant-time: the comparison must not tell how much of a guess was right.
    if not hmac.compare_digest(credentials.strip().encode(), expected):
        log.warning("rejected a request with a wrong token from %s", request.remote)
        raise Problem(401, "Unauthorized", "the bearer token is not valid", "unauthorized")
    return await handler(request)


def _int_param(request: web.Request, name: str, default: int, maximum: int | None = None) -> int:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0 or (maximum is not None and value > maximum):
        bound = f" and at most {maximum}" if maximum is not None else ""
        raise Problem(400, "Bad Request", f"{name} must be an integer >= 0{bound}", "bad-request")
    return value


def _since(request: web.Request) -> int:
    if "since" not in request.query and request.headers.get("Last-Event-ID"):
        text = request.headers["Last-Event-ID"].strip()
        if not text.isdigit():
            raise Problem(
                400, "Bad Request", "Last-Event-ID must be a stream sequence", "bad-request"
            )
        return int(text)
    return _int_param(request, "since", 0)


def _cell_or_404(hub: Hub, cell_id: str) -> dict[str, Any]:
    view = hub.projection.get(cell_id)
    if view is None:
        raise Problem(404, "Not Found", f"no cell {cell_id!r} is known", "not-found")
    return view


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def list_cells(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    state = request.query.get("state")
    if state is not None and state.upper() not in CellState.__members__:
        choices = ", ".join(CellState.__members__)
        raise Problem(400, "Bad Request", f"state must be one of {choices}", "bad-request")
    tenant = request.query.get("tenant")
    items = [
        cell
        for cell in hub.projection.snapshot()
        if (state is None or cell["state"] == state.upper())
        and (tenant is None or cell["tenant"] == tenant)
    ]
    return web.json_response(
        {"items": items, "count": len(items), "lastSeq": hub.projection.last_seq}
    )


async def get_cell(request: web.Request) -> web.Response:
    return web.json_response(_cell_or_404(request.app[HUB], request.match_info["id"]))


async def submit_cell(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    ctype = request.content_type
    if request.headers.get("Content-Type") and ctype not in _DOCUMENT_TYPES:
        raise Problem(
            415,
            "Unsupported Media Type",
            f"send the document as application/json or application/yaml, not {ctype}",
            "unsupported-media-type",
        )
    data = await request.read()
    try:
        status, view, duplicate = await hub.submit(data)
    except InvalidSpec as exc:
        raise Problem(
            422,
            "Invalid Document",
            f"{exc.path}: {exc.reason}",
            "invalid-document",
            errors=[{"path": p, "reason": r} for p, r in exc.problems],
        ) from None
    except queue.QueueError as exc:
        raise Problem(503, "Service Unavailable", exc.reason, "unavailable") from None
    body = {**view, "duplicate": duplicate} if duplicate else view
    return web.json_response(body, status=status, headers={"Location": f"/v1/cells/{view['id']}"})


async def cell_events(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    cell_id = request.match_info["id"]
    _cell_or_404(hub, cell_id)
    since = _since(request)
    limit = _int_param(request, "limit", DEFAULT_EVENTS_LIMIT, MAX_EVENTS_LIMIT)
    seqs = hub.projection.event_seqs(cell_id, since)
    more = len(seqs) > limit
    items = await hub.fetch_many(seqs[:limit])
    last = seqs[:limit][-1] if seqs[:limit] else since
    return web.json_response({"cellId": cell_id, "items": items, "lastSeq": last, "more": more})


def _sse(item: dict[str, Any]) -> bytes:
    data = json.dumps(item, separators=(",", ":"), ensure_ascii=False)
    return f"id: {item['seq']}\nevent: cellos.event\ndata: {data}\n\n".encode()


async def _stream(request: web.Request, cell_id: str | None) -> web.StreamResponse:
    hub = request.app[HUB]
    since = _since(request)
    start = since + 1
    if cell_id is not None:
        # A cell not known yet (submitted, or its first event on its way) is waited for.
        seqs = hub.projection.event_seqs(cell_id, since) if hub.projection.get(cell_id) else []
        # Skip the part of the stream that holds nothing of this cell.
        start = seqs[0] if seqs else max(start, hub.projection.last_seq + 1)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    await response.write(b"retry: 2000\n\n")
    sub = await hub.follow(start)
    loop = asyncio.get_running_loop()
    last_write = loop.time()
    try:
        while not hub.closing.is_set():
            try:
                msg = await sub.next_msg(timeout=1.0)
            except nats.errors.TimeoutError:
                if request.transport is None or request.transport.is_closing():
                    break
                if loop.time() - last_write >= KEEPALIVE_SECONDS:
                    await response.write(b": keepalive\n\n")
                    last_write = loop.time()
                continue
            seq = msg.metadata.sequence.stream
            # The projection first: a client that sees event N and then asks for the cell
            # gets a record that includes N.
            await hub.wait_applied(seq)
            item = event_item(seq, msg.subject, msg.data, hub.rejected.get(seq))
            if cell_id is not None and item["cellId"] != cell_id:
                continue
            await response.write(_sse(item))
            last_write = loop.time()
    except (ConnectionResetError, nats.errors.ConnectionClosedError):
        pass
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return response


async def cell_event_stream(request: web.Request) -> web.StreamResponse:
    return await _stream(request, request.match_info["id"])


async def event_stream(request: web.Request) -> web.StreamResponse:
    return await _stream(request, None)


async def cell_logs(request: web.Request) -> web.StreamResponse:
    from cellos.server.logs import stream_logs

    offset = _int_param(request, "offset", 0)
    if "offset" not in request.query and request.headers.get("Last-Event-ID"):
        text = request.headers["Last-Event-ID"].strip()
        if not text.isdigit():
            raise Problem(400, "Bad Request", "Last-Event-ID must be a byte offset", "bad-request")
        offset = int(text)
    return await stream_logs(request, request.app[HUB], Problem, offset)


def build_app(hub: Hub, token: str) -> web.Application:
    app = web.Application(
        middlewares=[problems_middleware, auth_middleware], client_max_size=MAX_DOCUMENT_BYTES
    )
    app[HUB] = hub
    app[TOKEN] = token
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/v1/cells", submit_cell)
    app.router.add_get("/v1/cells", list_cells)
    app.router.add_get("/v1/cells/{id}", get_cell)
    app.router.add_get("/v1/cells/{id}/events", cell_events)
    app.router.add_get("/v1/cells/{id}/events/stream", cell_event_stream)
    app.router.add_get("/v1/cells/{id}/logs", cell_logs)
    app.router.add_get("/v1/events/stream", event_stream)

    async def on_shutdown(app: web.Application) -> None:
        hub.closing.set()

    app.on_shutdown.append(on_shutdown)
    return app


async def serve(config: ServeConfig, ready: Callable[[str], None] | None = None) -> None:
    """Replay, listen, and serve until SIGINT/SIGTERM."""
    hub = Hub(config.nats_url, config.keys)
    try:
        await hub.start()
        app = build_app(hub, config.token)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, config.host, config.port)
            try:
                await site.start()
            except OSError as exc:
                raise CellosError(
                    "--port",
                    f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
                ) from None
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)
            if ready is not None:
                host, port = _bound_address(site, config)
                ready(
                    f"serving http://{host}:{port} ({len(hub.projection.cells)} cells, "
                    f"stream seq {hub.projection.last_seq})"
                )
            await stop.wait()
        finally:
            hub.closing.set()
            await runner.cleanup()
    finally:
        await hub.close()


def _bound_address(site: web.TCPSite, config: ServeConfig) -> tuple[str, int]:
    server = site._server  # the asyncio server: the real port when 0 was asked for
    sockets = getattr(server, "sockets", None) or []
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        return str(host), int(port)
    return config.host, config.port
