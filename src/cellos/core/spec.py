"""The ExecutionCell document (DESIGN.md §2) as msgspec Structs.

One declaration for the validator and for ``cellos schema``: every rule that JSON Schema 2020-12
can state is written on the field (``Meta``: pattern, lengths, ranges; ``extra_json_schema``:
``uniqueItems``, ``oneOf``, ``prefixItems``), and ``msgspec.json.schema`` prints the same text the
validator checks. The few rules a schema cannot state (docs/document.md, "What the schema cannot
say") are checked in ``__post_init__``; the ``extra_json_schema`` keywords msgspec does not
enforce itself are checked there too, next to their declaration (``uniqueItems``, and the
patterns of rarely present fields, compiled on first use: :class:`DeferredPattern`).

Why msgspec rather than pydantic: pydantic builds its validators when the module is imported
(about 100 ms, paid by every ``cellos-supervisor`` process); msgspec builds them lazily, in C.

No ``from __future__ import annotations`` here: msgspec would then turn every annotation
string into a ``typing.ForwardRef`` and compile it on the first decode (~2 ms of every
one-shot supervisor's start); evaluated at class creation they cost less.

Strict on purpose: ``msgspec.convert`` refuses ``ttlSeconds: "600"``, ``1.0`` for an integer and
``CI: yes``; unknown keys are errors (``forbid_unknown_fields``). ``null`` means "absent" for an
optional field. Errors from ``__post_init__`` that belong to one field start with ``@<field>: ``
(see :func:`rule_error`); :mod:`cellos.core.doc_errors` turns them into JSON paths.
"""

import re
from typing import Annotated, Any, Literal, NoReturn

import msgspec
from msgspec import Meta

from cellos.core.secrets_env import (
    INJECTION_TRUST_VARIABLES,
    placeholder_env_name,
    secret_env_name,
)

API_VERSION = "cellos.io/v1"
KIND = "ExecutionCell"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

#: Upper bound for any lifetime in seconds (30 days): larger values are almost always typos.
MAX_SECONDS = 30 * 24 * 3600
DEFAULT_WORKING_DIRECTORY = "/workspace"

# -- patterns ----------------------------------------------------------------------------------
# Each pattern is valid both as a Python ``re`` and as an ECMA-262 (JSON Schema) regex: no
# ``\-`` or other escapes that the ``u`` flag refuses, and ends anchored by ``$(?!\n)`` because
# Python's ``$`` also matches before a final newline (``"cell\n"`` would pass ``^...$``).


def _whole(body: str) -> str:
    return f"^(?:{body})$(?!\\n)"


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = rf"{_LABEL}(?:\.{_LABEL})*\.?"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_H = r"[0-9A-Fa-f]{1,4}"
# RFC 4291 text forms (no embedded IPv4, no zone id): every string this accepts, Python's
# ipaddress and cellos.core.cidr accept too.
_IPV6 = (
    rf"(?:(?:{_H}:){{7}}{_H}|(?:{_H}:){{1,7}}:|(?:{_H}:){{1,6}}:{_H}"
    rf"|(?:{_H}:){{1,5}}(?::{_H}){{1,2}}|(?:{_H}:){{1,4}}(?::{_H}){{1,3}}"
    rf"|(?:{_H}:){{1,3}}(?::{_H}){{1,4}}|(?:{_H}:){{1,2}}(?::{_H}){{1,5}}"
    rf"|{_H}:(?::{_H}){{1,6}}|:(?:(?::{_H}){{1,7}}|:))"
)
_PORT = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"

