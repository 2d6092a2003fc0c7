"""Live output: the workload's stdout/stderr relayed, logged, digested and published as it is
produced (DESIGN.md §5 "Output").

Everything runs for real: ``cellos-supervisor`` in a subprocess on the ``stub`` and ``cellos``
backends, a real nats-server (``nats_server`` fixture), ``cellos serve`` and ``cellctl`` as
subprocesses. The one exception is :func:`test_guest_channel_is_decoded_as_it_arrives`,
which feeds :class:`GuestChannel` the serial lines guest init writes (a QEMU boot needs a built
image, which this suite builds only in the microVM tests).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import selectors
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cellos.core.errors import CellosError
from cellos.output.redacting import REDACTED, StreamRedactor
from tests.conftest import (
    base_env,
    doc,
    read_events,
    require_host,
    require_sandbox,
    run_cli,
    write_doc,
)

SECRET = "s3cr3t-T0KEN-value-42"
COMPLETED = "dev.cellos.events.cell.command.v1.completed"
#: One line every 100 ms for 3 s, each carrying the moment it was written (ns, realtime).
TICKER = ["/bin/sh", "-c", "i=0; while [ $i -lt 30 ]; do date +%s%N; sleep 0.1; i=$((i+1)); done"]
LATENCY_BUDGET_S = 0.3


def _env(tmp_path: Path, backend: str = "stub", **extra: str) -> dict[str, str]:
    settings = {
        "CELLOS_CELL_BACKEND": backend,
        "CELL_OS_JSONL_EVENTS": str(tmp_path / "events.jsonl"),
        "CELLOS_LOG_DIR": str(tmp_path / "logs"),
    }
    return base_env(tmp_path, **{**settings, **extra})


def _backend(name: str) -> str:
    if name == "cellos":
        require_sandbox()
    elif name == "gvisor":
        require_host(shutil.which("runsc") is not None, "gVisor runsc")
        require_host(os.geteuid() == 0, "root (Debian's runsc cannot run rootless)")
    return name


def _supervisor(spec: Path, env: dict[str, str], **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cellos.supervisor.cli", str(spec)], env=env, **kwargs
    )


def _completed(tmp_path: Path) -> dict[str, Any]:
    events = [e for e in read_events(tmp_path / "events.jsonl") if e["type"] == COMPLETED]
    assert len(events) == 1, events
    return dict(events[0]["data"])


def _latencies(lines: list[tuple[float, bytes]]) -> list[float]:
    """Seconds from each ticker line's write (its content) to its arrival."""
    return [arrived - int(line) / 1e9 for arrived, line in lines if line.strip().isdigit()]


def _read_lines(stream: Any, until: float) -> list[tuple[float, bytes]]:
    """(arrival time, line) of everything ``stream`` yields, read as it comes."""
    out: list[tuple[float, bytes]] = []
    fd = stream.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    buf = b""
    while time.time() < until:
        if not sel.select(0.5):
            continue
        chunk = os.read(fd, 65536)
        now = time.time()
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        out += [(now, line) for line in lines]
    return out


# -- redaction across chunk boundaries (pure) -----------------------------------------------


def test_a_secret_split_at_any_point_is_redacted() -> None:
    text = f"before {SECRET} middle {SECRET}{SECRET} end\n".encode()
    for cut in range(1, len(text)):
        for second in (cut, min(len(text), cut + 7)):
            redactor = StreamRedactor([SECRET.encode(), b"other"])
            parts = [text[:cut], text[cut:second], text[second:]]
            out = b"".join(redactor.feed(p) for p in parts) + redactor.flush()
            assert SECRET.encode() not in out
            assert out == text.replace(SECRET.encode(), REDACTED), cut


def test_only_a_possible_secret_prefix_is_held_back() -> None:
    redactor = StreamRedactor([SECRET.encode()])
    # A finished line is released at once (it cannot be the start of the secret) ...
    assert redactor.feed(b"line 1\n") == b"line 1\n"
    # ... the start of the secret is held until the next chunk says what it was.
    assert redactor.feed(b"x s3cr") == b"x "
    assert redactor.feed(b"ew\n") == b"s3crew\n"
    assert StreamRedactor([]).feed(b"as is") == b"as is"


