"""The document: every rule of DESIGN.md §2 gives a typed error naming the JSON path."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from cellos.core.errors import InvalidSpec
from cellos.core.loading import MAX_DOCUMENT_BYTES, load_document, parse_document, validate_document
from cellos.core.spec import to_document
from tests.conftest import doc

FULL = """
apiVersion: cellos.io/v1
kind: ExecutionCell
spec:
  id: build-42
  correlation: {platform: github-actions, externalRunId: "123", externalJobId: build,
                tenantId: acme, labels: {repo: acme/app}}
  authority:
    secretRefs: [npm-token]
    egressRules:
      - {host: registry.npmjs.org, port: 443, protocol: tcp}
      - {cidr: 10.0.0.0/24, port: 5432, protocol: tcp}
    dnsAuthority:
      hostnameAllowlist: [registry.npmjs.org, "*.github.com"]
      resolvers: [{resolverId: corp, protocol: do53-udp, address: "10.0.0.2:53"}]
  lifetime: {ttlSeconds: 600}
  run:
    argv: [/usr/bin/npm, ci]
    workingDirectory: /workspace
    env: {CI: "true"}
    secretDelivery: env
    timeoutSeconds: 300
    limits: {memoryMaxBytes: 536870912, pidsMax: 256,
             cpuMax: {quotaMicros: 50000, periodMicros: 100000}, gracefulShutdownSeconds: 5}
  export:
    artifacts:
      - {name: report.json, path: /workspace/out/report.json}
  policy: {packId: baseline, packVersion: 1.0.0}
  placement: {poolId: pool-a, queueName: default}