CELL_ID_PATTERN = _whole(r"[A-Za-z0-9](?:\.?[A-Za-z0-9_-])*\.?")
#: Keys that end up in NATS subjects and file names: no dots, no wildcards.
TOKEN_PATTERN = _whole(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
SECRET_KEY_PATTERN = _whole(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ENV_NAME_PATTERN = _whole(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
HOST_PATTERN = _whole(_HOST)
WILDCARD_HOST_PATTERN = _whole(rf"(?:\*\.)?{_HOST}")
_CIDR_V4 = rf"{_IPV4}(?:/(?:3[0-2]|[12]?[0-9]))?"
_CIDR_V6 = rf"{_IPV6}(?:/(?:12[0-8]|1[01][0-9]|[1-9]?[0-9]))?"
CIDR_PATTERN = _whole(f"{_CIDR_V4}|{_CIDR_V6}")
_RESOLVER_V4 = rf"{_IPV4}:{_PORT}"
_RESOLVER_V6 = rf"\[{_IPV6}\]:{_PORT}"
RESOLVER_ADDRESS_PATTERN = _whole(f"{_RESOLVER_V4}|{_RESOLVER_V6}")
NO_NUL_PATTERN = _whole(r"[^\x00]*")
#: Absolute, not only slashes, no ``..`` component, no NUL.
WORKING_DIRECTORY_PATTERN = _whole(
    r"(?=[^\x00]*[^/\x00])(?![^\x00]*/\.\.(?:/|(?![\s\S])))/[^\x00]*"
)
#: One plain file name: no separators, NUL or control characters, no ``..``, not ``.``, no
#: leading ``~``; the export destination is ``<root>/<cellId>/<name>``.
FILE_NAME_PATTERN = _whole(r"(?!~)(?![^\x00]*\.\.)(?!\.(?![\s\S]))[^/\\\x00-\x1f]+")
#: An HTTP field name (RFC 9110 ``token``).
HEADER_NAME_PATTERN = _whole(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: A header value template: ``{value}`` exactly once, no CR, LF or NUL (header injection).
INJECTION_FORMAT_PATTERN = _whole(
    r"(?:(?!\{value\})[^\r\n\x00])*\{value\}(?:(?!\{value\})[^\r\n\x00])*"
)

#: Why a value does not match, per pattern (``{value}`` is the offending value, quoted).
PATTERN_REASONS: dict[str, str] = {
    CELL_ID_PATTERN: "must match [A-Za-z0-9][A-Za-z0-9._-]{0,127} and must not contain '..'",
    TOKEN_PATTERN: "must match [A-Za-z0-9][A-Za-z0-9_-]{0,63}",
    SECRET_KEY_PATTERN: "{value} is not a valid secret key ([A-Za-z0-9][A-Za-z0-9._-]{0,127})",
    ENV_NAME_PATTERN: "{value} is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
    HOST_PATTERN: "{value} is not a valid host name (wildcards: not allowed here)",
    WILDCARD_HOST_PATTERN: "{value} is not a valid host name (wildcards: only as a leading "
    "'*.' label)",
    CIDR_PATTERN: "{value} is not a valid CIDR (an IPv4 or IPv6 address, optionally /<prefix>)",
    RESOLVER_ADDRESS_PATTERN: "{value} must be '<ip>:<port>' with a literal IP address "
    "(IPv6 in brackets)",
    NO_NUL_PATTERN: "must not contain NUL",
    WORKING_DIRECTORY_PATTERN: "must be an absolute path below '/' without '..'",
    HEADER_NAME_PATTERN: "{value} is not an HTTP header name (RFC 9110 token characters)",
    INJECTION_FORMAT_PATTERN: "must contain {value} exactly once and no CR, LF or NUL",
    FILE_NAME_PATTERN: "must be a single file name (no '/', '\\\\', NUL, control characters, "
    "'..' or leading '~', at most 255 bytes)",
}

CELL_ID_RE = re.compile(CELL_ID_PATTERN)
_SAFE_FILE_NAME_RE = re.compile(FILE_NAME_PATTERN)

MAX_FILE_NAME_BYTES = 255
MAX_HOST_LENGTH = 253


def rule_error(field: str, reason: str) -> NoReturn:
    """Fail a ``__post_init__`` check, naming the field (relative to the struct) it is about."""
    raise ValueError(f"@{field}: {reason}")


def pattern_reason(pattern: str, value: object) -> str:
    """Why ``value`` does not match ``pattern``. A reason that starts with ``{value}`` names the
    value (quoted, at most 80 characters); elsewhere ``{value}`` is literal text (the
    secretInjection format's marker)."""
    template = PATTERN_REASONS[pattern]
    if not template.startswith("{value}"):
        return template
    return (repr(value)[:80] if isinstance(value, str) else "the value") + template[7:]


class DeferredPattern:
    """A ``pattern`` that the schema states (``extra_json_schema``) and that is compiled on first
    use, checked by the struct's ``__post_init__`` (and by :mod:`cellos.core.doc_errors` for
    each value, so that an invalid document still gets every problem at once).

    For the patterns of fields that most cells do not have (hosts, CIDRs, resolvers, injected
    headers): ``Meta(pattern=...)`` compiles when this module is imported, ~3 ms of every
    one-shot supervisor's start for these, mostly the IPv6 alternatives.
    """

    def __init__(self, pattern: str, *alternatives: str) -> None:
        """``alternatives``: the bodies whose union ``pattern`` is (``_whole(a|b)``), each
        compiled only when the ones before it did not match: an IPv4 CIDR never compiles
        the IPv6 alternatives (~1 ms)."""
        self.pattern = pattern
        self.sources = tuple(_whole(body) for body in alternatives) or (pattern,)
        # One slot per source: threads that compile the same source at once only repeat work.
        self._regexes: list[re.Pattern[str] | None] = [None] * len(self.sources)

    def meta(self, **constraints: Any) -> Meta:
        return Meta(extra_json_schema={"pattern": self.pattern}, **constraints)

    def matches(self, value: str) -> bool:
        for index, source in enumerate(self.sources):
            regex = self._regexes[index]
            if regex is None:
                regex = self._regexes[index] = re.compile(source)
            if regex.search(value) is not None:
                return True
        return False

    def check(self, field: str, value: str | None) -> None:
        if value is not None and not self.matches(value):
            rule_error(field, pattern_reason(self.pattern, value))


_HOSTNAME = DeferredPattern(HOST_PATTERN)
_WILDCARD_HOSTNAME = DeferredPattern(WILDCARD_HOST_PATTERN)
_CIDR = DeferredPattern(CIDR_PATTERN, _CIDR_V4, _CIDR_V6)
_RESOLVER_ADDRESS = DeferredPattern(RESOLVER_ADDRESS_PATTERN, _RESOLVER_V4, _RESOLVER_V6)
_HEADER_NAME = DeferredPattern(HEADER_NAME_PATTERN)
_INJECTION_FORMAT = DeferredPattern(INJECTION_FORMAT_PATTERN)


def check_cell_id(value: str) -> str:
    """The id becomes a directory name, a cgroup name and a NATS subject token."""
    if len(value) > 128 or not CELL_ID_RE.search(value):
        raise ValueError(PATTERN_REASONS[CELL_ID_PATTERN])
    return value


def check_hostname(value: str, *, allow_wildcard: bool) -> str:
    pattern = _WILDCARD_HOSTNAME if allow_wildcard else _HOSTNAME
    if len(value) > MAX_HOST_LENGTH or not pattern.matches(value):
        raise ValueError(pattern_reason(pattern.pattern, value))
    return value


def check_safe_file_name(value: str) -> str:
    if not _SAFE_FILE_NAME_RE.search(value) or not _fits_file_name(value):
        raise ValueError(PATTERN_REASONS[FILE_NAME_PATTERN])
    return value


def _fits_file_name(value: str) -> bool:
    # The schema can bound characters (maxLength), not UTF-8 bytes: a file name is bytes.
    return len(value.encode("utf-8", "surrogatepass")) <= MAX_FILE_NAME_BYTES


CellId = Annotated[str, Meta(pattern=CELL_ID_PATTERN, max_length=128)]
Token = Annotated[str, Meta(pattern=TOKEN_PATTERN)]
SecretKey = Annotated[str, Meta(pattern=SECRET_KEY_PATTERN)]
EnvName = Annotated[str, Meta(pattern=ENV_NAME_PATTERN)]
NoNul = Annotated[str, Meta(pattern=NO_NUL_PATTERN)]
Host = Annotated[str, _HOSTNAME.meta(max_length=MAX_HOST_LENGTH)]
WildcardHost = Annotated[str, _WILDCARD_HOSTNAME.meta(max_length=MAX_HOST_LENGTH)]
Cidr = Annotated[str, _CIDR.meta()]
ResolverAddress = Annotated[str, _RESOLVER_ADDRESS.meta()]
WorkingDirectory = Annotated[str, Meta(pattern=WORKING_DIRECTORY_PATTERN)]
FileName = Annotated[str, Meta(pattern=FILE_NAME_PATTERN, max_length=MAX_FILE_NAME_BYTES)]
PositiveSeconds = Annotated[int, Meta(ge=1, le=MAX_SECONDS)]
Port = Annotated[int, Meta(ge=1, le=65535)]

#: ``uniqueItems``: msgspec prints it; :func:`_check_unique` enforces it.
_UNIQUE = Meta(extra_json_schema={"uniqueItems": True})


def _check_unique(values: list[Any], field: str, reason: str) -> None:
    seen: list[Any] = []
    for value in values:
        if value in seen:
            rule_error(field, reason)
        seen.append(value)


class _Doc(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of every part of the document: camelCase keys only, no unknown keys.

    (Subclasses repeat ``frozen`` and ``kw_only`` for type checkers, which do not inherit them.)
    """


class Correlation(_Doc, frozen=True, kw_only=True):
    """Copied into every event of the run."""

    platform: str | None = None
    external_run_id: str | None = None
    external_job_id: str | None = None
    tenant_id: Token | None = None
    labels: dict[str, str] = {}


#: ``oneOf``: exactly one of ``host`` and ``cidr`` (``null`` counts as absent).
_ONE_DESTINATION = Meta(
    extra_json_schema={
        "oneOf": [
            {"required": ["host"], "properties": {"host": {"type": "string"}}},
            {"required": ["cidr"], "properties": {"cidr": {"type": "string"}}},
        ]
    }
)


class EgressRule(_Doc, frozen=True, kw_only=True):
    """One allowed destination: exactly one of host or cidr."""

    host: Host | None = None
    cidr: Cidr | None = None
    port: Port
    protocol: Literal["tcp", "udp"] = "tcp"

    def __post_init__(self) -> None:
        _HOSTNAME.check("host", self.host)
        _CIDR.check("cidr", self.cidr)
        if (self.host is None) == (self.cidr is None):
            raise ValueError("exactly one of 'host' or 'cidr' is required")
        if self.cidr is not None:
            from cellos.core import cidr  # only documents with a CIDR rule pay for it

            try:
                cidr.parse_network(self.cidr, strict=True)
            except ValueError as exc:
                # Host bits set (10.0.0.1/24): the schema cannot say this.
                rule_error("cidr", f"{self.cidr!r} is not a valid CIDR ({exc})")


class Resolver(_Doc, frozen=True, kw_only=True):
    resolver_id: Annotated[str, Meta(min_length=1, max_length=64)]
    protocol: Literal["do53-udp", "do53-tcp"] = "do53-udp"
    address: ResolverAddress

    def __post_init__(self) -> None:
        _RESOLVER_ADDRESS.check("address", self.address)


class DnsAuthority(_Doc, frozen=True, kw_only=True):
    hostname_allowlist: list[WildcardHost] = []
    resolvers: list[Resolver] = []

    def __post_init__(self) -> None:
        for index, host in enumerate(self.hostname_allowlist):
            _WILDCARD_HOSTNAME.check(f"hostnameAllowlist[{index}]", host)


#: Headers that frame or route a request: a secret placed there would change what the request
#: is, not only who it claims to be from.
RESERVED_INJECTION_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer"}
)
#: Ports whose TCP the cell's L7 proxy sees (80: HTTP, 443: HTTPS).
L7_PORTS = (80, 443)


class SecretInjection(_Doc, frozen=True, kw_only=True):
    """The cell's L7 proxy puts secret ``secretRef`` into header ``header`` of requests to
    ``host``; the workload only ever holds a placeholder (docs/secrets.md)."""

    secret_ref: SecretKey
    host: Host
    header: Annotated[str, _HEADER_NAME.meta(max_length=128)]
    format: Annotated[str, _INJECTION_FORMAT.meta(max_length=1024)] = "{value}"

    def __post_init__(self) -> None:
        _HOSTNAME.check("host", self.host)
        _HEADER_NAME.check("header", self.header)
        _INJECTION_FORMAT.check("format", self.format)


def _host_key(host: str) -> str:
    return host.lower().rstrip(".")


def _allowlisted(host: str, patterns: list[str]) -> bool:
    """``hostnameAllowlist`` semantics (docs/network.md): exact, case-insensitive; ``*.x``
    matches the subdomains of x, not x."""
    for pattern in patterns:
        key = _host_key(pattern)
        if key.startswith("*."):
            if host.endswith(key[1:]):
                return True
        elif host == key:
            return True
    return False


class Authority(_Doc, frozen=True, kw_only=True):
    secret_refs: Annotated[list[SecretKey], _UNIQUE] = []
    egress_rules: list[Annotated[EgressRule, _ONE_DESTINATION]] = []
    dns_authority: DnsAuthority | None = None
    secret_injection: Annotated[list[SecretInjection], _UNIQUE] = []

    def __post_init__(self) -> None:
        _check_unique(self.secret_refs, "secretRefs", "secret keys must be unique")
        seen: set[tuple[str, str]] = set()
        for index, entry in enumerate(self.secret_injection):
            where = f"secretInjection[{index}]"
            if entry.secret_ref not in self.secret_refs:
                rule_error(
                    f"{where}.secretRef",
                    f"{entry.secret_ref!r} is not in spec.authority.secretRefs",
                )
            if entry.header.lower() in RESERVED_INJECTION_HEADERS:
                rule_error(
                    f"{where}.header",
                    f"{entry.header!r} frames or routes the request and cannot carry a secret",
                )
            key = (_host_key(entry.host), entry.header.lower())
            if key in seen:
                rule_error(
                    f"{where}.host",
                    f"header {entry.header!r} of {entry.host!r} is "
                    "already injected by an earlier entry",
                )
            seen.add(key)
            if not self._l7_reachable(key[0]):
                rule_error(
                    f"{where}.host",
                    f"{entry.host!r} is not reachable through the cell's L7 proxy: it needs a "
                    "tcp egress rule for that host on port 80 or 443, or a name in "
                    "dnsAuthority.hostnameAllowlist and a tcp egress rule on port 80 or 443",
                )

    def _l7_reachable(self, host: str) -> bool:
        l7 = [r for r in self.egress_rules if r.protocol == "tcp" and r.port in L7_PORTS]
        if any(r.host is not None and _host_key(r.host) == host for r in l7):
            return True
        dns = self.dns_authority
        return bool(l7) and dns is not None and _allowlisted(host, dns.hostname_allowlist)

    @property
    def injected_refs(self) -> frozenset[str]:
        """Secret keys the workload gets only as a placeholder."""
        return frozenset(e.secret_ref for e in self.secret_injection)


class Lifetime(_Doc, frozen=True, kw_only=True):
    ttl_seconds: PositiveSeconds


class CpuMax(_Doc, frozen=True, kw_only=True):
    quota_micros: Annotated[int, Meta(ge=1000, le=10_000_000)]
    period_micros: Annotated[int, Meta(ge=1000, le=1_000_000)] = 100_000


class Limits(_Doc, frozen=True, kw_only=True):
    memory_max_bytes: Annotated[int, Meta(ge=1 << 20, le=1 << 46)] | None = None
    pids_max: Annotated[int, Meta(ge=1, le=4_194_304)] | None = None
    cpu_max: CpuMax | None = None
    graceful_shutdown_seconds: Annotated[int, Meta(ge=0, le=300)] = 5


#: How ``authority.secretRefs`` reach the workload (docs/document.md, "Secrets").
SecretDelivery = Literal["env", "runtimeBroker", "runtimeLeasedBroker"]
LEASED_DELIVERY = "runtimeLeasedBroker"
FILE_DELIVERIES = ("runtimeBroker", LEASED_DELIVERY)
#: Where file deliveries put the secrets inside the cell (one file per key).
SECRETS_DIRECTORY = "/run/secrets"

#: ``secretLeaseSeconds`` is required with leased delivery and absent (or null) otherwise;
#: :meth:`RunSpec.__post_init__` enforces it.
_LEASE_RULE = Meta(
    extra_json_schema={
        "if": {
            "required": ["secretDelivery"],
            "properties": {"secretDelivery": {"const": LEASED_DELIVERY}},
        },
        "then": {
            "required": ["secretLeaseSeconds"],
            "properties": {"secretLeaseSeconds": {"type": "integer"}},
        },
        "else": {"properties": {"secretLeaseSeconds": {"type": "null"}}},
    }
)

#: ``prefixItems``: the program (argv[0]) is a non-empty string.
_PROGRAM_NON_EMPTY = Meta(
    min_length=1, max_length=4096, extra_json_schema={"prefixItems": [{"minLength": 1}]}
)


class RunSpec(_Doc, frozen=True, kw_only=True):
    """The workload. Without it, the cell is created, exports and is destroyed."""

    argv: Annotated[list[NoNul], _PROGRAM_NON_EMPTY]
    working_directory: WorkingDirectory = DEFAULT_WORKING_DIRECTORY
    env: dict[EnvName, NoNul] = {}
    #: ``env``: variables; ``runtimeBroker``: files under /run/secrets on a per-cell tmpfs;
    #: ``runtimeLeasedBroker``: the same files, removed after ``secretLeaseSeconds``.
    secret_delivery: SecretDelivery = "env"
    #: Seconds from the workload's start until its secret files are removed (leased only).
    secret_lease_seconds: PositiveSeconds | None = None
    timeout_seconds: PositiveSeconds | None = None
    limits: Limits | None = None

    def __post_init__(self) -> None:
        if not self.argv[0]:
            rule_error("argv[0]", "argv[0] (the program) must be non-empty")
        leased = self.secret_delivery == LEASED_DELIVERY
        if leased and self.secret_lease_seconds is None:
            rule_error(
                "secretLeaseSeconds",
                f"required when secretDelivery is {LEASED_DELIVERY!r}",
            )
        if not leased and self.secret_lease_seconds is not None:
            rule_error(
                "secretLeaseSeconds",
                f"only allowed with secretDelivery {LEASED_DELIVERY!r} "
                f"(secretDelivery is {self.secret_delivery!r})",
            )

    @property
    def secrets_as_files(self) -> bool:
        """Secrets are files under /run/secrets (not variables)."""
        return self.secret_delivery in FILE_DELIVERIES


class Artifact(_Doc, frozen=True, kw_only=True):
    name: FileName
    path: Annotated[str, Meta(min_length=1, pattern=NO_NUL_PATTERN)]

    def __post_init__(self) -> None:
        if not _fits_file_name(self.name):
            rule_error("name", PATTERN_REASONS[FILE_NAME_PATTERN])


class ExportSpec(_Doc, frozen=True, kw_only=True):
    artifacts: Annotated[list[Artifact], _UNIQUE] = []

    def __post_init__(self) -> None:
        # The schema's uniqueItems catches identical entries only; the names must differ.
        names = [a.name for a in self.artifacts]
        _check_unique(names, "artifacts", "artifact names must be unique")


class Policy(_Doc, frozen=True, kw_only=True):
    pack_id: str
    pack_version: str


class Placement(_Doc, frozen=True, kw_only=True):
    pool_id: str | None = None
    queue_name: str | None = None


class CellSpec(_Doc, frozen=True, kw_only=True):
    id: CellId
    correlation: Correlation | None = None
    authority: Authority = msgspec.field(default_factory=Authority)
    lifetime: Lifetime | None = None
    run: Annotated[RunSpec | None, _LEASE_RULE] = None
    export: ExportSpec | None = None
    policy: Policy | None = None
    placement: Placement | None = None

    def __post_init__(self) -> None:
        run = self.run
        if run is None:
            return
        timeout = run.timeout_seconds
        ttl = self.lifetime.ttl_seconds if self.lifetime else None
        if ttl is not None and timeout is not None and timeout > ttl:
            raise ValueError(
                f"run.timeoutSeconds ({timeout}) must be <= lifetime.ttlSeconds ({ttl})"
            )
        injected = self.authority.injected_refs
        if run.secret_delivery == "env":
            for ref in self.authority.secret_refs:
                if ref not in injected and secret_env_name(ref) in run.env:
                    raise ValueError(
                        f"run.env.{secret_env_name(ref)} collides with the variable that "
                        f"delivers secret {ref!r}"
                    )
        for ref in sorted(injected):
            if placeholder_env_name(ref) in run.env:
                raise ValueError(
                    f"run.env.{placeholder_env_name(ref)} collides with the variable that "
                    f"carries the placeholder of secret {ref!r}"
                )
        if injected:
            for name in INJECTION_TRUST_VARIABLES:
                if name in run.env:
                    raise ValueError(
                        f"run.env.{name} collides with the cell's CA bundle variable "
                        "(set by CellOS when secretInjection is declared)"
                    )

    @property
    def artifacts(self) -> list[Artifact]:
        return list(self.export.artifacts) if self.export else []

    @property
    def working_directory(self) -> str:
        """Where the workspace is mounted (also for a cell without ``run``)."""
        return self.run.working_directory if self.run else DEFAULT_WORKING_DIRECTORY

    @property
    def limits(self) -> Limits | None:
        return self.run.limits if self.run else None


class ExecutionCell(_Doc, frozen=True, kw_only=True):
    """A declarative execution cell (CellOS)."""

    api_version: Literal["cellos.io/v1"]
    kind: Literal["ExecutionCell"]
    spec: CellSpec


def to_document(value: msgspec.Struct, *, exclude_none: bool = False) -> Any:
    """The camelCase JSON form of a document or of one of its parts."""
    data = msgspec.to_builtins(value)
    return _without_none(data) if exclude_none else data


def _without_none(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _without_none(v) for k, v in data.items() if v is not None}
    if isinstance(data, list):
        return [_without_none(v) for v in data]
    return data


def json_schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of the document, as printed by ``cellos schema``."""
    schema = msgspec.json.schema(ExecutionCell)
    defs: dict[str, Any] = schema["$defs"]
    top: dict[str, Any] = defs.pop("ExecutionCell")
    return {"$schema": JSON_SCHEMA_DIALECT, **top, "title": "ExecutionCell", "$defs": defs}