# -- the terminal ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["stub", "cellos", "gvisor"])
def test_lines_reach_the_terminal_within_300ms(tmp_path: Path, backend: str) -> None:
    spec = write_doc(tmp_path / "tick.yaml", doc("tick", argv=TICKER, run={"timeoutSeconds": 20}))
    proc = _supervisor(spec, _env(tmp_path, _backend(backend)), stdout=subprocess.PIPE)
    assert proc.stdout is not None
    lines = _read_lines(proc.stdout, time.time() + 20)
    assert proc.wait(10) == 0
    latencies = _latencies(lines)
    assert len(latencies) == 30
    # Measured line by line as they arrive, not at the end: the first one too.
    assert max(latencies) < LATENCY_BUDGET_S, latencies
    assert lines[-1][0] - lines[0][0] > 2.5  # they came over 3 s, not in one burst


def test_a_microvm_guests_lines_reach_the_terminal_as_they_are_written(
    tmp_path: Path, image_dir: Path
) -> None:
    """Real QEMU guest (TCG): its clock is not the host's, so the test checks that the lines
    arrive spread over the 3 s in which the guest writes them, not in one burst at its end."""
    ticker = [
        "/bin/sh",
        "-c",
        "i=0; while [ $i -lt 30 ]; do echo tick$i; sleep 0.1; i=$((i+1)); done",
    ]
    spec = write_doc(
        tmp_path / "tick.yaml", doc("vm-tick", argv=ticker, run={"timeoutSeconds": 120})
    )
    env = _env(
        tmp_path,
        "qemu",
        CELLOS_MICROVM_IMAGE=str(image_dir),
        CELLOS_MICROVM_ACCEL="tcg",
        CELLOS_MICROVM_ALLOW_TCG="1",
    )
    proc = _supervisor(spec, env, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    lines = _read_lines(proc.stdout, time.time() + 120)
    assert proc.wait(30) == 0
    ticks = [arrived for arrived, line in lines if line.startswith(b"tick")]
    assert len(ticks) == 30, lines
    assert ticks[-1] - ticks[0] > 2.0, ticks
    assert _completed(tmp_path)["stdoutBytes"] == sum(len(f"tick{i}\n") for i in range(30))


def test_50mb_relayed_in_full_and_the_digest_and_log_verify(tmp_path: Path) -> None:
    size = 50_000_000
    argv = ["/bin/sh", "-c", f"head -c {size} /dev/zero | tr '\\0' 'x'; echo done >&2"]
    spec = write_doc(tmp_path / "big.yaml", doc("big", argv=argv, run={"timeoutSeconds": 60}))
    out_path = tmp_path / "terminal.out"
    with out_path.open("wb") as out:
        proc = _supervisor(spec, _env(tmp_path), stdout=out, stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    data = _completed(tmp_path)
    terminal = hashlib.sha256(out_path.read_bytes()).hexdigest()
    assert out_path.stat().st_size == size == data["stdoutBytes"]
    assert terminal == data["output"]["stdout"]["sha256"]
    assert data["outputTruncated"] is False

    log = data["output"]["stdout"]["log"]
    verify = ["logs", "verify", log, "--events", str(tmp_path / "events.jsonl"), "--cell", "big"]
    ok = run_cli("cellos.cli", verify, _env(tmp_path))
    assert ok.code == 0 and ok.stdout.startswith("ok: "), ok
    with open(log, "r+b") as f:  # one changed byte
        f.seek(size // 2)
        f.write(b"y")
    bad = run_cli("cellos.cli", verify, _env(tmp_path))
    assert bad.code == 1 and "content differs" in bad.stderr, bad
    stderr_ok = run_cli("cellos.cli", [*verify[:2], data["output"]["stderr"]["log"], *verify[3:],
                                       "--stream", "stderr"], _env(tmp_path))  # fmt: skip
    assert stderr_ok.code == 0, stderr_ok


def test_binary_and_invalid_utf8_pass_unchanged(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 3 + b"\xff\xfe\xc3(\x00"
    (tmp_path / "blob").write_bytes(payload)
    argv = ["/bin/cat", str(tmp_path / "blob")]
    spec = write_doc(tmp_path / "bin.yaml", doc("bin", argv=argv))
    proc = _supervisor(spec, _env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out == payload
    data = _completed(tmp_path)
    assert data["output"]["stdout"]["sha256"] == hashlib.sha256(payload).hexdigest()


def test_200mb_keeps_a_bounded_log_that_still_verifies(tmp_path: Path) -> None:
    size, bound = 200_000_000, 1 << 20
    argv = ["/usr/bin/head", "-c", str(size), "/dev/zero"]
    spec = write_doc(tmp_path / "huge.yaml", doc("huge", argv=argv, run={"timeoutSeconds": 60}))
    env = _env(tmp_path, CELLOS_LOG_MAX_BYTES=str(bound))
    started = time.monotonic()
    proc = _supervisor(spec, env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    data = _completed(tmp_path)
    stdout = data["output"]["stdout"]
    assert data["stdoutBytes"] == size and data["outputTruncated"] is True
    assert stdout["logBytes"] == bound and stdout["logDroppedBytes"] == size - bound
    assert stdout["sha256"] == _zeros_sha256(size)
    assert Path(stdout["log"]).stat().st_size == bound
    verify = ["logs", "verify", stdout["log"], "--events", str(tmp_path / "events.jsonl")]
    ok = run_cli("cellos.cli", [*verify, "--cell", "huge"], env)
    assert ok.code == 0 and "first 1048576 of 200000000 bytes" in ok.stdout, ok
    print(f"200 MB through the supervisor in {time.monotonic() - started:.2f} s")


def _zeros_sha256(size: int) -> str:
    digest, block = hashlib.sha256(), bytes(1 << 20)
    for start in range(0, size, len(block)):
        digest.update(block[: min(len(block), size - start)])
    return digest.hexdigest()


def test_a_workload_that_closes_its_stdout_early(tmp_path: Path) -> None:
    argv = ["/bin/sh", "-c", "echo first; exec >&-; sleep 0.3; echo after >&2; exit 3"]
    spec = write_doc(tmp_path / "closed.yaml", doc("closed", argv=argv))
    proc = _supervisor(spec, _env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert out == b"first\n" and b"after\n" in err
    assert _completed(tmp_path)["stderrBytes"] == len(b"after\n")


@pytest.mark.parametrize("timeout", [None, 2])
def test_a_reader_that_never_reads_blocks_neither_timeout_nor_teardown(
    tmp_path: Path, timeout: int | None
) -> None:
    """``cellos-supervisor x.yaml | sleep 100``: 20 MB is far more than the pipe and the
    relay's queue take."""
    tail = "sleep 300" if timeout else "true"
    argv = ["/bin/sh", "-c", f"head -c 20000000 /dev/zero; {tail}"]
    run = {"timeoutSeconds": timeout or 60, "limits": {"gracefulShutdownSeconds": 1}}
    spec = write_doc(tmp_path / "stall.yaml", doc("stall", argv=argv, run=run))
    reader_r, reader_w = os.pipe()  # a reader that never reads
    started = time.monotonic()
    try:
        proc = _supervisor(spec, _env(tmp_path), stdout=reader_w, stderr=subprocess.PIPE)
        os.close(reader_w)
        _, err = proc.communicate(timeout=30)
    finally:
        os.close(reader_r)
    elapsed = time.monotonic() - started
    assert proc.returncode == (124 if timeout else 0), err
    # Bounded: the timeout (or the exit), one stall period of the relay, the grace, startup.
    assert elapsed < (timeout or 0) + 6, elapsed
    data = _completed(tmp_path)
    assert data["stdoutBytes"] == 20_000_000  # the log and the digest have every byte
    assert data["output"]["stdout"]["logDroppedBytes"] == 0
    assert b"warning: stdout:" in err and b"were not relayed" in err


# -- secrets everywhere ----------------------------------------------------------------------


def _nats_messages(url: str, subject: str) -> list[tuple[dict[str, str], bytes]]:
    async def read() -> list[tuple[dict[str, str], bytes]]:
        import nats
        import nats.js.errors

        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            try:
                sub = await js.subscribe(subject, ordered_consumer=True)
            except nats.js.errors.NotFoundError:
                return []  # no cell has published output yet
            out = []
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.0)
                except nats.errors.TimeoutError:
                    return out
                out.append((dict(msg.headers or {}), msg.data))
        finally:
            await nc.close()

    return asyncio.run(read())


class _Server:
    """``cellos serve`` against the test's nats-server (tests/test_server.py's ``Serve``)."""

    def __init__(self, tmp_path: Path, url: str) -> None:
        from tests.test_server import Serve

        env = {**base_env(tmp_path), "CELLOS_NATS_URL": url}
        self.serve = Serve(SimpleNamespace(env=env, root=tmp_path))  # type: ignore[arg-type]

    def __enter__(self) -> Any:
        self.serve.start()
        return self.serve

    def __exit__(self, *exc: object) -> None:
        self.serve.stop()


def _cellctl(serve: Any, *args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
    from tests.test_server import TOKEN

    env = {"PATH": os.environ.get("PATH", ""), "CELLCTL_SERVER": serve.url, "CELLCTL_TOKEN": TOKEN}
    return subprocess.Popen([sys.executable, "-m", "cellos.ctl.main", *args], env=env, **kwargs)


def test_a_split_secret_never_appears_anywhere(tmp_path: Path, nats_server: Any) -> None:
    # The secret is written in two pieces, 300 ms apart: two reads on the supervisor's side.
    half = len(SECRET) // 2
    script = (
        f"printf 'token=%s' '{SECRET[:half]}'; sleep 0.3; printf '%s\\n' '{SECRET[half:]}'; "
        f"printf 'err %s' '{SECRET[:3]}' >&2; sleep 0.3; printf '%s\\n' '{SECRET[3:]}' >&2"
    )
    spec = write_doc(
        tmp_path / "sec.yaml",
        doc("sec", argv=["/bin/sh", "-c", script], authority={"secretRefs": ["tok"]}),
    )
    env = _env(
        tmp_path,
        CELLOS_BROKER="env",
        CELLOS_SECRET_TOK=SECRET,
        CELLOS_NATS_URL=nats_server.url,
        CELLOS_DLQ_DIR=str(tmp_path / "dlq"),
    )
    with _Server(tmp_path, nats_server.url) as serve:
        proc = _supervisor(spec, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        api = _cellctl(serve, "logs", "sec", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        api_out, api_err = api.communicate(timeout=30)
        api_stderr = _cellctl(serve, "logs", "--stream", "stderr", "sec", stdout=subprocess.PIPE)
        api_err_out, _ = api_stderr.communicate(timeout=30)
    assert out == b"token=[REDACTED]\n" and b"err [REDACTED]\n" in err
    assert api.returncode == 0 and api_out == out, api_err
    assert api_err_out == b"err [REDACTED]\n"
    data = _completed(tmp_path)
    published = b"".join(body for _, body in _nats_messages(nats_server.url, "cellos.logs.>"))
    logs = b"".join(Path(data["output"][s]["log"]).read_bytes() for s in ("stdout", "stderr"))
    for where in (out, err, api_out, api_err_out, published, logs,
                  (tmp_path / "events.jsonl").read_bytes()):  # fmt: skip
        assert SECRET.encode() not in where
        assert SECRET[:half].encode() not in where and SECRET[half:].encode() not in where
    assert published == out + b"err [REDACTED]\n" or sorted(published) == sorted(
        out + b"err [REDACTED]\n"
    )


# -- NATS, the API and cellctl live ---------------------------------------------------------


def test_lines_reach_nats_and_cellctl_within_300ms(tmp_path: Path, nats_server: Any) -> None:
    spec = write_doc(tmp_path / "tick.yaml", doc("tick-nats", argv=TICKER))
    env = _env(tmp_path, CELLOS_NATS_URL=nats_server.url, CELLOS_DLQ_DIR=str(tmp_path / "dlq"))
    arrivals: list[tuple[float, bytes]] = []
    subscribed = threading.Event()

    async def listen() -> None:
        import nats

        nc = await nats.connect(nats_server.url)
        sub = await nc.subscribe("cellos.logs.default.tick-nats.stdout")
        subscribed.set()
        buf = b""
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=15)
                except nats.errors.TimeoutError:
                    return
                now = time.time()
                buf += msg.data
                *lines, buf = buf.split(b"\n")
                arrivals.extend((now, line) for line in lines)
                if len(arrivals) >= 30:
                    return
        finally:
            await nc.close()

    listener = threading.Thread(target=lambda: asyncio.run(listen()))
    listener.start()
    assert subscribed.wait(10)
    with _Server(tmp_path, nats_server.url) as serve:
        # Opened before the cell exists: it waits for the cell instead of answering 404.
        follower = _cellctl(serve, "logs", "-f", "tick-nats", stdout=subprocess.PIPE)
        time.sleep(0.5)
        proc = _supervisor(spec, env, stdout=subprocess.DEVNULL)
        assert follower.stdout is not None
        followed = _read_lines(follower.stdout, time.time() + 30)
        assert proc.wait(20) == 0
        assert follower.wait(20) == 0  # -f ends with the run
    listener.join(20)
    for name, lines in (("nats", arrivals), ("cellctl", followed)):
        latencies = _latencies(lines)
        assert len(latencies) == 30, (name, lines)
        assert max(latencies) < LATENCY_BUDGET_S, (name, latencies)
    data = _completed(tmp_path)
    assert data["output"]["stdout"]["natsDroppedBytes"] == 0


def test_nats_down_mid_stream_is_counted_not_fatal(tmp_path: Path, nats_server: Any) -> None:
    argv = [
        "/bin/sh",
        "-c",
        "i=0; while [ $i -lt 20 ]; do echo line $i; sleep 0.1; i=$((i+1)); done",
    ]
    spec = write_doc(tmp_path / "down.yaml", doc("down", argv=argv, run={"timeoutSeconds": 30}))
    env = _env(tmp_path, CELLOS_NATS_URL=nats_server.url, CELLOS_DLQ_DIR=str(tmp_path / "dlq"))
    started = time.monotonic()
    proc = _supervisor(spec, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.2)
    nats_server.stop()
    out, _ = proc.communicate(timeout=60)
    elapsed = time.monotonic() - started
    assert out.count(b"\n") == 20  # the terminal got everything
    data = _completed(tmp_path)
    assert data["exitCode"] == 0 and not data["forced"]
    assert data["durationMs"] < 4000  # the workload was not slowed down
    assert data["output"]["stdout"]["natsDroppedBytes"] > 0
    assert elapsed < 20, elapsed


def test_a_log_follower_that_disconnects_changes_nothing(tmp_path: Path, nats_server: Any) -> None:
    spec = write_doc(tmp_path / "tick.yaml", doc("gone-reader", argv=TICKER))
    env = _env(tmp_path, CELLOS_NATS_URL=nats_server.url, CELLOS_DLQ_DIR=str(tmp_path / "dlq"))
    with _Server(tmp_path, nats_server.url) as serve:
        proc = _supervisor(spec, env, stdout=subprocess.DEVNULL)
        follower = _cellctl(serve, "logs", "-f", "gone-reader", stdout=subprocess.PIPE)
        assert follower.stdout is not None
        assert follower.stdout.readline()  # one line, then the consumer goes away
        follower.kill()
        follower.wait()
        assert proc.wait(20) == 0
        again = _cellctl(serve, "logs", "gone-reader", stdout=subprocess.PIPE)
        out, _ = again.communicate(timeout=30)
    assert again.returncode == 0 and out.count(b"\n") == 30


# -- workers, the Python API, the guest channel ----------------------------------------------


def test_a_worker_publishes_the_logs_of_its_cells(tmp_path: Path, nats_server: Any) -> None:
    spec = write_doc(tmp_path / "w.yaml", doc("from-worker", argv=["/bin/echo", "by worker"]))
    env = _env(tmp_path, CELLOS_NATS_URL=nats_server.url, CELLOS_DLQ_DIR=str(tmp_path / "dlq"))
    submitted = run_cli("cellos.cli", ["submit", str(spec)], env)
    assert submitted.code == 0, submitted
    worker = subprocess.Popen(
        [sys.executable, "-m", "cellos.cli", "worker", "--concurrency", "1"],
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        messages: list[tuple[dict[str, str], bytes]] = []
        while time.monotonic() < deadline and not messages:
            messages = _nats_messages(nats_server.url, "cellos.logs.*.from-worker.stdout")
    finally:
        worker.terminate()
        worker.wait(30)
    assert [body for _, body in messages] == [b"by worker\n"]
    headers = messages[0][0]
    assert headers["Cellos-Offset"] == "0" and headers["Cellos-Run-Id"]


def test_python_api_runs_a_cell_and_streams_its_output(tmp_path: Path) -> None:
    import cellos

    chunks: list[tuple[float, str, bytes]] = []

    def on_output(stream: str, data: bytes) -> None:
        chunks.append((time.time(), stream, data))

    argv = ["/bin/sh", "-c", "echo one; sleep 0.5; echo two >&2; sleep 0.5; echo three"]
    env = _env(tmp_path)
    outcome = cellos.run_cell(doc("api", argv=argv), on_output=on_output, env=env)
    assert outcome.exit_code == 0 and outcome.outcome == "succeeded"
    assert [(s, d) for _, s, d in chunks] == [
        ("stdout", b"one\n"),
        ("stderr", b"two\n"),
        ("stdout", b"three\n"),
    ]
    assert chunks[-1][0] - chunks[0][0] > 0.8  # live, not handed over at the end
    assert outcome.output["stdout"]["sha256"] == hashlib.sha256(b"one\nthree\n").hexdigest()
    with pytest.raises(CellosError) as refused:
        cellos.run_cell({"apiVersion": "cellos.io/v1", "kind": "ExecutionCell"}, env=env)
    assert refused.value.path.startswith("spec")


def test_guest_channel_is_decoded_as_it_arrives() -> None:
    """Fake guest: the serial lines guest init writes (no QEMU boot here, see module doc)."""
    from cellos.hosts.microvm.channel import GuestChannel

    got: list[tuple[str, bytes]] = []

    class Sink:
        def write(self, stream: str, data: bytes) -> None:
            got.append((stream, data))

    channel = GuestChannel(Sink())
    line = b"CELLOS:OUT:" + base64.b64encode(b"hello\n") + b"\r\n"
    channel.write("stdout", b"[ 0.1] kernel noise\r\nCELLOS:READY\r\n" + line[:9])
    assert got == []
    channel.write("stdout", line[9:])
    assert got == [("stdout", b"hello\n")]  # before the guest has even exited
    channel.write("stdout", b"CELLOS:ERR:" + base64.b64encode(b"\xff\x00") + b"\nCELLOS:EXIT:7\n")
    result = channel.finish()
    assert got[-1] == ("stderr", b"\xff\x00")
    assert (
        result["exit_code"] == 7 and result["stdout_bytes"] == 6 and result["stdout"] == b"hello\n"
    )


def test_bad_output_settings_name_their_variable(tmp_path: Path) -> None:
    spec = write_doc(tmp_path / "c.yaml", doc("c"))
    for name, value in (("CELLOS_LOG_MAX_BYTES", "lots"), ("CELLOS_LOG_DIR", "relative/dir")):
        proc = _supervisor(spec, _env(tmp_path, **{name: value}), stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 2
        assert err.decode().startswith(f"error: {name}: "), err
        assert b"Traceback" not in err
