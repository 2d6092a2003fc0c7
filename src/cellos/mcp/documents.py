"""From a tool call to an ExecutionCell document, within the server's limits.

Pure functions (no I/O): each refusal is a :class:`CallError` naming the tool argument, raised
before anything runs. The document is then validated by the same rules as ``cellos validate``
(:func:`cellos.core.loading.validate_document`).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from cellos.core.errors import CellosError
from cellos.core.loading import validate_document
from cellos.core.spec import EgressRule, ExecutionCell
from cellos.mcp import prelude
from cellos.mcp.settings import LANGUAGES, McpSettings

WORKSPACE = "/workspace"
CODE_FILES = {"python": "main.py", "bash": "main.sh", "node": "main.js"}
#: What every workload sees; nothing of the server's environment is inherited.
BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORKSPACE, "LANG": "C.UTF-8"}
#: Extra TTL over the command timeout: creation, grace, export and teardown fit in it.
TTL_MARGIN_SECONDS = 30
GRACE_SECONDS = 2


class CallError(Exception):
    """A tool argument the server refuses: ``argument: reason``."""

    def __init__(self, argument: str, reason: str) -> None:
        super().__init__(f"{argument}: {reason}")
        self.argument, self.reason = argument, reason


@dataclass(frozen=True)
class CellCall:
    """What one tool call asks for, after the server's checks."""

    document: ExecutionCell
    #: Artifact name in the exports -> the path the caller asked for.
    artifacts: dict[str, str]


def new_cell_id(tool: str) -> str:
    """Unique per call (random), valid ([A-Za-z0-9][A-Za-z0-9._-]{0,127})."""
    return f"mcp-{tool.replace('_', '-')}-{secrets.token_hex(8)}"


def _timeout(settings: McpSettings, value: Any) -> int:
    if value is None:
        return settings.default_timeout_seconds
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CallError("timeout_seconds", "must be a positive integer")
    if value > settings.max_timeout_seconds:
        raise CallError(
            "timeout_seconds",
            f"{value} is above this server's limit of {settings.max_timeout_seconds}",
        )
    return value


def _covered(rule: EgressRule, allowed: EgressRule) -> bool:
    if rule.port != allowed.port or rule.protocol != allowed.protocol:
        return False
    if rule.host is not None:
        return allowed.host is not None and rule.host.lower() == allowed.host.lower()
    if rule.cidr is None or allowed.cidr is None:
        return False
    want = ipaddress.ip_network(rule.cidr, strict=False)
    have = ipaddress.ip_network(allowed.cidr, strict=False)
    return want.version == have.version and want.subnet_of(have)  # type: ignore[arg-type]


def _egress(settings: McpSettings, rules: Sequence[Mapping[str, Any]] | None) -> list[Any]:
    out: list[Any] = []
    for index, item in enumerate(rules or ()):
        where = f"egress[{index}]"
        try:
            rule = msgspec.convert(dict(item), EgressRule)
        except (msgspec.ValidationError, TypeError) as exc:
            raise CallError(where, str(exc)) from None
        if (rule.host is None) == (rule.cidr is None):
            raise CallError(where, "needs exactly one of host or cidr")
        if not any(_covered(rule, allowed) for allowed in settings.allowed_egress):
            raise CallError(where, "is not within the egress this server allows")
        out.append(msgspec.to_builtins(rule))
    return out


