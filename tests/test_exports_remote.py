"""Remote exports (CELLOS_EXPORT_URL, CELLOS_EXPORT_S3) against real servers started here.

HTTP: tests/http_put_server.py, a real threaded HTTP server with failure injection (500s, slow
answers, connection resets). S3: moto's standalone S3 API server on a loopback port. Cells use
the ``stub`` backend only (no cgroups, namespaces or cell temp dirs on the host).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cellos.brokers import MemoryBroker
from cellos.core.errors import ExportError, PolicyRefused
from cellos.exports.http import HttpExportSink, RetryPolicy
from tests.conftest import CliResult, base_env, doc, read_events, short_types, write_doc
from tests.http_put_server import PutServer

Run = Callable[..., CliResult]
TOKEN = "tok-7f3e9c1d-never-shown"
FAST = RetryPolicy(attempts=3, backoff_seconds=0.05, backoff_cap_seconds=0.5, timeout_seconds=1)


@pytest.fixture
def put_server() -> Iterator[PutServer]:
    with PutServer(token=TOKEN) as server:
        yield server


def _sink(server: PutServer, retry: RetryPolicy = FAST) -> HttpExportSink:
    broker = MemoryBroker({"export-token": TOKEN})
    return HttpExportSink(
        server.url + "/artifacts", broker=broker, token_key="export-token", retry=retry
    )


def _artifact(tmp_path: Path, data: bytes, name: str = "out.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# -- HTTP, the sink on its own ------------------------------------------------------------------


def test_http_put_sends_length_digest_and_token(tmp_path: Path, put_server: PutServer) -> None:
    data = os.urandom(300_000)
    with _artifact(tmp_path, data).open("rb") as source:
        receipt = _sink(put_server).export("cell-1", "out.bin", source)
    assert receipt.destination == f"{put_server.url}/artifacts/cell-1/out.bin"
    assert (receipt.size_bytes, receipt.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert put_server.objects["/artifacts/cell-1/out.bin"] == data
    headers = put_server.requests[0]["headers"]
    assert headers["Content-Length"] == str(len(data))
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert headers["Digest"].startswith("SHA-256=") and headers["x-amz-checksum-sha256"]


def test_http_streams_a_non_seekable_source_through_a_spool(put_server: PutServer) -> None:
    data = b"piped bytes " * 1000
    receipt = _sink(put_server).export("cell-1", "piped.txt", io.BufferedReader(io.BytesIO(data)))
    assert put_server.objects["/artifacts/cell-1/piped.txt"] == data
    assert receipt.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("fault", ["500", "reset", "slow"])
def test_http_transient_failures_are_retried(
    tmp_path: Path, put_server: PutServer, fault: str
) -> None:
    put_server.faults.extend([fault, fault])
    put_server.slow_seconds = 2.0  # > the sink's 1 s timeout
    data = os.urandom(200_000)
    with _artifact(tmp_path, data).open("rb") as source:
        receipt = _sink(put_server).export("cell-1", "out.bin", source)
    assert len(put_server.requests) == 3
    assert put_server.objects["/artifacts/cell-1/out.bin"] == data
    assert receipt.size_bytes == len(data)


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("500", "HTTP 500"),
        # RST before or while we send: ECONNRESET or EPIPE, depending on timing.
        ("reset", "connection (reset|closed)"),
        ("slow", "timed out"),
    ],
)
def test_http_bounded_retries_then_failure_never_exported(
    tmp_path: Path, put_server: PutServer, fault: str, reason: str
) -> None:
    put_server.faults.extend([fault] * 3)
    put_server.slow_seconds = 2.0
    with (
        _artifact(tmp_path, b"x" * 100_000).open("rb") as source,
        pytest.raises(ExportError) as caught,
    ):
        _sink(put_server).export("cell-1", "out.bin", source)
    assert caught.value.path == "CELLOS_EXPORT_URL"
    assert "after 3 attempts" in caught.value.reason and re.search(reason, caught.value.reason)
    assert TOKEN not in str(caught.value)
    assert len(put_server.requests) == 3
    if fault != "slow":  # a slow server does store the body, just too late to be reported
        assert put_server.objects == {}


def test_http_wrong_token_is_not_retried_and_not_shown(tmp_path: Path) -> None:
    with PutServer(token="another-token") as server:
        with (
            _artifact(tmp_path, b"data").open("rb") as source,
            pytest.raises(ExportError) as caught,
        ):
            _sink(server).export("cell-1", "out.bin", source)
        assert len(server.requests) == 1 and server.objects == {}
    assert "HTTP 401" in caught.value.reason and TOKEN not in str(caught.value)


def test_http_missing_token_names_the_variable_and_key(tmp_path: Path) -> None:
    with PutServer() as server:
        sink = HttpExportSink(
            server.url, broker=MemoryBroker({}), token_key="export-token", retry=FAST
        )
        with (
            _artifact(tmp_path, b"data").open("rb") as source,
            pytest.raises(ExportError) as caught,
        ):
            sink.export("cell-1", "out.bin", source)
        assert server.requests == []
    assert caught.value.path == "CELLOS_EXPORT_TOKEN_SECRET" and "'export-token'" in str(
        caught.value
    )


def test_http_token_over_plain_http_to_a_remote_host_is_refused() -> None:
    with pytest.raises(PolicyRefused) as caught:
        HttpExportSink(
            "http://exports.example.com/a", broker=MemoryBroker({}), token_key="export-token"
        )
    assert caught.value.path == "CELLOS_EXPORT_URL" and "plain http" in caught.value.reason
    # Without a token, or over https, or to loopback, it is fine.
    HttpExportSink("http://exports.example.com/a")
    HttpExportSink("https://exports.example.com/a", broker=MemoryBroker({}), token_key="k")
    HttpExportSink("http://[::1]:9/a", broker=MemoryBroker({}), token_key="k")


@pytest.mark.parametrize(
    "url",
    ["ftp://h/x", "http://", "http://user:pw@h/x", "http://h:99999/x", "http://h/x?a=1"],
)
def test_http_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(PolicyRefused) as caught:
        HttpExportSink(url)
    assert caught.value.path == "CELLOS_EXPORT_URL"
    assert "pw" not in caught.value.reason


# -- through the real supervisor CLI (stub backend) -------------------------------------------


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return base_env(
        tmp_path,
        CELLOS_CELL_BACKEND="stub",
        CELL_OS_JSONL_EVENTS=str(tmp_path / "events.jsonl"),
        CELLOS_BROKER="env",
        **extra,
    )


def _run_export(
    tmp_path: Path, supervisor_cli: Run, env: dict[str, str], data: bytes = b"hello remote"
) -> tuple[CliResult, dict[str, dict[str, Any]]]:
    source = _artifact(tmp_path, data, "result.txt")
    spec = write_doc(
        tmp_path / "cell.yaml",
        doc("remote-1", export={"artifacts": [{"name": "result.txt", "path": str(source)}]}),
    )
    result = supervisor_cli(str(spec), env, timeout=300)
    events = read_events(tmp_path / "events.jsonl") if (tmp_path / "events.jsonl").exists() else []
    return result, {short_types([e])[0]: e["data"] for e in events}


def test_cli_http_export_event_carries_url_size_sha256(
    tmp_path: Path, supervisor_cli: Run, put_server: PutServer
) -> None:
    env = _env(
        tmp_path,
        CELLOS_EXPORT_URL=put_server.url + "/up",
        CELLOS_EXPORT_TOKEN_SECRET="export-token",
        CELLOS_SECRET_EXPORT_TOKEN=TOKEN,
    )
    result, by_type = _run_export(tmp_path, supervisor_cli, env)
    assert result.code == 0, result
    done = by_type["export.v2.completed"]
    assert done["destination"] == f"{put_server.url}/up/remote-1/result.txt"
    assert done["exporter"] == "http" and done["sizeBytes"] == len(b"hello remote")
    assert done["sha256"] == hashlib.sha256(b"hello remote").hexdigest()
    assert put_server.objects["/up/remote-1/result.txt"] == b"hello remote"
    assert TOKEN not in (tmp_path / "events.jsonl").read_text() + result.stderr + result.stdout


def test_cli_http_export_failure_is_exit_1_with_the_reason(
    tmp_path: Path, supervisor_cli: Run, put_server: PutServer
) -> None:
    put_server.faults.extend(["500"] * 3)
    env = _env(
        tmp_path,
        CELLOS_EXPORT_URL=put_server.url,
        CELLOS_EXPORT_TOKEN_SECRET="export-token",
        CELLOS_SECRET_EXPORT_TOKEN=TOKEN,
    )
    result, by_type = _run_export(tmp_path, supervisor_cli, env)
    assert result.code == 1, result
    assert "error: CELLOS_EXPORT_URL: PUT " in result.stderr and "HTTP 500" in result.stderr
    assert "HTTP 500" in by_type["export.v2.failed"]["reason"]
    assert "export.v2.completed" not in by_type
    assert by_type["compliance.v1.summary"]["exportsFailed"] == 1
    assert TOKEN not in (tmp_path / "events.jsonl").read_text() + result.stderr + result.stdout


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            {"CELLOS_EXPORT_DIR": "/tmp/x", "CELLOS_EXPORT_URL": "https://h/x"},
            "error: CELLOS_EXPORT_URL: only one export destination at a time",
        ),
        (
            {"CELLOS_EXPORT_URL": "https://h/x", "CELLOS_EXPORT_S3": "s3://b"},
            "error: CELLOS_EXPORT_S3: only one export destination at a time",
        ),
        (
            {"CELLOS_EXPORT_URL": "http://10.1.2.3/x", "CELLOS_EXPORT_TOKEN_SECRET": "k"},
            "error: CELLOS_EXPORT_URL: refusing to send the bearer token",
        ),
        ({"CELLOS_EXPORT_URL": "ftp://h/x"}, "error: CELLOS_EXPORT_URL: must be an http"),
        ({"CELLOS_EXPORT_S3": "bucket/x"}, "error: CELLOS_EXPORT_S3: must be s3://"),
        ({"CELLOS_EXPORT_TOKEN_SECRET": "k"}, "error: CELLOS_EXPORT_TOKEN_SECRET: set without"),
        (
            {"CELLOS_EXPORT_URL": "https://h/x", "CELLOS_EXPORT_TIMEOUT_SECONDS": "soon"},
            "error: CELLOS_EXPORT_TIMEOUT_SECONDS: ",
        ),
    ],
)
def test_cli_bad_export_configuration_is_exit_2(
    tmp_path: Path, supervisor_cli: Run, extra: dict[str, str], expected: str
) -> None:
    result, _ = _run_export(tmp_path, supervisor_cli, _env(tmp_path, **extra))
    assert result.code == 2, result
    assert result.stderr.startswith(expected), result
    assert "Traceback" not in result.stderr


# -- S3, against moto's S3 API server -----------------------------------------------------------

BUCKET = "artifact-exports-test"
AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture
def s3_server() -> Iterator[tuple[str, Any]]:
    """(endpoint URL, boto3 client) of a fresh moto S3 server with an empty bucket."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=AWS["AWS_REGION"],
            aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"],
        )
        client.create_bucket(Bucket=BUCKET)
        yield endpoint, client
    finally:
        server.stop()


