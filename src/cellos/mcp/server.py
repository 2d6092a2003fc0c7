"""The MCP tools (``run_code``, ``run_command``, ``get_run``) on the official SDK's MCPServer.

Each call: arguments checked against the server's limits (:mod:`documents`) -> an
ExecutionCell validated like ``cellos validate`` -> a slot (at most ``max_concurrent`` cells)
-> the cell runs in a worker thread on the warm supervisor (:mod:`runner`) while its output is
sent to the client as progress notifications -> the result, with the run's evidence verdict.

A cancelled call (``notifications/cancelled``, or the HTTP client going away) cancels the
handler: the cell's own stop request is set (grace, kill, teardown, events with ``reason:
mcp_call_cancelled`` and ``terminalState: forced``) and the handler returns only once the
cell is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, ConfigDict, Field

from cellos.core.errors import CellosError
from cellos.core.stop import StopRequest
from cellos.mcp import documents
from cellos.mcp.documents import CallError, CellCall
from cellos.mcp.runner import CANCELLED, CellRunner
from cellos.mcp.settings import McpSettings

INSTRUCTIONS = (
    "Runs code and commands in CellOS execution cells: one isolated, bounded, audited "
    "workload per call, with no network unless egress is granted, and a signed, hash-chained "
    "record of every step (get_run returns it). Files live in /workspace, the working "
    "directory; nothing persists between calls."
)


class EgressRuleArg(BaseModel):
    """One destination the cell may reach (within what the server allows)."""

    model_config = ConfigDict(extra="forbid")
    host: str | None = Field(None, description="DNS name (exactly one of host or cidr)")
    cidr: str | None = Field(None, description="IP network, e.g. 10.0.0.0/24")
    port: int = Field(ge=1, le=65535)
    protocol: Literal["tcp", "udp"] = "tcp"


Files = Annotated[
    dict[str, str] | None,
    Field(description="files written into /workspace before the run: {relative path: text}"),
]
Timeout = Annotated[
    int | None,
    Field(description="seconds before the workload is killed (default and maximum: server's)"),
]
Egress = Annotated[
    list[EgressRuleArg] | None, Field(description="network egress to allow (default: none)")
]
Artifacts = Annotated[
    list[str] | None,
    Field(description="paths (relative to /workspace) to return after the run"),
]
Env = Annotated[dict[str, str] | None, Field(description="extra environment variables")]


class CellTools:
    def __init__(self, settings: McpSettings, runner: CellRunner) -> None:
        self.settings = settings
        self.runner = runner
        self.slots = anyio.Semaphore(settings.max_concurrent)

    async def execute(self, call: CellCall, ctx: Context | None) -> dict[str, Any]:
        async with self.slots:
            return await self._execute(call, ctx)

    async def _execute(self, call: CellCall, ctx: Context | None) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        stop = StopRequest()
        box: dict[str, Any] = {}
        done = anyio.Event()

        def progress(stream: str, data: bytes) -> None:
            # Called on the cell's thread: hand over without waiting for the client.
            loop.call_soon_threadsafe(chunks.put_nowait, (stream, data))

        def work() -> None:
            try:
                box["result"] = self.runner.run(call, stop, progress if ctx else None)
            except CellosError as exc:
                box["error"] = f"{exc.path}: {exc.reason}"

        async def run_cell() -> None:
            # Not abandoned on cancellation: the thread is waited for until the cell is gone.
            await anyio.to_thread.run_sync(work)
            done.set()

        async def pump() -> None:
            sent = 0
            while True:
                stream, data = await chunks.get()
                parts = [(stream, data)]
                while not chunks.empty():  # coalesce what piled up meanwhile
                    parts.append(chunks.get_nowait())
                for name in ("stdout", "stderr"):
                    text = b"".join(d for s, d in parts if s == name)
                    if text and ctx is not None:
                        sent += len(text)
                        await ctx.report_progress(
                            sent, None, f"{name}: {text.decode('utf-8', errors='replace')}"
                        )

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_cell)
            tg.start_soon(pump)
            try:
                await done.wait()
            except anyio.get_cancelled_exc_class():
                stop.set(reason=CANCELLED)
                raise
            await anyio.sleep(0)  # let the pump take the last chunks
            while not chunks.empty():
                await anyio.sleep(0.001)
            tg.cancel_scope.cancel()
        if "error" in box:
            raise ToolError(box["error"])
        result: dict[str, Any] = box["result"]
        return result


def _checked(build: Any, **arguments: Any) -> CellCall:
    try:
        call: CellCall = build(**arguments)
    except CallError as exc:
        raise ToolError(f"invalid argument {exc.argument}: {exc.reason}") from None
    return call


def create_server(settings: McpSettings, runner: CellRunner) -> MCPServer:
    server = MCPServer(name="cellos", instructions=INSTRUCTIONS, log_level="WARNING")
    tools = CellTools(settings, runner)

    @server.tool(
        description="Run code (python, bash or node) in a fresh isolated cell. Returns the exit "
        "code, stdout/stderr (bounded), requested artifacts, the run id and the verdict of "
        "its signed event record. Output streams as progress notifications."
    )
    async def run_code(
        language: Literal["python", "bash", "node"],
        code: Annotated[str, Field(description="the program text")],
        ctx: Context,
        timeout_seconds: Timeout = None,
        files: Files = None,
        egress: Egress = None,
        artifacts: Artifacts = None,
        env: Env = None,
    ) -> dict[str, Any]:
        call = _checked(
            documents.code_call,
            settings=settings,
            language=language,
            code=code,
            files=files,
            env=env,
            timeout_seconds=timeout_seconds,
            egress=_rules(egress),
            artifacts=artifacts,
            call_id=_call_id(ctx),
        )
        return await tools.execute(call, ctx)

    @server.tool(
        description="Run a command (argv, no shell) in a fresh isolated cell; same result as "
        "run_code."
    )
    async def run_command(
        argv: Annotated[list[str], Field(min_length=1, description="program and arguments")],
        ctx: Context,
        timeout_seconds: Timeout = None,
        files: Files = None,
        egress: Egress = None,
        artifacts: Artifacts = None,
        env: Env = None,
    ) -> dict[str, Any]:
        call = _checked(
            documents.build,
            settings=settings,
            tool="run_command",
            argv=list(argv),
            files=files,
            env=env,
            timeout_seconds=timeout_seconds,
            egress=_rules(egress),
            artifacts=artifacts,
            call_id=_call_id(ctx),
        )
        return await tools.execute(call, ctx)

    @server.tool(description="The events (as recorded, signed) and evidence verdict of a run.")
    async def get_run(
        run_id: Annotated[str, Field(min_length=1, max_length=64, description="runId")],
    ) -> dict[str, Any]:
        log = runner.log
        events = await anyio.to_thread.run_sync(log.events, run_id)
        if not events:
            raise ToolError(f"invalid argument run_id: no run {run_id!r} on this server")
        verdict = await anyio.to_thread.run_sync(log.verdict, run_id)
        return {"runId": run_id, "events": events, "evidence": verdict.as_dict()}

    return server


def _rules(egress: list[EgressRuleArg] | None) -> list[Mapping[str, Any]] | None:
    if egress is None:
        return None
    return [rule.model_dump(exclude_none=True) for rule in egress]


def _call_id(ctx: Context) -> str | None:
    with contextlib.suppress(ValueError, AttributeError):
        return f"request-{ctx.request_id}"
    return None
