"""The ExecutionCell document (DESIGN.md §2) as pydantic v2 models.

Strict mode on purpose: a document that says ``ttlSeconds: "600"`` or ``CI: yes`` is a mistake
the author should hear about, not something to coerce silently. Unknown keys are rejected.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from cellos.core.secrets_env import secret_env_name

API_VERSION = "cellos.io/v1"
KIND = "ExecutionCell"

#: Upper bound for any lifetime in seconds (30 days): larger values are almost always typos.
MAX_SECONDS = 30 * 24 * 3600

CELL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Keys that end up in NATS subjects and file names: no dots, no wildcards.
TOKEN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
SECRET_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")
HOST_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class _Model(BaseModel):
    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        alias_generator=to_camel,
        # Only the camelCase names of the document are accepted (snake_case is not a key).
        populate_by_name=False,
        frozen=True,
    )


def _check_no_nul(value: str, what: str) -> str:
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL")
    return value


def check_cell_id(value: str) -> str:
    """The id becomes a directory name, a cgroup name and a NATS subject token."""
    if not CELL_ID_RE.fullmatch(value) or ".." in value:
        raise ValueError("must match [A-Za-z0-9][A-Za-z0-9._-]{0,127} and must not contain '..'")
    return value


def check_hostname(value: str, *, allow_wildcard: bool) -> str:
    name = value[:-1] if value.endswith(".") else value
    if allow_wildcard and name.startswith("*."):
        name = name[2:]
    labels = name.split(".")
    if len(name) > 253 or not name or not all(HOST_LABEL_RE.fullmatch(lbl) for lbl in labels):
        where = "only as a leading '*.' label" if allow_wildcard else "not allowed here"
        raise ValueError(f"{value!r} is not a valid host name (wildcards: {where})")
    return value


def check_safe_file_name(value: str) -> str:
    """A single plain file name: the export destination is ``<root>/<cellId>/<name>``."""
    if (
        not value
        or value in {".", ".."}
        or ".." in value
        or "/" in value
        or "\\" in value
        or "\x00" in value
        or value.startswith("~")
        or len(value.encode()) > 255
        or any(ord(ch) < 0x20 for ch in value)
    ):
        raise ValueError(
            "must be a single file name (no '/', '\\\\', NUL, control characters, '..' "
            "or leading '~', at most 255 bytes)"
        )
    return value


PositiveSeconds = Annotated[int, Field(ge=1, le=MAX_SECONDS)]
Port = Annotated[int, Field(ge=1, le=65535)]


class Correlation(_Model):
    platform: str | None = None
    external_run_id: str | None = None
    external_job_id: str | None = None
    tenant_id: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("tenant_id")
    @classmethod
    def _tenant(cls, value: str | None) -> str | None:
        if value is not None and not TOKEN_RE.fullmatch(value):
            raise ValueError("must match [A-Za-z0-9][A-Za-z0-9_-]{0,63}")
        return value


class EgressRule(_Model):
    host: str | None = None
    cidr: str | None = None
    port: Port
    protocol: Literal["tcp", "udp"] = "tcp"

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        return None if value is None else check_hostname(value, allow_wildcard=False)

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            ipaddress.ip_network(value, strict=True)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a valid CIDR ({exc})") from None
        return value

    @model_validator(mode="after")
    def _exactly_one_destination(self) -> EgressRule:
        if (self.host is None) == (self.cidr is None):
            raise ValueError("exactly one of 'host' or 'cidr' is required")
        return self


class Resolver(_Model):
    resolver_id: Annotated[str, Field(min_length=1, max_length=64)]
    protocol: Literal["do53-udp", "do53-tcp"] = "do53-udp"
    address: str

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        host = host.strip("[]")
        try:
            ipaddress.ip_address(host)
            ok = bool(sep) and port.isdigit() and 1 <= int(port) <= 65535
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{value!r} must be '<ip>:<port>' with a literal IP address")
        return value


class DnsAuthority(_Model):
    hostname_allowlist: list[str] = Field(default_factory=list)
    resolvers: list[Resolver] = Field(default_factory=list)

    @field_validator("hostname_allowlist")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        for name in value:
            check_hostname(name, allow_wildcard=True)
        return value


class Authority(_Model):
    secret_refs: list[str] = Field(default_factory=list)
    egress_rules: list[EgressRule] = Field(default_factory=list)
    dns_authority: DnsAuthority | None = None

    @field_validator("secret_refs")
    @classmethod
    def _refs(cls, value: list[str]) -> list[str]:
        for ref in value:
            if not SECRET_KEY_RE.fullmatch(ref):
                raise ValueError(f"{ref!r} is not a valid secret key ([A-Za-z0-9][A-Za-z0-9._-]*)")
        if len(set(value)) != len(value):
            raise ValueError("secret keys must be unique")
        return value


class Lifetime(_Model):
    ttl_seconds: PositiveSeconds


class CpuMax(_Model):
    quota_micros: Annotated[int, Field(ge=1000, le=10_000_000)]
    period_micros: Annotated[int, Field(ge=1000, le=1_000_000)] = 100_000


class Limits(_Model):
    memory_max_bytes: Annotated[int, Field(ge=1 << 20, le=1 << 46)] | None = None
    pids_max: Annotated[int, Field(ge=1, le=4_194_304)] | None = None
    cpu_max: CpuMax | None = None
    graceful_shutdown_seconds: Annotated[int, Field(ge=0, le=300)] = 5


class RunSpec(_Model):
    argv: Annotated[list[str], Field(min_length=1, max_length=4096)]
    working_directory: str = "/workspace"
    env: dict[str, str] = Field(default_factory=dict)
    secret_delivery: Literal["env", "runtimeBroker", "runtimeLeasedBroker"] = "env"
    timeout_seconds: PositiveSeconds | None = None
    limits: Limits | None = None

    @field_validator("argv")
    @classmethod
    def _argv(cls, value: list[str]) -> list[str]:
        if not value[0]:
            raise ValueError("argv[0] (the program) must be non-empty")
        for arg in value:
            _check_no_nul(arg, "arguments")
        return value

    @field_validator("working_directory")
    @classmethod
    def _workdir(cls, value: str) -> str:
        parts = value.split("/")
        if not value.startswith("/") or ".." in parts or "\x00" in value or value == "/":
            raise ValueError("must be an absolute path below '/' without '..'")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name, val in value.items():
            if not ENV_NAME_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
            _check_no_nul(val, f"the value of {name}")
        return value


class Artifact(_Model):
    name: str
    path: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_safe_file_name(value)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value or "\x00" in value:
            raise ValueError("must be a non-empty path without NUL")
        return value


class ExportSpec(_Model):
    artifacts: list[Artifact] = Field(default_factory=list)

    @field_validator("artifacts")
    @classmethod
    def _unique(cls, value: list[Artifact]) -> list[Artifact]:
        names = [a.name for a in value]
        if len(set(names)) != len(names):
            raise ValueError("artifact names must be unique")
        return value


class Policy(_Model):
    pack_id: str
    pack_version: str


class Placement(_Model):
    pool_id: str | None = None
    queue_name: str | None = None


class CellSpec(_Model):
    id: str
    correlation: Correlation | None = None
    authority: Authority = Field(default_factory=Authority)
    lifetime: Lifetime | None = None
    run: RunSpec
    export: ExportSpec | None = None
    policy: Policy | None = None
    placement: Placement | None = None

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        return check_cell_id(value)

    @model_validator(mode="after")
    def _timeout_within_ttl(self) -> CellSpec:
        timeout = self.run.timeout_seconds
        if (
            self.lifetime is not None
            and timeout is not None
            and timeout > self.lifetime.ttl_seconds
        ):
            raise ValueError(
                f"run.timeoutSeconds ({timeout}) must be <= lifetime.ttlSeconds "
                f"({self.lifetime.ttl_seconds})"
            )
        if self.run.secret_delivery == "env":
            for ref in self.authority.secret_refs:
                if secret_env_name(ref) in self.run.env:
                    raise ValueError(
                        f"run.env.{secret_env_name(ref)} collides with the variable that "
                        f"delivers secret {ref!r}"
                    )
        return self

    @property
    def artifacts(self) -> list[Artifact]:
        return list(self.export.artifacts) if self.export else []


class ExecutionCell(_Model):
    api_version: Literal["cellos.io/v1"]
    kind: Literal["ExecutionCell"]
    spec: CellSpec