def _files(settings: McpSettings, files: Mapping[str, str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    total = 0
    for index, (name, content) in enumerate(sorted((files or {}).items())):
        why = prelude.check_name(name)
        if why:
            raise CallError(f"files[{name!r}]", why)
        data = content.encode()
        total += len(data)
        encoded = prelude.encode_file(name, data)
        if len(encoded) > prelude.MAX_ENCODED_FILE_BYTES:
            raise CallError(f"files[{name!r}]", "too large for one file (about 88 KiB at most)")
        env[f"{prelude.ENV_PREFIX}{index}"] = encoded
    if total > settings.max_files_bytes:
        raise CallError(
            "files",
            f"{total} bytes in all, above this server's limit of {settings.max_files_bytes}",
        )
    return env


def _artifacts(paths: Sequence[str] | None) -> dict[str, str]:
    named: dict[str, str] = {}
    for index, path in enumerate(paths or ()):
        if not path or "\x00" in path:
            raise CallError(f"artifacts[{index}]", "must be a non-empty path")
        full = os.path.normpath(path if path.startswith("/") else f"{WORKSPACE}/{path}")
        base = os.path.basename(full)
        if not base or base in (".", ".."):
            raise CallError(f"artifacts[{index}]", "must name a file")
        # Export names are single file names; two paths with one base name stay apart.
        name = base if base not in named else f"{index}-{base}"
        named[name] = full
    return named


def _env(env: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(BASE_ENV)
    for name, value in (env or {}).items():
        if name.startswith(prelude.ENV_PREFIX):
            raise CallError(f"env[{name!r}]", f"the {prelude.ENV_PREFIX}* names are reserved")
        out[name] = value
    return out


def build(
    settings: McpSettings,
    *,
    tool: str,
    argv: list[str],
    files: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout_seconds: Any = None,
    egress: Sequence[Mapping[str, Any]] | None = None,
    artifacts: Sequence[str] | None = None,
    call_id: str | None = None,
) -> CellCall:
    timeout = _timeout(settings, timeout_seconds)
    rules = _egress(settings, egress)
    file_env = _files(settings, files)
    named = _artifacts(artifacts)
    run_env = {**_env(env), **file_env}
    if file_env:
        argv = prelude.prelude_argv(settings.interpreters["python"], argv)
    correlation: dict[str, Any] = {
        "platform": "mcp",
        "tenantId": settings.tenant,
        "labels": {"tool": tool},
    }
    if call_id:
        correlation["externalJobId"] = call_id[:128]
    spec: dict[str, Any] = {
        "id": new_cell_id(tool),
        "correlation": correlation,
        "lifetime": {"ttlSeconds": timeout + GRACE_SECONDS + TTL_MARGIN_SECONDS},
        "run": {
            "argv": argv,
            "workingDirectory": WORKSPACE,
            "env": run_env,
            "timeoutSeconds": timeout,
            "limits": {
                "memoryMaxBytes": settings.memory_max_bytes,
                "pidsMax": settings.pids_max,
                "gracefulShutdownSeconds": GRACE_SECONDS,
            },
        },
    }
    if rules:
        spec["authority"] = {"egressRules": rules}
    if named:
        spec["export"] = {
            "artifacts": [{"name": name, "path": path} for name, path in named.items()]
        }
    document = {"apiVersion": "cellos.io/v1", "kind": "ExecutionCell", "spec": spec}
    try:
        cell = validate_document(document)
    except CellosError as exc:
        raise CallError(_argument_of(exc.path), exc.reason) from None
    return CellCall(cell, named)


def _argument_of(path: str) -> str:
    """Map a document path back to the tool argument it came from."""
    for prefix, argument in (
        ("spec.run.argv", "argv"),
        ("spec.run.env", "env"),
        ("spec.authority.egressRules", "egress"),
        ("spec.export.artifacts", "artifacts"),
        ("spec.run.timeoutSeconds", "timeout_seconds"),
    ):
        if path.startswith(prefix):
            return f"{argument} ({path})"
    return path


def code_call(
    settings: McpSettings,
    *,
    language: str,
    code: str,
    files: Mapping[str, str] | None = None,
    **rest: Any,
) -> CellCall:
    if language not in LANGUAGES:
        raise CallError("language", f"must be one of {', '.join(LANGUAGES)}")
    main = CODE_FILES[language]
    if files and main in files:
        raise CallError(f"files[{main!r}]", "is where the code goes; choose another name")
    interpreter = settings.interpreters[language]
    return build(
        settings,
        tool="run_code",
        argv=[interpreter, main],
        files={**(files or {}), main: code},
        **rest,
    )
