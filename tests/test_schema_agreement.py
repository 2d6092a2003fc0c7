"""``cellos schema`` says what ``cellos validate`` does (docs/document.md).

A corpus of invalid documents (one broken rule each) and valid ones: for every rule JSON Schema
2020-12 can express, the ``jsonschema`` package with the printed schema and the validator agree;
the few rules it cannot express (listed in docs/document.md) are refused by the validator and
accepted by the schema, which is what makes the list honest. A property test then generates
documents from the schema (hypothesis-jsonschema): the validator accepts every one that the
inexpressible rules allow, and refuses every one that they do not.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis_jsonschema import from_schema

from cellos.core.errors import InvalidSpec
from cellos.core.loading import validate_document
from cellos.core.secrets_env import secret_env_name
from tests.conftest import REPO

Doc = dict[str, Any]


def _printed_schema() -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "cellos.cli", "schema"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    schema: dict[str, Any] = json.loads(out)
    return schema


SCHEMA = _printed_schema()
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def base() -> Doc:
    return {
        "apiVersion": "cellos.io/v1",
        "kind": "ExecutionCell",
        "spec": {"id": "cell-1", "run": {"argv": ["/bin/true"]}},
    }


def spec(**fields: Any) -> Doc:
    doc = base()
    doc["spec"].update(fields)
    return doc


def run(**fields: Any) -> Doc:
    doc = base()
    doc["spec"]["run"].update(fields)
    return doc


def egress(*rules: Any) -> Doc:
    return spec(authority={"egressRules": list(rules)})


def dns(**fields: Any) -> Doc:
    return spec(authority={"dnsAuthority": fields})


def injection(**entry: Any) -> Doc:
    """A cell that injects secret ``tok`` into requests to api.test (plus ``entry``'s changes)."""
    fields = {"secretRef": "tok", "host": "api.test", "header": "Authorization", **entry}
    return spec(
        authority={
            "secretRefs": ["tok"],
            "egressRules": [{"host": "api.test", "port": 443}],
            "secretInjection": [fields],
        }
    )


def artifacts(*items: Any) -> Doc:
    return spec(export={"artifacts": list(items)})


def art(name: Any, path: Any = "/workspace/out") -> dict[str, Any]:
    return {"name": name, "path": path}


def without_run() -> Doc:
    doc = base()
    del doc["spec"]["run"]
    return doc


def edit(change: Callable[[Doc], Any]) -> Doc:
    doc = base()
    change(doc)
    return doc


@dataclass(frozen=True)
class Invalid:
    name: str
    document: Doc
    #: The path ``cellos validate`` names first.
    path: str


# -- invalid documents the schema must refuse too ------------------------------------------------

EXPRESSIBLE = [
    Invalid("api-version", edit(lambda d: d.update(apiVersion="cellos.io/v2")), "apiVersion"),
    Invalid("kind", edit(lambda d: d.update(kind="Pod")), "kind"),
    Invalid("missing-spec", edit(lambda d: d.pop("spec")), "spec"),
    Invalid("unknown-top-key", edit(lambda d: d.update(metadata={})), "metadata"),
    Invalid("unknown-spec-key", spec(image="alpine"), "spec.image"),
    Invalid("unknown-run-key", run(command="x"), "spec.run.command"),
    Invalid("snake-case-key", run(working_directory="/w"), "spec.run.working_directory"),
    Invalid("missing-id", edit(lambda d: d["spec"].pop("id")), "spec.id"),
    Invalid("id-dotdot", spec(id="a..b"), "spec.id"),
    Invalid("id-dotdot-escape", spec(id="../x"), "spec.id"),
    Invalid("id-129-chars", spec(id="x" * 129), "spec.id"),
    Invalid("id-non-ascii", spec(id="céll"), "spec.id"),
    Invalid("id-trailing-newline", spec(id="cell\n"), "spec.id"),
    Invalid("id-leading-dash", spec(id="-rf"), "spec.id"),
    Invalid("id-empty", spec(id=""), "spec.id"),
    Invalid("id-slash", spec(id="a/b"), "spec.id"),
    Invalid("id-int", spec(id=7), "spec.id"),
    Invalid("tenant-dot", spec(correlation={"tenantId": "a.b"}), "spec.correlation.tenantId"),
    Invalid("tenant-65", spec(correlation={"tenantId": "t" * 65}), "spec.correlation.tenantId"),
    Invalid(
        "label-not-string", spec(correlation={"labels": {"a": 1}}), "spec.correlation.labels.a"
    ),
    Invalid("ttl-string", spec(lifetime={"ttlSeconds": "600"}), "spec.lifetime.ttlSeconds"),
    Invalid("ttl-zero", spec(lifetime={"ttlSeconds": 0}), "spec.lifetime.ttlSeconds"),
    Invalid("ttl-too-big", spec(lifetime={"ttlSeconds": 2592001}), "spec.lifetime.ttlSeconds"),
    Invalid("ttl-bool", spec(lifetime={"ttlSeconds": True}), "spec.lifetime.ttlSeconds"),
    Invalid("ttl-fraction", spec(lifetime={"ttlSeconds": 1.5}), "spec.lifetime.ttlSeconds"),
    Invalid("ttl-missing", spec(lifetime={}), "spec.lifetime.ttlSeconds"),
    Invalid("argv-empty", run(argv=[]), "spec.run.argv"),
    Invalid("secret-delivery-bogus", run(secretDelivery="bogus"), "spec.run.secretDelivery"),
    # A lease belongs to leased delivery: required there, refused anywhere else.
    Invalid(
        "leased-without-lease",
        run(secretDelivery="runtimeLeasedBroker"),
        "spec.run.secretLeaseSeconds",
    ),
    Invalid(
        "leased-null-lease",
        run(secretDelivery="runtimeLeasedBroker", secretLeaseSeconds=None),
        "spec.run.secretLeaseSeconds",
    ),
    Invalid(
        "lease-with-runtime-broker",
        run(secretDelivery="runtimeBroker", secretLeaseSeconds=5),
        "spec.run.secretLeaseSeconds",
    ),
    Invalid("lease-with-default-env", run(secretLeaseSeconds=5), "spec.run.secretLeaseSeconds"),
    Invalid(
        "lease-zero",
        run(secretDelivery="runtimeLeasedBroker", secretLeaseSeconds=0),
        "spec.run.secretLeaseSeconds",
    ),
    Invalid(
        "lease-string",
        run(secretDelivery="runtimeLeasedBroker", secretLeaseSeconds="5"),
        "spec.run.secretLeaseSeconds",
    ),
    Invalid("argv-string", run(argv="/bin/true"), "spec.run.argv"),
    Invalid("argv-empty-program", run(argv=[""]), "spec.run.argv[0]"),
    Invalid("argv-nul", run(argv=["/bin/echo", "a\x00b"]), "spec.run.argv[1]"),
    Invalid("argv-int", run(argv=["/bin/echo", 3]), "spec.run.argv[1]"),
    Invalid("argv-too-long", run(argv=["x"] * 4097), "spec.run.argv"),
    Invalid("env-name-digit", run(env={"1BAD": "x"}), "spec.run.env"),
    Invalid("env-name-dash", run(env={"A-B": "x"}), "spec.run.env"),
    Invalid("env-value-bool", run(env={"CI": True}), "spec.run.env.CI"),
    Invalid("env-value-nul", run(env={"CI": "a\x00"}), "spec.run.env.CI"),
    Invalid("workdir-relative", run(workingDirectory="work"), "spec.run.workingDirectory"),
    Invalid("workdir-dotdot", run(workingDirectory="/w/../etc"), "spec.run.workingDirectory"),
    Invalid("workdir-trailing-dotdot", run(workingDirectory="/w/.."), "spec.run.workingDirectory"),
    Invalid("workdir-root", run(workingDirectory="/"), "spec.run.workingDirectory"),
    Invalid("workdir-nul", run(workingDirectory="/w\x00"), "spec.run.workingDirectory"),
    Invalid("secret-delivery", run(secretDelivery="file"), "spec.run.secretDelivery"),
    Invalid("timeout-zero", run(timeoutSeconds=0), "spec.run.timeoutSeconds"),
    Invalid("memory-small", run(limits={"memoryMaxBytes": 1024}), "spec.run.limits.memoryMaxBytes"),
    Invalid("pids-zero", run(limits={"pidsMax": 0}), "spec.run.limits.pidsMax"),
    Invalid(
        "quota-small",
        run(limits={"cpuMax": {"quotaMicros": 10}}),
        "spec.run.limits.cpuMax.quotaMicros",
    ),
    Invalid(
        "period-big",
        run(limits={"cpuMax": {"quotaMicros": 1000, "periodMicros": 2_000_000}}),
        "spec.run.limits.cpuMax.periodMicros",
    ),
    Invalid(
        "grace-big",
        run(limits={"gracefulShutdownSeconds": 301}),
        "spec.run.limits.gracefulShutdownSeconds",
    ),
    Invalid("unknown-limit", run(limits={"memoryMax": 1 << 30}), "spec.run.limits.memoryMax"),
    Invalid("artifact-slash", artifacts(art("a/b")), "spec.export.artifacts[0].name"),
    Invalid("artifact-backslash", artifacts(art("a\\b")), "spec.export.artifacts[0].name"),
    Invalid("artifact-tilde", artifacts(art("~root")), "spec.export.artifacts[0].name"),
    Invalid("artifact-dotdot", artifacts(art("..")), "spec.export.artifacts[0].name"),
    Invalid("artifact-inner-dotdot", artifacts(art("a..b")), "spec.export.artifacts[0].name"),
    Invalid("artifact-dot", artifacts(art(".")), "spec.export.artifacts[0].name"),
    Invalid("artifact-empty", artifacts(art("")), "spec.export.artifacts[0].name"),
    Invalid("artifact-newline", artifacts(art("a\nb")), "spec.export.artifacts[0].name"),
    Invalid("artifact-control", artifacts(art("a\x1fb")), "spec.export.artifacts[0].name"),
    Invalid("artifact-256-chars", artifacts(art("x" * 256)), "spec.export.artifacts[0].name"),
    Invalid("artifact-empty-path", artifacts(art("out", "")), "spec.export.artifacts[0].path"),
    Invalid("artifact-nul-path", artifacts(art("out", "/a\x00")), "spec.export.artifacts[0].path"),
    Invalid("artifact-no-path", artifacts({"name": "out"}), "spec.export.artifacts[0].path"),
    Invalid(
        "artifact-identical-twice",
        artifacts(art("out"), art("out")),
        "spec.export.artifacts",
    ),
    Invalid(
        "secret-refs-duplicate",
        spec(authority={"secretRefs": ["npm", "npm"]}),
        "spec.authority.secretRefs",
    ),
    Invalid(
        "secret-ref-slash", spec(authority={"secretRefs": ["a/b"]}), "spec.authority.secretRefs[0]"
    ),
    Invalid(
        "egress-host-and-cidr",
        egress({"host": "a.example", "cidr": "10.0.0.0/8", "port": 443}),
        "spec.authority.egressRules[0]",
    ),
    Invalid("egress-neither", egress({"port": 443}), "spec.authority.egressRules[0]"),
    Invalid(
        "egress-wildcard-host",
        egress({"host": "*.example.com", "port": 443}),
        "spec.authority.egressRules[0].host",
    ),
    Invalid(
        "egress-space-in-host",
        egress({"host": "a b.example", "port": 443}),
        "spec.authority.egressRules[0].host",
    ),
    Invalid(
        "egress-label-dash",
        egress({"host": "-a.example", "port": 443}),
        "spec.authority.egressRules[0].host",
    ),
    Invalid(
        "egress-cidr-garbage",
        egress({"cidr": "10.0.0.0/33", "port": 443}),
        "spec.authority.egressRules[0].cidr",
    ),
    Invalid(
        "egress-cidr6-garbage",
        egress({"cidr": "2001:db8::/129", "port": 443}),
        "spec.authority.egressRules[0].cidr",
    ),
    Invalid(
        "egress-cidr6-two-gaps",
        egress({"cidr": "2001::db8::1", "port": 443}),
        "spec.authority.egressRules[0].cidr",
    ),
    Invalid(
        "egress-port-zero",
        egress({"host": "a.example", "port": 0}),
        "spec.authority.egressRules[0].port",
    ),
    Invalid(
        "egress-port-big",
        egress({"host": "a.example", "port": 65536}),
        "spec.authority.egressRules[0].port",
    ),
    Invalid(
        "egress-protocol",
        egress({"host": "a.example", "port": 1, "protocol": "icmp"}),
        "spec.authority.egressRules[0].protocol",
    ),
    Invalid(
        "dns-mid-label-wildcard",
        dns(hostnameAllowlist=["a.*.example"]),
        "spec.authority.dnsAuthority.hostnameAllowlist[0]",
    ),
    Invalid(
        "dns-resolver-without-port",
        dns(resolvers=[{"resolverId": "r", "address": "10.0.0.2"}]),
        "spec.authority.dnsAuthority.resolvers[0].address",
    ),
    Invalid(
        "dns-resolver-name",
        dns(resolvers=[{"resolverId": "r", "address": "dns.example:53"}]),
        "spec.authority.dnsAuthority.resolvers[0].address",
    ),
    Invalid(
        "dns-resolver-port-zero",
        dns(resolvers=[{"resolverId": "r", "address": "10.0.0.2:0"}]),
        "spec.authority.dnsAuthority.resolvers[0].address",
    ),
    Invalid(
        "dns-resolver-empty-id",
        dns(resolvers=[{"resolverId": "", "address": "10.0.0.2:53"}]),
        "spec.authority.dnsAuthority.resolvers[0].resolverId",
    ),
    Invalid("policy-incomplete", spec(policy={"packId": "p"}), "spec.policy.packVersion"),
    Invalid(
        "injection-format-no-marker",
        injection(format="Bearer"),
        "spec.authority.secretInjection[0].format",
    ),
    Invalid(
        "injection-format-twice",
        injection(format="{value}:{value}"),
        "spec.authority.secretInjection[0].format",
    ),
    Invalid(
        "injection-format-newline",
        injection(format="{value}\r\nX-Evil: 1"),
        "spec.authority.secretInjection[0].format",
    ),
    Invalid(
        "injection-header-space",
        injection(header="X Token"),
        "spec.authority.secretInjection[0].header",
    ),
    Invalid(
        "injection-host-wildcard",
        injection(host="*.api.test"),
        "spec.authority.secretInjection[0].host",
    ),
    Invalid(
        "injection-missing-header",
        edit(
            lambda d: (
                d.update(injection()) or d["spec"]["authority"]["secretInjection"][0].pop("header")
            )
        ),
        "spec.authority.secretInjection[0].header",
    ),
    Invalid(
        "injection-unknown-key",
        injection(value="x"),
        "spec.authority.secretInjection[0].value",
    ),
    Invalid("run-list", spec(run=["/bin/true"]), "spec.run"),
]

# -- invalid documents only the validator can refuse (docs/document.md lists why) ----------------

INEXPRESSIBLE = [
    Invalid(
        "timeout-above-ttl",
        spec(lifetime={"ttlSeconds": 5}, run={"argv": ["/bin/true"], "timeoutSeconds": 6}),
        "spec",
    ),
    Invalid(
        "secret-env-clash",
        spec(
            authority={"secretRefs": ["npm-token"]},
            run={"argv": ["/bin/true"], "env": {"NPM_TOKEN": "x"}},
        ),
        "spec",
    ),
    Invalid(
        "injection-secret-not-a-ref",
        injection(secretRef="other"),
        "spec.authority.secretInjection[0].secretRef",
    ),
    Invalid(
        "injection-host-not-allowed",
        injection(host="evil.test"),
        "spec.authority.secretInjection[0].host",
    ),
    Invalid(
        "injection-reserved-header",
        injection(header="Transfer-Encoding"),
        "spec.authority.secretInjection[0].header",
    ),
    Invalid(
        "injection-placeholder-env-clash",
        edit(
            lambda d: (
                d.update(injection())
                or d["spec"]["run"].update(env={"CELLOS_SECRET_PLACEHOLDER_TOK": "x"})
            )
        ),
        "spec",
    ),
    Invalid(
        "injection-ca-variable-clash",
        edit(
            lambda d: d.update(injection()) or d["spec"]["run"].update(env={"SSL_CERT_FILE": "x"})
        ),
        "spec",
    ),
    Invalid(
        "artifact-names-duplicate",
        artifacts(art("out", "/workspace/a"), art("out", "/workspace/b")),
        "spec.export.artifacts",
    ),
    Invalid(
        "cidr-host-bits",
        egress({"cidr": "10.0.0.1/24", "port": 443}),
        "spec.authority.egressRules[0].cidr",
    ),
    Invalid(
        "cidr6-host-bits",
        egress({"cidr": "2001:db8::1/64", "port": 443}),
        "spec.authority.egressRules[0].cidr",
    ),
    Invalid("artifact-name-256-bytes", artifacts(art("é" * 128)), "spec.export.artifacts[0].name"),
    Invalid(
        "integer-valued-float", spec(lifetime={"ttlSeconds": 60.0}), "spec.lifetime.ttlSeconds"
    ),
    Invalid(
        "lone-surrogate", spec(correlation={"platform": "\ud800"}), "spec.correlation.platform"
    ),
]

VALID = [
    base(),
    without_run(),
    spec(lifetime={"ttlSeconds": 1}),
    spec(lifetime={"ttlSeconds": 2592000}, run={"argv": ["/bin/true"], "timeoutSeconds": 2592000}),
    spec(id="a.b_c-d." + "x" * 120),
    spec(id="X"),
    run(env={"_A1": "", "PATH": "/usr/bin"}, workingDirectory="/w/..x/./y"),
    run(argv=["/bin/echo", ""], secretDelivery="env"),
    run(secretDelivery="runtimeBroker"),
    run(secretDelivery="runtimeBroker", secretLeaseSeconds=None),
    run(secretDelivery="runtimeLeasedBroker", secretLeaseSeconds=1),
    spec(
        authority={"secretRefs": ["npm-token"]},
        run={"argv": ["/bin/true"], "env": {"NPM_TOKEN": "x"}, "secretDelivery": "runtimeBroker"},
    ),
    run(
        limits={
            "memoryMaxBytes": 1 << 20,
            "pidsMax": 1,
            "cpuMax": {"quotaMicros": 1000, "periodMicros": 1000},
            "gracefulShutdownSeconds": 0,
        }
    ),
    artifacts(art(".hidden"), art("report.json", "out/report.json"), art("é" * 127)),
    artifacts(art("a", "/workspace/x"), art("b", "/workspace/x")),
    spec(authority={"secretRefs": ["npm-token", "a.b"]}),
    injection(),
    injection(format="Bearer {value}", host="API.test.", header="x-api-key"),
    spec(
        authority={
            "secretRefs": ["tok"],
            "egressRules": [{"cidr": "10.0.0.0/8", "port": 80}],
            "dnsAuthority": {"hostnameAllowlist": ["*.corp.test"]},
            "secretInjection": [
                {"secretRef": "tok", "host": "a.corp.test", "header": "X-Token"},
                {
                    "secretRef": "tok",
                    "host": "b.corp.test",
                    "header": "X-Token",
                    "format": "t={value};",
                },
            ],
        },
        run={"argv": ["/bin/true"], "env": {"TOK": "not the secret's variable when injected"}},
    ),
    egress(
        {"host": "registry.npmjs.org", "port": 443},
        {"host": "localhost.", "port": 1, "protocol": "udp"},
        {"cidr": "10.0.0.0/8", "port": 65535},
        {"cidr": "10.0.0.1", "port": 5432},
        {"cidr": "2001:db8::/32", "port": 443},
        {"cidr": "fd74:6573:74:1::2/128", "port": 8080, "protocol": "udp"},
        {"cidr": "::1", "port": 80},
        {"cidr": "::/0", "port": 443},
        {"host": None, "cidr": "0.0.0.0/0", "port": 53},
    ),
    dns(
        hostnameAllowlist=["*.github.com", "example.com", "a-b.c"],
        resolvers=[
            {"resolverId": "corp", "protocol": "do53-tcp", "address": "10.0.0.2:53"},
            {"resolverId": "v6", "address": "[2001:db8::1]:5353"},
        ],
    ),
    spec(
        correlation={
            "platform": "github-actions",
            "externalRunId": "123",
            "tenantId": "acme_1",
            "labels": {"repo": "acme/app", "": "x"},
        },
        policy={"packId": "baseline", "packVersion": "1.0.0"},
        placement={"poolId": "pool-a"},
        lifetime=None,
        export=None,
    ),
]


def _refusal(document: Doc) -> list[tuple[str, str]]:
    try:
        validate_document(copy.deepcopy(document))
    except InvalidSpec as exc:
        return exc.problems
    return []


def test_the_corpus_is_large_enough() -> None:
    assert len(EXPRESSIBLE) + len(INEXPRESSIBLE) >= 60
    assert len(VALID) >= 15
    names = [c.name for c in EXPRESSIBLE + INEXPRESSIBLE]
    assert len(set(names)) == len(names)


def test_printed_schema_is_a_valid_2020_12_schema() -> None:
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    # The metaschema itself, fetched from the package's bundled copy (no network).
    meta = jsonschema.Draft202012Validator.META_SCHEMA
    jsonschema.Draft202012Validator(meta).validate(SCHEMA)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in EXPRESSIBLE])
