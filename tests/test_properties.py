"""Property tests: whatever the document, the answer is ``ok: <id>`` or typed errors.

Random bytes, random JSON-able trees, YAML-ish token soup and a valid document mutated at
random paths go through ``cellos validate`` in-process; the contract is exit status 0 with
``ok: <id>`` or exit status 2 with one ``error: <path>: <reason>`` line per problem, and never
an exception. Mutated documents also go through the supervisor (stub backend, ``/bin/true``).
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cellos import cli
from cellos.core.errors import InvalidSpec
from cellos.core.loading import parse_document, validate_document
from cellos.core.spec import CELL_ID_RE, json_schema
from cellos.supervisor.cli import run_spec

#: One problem per line. A path is dotted names, ``[<index>]`` and ``["<json string>"]`` for a
#: key that is not a plain name; the reason is the rest of the line.
ERROR_LINE = re.compile(r'^error: (?:[^:\s\[\]]|\[\d+\]|\["(?:[^"\\]|\\.)*"\])+: \S.*$')

VALIDATE_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SUPERVISOR_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- strategies ------------------------------------------------------------------------------

#: Values the validators care about, drawn more often than chance would.
INTERESTING = st.sampled_from(
    [
        "",
        ".",
        "..",
        "../x",
        "a/b",
        "/",
        "/workspace",
        "/workspace/../etc",
        "~x",
        "*",
        "*.example.com",
        "a\x00b",
        "a\nb",
        "0.0.0.0/0",
        "10.0.0.1/24",
        "::1",
        "10.0.0.2:53",
        "[::1]:53",
        "tcp",
        "udp",
        "env",
        "runtimeBroker",
        "runtimeLeasedBroker",
        "cellos.io/v1",
        "ExecutionCell",
        "x" * 300,
        0,
        -1,
        1,
        65536,
        2**31,
        2**63,
        10**20,
        0.5,
        1.0,
        float("inf"),
        True,
        False,
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=16)
    | INTERESTING
)
KEYS = st.text(max_size=10) | st.sampled_from(
    ["id", "run", "argv", "spec", "apiVersion", "kind", "name", "path", "env", "api_version"]
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=12,
)
FORMATS = st.sampled_from(["json", "yaml", "yaml-flow"])

API_HEADER = {"apiVersion": "cellos.io/v1", "kind": "ExecutionCell"}

#: Every field of the document (DESIGN.md §2), valid as a whole.
FULL_BASE: dict[str, Any] = {
    **API_HEADER,
    "spec": {
        "id": "prop-1",
        "correlation": {
            "platform": "github-actions",
            "externalRunId": "123",
            "externalJobId": "build",
            "tenantId": "acme",
            "labels": {"repo": "acme/app"},
        },
        "authority": {
            "secretRefs": ["npm-token"],
            "egressRules": [
                {"host": "registry.npmjs.org", "port": 443, "protocol": "tcp"},
                {"cidr": "10.0.0.0/24", "port": 5432, "protocol": "tcp"},
            ],
            "dnsAuthority": {
                "hostnameAllowlist": ["registry.npmjs.org", "*.github.com"],
                "resolvers": [
                    {"resolverId": "corp", "protocol": "do53-udp", "address": "10.0.0.2:53"}
                ],
            },
        },
        "lifetime": {"ttlSeconds": 600},
        "run": {
            "argv": ["/bin/true", "ci"],
            "workingDirectory": "/workspace",
            "env": {"CI": "true"},
            "secretDelivery": "env",
            "timeoutSeconds": 300,
            "limits": {
                "memoryMaxBytes": 536870912,
                "pidsMax": 256,
                "cpuMax": {"quotaMicros": 50000, "periodMicros": 100000},
                "gracefulShutdownSeconds": 5,
            },
        },
        "export": {"artifacts": [{"name": "report.json", "path": "/workspace/out/report.json"}]},
        "policy": {"packId": "baseline", "packVersion": "1.0.0"},
        "placement": {"poolId": "pool-a", "queueName": "default"},
    },
}

#: What the supervisor property runs: no secret (the memory broker has none) and no limits.
RUN_BASE: dict[str, Any] = {
    **API_HEADER,
    "spec": {
        "id": "prop-run",
        "correlation": {"platform": "local", "labels": {"k": "v"}},
        "authority": {"egressRules": [{"host": "example.com", "port": 443}]},
        "lifetime": {"ttlSeconds": 60},
        "run": {"argv": ["/bin/true"], "env": {"A": "b"}, "timeoutSeconds": 30},
        "export": {"artifacts": [{"name": "out.txt", "path": "/workspace/out.txt"}]},
        "policy": {"packId": "baseline", "packVersion": "1"},
    },
}


def _locations(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _locations(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _locations(value, (*prefix, index))


def _at(node: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        node = node[part]
    return node


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any], max_edits: int = 3) -> Any:
    """``base`` with one to ``max_edits`` random edits: replace a value, delete one, add one."""
    data: Any = copy.deepcopy(base)
    for _ in range(draw(st.integers(min_value=1, max_value=max_edits))):
        path = draw(st.sampled_from(list(_locations(data))))
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        node = _at(data, path)
        if op == "add" and isinstance(node, dict):
            node[draw(KEYS)] = draw(JSON_VALUES)
        elif op == "add" and isinstance(node, list):
            node.insert(draw(st.integers(min_value=0, max_value=len(node))), draw(JSON_VALUES))
        elif not path:
            data = draw(JSON_VALUES)
        elif op == "delete":
            del _at(data, path[:-1])[path[-1]]
        else:
            _at(data, path[:-1])[path[-1]] = draw(JSON_VALUES)
    return data


NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,24}", fullmatch=True).filter(
    lambda name: ".." not in name
)
ENV_NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,24}", fullmatch=True)
#: Any text without NUL (the one character no string field accepts) and without lone
#: surrogates (not Unicode text; see test_cli_bad_input.py::test_lone_surrogate_*).
TEXT = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=16)


@st.composite
def valid_run_documents(draw: st.DrawFn) -> dict[str, Any]:
    """Valid documents whose workload is ``/bin/true``, with a random choice of optional parts."""
    ttl = draw(st.integers(min_value=1, max_value=3600))
    run: dict[str, Any] = {"argv": ["/bin/true"]}
    spec: dict[str, Any] = {"id": draw(NAMES), "run": run}
    if draw(st.booleans()):
        spec["lifetime"] = {"ttlSeconds": ttl}
        if draw(st.booleans()):
            run["timeoutSeconds"] = draw(st.integers(min_value=1, max_value=ttl))
    if draw(st.booleans()):
        run["env"] = draw(st.dictionaries(ENV_NAMES, TEXT, max_size=4))
    if draw(st.booleans()):
        run["workingDirectory"] = draw(st.sampled_from(["/workspace", "/work/dir", "/w s/ü"]))
    if draw(st.booleans()):
        run["limits"] = {"gracefulShutdownSeconds": draw(st.integers(min_value=0, max_value=300))}
    if draw(st.booleans()):
        spec["correlation"] = {
            "platform": draw(TEXT),
            "labels": draw(st.dictionaries(TEXT, TEXT, max_size=3)),
        }
    if draw(st.booleans()):
        port = draw(st.integers(min_value=1, max_value=65535))
        spec["authority"] = {"egressRules": [{"cidr": "10.0.0.0/8", "port": port}]}
    if draw(st.booleans()):
        spec["export"] = {"artifacts": [{"name": draw(NAMES), "path": "/workspace/out"}]}
    if draw(st.booleans()):
        spec["policy"] = {"packId": draw(TEXT), "packVersion": draw(TEXT)}
    return {**API_HEADER, "spec": spec}


def _serialize(data: Any, fmt: str) -> bytes:
    if fmt == "json":
        return json.dumps(data).encode()
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=fmt == "yaml-flow")
    # A document starting with '{' is read as JSON, so flow-style YAML gets a start marker.
    return (f"---\n{text}" if fmt == "yaml-flow" else text).encode()


#: Pieces of YAML and JSON syntax (and of the document) for token soup.
TOKENS = st.sampled_from(
    [
        "apiVersion: cellos.io/v1\n",
        "kind: ExecutionCell\n",
        "spec:\n",
        "  id: soup\n",
        "  run:\n",
        "    argv: [/bin/true]\n",
        "  export: {artifacts: [{name: a, path: /workspace/a}]}\n",
        "\n",
        "  ",
        "\t",
        "- ",
        ": ",
        "? ",
        ", ",
        "{",
        "}",
        "[",
        "]",
        '"',
        "'",
        "\\",
        "#",
        "&a ",
        "*a",
        "<<: ",
        "!!str ",
        "!!int ",
        "!!float ",
        "!!bool ",
        "!!binary ",
        "!!timestamp ",
        "!!set ",
        "!!map ",
        "!!seq ",
        "!!omap ",
        "!!python/object:os.system ",
        "!local ",
        "%YAML 1.1\n",
        "%TAG ! tag:x,2000:\n",
        "---\n",
        "...\n",
        "|\n",
        ">-\n",
        "null",
        "~",
        "true",
        "yes",
        "0x1F",
        "0o17",
        "0b101",
        "1_000",
        "1:30",
        "1e400",
        ".nan",
        "2024-13-01",
        "2024-02-30 25:61:61",
        "2024-01-01T00:00:00+25:00",
        "9" * 5000,
        "\x00",
        "\x85",
        "\u2028",
        "\ufeff",
    ]
)
SOUP = st.lists(TOKENS | st.text(max_size=4), max_size=25).map(lambda parts: "".join(parts))

# -- checks ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema_validator() -> Any:
    schema = json_schema()
    return jsonschema.validators.validator_for(schema)(schema)


def _check_errors(err: str) -> None:
    assert err.endswith("\n"), err
    for line in err[:-1].split("\n"):
        assert ERROR_LINE.match(line), f"malformed error line {line!r}"
        assert line.isprintable(), f"unprintable error line {line!r}"


def _validate(data: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str | None:
    """Run ``cellos validate``; check the output contract; return the id when valid."""
    path = tmp_path / "doc.yaml"
    path.write_bytes(data)
    capsys.readouterr()
    code = cli.main(["validate", str(path)])  # any exception fails the test
    out, err = capsys.readouterr()
    assert code in (0, 2), (code, out, err)
    if code == 2:
        assert out == ""
        _check_errors(err)
        return None
    assert err == ""
    match = re.fullmatch(r"ok: (.+)\n", out)
    assert match and CELL_ID_RE.fullmatch(match[1]) and ".." not in match[1], out
    return match[1]


# -- properties: cellos validate -------------------------------------------------------------


@VALIDATE_SETTINGS
@given(data=st.binary(max_size=400) | st.text(max_size=200).map(str.encode))
def test_random_bytes(data: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _validate(data, tmp_path, capsys)


@VALIDATE_SETTINGS
@given(text=SOUP)
def test_yaml_token_soup(text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _validate(text.encode(), tmp_path, capsys)


@VALIDATE_SETTINGS
@given(
    tree=JSON_VALUES
    | JSON_VALUES.map(lambda t: {**API_HEADER, "spec": t})
    | JSON_VALUES.map(lambda t: {**API_HEADER, "spec": {"id": "tree", "run": t}}),
    fmt=FORMATS,
)
def test_random_trees(
    tree: Any, fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _validate(_serialize(tree, fmt), tmp_path, capsys)


@VALIDATE_SETTINGS
@given(document=mutated(FULL_BASE), fmt=FORMATS)
def test_mutated_documents(
    document: Any,
    fmt: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    schema_validator: Any,
) -> None:
    data = _serialize(document, fmt)
    cell_id = _validate(data, tmp_path, capsys)
    if cell_id is not None:
        # What the model accepts, the published JSON Schema accepts too.
        parsed = parse_document(data, "doc")
        assert list(schema_validator.iter_errors(parsed)) == []
        assert parsed["spec"]["id"] == cell_id


@VALIDATE_SETTINGS
@given(document=valid_run_documents(), fmt=FORMATS)
def test_valid_documents_are_ok(
    document: dict[str, Any],
    fmt: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    schema_validator: Any,
) -> None:
    assert _validate(_serialize(document, fmt), tmp_path, capsys) == document["spec"]["id"]
    assert list(schema_validator.iter_errors(document)) == []


def test_the_bases_are_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for base, cell_id in ((FULL_BASE, "prop-1"), (RUN_BASE, "prop-run")):
        for fmt in ("json", "yaml", "yaml-flow"):
            assert _validate(_serialize(base, fmt), tmp_path, capsys) == cell_id


# -- property: the supervisor ----------------------------------------------------------------


def _with_true_argv(document: Any) -> Any:
    """A valid document's workload is always ``/bin/true``, whatever the mutation did."""
    try:
        validate_document(document)
    except InvalidSpec:
        return document
    fixed = copy.deepcopy(document)
    if isinstance(fixed["spec"].get("run"), dict):  # a cell without a workload is valid too
        fixed["spec"]["run"]["argv"] = ["/bin/true"]
    return fixed


