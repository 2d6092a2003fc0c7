"""``cellos mcp`` through the official SDK's own client, over stdio and streamable HTTP.

Real protocol, real cells (the ``cellos`` backend): every call below is a sandboxed cell with
a signed record, and every test ends by checking the server's event log with ``cellos events
verify --keys``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import jsonschema
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from cellos.keygen import write_keypair
from tests.conftest import (
    base_env,
    read_events,
    require_host,
    require_sandbox,
    running_with,
    unique_sleep,
)

CELLOS = [sys.executable, "-m", "cellos.cli"]
TOKEN = "mcp-test-token-0123456789"
Scenario = Callable[[ClientSession], Awaitable[None]]


@pytest.fixture
def server_env(tmp_path: Path) -> dict[str, str]:
    require_sandbox()
    keys = write_keypair(str(tmp_path / "keys"), "mcp-test")
    return base_env(
        tmp_path,
        CELLOS_MCP_DATA_DIR=str(tmp_path / "mcp"),
        CELLOS_EVENT_SIGNING="ed25519",
        CELLOS_EVENT_SIGNING_KID="mcp-test",
        CELLOS_EVENT_SIGNING_KEY_BASE64=Path(keys.key_path).read_text().strip(),
        CELLOS_MCP_MAX_TIMEOUT_SECONDS="20",
        CELLOS_MCP_MAX_CONCURRENT="4",
        CELLOS_MCP_OUTPUT_LIMIT_BYTES="4096",
        PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"),
    )


def events_file(env: dict[str, str]) -> Path:
    return Path(env["CELLOS_MCP_DATA_DIR"]) / "events.jsonl"


def verify_log(env: dict[str, str]) -> None:
    """The whole server log verifies: signatures, run chains, every run complete."""
    keys = Path(env["HOME"]) / "keys" / "mcp-test.verify-keys.json"
    proc = subprocess.run(
        [*CELLOS, "events", "verify", str(events_file(env)), "--keys", str(keys)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "signed, chain intact" in proc.stdout


def stdio(env: dict[str, str], scenario: Scenario) -> None:
    async def main() -> None:
        params = StdioServerParameters(command=CELLOS[0], args=[*CELLOS[1:], "mcp"], env=env)
        with open(Path(env["HOME"]) / "server.stderr", "w") as errlog:
            async with (
                stdio_client(params, errlog=errlog) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                with anyio.fail_after(60):
                    await scenario(session)

    anyio.run(main)


async def call(session: ClientSession, tool: str, args: dict[str, Any], **kw: Any) -> Any:
    result = await session.call_tool(tool, args, **kw)
    assert not result.is_error, result.content
    return result.structured_content


async def refused(session: ClientSession, tool: str, args: dict[str, Any]) -> str:
    result = await session.call_tool(tool, args)
    assert result.is_error
    text: str = result.content[0].text  # type: ignore[union-attr]
    assert "Traceback" not in text
    return text


def runs_in_log(env: dict[str, str]) -> set[str]:
    path = events_file(env)
    if not path.exists():
        return set()
    return {e["cellosrunid"] for e in read_events(path)}


def test_tools_listed_with_valid_schemas(server_env: dict[str, str]) -> None:
    async def scenario(session: ClientSession) -> None:
        tools = {t.name: t for t in (await session.list_tools()).tools}
        assert set(tools) == {"run_code", "run_command", "get_run"}
        for tool in tools.values():
            jsonschema.Draft202012Validator.check_schema(tool.input_schema)
        schema = tools["run_code"].input_schema
        assert schema["properties"]["language"]["enum"] == ["python", "bash", "node"]
        assert set(schema["required"]) == {"language", "code"}
        jsonschema.validate({"language": "python", "code": "print(1)"}, schema)
        jsonschema.validate({"argv": ["/bin/true"]}, tools["run_command"].input_schema)

    stdio(server_env, scenario)


def test_python_prints_streams_and_returns_its_file(server_env: dict[str, str]) -> None:
    progress: list[tuple[float, str | None, float]] = []
    code = (
        "import sys, time\n"
        "print('first', flush=True)\n"
        "time.sleep(0.5)\n"
        "print(open('data/in.txt').read().upper())\n"
        "open('out/result.txt', 'w').write('written by the cell')\n"
    )

    async def scenario(session: ClientSession) -> None:
        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append((value, message, time.monotonic()))

        result = await call(
            session,
            "run_code",
            {
                "language": "python",
                "code": code,
                "files": {"data/in.txt": "quote ' \" $HOME `x` \\ ok", "out/.keep": ""},
                "artifacts": ["out/result.txt"],
            },
            progress_callback=on_progress,
        )
        done = time.monotonic()
        assert result["exitCode"] == 0 and result["outcome"] == "succeeded", result
        assert result["stdout"] == "first\nQUOTE ' \" $HOME `X` \\ OK\n"
        assert not result["stdoutTruncated"]
        [artifact] = result["artifacts"]
        assert artifact["name"] == "result.txt" and artifact["exported"]
        assert base64.b64decode(artifact["contentBase64"]) == b"written by the cell"
        assert result["evidence"] == {
            "ok": True,
            "signed": True,
            "chainIntact": True,
            "complete": True,
            "events": result["evidence"]["events"],
            "error": None,
        }
        # Live: the first line arrived as progress well before the call returned.
        assert progress and progress[0][1] == "stdout: first\n"
        assert done - progress[0][2] > 0.3
        run = await call(session, "get_run", {"run_id": result["runId"]})
        assert run["evidence"]["ok"] and len(run["events"]) == result["evidence"]["events"]
        assert all(e["type"] == "dev.cellos.events.signed_envelope.v1" for e in run["events"])
        # The record holds no file content (it travels in the cell's environment only).
        assert "written by the cell" not in json.dumps(run["events"])
        assert "QUOTE" not in events_file(server_env).read_text()

    stdio(server_env, scenario)
    verify_log(server_env)


def test_bash_nonzero_exit_and_node(server_env: dict[str, str]) -> None:
    require_host(os.path.exists("/usr/bin/node"), "node (Debian's nodejs, for run_code node)")

    async def scenario(session: ClientSession) -> None:
        result = await call(
            session, "run_code", {"language": "bash", "code": "echo oops >&2; exit 3"}
        )
        assert result["exitCode"] == 3 and result["outcome"] == "failed"
        assert result["stderr"] == "oops\n" and not result["forced"]
        assert result["evidence"]["ok"]
        result = await call(session, "run_code", {"language": "node", "code": "console.log(6 * 7)"})
        assert (result["exitCode"], result["stdout"]) == (0, "42\n"), result
        # Output beyond the server's limit is cut and flagged (the record has the full count).
        result = await call(
            session, "run_command", {"argv": ["/bin/sh", "-c", "head -c 10000 /dev/zero"]}
        )
        assert result["stdoutTruncated"] and len(result["stdout"]) == 4096
        assert result["stdoutBytes"] == 10000

    stdio(server_env, scenario)
    verify_log(server_env)


def test_timeout_kills_the_workload(server_env: dict[str, str]) -> None:
    marker = unique_sleep()

    async def scenario(session: ClientSession) -> None:
        result = await call(
            session, "run_command", {"argv": ["/bin/sleep", marker], "timeout_seconds": 1}
        )
        assert result["forced"] and result["reason"] == "timeout", result
        assert result["terminalState"] == "forced" and result["exitCode"] is None
        assert result["evidence"]["ok"]
        assert running_with(marker) == []

    stdio(server_env, scenario)
    verify_log(server_env)


def test_egress_without_authority_is_refused(server_env: dict[str, str]) -> None:
    code = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('1.1.1.1', 80), timeout=2)\n"
        "    print('connected')\n"
        "except OSError as exc:\n"
        "    print('refused', exc.errno)\n"
    )

    async def scenario(session: ClientSession) -> None:
        result = await call(session, "run_code", {"language": "python", "code": code})
        assert result["stdout"].startswith("refused"), result
        before = runs_in_log(server_env)
        text = await refused(
            session,
            "run_code",
            {
                "language": "python",
                "code": code,
                "egress": [{"cidr": "1.1.1.1/32", "port": 80, "protocol": "tcp"}],
            },
        )
        assert "egress[0]" in text and "not within the egress this server allows" in text
        assert runs_in_log(server_env) == before  # nothing ran

    stdio(server_env, scenario)
    verify_log(server_env)


def test_limits_and_malformed_arguments_are_tool_errors(server_env: dict[str, str]) -> None:
    async def scenario(session: ClientSession) -> None:
        before = runs_in_log(server_env)
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("run_command", {"argv": ["/bin/true"], "timeout_seconds": 21}, "timeout_seconds"),
            ("run_command", {"argv": []}, "argv"),
            ("run_command", {"argv": "/bin/true"}, "argv"),
            ("run_command", {}, "argv"),
            ("run_code", {"language": "ruby", "code": "1"}, "language"),
            ("run_code", {"language": "python", "code": 7}, "code"),
            ("run_code", {"language": "python", "code": "", "files": {"../x": "y"}}, "files"),
            ("run_code", {"language": "python", "code": "", "files": {"/etc/x": ""}}, "files"),
            ("run_code", {"language": "python", "code": "", "files": {"main.py": ""}}, "files"),
            ("run_code", {"language": "python", "code": "", "env": {"1BAD": "x"}}, "env"),
            ("run_code", {"language": "python", "code": "", "artifacts": ["/"]}, "artifacts"),
            ("run_code", {"language": "python", "code": "", "egress": [{"port": 80}]}, "egress"),
            ("run_command", {"argv": ["/bin/true"], "files": {"f": "x" * 600_000}}, "files"),
            ("get_run", {"run_id": "no-such-run"}, "run_id"),
        ]
        for tool, args, argument in cases:
            text = await refused(session, tool, args)
            assert argument in text, (args, text)
        assert runs_in_log(server_env) == before  # nothing ran
        # The server is still there and serving.
        result = await call(session, "run_command", {"argv": ["/bin/echo", "alive"]})
        assert result["stdout"] == "alive\n"

    stdio(server_env, scenario)
    verify_log(server_env)


def test_cancellation_stops_the_cell_and_the_record_says_so(server_env: dict[str, str]) -> None:
    marker = unique_sleep()

    async def scenario(session: ClientSession) -> None:
        started = anyio.Event()

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            started.set()

        async def doomed() -> None:
            await session.call_tool(
                "run_command",
                {"argv": ["/bin/sh", "-c", f"echo up; exec /bin/sleep {marker}"]},
                progress_callback=on_progress,
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(doomed)
            await started.wait()
            assert running_with(marker)
            tg.cancel_scope.cancel()  # the SDK sends notifications/cancelled
        # The server stops the cell (grace, kill, teardown) and records it.
        with anyio.fail_after(20):
            while True:
                events = read_events(events_file(server_env))
                if any(e["type"].endswith("compliance.v1.summary") for e in events):
                    break
                await anyio.sleep(0.1)
        assert running_with(marker) == []
        completed = [e for e in events if e["type"].endswith("command.v1.completed")]
        assert completed[0]["data"]["forced"] is True
        assert completed[0]["data"]["reason"] == "mcp_call_cancelled"
        destroyed = [e for e in events if e["type"].endswith("lifecycle.v1.destroyed")]
        assert destroyed[0]["data"]["terminalState"] == "forced"
        # The session goes on.
        result = await call(session, "run_command", {"argv": ["/bin/true"]})
        assert result["exitCode"] == 0

    stdio(server_env, scenario)
    verify_log(server_env)


def test_ten_concurrent_calls(server_env: dict[str, str]) -> None:
    results: dict[int, Any] = {}

    async def scenario(session: ClientSession) -> None:
        async def one(i: int) -> None:
            results[i] = await call(
                session,
                "run_code",
                {"language": "bash", "code": f"sleep 0.2; echo call-{i}"},
            )

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(one, i)

    stdio(server_env, scenario)
    assert [results[i]["stdout"] for i in range(10)] == [f"call-{i}\n" for i in range(10)]
    assert len({r["cellId"] for r in results.values()}) == 10
    assert len({r["runId"] for r in results.values()}) == 10
    assert all(r["evidence"]["ok"] for r in results.values())
    for r in results.values():
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", r["cellId"])
    verify_log(server_env)


@pytest.fixture
def http_server(server_env: dict[str, str]) -> Iterator[str]:
    env = {**server_env, "CELLOS_API_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [*CELLOS, "mcp", "--http", "--port", "0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        found = re.search(r"listening on (http://\S+)", line)
        assert found, line
        yield found.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_http_needs_the_token_and_runs_cells(server_env: dict[str, str], http_server: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}):
        response = httpx2.post(http_server, json={}, headers=headers)
        assert response.status_code == 401
        assert "wrong-token" not in response.text

    async def main() -> None:
        client = create_mcp_http_client(headers={"Authorization": f"Bearer {TOKEN}"})
        messages: list[str | None] = []

        async def on_progress(v: float, t: float | None, m: str | None) -> None:
            messages.append(m)

        async with (
            client,
            streamable_http_client(http_server, http_client=client) as (r, w),
            ClientSession(r, w) as session,
        ):
            await session.initialize()
            result = await call(
                session,
                "run_code",
                {"language": "python", "code": "print('over http')"},
                progress_callback=on_progress,
            )
            assert result["stdout"] == "over http\n" and result["evidence"]["ok"]
            assert messages == ["stdout: over http\n"]

    anyio.run(main)
    verify_log(server_env)


def test_no_token_no_http_server(server_env: dict[str, str]) -> None:
    env = {k: v for k, v in server_env.items() if k != "CELLOS_API_TOKEN"}
    proc = subprocess.run(
        [*CELLOS, "mcp", "--http", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: CELLOS_API_TOKEN: not set")
    assert not os.path.exists(events_file(server_env))
