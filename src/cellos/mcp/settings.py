"""Server-side settings of ``cellos mcp``: upper bounds a caller cannot raise.

Every value comes from a ``CELLOS_MCP_*`` variable (or its default); a bad value is an
``InvalidSpec`` naming the variable, raised before the server accepts anything.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from cellos.core.data_dirs import default_data_dir
from cellos.core.errors import InvalidSpec
from cellos.core.spec import EgressRule

LANGUAGES = ("python", "bash", "node")


@dataclass(frozen=True)
class McpSettings:
    #: Holds ``events.jsonl`` (every call's events) and ``exports/`` (artifacts).
    data_dir: str
    #: ``correlation.tenantId`` of every cell (a caller cannot choose it).
    tenant: str = "mcp"
    max_timeout_seconds: int = 300
    default_timeout_seconds: int = 60
    memory_max_bytes: int = 512 << 20
    pids_max: int = 256
    #: Cells running at once; further calls wait for a slot.
    max_concurrent: int = 4
    #: Egress a caller may ask for: each requested rule must fall inside one of these.
    allowed_egress: tuple[EgressRule, ...] = ()
    #: stdout/stderr returned (and streamed as progress) per stream; the rest is cut.
    output_limit_bytes: int = 64 << 10
    #: Artifacts up to this size come back inline (base64); larger ones as a path.
    inline_artifact_bytes: int = 64 << 10
    #: All files of one call together (they travel in the cell's environment).
    max_files_bytes: int = 512 << 10
    interpreters: Mapping[str, str] = field(
        default_factory=lambda: {
            "python": "/usr/bin/python3",
            "bash": "/bin/bash",
            "node": "/usr/bin/node",
        }
    )

    @property
    def events_path(self) -> str:
        return os.path.join(self.data_dir, "events.jsonl")

    @property
    def export_dir(self) -> str:
        return os.path.join(self.data_dir, "exports")


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise InvalidSpec(name, f"must be an integer from {low} to {high}")
    return int(raw)


def _egress(env: Mapping[str, str]) -> tuple[EgressRule, ...]:
    name = "CELLOS_MCP_ALLOWED_EGRESS"
    raw = env.get(name, "").strip()
    if not raw:
        return ()
    try:
        data: Any = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidSpec(name, f"is not valid JSON: {exc.msg}") from None
    if not isinstance(data, list):
        raise InvalidSpec(name, "must be a JSON list of egress rules")
    rules = []
    for index, item in enumerate(data):
        try:
            rule = msgspec.convert(item, EgressRule)
        except msgspec.ValidationError as exc:
            raise InvalidSpec(f"{name}[{index}]", str(exc)) from None
        if (rule.host is None) == (rule.cidr is None):
            raise InvalidSpec(f"{name}[{index}]", "needs exactly one of host or cidr")
        rules.append(rule)
    return tuple(rules)


def read_settings(env: Mapping[str, str], data_dir: str | None = None) -> McpSettings:
    max_timeout = _int(env, "CELLOS_MCP_MAX_TIMEOUT_SECONDS", 300, 1, 86_400)
    tenant = env.get("CELLOS_MCP_TENANT", "").strip() or "mcp"
    if not all(c.isalnum() or c in "._-" for c in tenant) or len(tenant) > 64:
        raise InvalidSpec("CELLOS_MCP_TENANT", "must be 1-64 characters of [A-Za-z0-9._-]")
    interpreters = {
        "python": env.get("CELLOS_MCP_PYTHON", "").strip() or "/usr/bin/python3",
        "bash": env.get("CELLOS_MCP_BASH", "").strip() or "/bin/bash",
        "node": env.get("CELLOS_MCP_NODE", "").strip() or "/usr/bin/node",
    }
    for language, path in interpreters.items():
        if not os.path.isabs(path):
            raise InvalidSpec(f"CELLOS_MCP_{language.upper()}", "must be an absolute path")
    return McpSettings(
        data_dir=data_dir or env.get("CELLOS_MCP_DATA_DIR", "").strip() or default_data_dir("mcp"),
        tenant=tenant,
        max_timeout_seconds=max_timeout,
        default_timeout_seconds=min(
            max_timeout, _int(env, "CELLOS_MCP_DEFAULT_TIMEOUT_SECONDS", 60, 1, 86_400)
        ),
        memory_max_bytes=_int(env, "CELLOS_MCP_MEMORY_MAX_BYTES", 512 << 20, 1 << 20, 1 << 46),
        pids_max=_int(env, "CELLOS_MCP_PIDS_MAX", 256, 1, 4_194_304),
        max_concurrent=_int(env, "CELLOS_MCP_MAX_CONCURRENT", 4, 1, 256),
        allowed_egress=_egress(env),
        output_limit_bytes=_int(env, "CELLOS_MCP_OUTPUT_LIMIT_BYTES", 64 << 10, 0, 64 << 20),
        inline_artifact_bytes=_int(env, "CELLOS_MCP_INLINE_ARTIFACT_BYTES", 64 << 10, 0, 16 << 20),
        max_files_bytes=_int(env, "CELLOS_MCP_MAX_FILES_BYTES", 512 << 10, 0, 1 << 20),
        interpreters=interpreters,
    )