def _s3_sink(endpoint: str) -> Any:
    from cellos.exports.s3 import S3ExportSink

    return S3ExportSink(f"s3://{BUCKET}/runs/", {**AWS, "AWS_ENDPOINT_URL": endpoint})


def test_s3_small_artifact_single_put_with_sha256(
    tmp_path: Path, s3_server: tuple[str, Any]
) -> None:
    endpoint, client = s3_server
    data = os.urandom(100_000)
    with _artifact(tmp_path, data).open("rb") as source:
        receipt = _s3_sink(endpoint).export("cell-1", "out.bin", source)
    assert receipt.destination == f"s3://{BUCKET}/runs/cell-1/out.bin"
    head = client.head_object(Bucket=BUCKET, Key="runs/cell-1/out.bin", ChecksumMode="ENABLED")
    assert head["Metadata"]["sha256"] == receipt.sha256 == hashlib.sha256(data).hexdigest()
    assert head["ChecksumSHA256"].startswith(
        __import__("base64").b64encode(hashlib.sha256(data).digest()).decode()
    )
    assert client.get_object(Bucket=BUCKET, Key="runs/cell-1/out.bin")["Body"].read() == data


def test_s3_100_mib_artifact_is_a_multipart_upload(
    tmp_path: Path, s3_server: tuple[str, Any]
) -> None:
    endpoint, client = s3_server
    path = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(100):
            block = os.urandom(1 << 20)
            digest.update(block)
            out.write(block)
    with path.open("rb") as source:
        receipt = _s3_sink(endpoint).export("cell-1", "big.bin", source)
    assert (receipt.size_bytes, receipt.sha256) == (100 << 20, digest.hexdigest())
    key = "runs/cell-1/big.bin"
    head = client.head_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED")
    assert head["ContentLength"] == 100 << 20
    assert head["ETag"].strip('"').endswith("-7")  # 7 parts of 16 MiB: multipart
    assert head["Metadata"]["sha256"] == digest.hexdigest()
    echoed = hashlib.sha256()
    for chunk in client.get_object(Bucket=BUCKET, Key=key)["Body"].iter_chunks(1 << 20):
        echoed.update(chunk)
    assert echoed.hexdigest() == digest.hexdigest()
    assert client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []


def test_s3_missing_bucket_is_a_clear_failure(tmp_path: Path, s3_server: tuple[str, Any]) -> None:
    endpoint, _ = s3_server
    from cellos.exports.s3 import S3ExportSink

    sink = S3ExportSink("s3://no-such-bucket-here", {**AWS, "AWS_ENDPOINT_URL": endpoint})
    with _artifact(tmp_path, b"data").open("rb") as source, pytest.raises(ExportError) as caught:
        sink.export("cell-1", "out.bin", source)
    assert caught.value.path == "CELLOS_EXPORT_S3" and "NoSuchBucket" in caught.value.reason
    assert AWS["AWS_SECRET_ACCESS_KEY"] not in str(caught.value)


def test_cli_s3_export_event_carries_url_size_sha256(
    tmp_path: Path, supervisor_cli: Run, s3_server: tuple[str, Any]
) -> None:
    endpoint, client = s3_server
    env = _env(tmp_path, CELLOS_EXPORT_S3=f"s3://{BUCKET}/ci", AWS_ENDPOINT_URL=endpoint, **AWS)
    result, by_type = _run_export(tmp_path, supervisor_cli, env)
    assert result.code == 0, result
    done = by_type["export.v2.completed"]
    assert done["destination"] == f"s3://{BUCKET}/ci/remote-1/result.txt"
    assert done["exporter"] == "s3" and done["sizeBytes"] == len(b"hello remote")
    assert done["sha256"] == hashlib.sha256(b"hello remote").hexdigest()
    body = client.get_object(Bucket=BUCKET, Key="ci/remote-1/result.txt")["Body"].read()
    assert body == b"hello remote"
    events = (tmp_path / "events.jsonl").read_text()
    assert AWS["AWS_SECRET_ACCESS_KEY"] not in events + result.stderr
    assert json.loads(events.splitlines()[0])  # a well-formed log


def test_cli_s3_unreachable_endpoint_is_exit_1(tmp_path: Path, supervisor_cli: Run) -> None:
    pytest.importorskip("boto3")
    env = _env(
        tmp_path,
        CELLOS_EXPORT_S3=f"s3://{BUCKET}",
        AWS_ENDPOINT_URL="http://127.0.0.1:9",
        AWS_MAX_ATTEMPTS="1",
        **AWS,
    )
    result, by_type = _run_export(tmp_path, supervisor_cli, env)
    assert result.code == 1, result
    assert result.stderr.startswith("error: CELLOS_EXPORT_S3: upload to s3://"), result
    assert "export.v2.failed" in by_type and "Traceback" not in result.stderr