def test_expressible_rule_is_refused_by_both(case: Invalid) -> None:
    problems = _refusal(case.document)
    assert problems, "cellos validate accepted it"
    assert problems[0][0] == case.path, problems
    assert list(VALIDATOR.iter_errors(case.document)), "the schema accepted it"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in INEXPRESSIBLE])
def test_inexpressible_rule_is_refused_by_the_validator_only(case: Invalid) -> None:
    problems = _refusal(case.document)
    assert problems and problems[0][0] == case.path, problems
    assert list(VALIDATOR.iter_errors(case.document)) == [], "expressible after all: move it"


@pytest.mark.parametrize("document", VALID)
def test_valid_document_is_accepted_by_both(document: Doc) -> None:
    assert _refusal(document) == []
    assert list(VALIDATOR.iter_errors(document)) == []


# -- generated from the schema ---------------------------------------------------------------


def inexpressible_violation(document: Doc) -> str | None:
    """The rule of docs/document.md's "cannot say" list that ``document`` breaks, if any.

    Written independently of the model on purpose: it is the list, restated as code."""
    cell = document["spec"]
    run_ = cell.get("run")
    lifetime = cell.get("lifetime")
    timeout = run_.get("timeoutSeconds") if run_ else None
    if lifetime and timeout is not None and timeout > lifetime["ttlSeconds"]:
        return "timeout <= ttl"
    authority = cell.get("authority") or {}
    injected = {e["secretRef"] for e in authority.get("secretInjection") or []}
    if run_ and run_.get("secretDelivery", "env") == "env":
        env = run_.get("env") or {}
        refs = [r for r in authority.get("secretRefs") or [] if r not in injected]
        if any(secret_env_name(ref) in env for ref in refs):
            return "secret/env clash"
    broken = _injection_violation(authority, (run_ or {}).get("env") or {} if run_ else None)
    if broken is not None:
        return broken
    for rule in authority.get("egressRules") or []:
        if rule.get("cidr") is not None:
            try:
                ipaddress.ip_network(rule["cidr"], strict=True)
            except ValueError:
                return "cidr host bits"
    names = [a["name"] for a in (cell.get("export") or {}).get("artifacts") or []]
    if len(set(names)) != len(names):
        return "artifact names unique"
    if any(len(name.encode("utf-8", "surrogatepass")) > 255 for name in names):
        return "artifact name bytes"
    if any("\ud800" <= ch <= "\udfff" for ch in json.dumps(document, ensure_ascii=False)):
        return "lone surrogate"
    return None