@SUPERVISOR_SETTINGS
@given(
    document=st.one_of(
        valid_run_documents(),
        valid_run_documents().flatmap(lambda d: mutated(d, max_edits=1)),
        mutated(RUN_BASE),
    ).map(_with_true_argv),
    fmt=FORMATS,
)
def test_supervisor_on_mutated_documents(
    document: Any,
    fmt: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in list(os.environ):
        if name.startswith(("CELLOS_", "CELL_OS_")):
            monkeypatch.delenv(name)  # nothing of the runner's configuration leaks in
    monkeypatch.setenv("CELL_OS_USE_NOOP_SINK", "1")
    monkeypatch.setenv("CELLOS_CELL_BACKEND", "stub")
    monkeypatch.setenv("CELLOS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CELLOS_EXPORT_DIR", str(tmp_path / "exports"))
    try:
        valid = validate_document(document)
    except InvalidSpec:
        valid = None
    path = tmp_path / "doc.yaml"
    path.write_bytes(_serialize(document, fmt))
    capsys.readouterr()
    code = run_spec(str(path))  # any exception fails the test
    out, err = capsys.readouterr()
    assert isinstance(code, int)
    event(f"{'valid' if valid else 'invalid'} document, exit status {code}")
    if valid is None:
        assert code == 2, (code, err)
        _check_errors(err)
        return
    spec = valid.spec
    # A cell without a workload is created, exports and is destroyed (the seed contract).
    assert spec.run is None or spec.run.argv == ["/bin/true"]
    assert out == ""  # /bin/true prints nothing
    # /bin/true succeeds; only what the lifecycle refuses or cannot do fails the run.
    if spec.run is not None and spec.run.secrets_as_files and spec.authority.secret_refs:
        expected = {2}  # the stub backend cannot deliver secrets as files
    elif spec.authority.secret_refs:
        expected = {1}  # the memory broker holds no secret
    elif spec.artifacts:
        expected = {0, 1}  # the stub exports host paths; these normally do not exist
    else:
        expected = {0}
    assert code in expected, (code, err)
    if code == 0:
        assert err == ""
    else:
        _check_errors(err)