"""


def problems(data: Any) -> list[tuple[str, str]]:
    with pytest.raises(InvalidSpec) as info:
        validate_document(data)
    return info.value.problems


def test_full_design_document_loads_every_field() -> None:
    cell = validate_document(parse_document(FULL.encode(), "full.yaml"))
    spec = cell.spec
    assert spec.id == "build-42"
    assert spec.correlation and spec.correlation.tenant_id == "acme"
    assert spec.correlation.labels == {"repo": "acme/app"}
    assert spec.authority.secret_refs == ["npm-token"]
    assert spec.authority.egress_rules[0].host == "registry.npmjs.org"
    assert spec.authority.egress_rules[1].cidr == "10.0.0.0/24"
    assert spec.authority.dns_authority is not None
    assert spec.authority.dns_authority.resolvers[0].address == "10.0.0.2:53"
    assert spec.lifetime and spec.lifetime.ttl_seconds == 600
    assert (
        spec.run
        and spec.run.limits
        and spec.run.limits.cpu_max
        and spec.run.limits.cpu_max.quota_micros == 50000
    )
    assert spec.artifacts[0].path == "/workspace/out/report.json"
    assert spec.policy and spec.policy.pack_version == "1.0.0"
    assert spec.placement and spec.placement.queue_name == "default"
    # Round trip through the camelCase JSON form.
    dumped = to_document(cell, exclude_none=True)
    assert validate_document(json.loads(json.dumps(dumped))) == cell


@pytest.mark.parametrize(
    ("mutate", "path", "needle"),
    [
        (lambda d: d["spec"].update(id="a..b"), "spec.id", ".."),
        (lambda d: d["spec"].update(id=""), "spec.id", "must match"),
        (lambda d: d["spec"].update(id="-x"), "spec.id", "must match"),
        (lambda d: d["spec"].update(id="x" * 129), "spec.id", "length <= 128"),
        (lambda d: d["spec"]["run"].update(argv=[]), "spec.run.argv", "length >= 1"),
        (lambda d: d["spec"]["run"].update(argv=[""]), "spec.run.argv[0]", "non-empty"),
        (lambda d: d["spec"]["run"].update(argv="/bin/true"), "spec.run.argv", "Expected `array`"),
        (lambda d: d["spec"].update(bogus=1), "spec.bogus", "unknown field"),
        (lambda d: d.update(apiVersion="v2"), "apiVersion", "cellos.io/v1"),
        (lambda d: d.update(kind="Pod"), "kind", "ExecutionCell"),
        (
            lambda d: d["spec"].update(lifetime={"ttlSeconds": "600"}),
            "spec.lifetime.ttlSeconds",
            "Expected `int`, got `str`",
        ),
        (
            lambda d: d["spec"].update(lifetime={"ttlSeconds": 0}),
            "spec.lifetime.ttlSeconds",
            ">= 1",
        ),
        (
            lambda d: d["spec"].update(lifetime={"ttlSeconds": True}),
            "spec.lifetime.ttlSeconds",
            "Expected `int`, got `bool`",
        ),
        (
            lambda d: (
                d["spec"].update(lifetime={"ttlSeconds": 5}),
                d["spec"]["run"].update(timeoutSeconds=6),
            ),
            "spec",
            "<= lifetime.ttlSeconds",
        ),
        (lambda d: d["spec"]["run"].update(env={"CI": True}), "spec.run.env.CI", "Expected `str`"),
        (
            lambda d: d["spec"]["run"].update(env={"1X": "a"}),
            "spec.run.env",
            "not a valid environment",
        ),
        (
            lambda d: d["spec"]["run"].update(workingDirectory="rel"),
            "spec.run.workingDirectory",
            "absolute",
        ),
        (
            lambda d: d["spec"].update(export={"artifacts": [{"name": "../x", "path": "/a"}]}),
            "spec.export.artifacts[0].name",
            "single file name",
        ),
        (
            lambda d: d["spec"].update(export={"artifacts": [{"name": "a/b", "path": "/a"}]}),
            "spec.export.artifacts[0].name",
            "single file name",
        ),
        (
            lambda d: d["spec"].update(export={"artifacts": [{"name": "~x", "path": "/a"}]}),
            "spec.export.artifacts[0].name",
            "single file name",
        ),
        (
            lambda d: d["spec"].update(export={"artifacts": [{"name": "a\x00", "path": "/a"}]}),
            "spec.export.artifacts[0].name",
            "single file name",
        ),
        (
            lambda d: d["spec"].update(
                export={"artifacts": [{"name": "x", "path": "/a"}, {"name": "x", "path": "/b"}]}
            ),
            "spec.export.artifacts",
            "unique",
        ),
        (
            lambda d: d["spec"].update(
                authority={"egressRules": [{"cidr": "10.0.0.1/24", "port": 1}]}
            ),
            "spec.authority.egressRules[0].cidr",
            "valid CIDR",
        ),
        (
            lambda d: d["spec"].update(
                authority={"egressRules": [{"cidr": "10.0.0.0/8", "port": 0}]}
            ),
            "spec.authority.egressRules[0].port",
            ">= 1",
        ),
        (
            lambda d: d["spec"].update(
                authority={"egressRules": [{"cidr": "10.0.0.0/8", "port": 65536}]}
            ),
            "spec.authority.egressRules[0].port",
            "<= 65535",
        ),
        (
            lambda d: d["spec"].update(
                authority={"egressRules": [{"host": "a.b", "port": 1, "protocol": "icmp"}]}
            ),
            "spec.authority.egressRules[0].protocol",
            "'tcp' or 'udp'",
        ),
        (
            lambda d: d["spec"].update(authority={"egressRules": [{"host": "*.b.c", "port": 1}]}),
            "spec.authority.egressRules[0].host",
            "not a valid host name",
        ),
        (
            lambda d: d["spec"].update(authority={"egressRules": [{"port": 1}]}),
            "spec.authority.egressRules[0]",
            "exactly one",
        ),
        (
            lambda d: d["spec"].update(
                authority={"dnsAuthority": {"hostnameAllowlist": ["a.*.com"]}}
            ),
            "spec.authority.dnsAuthority.hostnameAllowlist[0]",
            "not a valid host name",
        ),
        (
            lambda d: d["spec"].update(
                authority={
                    "dnsAuthority": {
                        "resolvers": [{"resolverId": "r", "address": "dns.example:53"}]
                    }
                }
            ),
            "spec.authority.dnsAuthority.resolvers[0].address",
            "literal IP",
        ),
        (
            lambda d: d["spec"].update(authority={"secretRefs": ["a", "a"]}),
            "spec.authority.secretRefs",
            "unique",
        ),
        (
            lambda d: d["spec"].update(authority={"secretRefs": ["a/b"]}),
            "spec.authority.secretRefs[0]",
            "not a valid secret key",
        ),
        (
            lambda d: (
                d["spec"].update(authority={"secretRefs": ["npm-token"]}),
                d["spec"]["run"].update(env={"NPM_TOKEN": "x"}),
            ),
            "spec",
            "collides",
        ),
        (
            lambda d: d["spec"]["run"].update(limits={"cpuMax": {"quotaMicros": 10}}),
            "spec.run.limits.cpuMax.quotaMicros",
            ">= 1000",
        ),
        (
            lambda d: d["spec"]["run"].update(secretDelivery="smoke"),
            "spec.run.secretDelivery",
            "'env'",
        ),
        (
            lambda d: d["spec"].update(correlation={"tenantId": "a.b"}),
            "spec.correlation.tenantId",
            "must match",
        ),
    ],
)
def test_rule_violations_name_the_path(mutate: Any, path: str, needle: str) -> None:
    data = doc()
    mutate(data)
    found = problems(data)
    assert any(p == path and needle in reason for p, reason in found), found


def test_all_problems_are_reported_not_only_the_first() -> None:
    data = doc(cell_id="..", argv=[])
    data["spec"]["extra"] = 1
    paths = {p for p, _ in problems(data)}
    assert {"spec.id", "spec.run.argv", "spec.extra"} <= paths


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (b"{not json", "malformed JSON"),
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b"a: [1, 2", "malformed YAML"),
        (b"spec: 1\nspec: 2\n", "duplicate key 'spec'"),
        (b"\xff\xfe", "not valid UTF-8"),
        (b"- a\n- b\n", "must be a mapping"),
        (b"", "must be a mapping"),
        (b"!!python/object:os.system {}", "malformed YAML"),
    ],
)
def test_malformed_input_is_a_typed_error(text: bytes, needle: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        validate_document(parse_document(text, "doc.yaml"))
    assert needle in str(info.value)


def test_symlinked_document_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.yaml"
    real.write_text(json.dumps(doc()))
    link = tmp_path / "link.yaml"
    link.symlink_to(real)
    with pytest.raises(InvalidSpec, match="symlink"):
        load_document(str(link))
    assert load_document(str(real)).spec.id == "cell-1"


def test_oversized_and_special_files_are_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (MAX_DOCUMENT_BYTES + 1))
    with pytest.raises(InvalidSpec, match="larger than"):
        load_document(str(big))
    with pytest.raises(InvalidSpec, match="not a regular file"):
        load_document(str(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InvalidSpec, match="not a regular file"):
        load_document(str(fifo))  # must not block waiting for a writer
    with pytest.raises(InvalidSpec, match="cannot open"):
        load_document(str(tmp_path / "missing.yaml"))


def test_stdin_document() -> None:
    cell = load_document("-", io.BytesIO(json.dumps(doc("from-stdin")).encode()))
    assert cell.spec.id == "from-stdin"