def _injection_violation(authority: Doc, env: dict[str, str] | None) -> str | None:
    """docs/document.md's secretInjection rules, restated."""
    entries = authority.get("secretInjection") or []
    refs = authority.get("secretRefs") or []
    rules = [
        r
        for r in authority.get("egressRules") or []
        if r.get("protocol", "tcp") == "tcp" and r["port"] in (80, 443)
    ]
    dns = authority.get("dnsAuthority") or {}
    patterns = [p.lower().rstrip(".") for p in dns.get("hostnameAllowlist") or []]
    seen = set()
    for entry in entries:
        host = entry["host"].lower().rstrip(".")
        if entry["secretRef"] not in refs:
            return "injection: secretRef not in secretRefs"
        if entry["header"].lower() in {
            "host",
            "content-length",
            "transfer-encoding",
            "connection",
            "upgrade",
            "te",
            "trailer",
        }:
            return "injection: reserved header"
        if (host, entry["header"].lower()) in seen:
            return "injection: header of a host twice"
        seen.add((host, entry["header"].lower()))
        by_rule = any((r.get("host") or "").lower().rstrip(".") == host for r in rules)
        by_dns = (
            bool(rules)
            and "dnsAuthority" in authority
            and authority["dnsAuthority"] is not None
            and any(host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in patterns)
        )
        if not (by_rule or by_dns):
            return "injection: host not reachable at L7"
    if entries and env is not None:
        names = {"SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "CURL_CA_BUNDLE"}
        names |= {
            "CELLOS_SECRET_PLACEHOLDER_" + secret_env_name(e["secretRef"]).lstrip("_")
            for e in entries
        }
        if names & set(env):
            return "injection: variable clash"
    return None


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(document=from_schema(SCHEMA))
def test_documents_generated_from_the_schema_are_valid(document: Doc) -> None:
    assert list(VALIDATOR.iter_errors(document)) == []
    problems = _refusal(document)
    broken = inexpressible_violation(document)
    if broken is None:
        assert problems == [], problems
    else:
        assert problems, f"breaks {broken} but was accepted"
