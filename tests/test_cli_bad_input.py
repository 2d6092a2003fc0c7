"""Bad input through the real CLIs: a typed ``error: <path>: <reason>``, and nothing else.

Acceptance point: malformed YAML/JSON, unknown keys, wrong types, an invalid id, an empty argv,
unsafe artifact names and bad environment configuration give ``error: <path>: <reason>`` on
stderr and exit status 2; no workload is started and nothing is left behind (no export
directory, no cgroup leaf, no tracked cell, no event log). The symlink at the export destination
and the missing secret are covered in ``test_supervisor.py``.

Every document below is valid except for the one thing under test, and its workload is
``/bin/touch <marker>``. The marker shows a run on a backend that shares the host's ``/tmp``;
an isolating backend hides it, so the empty event log is the check that holds everywhere
(the control tests show that a valid run does write events, and on ``stub`` the marker).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cellos.core.loading import load_document
from tests.conftest import (
    REPO,
    CliResult,
    base_env,
    doc,
    read_events,
    require_host,
    short_types,
    write_doc,
)

Run = Callable[..., CliResult]

#: One problem per line: ``error: <path>: <reason>`` (the paths used here contain no colon).
ERROR_LINE = re.compile(r"^error: [^:]+: .+")
#: Stands for the document's own file name in an expected path (file-level problems).
FILE = "<file>"

Document = dict[str, Any] | str | bytes


# -- the sandbox every run happens in ----------------------------------------------------------


CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_dirs(name: str) -> list[Path]:
    """Every directory called ``name`` at the top of any cgroup hierarchy (v1, v2, hybrid)."""
    return [p for p in (CGROUP_ROOT / name, *CGROUP_ROOT.glob(f"*/{name}")) if p.is_dir()]


def _cell_leaves(name: str) -> list[str]:
    return [str(leaf) for d in _cgroup_dirs(name) for leaf in d.iterdir() if leaf.is_dir()]


@pytest.fixture
def cgroup_parent() -> Iterator[Path | None]:
    """A fresh cgroup directory for CELLOS_CGROUP_PARENT, removed (with any leaf) afterwards.

    A backend may put the cell's leaves for other controllers under the same name in other
    hierarchies; teardown removes those too (only directories carrying this unique name).
    ``None`` for a user who cannot write cgroups (the cgroup part of the residue check is then
    not run; under CELLOS_REQUIRE_HOST_FEATURES=1 that is a failure).
    """
    parent = CGROUP_ROOT / "pids" / f"cellos-badinput-{uuid.uuid4().hex[:8]}"
    try:
        parent.mkdir()
    except OSError as exc:
        if os.environ.get("CELLOS_REQUIRE_HOST_FEATURES") == "1":
            require_host(False, f"a writable cgroup hierarchy ({exc})")
        yield None
        return
    try:
        yield parent
    finally:
        for directory in _cgroup_dirs(parent.name):
            for leaf in directory.iterdir():
                if leaf.is_dir():
                    with contextlib.suppress(OSError):
                        leaf.rmdir()
            with contextlib.suppress(OSError):
                directory.rmdir()
        assert not parent.exists(), f"could not remove {parent}"


@dataclass
class Sandbox:
    tmp_path: Path
    cgroup_parent: Path | None

    @property
    def marker(self) -> Path:
        return self.tmp_path / "workload-ran"

    @property
    def export_dir(self) -> Path:
        return self.tmp_path / "exports"

    @property
    def state_dir(self) -> Path:
        return self.tmp_path / "state"

    @property
    def events(self) -> Path:
        return self.tmp_path / "events.jsonl"

    def env(self, **extra: str) -> dict[str, str]:
        return base_env(
            self.tmp_path,
            CELLOS_EXPORT_DIR=str(self.export_dir),
            CELL_OS_JSONL_EVENTS=str(self.events),
            **({"CELLOS_CGROUP_PARENT": str(self.cgroup_parent)} if self.cgroup_parent else {}),
            **extra,
        )

    def write(self, document: Document, name: str = "cell.yaml") -> Path:
        path = self.tmp_path / name
        if isinstance(document, bytes):
            path.write_bytes(document)
            return path
        return write_doc(path, document)

    def assert_refused(self, result: CliResult, paths: tuple[str, ...], code: int = 2) -> None:
        """Exit status ``code``, only well-formed error lines, naming every path in ``paths``."""
        assert result.code == code, result
        assert "Traceback" not in result.stderr, result
        assert result.stderr.endswith("\n"), result
        lines = result.stderr[:-1].split("\n")
        for line in lines:
            assert ERROR_LINE.match(line), f"malformed error line {line!r} in {result!r}"
        named = {line.removeprefix("error: ").split(": ", 1)[0] for line in lines}
        for path in paths:
            assert path in named, f"{path!r} not among {sorted(named)}"
        assert result.stdout == "", result

    def assert_no_residue(self) -> None:
        assert not self.marker.exists(), "the workload ran"
        assert not self.export_dir.exists(), "an export directory was created"
        cells = self.state_dir / "cells"
        assert not self.state_dir.exists() or (cells.is_dir() and not any(cells.iterdir())), (
            f"cell state left behind: {sorted(p.name for p in self.state_dir.rglob('*'))}"
        )
        if self.cgroup_parent is not None:
            leaves = _cell_leaves(self.cgroup_parent.name)
            assert leaves == [], f"cgroup leaves left behind: {leaves}"
        assert not self.events.exists() or self.events.read_text() == "", "events were emitted"


@pytest.fixture
def sandbox(tmp_path: Path, cgroup_parent: Path | None) -> Sandbox:
    return Sandbox(tmp_path, cgroup_parent)


# -- the bad documents -------------------------------------------------------------------------


def _valid(marker: str, cell_id: str = "bad-input", **spec: Any) -> dict[str, Any]:
    return doc(cell_id, argv=["/bin/touch", marker], **spec)


def _set(*path: str | int, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        node: Any = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


def _delete(*path: str | int) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        node: Any = data
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return change


def _changed(*changes: Callable[[dict[str, Any]], None], **spec: Any) -> Callable[[str], Document]:
    def build(marker: str) -> Document:
        data = _valid(marker, **spec)
        for change in changes:
            change(data)
        return data

    return build


def _artifact(name: Any) -> Callable[[str], Document]:
    return _changed(export={"artifacts": [{"name": name, "path": "/workspace/out"}]})


def _yaml_text(marker: str, *, spec_lines: str = "") -> str:
    return (
        "apiVersion: cellos.io/v1\nkind: ExecutionCell\nspec:\n  id: bad-input\n"
        f"  run: {{argv: [/bin/touch, {marker}]}}\n{spec_lines}"
    )


def _json_text(marker: str) -> str:
    return json.dumps(_valid(marker))


@dataclass(frozen=True)
class Bad:
    name: str
    build: Callable[[str], Document]
    paths: tuple[str, ...]
    needle: str = ""


BAD_DOCUMENTS = [
    # Malformed YAML / JSON: the problem is the file's, so the path is the file name.
    Bad(
        "yaml-unclosed-flow",
        lambda m: _yaml_text(m).replace("]}", "]"),
        (FILE,),
        "malformed YAML",
    ),
    Bad(
        "yaml-bad-indentation",
        lambda m: _yaml_text(m) + " lifetime: {ttlSeconds: 5}\n",
        (FILE,),
        "malformed YAML",
    ),
    Bad(
        "yaml-tab-indentation",
        lambda m: _yaml_text(m, spec_lines="\tlifetime: {ttlSeconds: 5}\n"),
        (FILE,),
        "malformed YAML",
    ),
    Bad(
        "yaml-duplicate-key",
        lambda m: _yaml_text(m, spec_lines="  id: other\n"),
        (FILE,),
        "duplicate key 'id'",
    ),
    Bad(
        "yaml-python-tag-is-not-executed",
        lambda m: _yaml_text(m, spec_lines=f"  x: !!python/object/apply:os.system ['touch {m}']\n"),
        (FILE,),
        "malformed YAML",
    ),
    # A trailing comma is valid flow-style YAML (and so accepted); a stray one is not.
    Bad("json-stray-comma", lambda m: _json_text(m)[:-1] + ",,}", (FILE,), "malformed JSON"),
    Bad("json-truncated", lambda m: _json_text(m)[:-3], (FILE,), "malformed JSON"),
    Bad(
        "json-duplicate-key",
        lambda m: '{"kind": "ExecutionCell", ' + _json_text(m)[1:],
        (FILE,),
        "duplicate key 'kind'",
    ),
    Bad(
        "json-nan-as-ttl",
        lambda m: json.dumps(_valid(m, lifetime={"ttlSeconds": float("nan")})),
        (FILE,),
        "NaN is not valid JSON",
    ),
    Bad(
        "not-utf8",
        lambda m: b"\xff\xfe" + _yaml_text(m).encode(),
        (FILE,),
        "not valid UTF-8",
    ),
    Bad("empty-file", lambda m: "", ("<document>",), "must be a mapping"),
    Bad("top-level-list", lambda m: f"- /bin/touch\n- {m}\n", ("<document>",), "must be a mapping"),
    Bad("top-level-scalar", lambda m: f"/bin/touch {m}\n", ("<document>",), "must be a mapping"),
    # Unknown keys.
    Bad("unknown-top-level-key", _changed(_set("metadata", value={"name": "x"})), ("metadata",)),
    Bad("unknown-spec-key", _changed(_set("spec", "image", value="alpine")), ("spec.image",)),
    Bad(
        "unknown-run-key",
        _changed(_set("spec", "run", "command", value="x")),
        ("spec.run.command",),
    ),
    Bad(
        "typo-in-egress-rule",
        _changed(authority={"egressRules": [{"hots": "example.com", "port": 443}]}),
        ("spec.authority.egressRules[0].hots",),
    ),
    Bad(
        "unknown-limits-key",
        _changed(run={"limits": {"memoryMax": 1 << 30}}),
        ("spec.run.limits.memoryMax",),
    ),
    # Wrong types (strict: nothing is coerced).
    Bad("ttl-as-string", _changed(lifetime={"ttlSeconds": "600"}), ("spec.lifetime.ttlSeconds",)),
    Bad("timeout-as-float", _changed(run={"timeoutSeconds": 1.5}), ("spec.run.timeoutSeconds",)),
    Bad("timeout-as-bool", _changed(run={"timeoutSeconds": True}), ("spec.run.timeoutSeconds",)),
    Bad("env-value-bool", _changed(run={"env": {"CI": True}}), ("spec.run.env.CI",)),
    Bad(
        "argv-as-string",
        lambda m: _valid(m, run={"argv": f"/bin/touch {m}"}),
        ("spec.run.argv",),
    ),
    Bad(
        "argv-element-int",
        lambda m: _valid(m, run={"argv": ["/bin/touch", m, 3]}),
        ("spec.run.argv[2]",),
    ),
    Bad("id-as-int", lambda m: _yaml_text(m).replace("id: bad-input", "id: 0123"), ("spec.id",)),
    Bad("run-as-list", _changed(_set("spec", "run", value=["/bin/touch"])), ("spec.run",)),
    Bad("spec-null", _changed(_set("spec", value=None)), ("spec",)),
    Bad("wrong-api-version", _changed(_set("apiVersion", value="cellos.io/v2")), ("apiVersion",)),
    Bad("wrong-kind", _changed(_set("kind", value="Pod")), ("kind",)),
    Bad("missing-kind", _changed(_delete("kind")), ("kind",)),
    Bad("zero-ttl", _changed(lifetime={"ttlSeconds": 0}), ("spec.lifetime.ttlSeconds",)),
    Bad(
        "timeout-above-ttl",
        _changed(lifetime={"ttlSeconds": 5}, run={"timeoutSeconds": 6}),
        ("spec",),
        "must be <= lifetime.ttlSeconds",
    ),
    Bad(
        "port-out-of-range",
        _changed(authority={"egressRules": [{"host": "example.com", "port": 70000}]}),
        ("spec.authority.egressRules[0].port",),
    ),
    Bad(
        "unknown-secret-delivery",
        _changed(run={"secretDelivery": "file"}),
        ("spec.run.secretDelivery",),
    ),
    Bad(
        "relative-workdir",
        _changed(run={"workingDirectory": "work"}),
        ("spec.run.workingDirectory",),
    ),
    Bad(
        "dotdot-workdir",
        _changed(run={"workingDirectory": "/workspace/../etc"}),
        ("spec.run.workingDirectory",),
    ),
    Bad("bad-env-name", _changed(run={"env": {"1BAD": "x"}}), ("spec.run.env",)),
    # Invalid ids (the id becomes a directory, a cgroup and a subject token).
    *(
        Bad(f"id-{label}", _changed(_set("spec", "id", value=value)), ("spec.id",))
        for label, value in [
            ("dotdot-escape", "../escape"),
            ("inner-dotdot", "a..b"),
            ("slash", "a/b"),
            ("leading-dash", "-rf"),
            ("leading-dot", ".hidden"),
            ("empty", ""),
            ("space", "has space"),
            ("newline", "cell\n"),
            ("too-long", "x" * 129),
        ]
    ),
    # Empty argv.
    Bad("argv-empty", lambda m: _valid(m, run={"argv": []}), ("spec.run.argv",)),
    Bad("argv-empty-program", lambda m: _valid(m, run={"argv": ["", m]}), ("spec.run.argv[0]",)),
    Bad(
        "argv-nul",
        lambda m: _valid(m, run={"argv": ["/bin/touch", m + "\0x"]}),
        ("spec.run.argv[1]",),
    ),
    # Artifact names are single safe file names.
    *(
        Bad(f"artifact-{label}", _artifact(name), ("spec.export.artifacts[0].name",))
        for label, name in [
            ("parent", "../x"),
            ("subdir", "a/b"),
            ("absolute", "/etc/passwd"),
            ("dotdot", ".."),
            ("dot", "."),
            ("backslash", "a\\b"),
            ("tilde", "~root"),
            ("empty", ""),
            ("nul", "a\0b"),
            ("newline", "a\nb"),
            ("too-long", "x" * 256),
            ("not-a-string", 7),
        ]
    ),
    Bad(
        "artifact-duplicate-names",
        _changed(
            export={
                "artifacts": [
                    {"name": "out", "path": "/workspace/a"},
                    {"name": "out", "path": "/workspace/b"},
                ]
            }
        ),
        ("spec.export.artifacts",),
    ),
    Bad(
        "artifact-without-path",
        _changed(export={"artifacts": [{"name": "out"}]}),
        ("spec.export.artifacts[0].path",),
    ),
    # Several problems at once: every one is reported, one line each.
    Bad(
        "several-problems",
        lambda m: _valid(m, cell_id="..", run={"argv": []}) | {"extra": 1},
        ("spec.id", "spec.run.argv", "extra"),
    ),
]


def _expected(paths: tuple[str, ...], spec: str) -> tuple[str, ...]:
    return tuple(spec if p == FILE else p for p in paths)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in BAD_DOCUMENTS])
def test_bad_document_is_refused_without_residue(
    case: Bad, sandbox: Sandbox, supervisor_cli: Run
) -> None:
    spec = sandbox.write(case.build(str(sandbox.marker)))
    result = supervisor_cli(str(spec), sandbox.env())
    sandbox.assert_refused(result, _expected(case.paths, str(spec)))
    assert case.needle in result.stderr
    sandbox.assert_no_residue()


STDIN_CASES = ["yaml-unclosed-flow", "json-stray-comma", "unknown-run-key", "id-dotdot-escape"]


@pytest.mark.parametrize("name", STDIN_CASES)
def test_bad_document_on_stdin_is_refused_without_residue(
    name: str, sandbox: Sandbox, supervisor_cli: Run
) -> None:
    case = next(c for c in BAD_DOCUMENTS if c.name == name)
    document = case.build(str(sandbox.marker))
    text = document if isinstance(document, str) else json.dumps(document)
    assert isinstance(text, str)
    result = supervisor_cli("-", sandbox.env(), stdin=text)
    sandbox.assert_refused(result, _expected(case.paths, "<stdin>"))
    assert case.needle in result.stderr
    sandbox.assert_no_residue()


def test_the_documents_are_otherwise_valid_and_the_harness_sees_a_run(
    sandbox: Sandbox, supervisor_cli: Run
) -> None:
    """Control: the base document runs, so each refusal above is due to its one defect.

    An isolating backend hides the host's /tmp from the workload, so there the marker cannot
    show a run; the event log can (and an empty log is what the refusals above assert).
    """
    spec = sandbox.write(_valid(str(sandbox.marker)))
    assert load_document(str(spec)).spec.id == "bad-input"
    result = supervisor_cli(str(spec), sandbox.env())
    assert "Traceback" not in result.stderr, result
    events = read_events(sandbox.events)
    types = short_types(events)
    assert "observability.v1.process_spawned" in types, result
    completed = next(e for e in events if e["type"].endswith("command.v1.completed"))
    assert completed["data"]["spawnError"] is None, completed
    if sandbox.cgroup_parent is not None:
        assert _cell_leaves(sandbox.cgroup_parent.name) == []
    assert list((sandbox.state_dir / "cells").iterdir()) == []


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_the_marker_shows_a_run_on_the_host(
    source: str, sandbox: Sandbox, supervisor_cli: Run
) -> None:
    """Control: on the stub backend (host paths) the workload really creates the marker."""
    document = json.dumps(_valid(str(sandbox.marker)))
    env = sandbox.env(CELLOS_CELL_BACKEND="stub")
    if source == "file":
        result = supervisor_cli(str(sandbox.write(document)), env)
    else:
        result = supervisor_cli("-", env, stdin=document)
    assert result.code == 0, result
    assert sandbox.marker.exists()


def test_nonexistent_file(sandbox: Sandbox, supervisor_cli: Run) -> None:
    missing = sandbox.tmp_path / "no-such-cell.yaml"
    result = supervisor_cli(str(missing), sandbox.env())
    sandbox.assert_refused(result, (str(missing),))
    assert "cannot open" in result.stderr
    sandbox.assert_no_residue()


def test_directory_as_spec(sandbox: Sandbox, supervisor_cli: Run) -> None:
    result = supervisor_cli(str(sandbox.tmp_path), sandbox.env())
    sandbox.assert_refused(result, (str(sandbox.tmp_path),))
    assert "not a regular file" in result.stderr
    sandbox.assert_no_residue()


def test_symlinked_spec_file_is_not_followed(sandbox: Sandbox, supervisor_cli: Run) -> None:
    real = sandbox.write(_valid(str(sandbox.marker)), "real.yaml")
    assert load_document(str(real)).spec.id == "bad-input"
    link = sandbox.tmp_path / "link.yaml"
    link.symlink_to(real)
    result = supervisor_cli(str(link), sandbox.env())
    sandbox.assert_refused(result, (str(link),))
    assert "symlink" in result.stderr
    sandbox.assert_no_residue()


# -- bad environment configuration -------------------------------------------------------------

#: Distinctive bad key texts: none of them may ever be echoed.
BAD_KEYS = {
    "standard-alphabet": "Zm9vYmFy+c2VjcmV0/S0VZLVRFWFQtMTIzNDU2Nzg5MA",
    "garbage": "not-a-key!!-SECRET-KEY-TEXT-0123456789",
    "short": base64.urlsafe_b64encode(b"SECRET-KEY-15-b").decode().rstrip("="),
    "long-seed": base64.urlsafe_b64encode(b"SECRET-KEY-" * 4).decode().rstrip("="),
    "non-canonical": "U0VDUkVULUtFWS1YWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFi",
    "padding-wrong": "U0VDUkVULUtFWS1YWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWA=",
}
BAD_SIGNING = [
    pytest.param(alg, key, id=f"{alg}-{label}")
    for alg in ("ed25519", "hmac")
    for label, key in BAD_KEYS.items()
    if not (alg == "hmac" and label in {"long-seed"})  # a long HMAC key is a good key
]


@pytest.mark.parametrize(
    ("config", "path"),
    [
        pytest.param({"CELLOS_CELL_BACKEND": "nonsense"}, "CELLOS_CELL_BACKEND", id="backend"),
        pytest.param(
            {"CELLOS_DEPLOYMENT_PROFILE": "hardened", "CELLOS_CELL_BACKEND": "stub"},
            "CELLOS_CELL_BACKEND",
            id="hardened-refuses-stub",
        ),
        pytest.param(
            {"CELLOS_DEPLOYMENT_PROFILE": "weird"}, "CELLOS_DEPLOYMENT_PROFILE", id="profile"
        ),
        pytest.param({"CELLOS_EVENT_SIGNING": "rsa"}, "CELLOS_EVENT_SIGNING", id="signing-mode"),
        pytest.param(
            {"CELLOS_EVENT_SIGNING": "ed25519", "CELLOS_EVENT_SIGNING_KEY_BASE64": "x" * 43},
            "CELLOS_EVENT_SIGNING_KID",
            id="signing-without-kid",
        ),
        pytest.param({"CELLOS_BROKER": "nonsense"}, "CELLOS_BROKER", id="broker"),
        pytest.param(
            {"CELLOS_DEFAULT_TTL_SECONDS": "0"}, "CELLOS_DEFAULT_TTL_SECONDS", id="default-ttl"
        ),
        # Smaller than one /30 link: no cell with egress authority could ever run.
        pytest.param(
            {"CELLOS_NETWORK_POOL": "10.213.0.0/31"}, "CELLOS_NETWORK_POOL", id="pool-too-small"
        ),
        pytest.param(
            {"CELLOS_NETWORK_POOL": "10.213.0.1/16"}, "CELLOS_NETWORK_POOL", id="pool-host-bits"
        ),
        pytest.param({"CELLOS_NETWORK_POOL": "fd00::/64"}, "CELLOS_NETWORK_POOL", id="pool-ipv6"),
        pytest.param(
            {"CELLOS_INJECTION_UPSTREAM_CA": "/nonexistent/ca.pem"},
            "CELLOS_INJECTION_UPSTREAM_CA",
            id="injection-upstream-ca-missing",
        ),
    ],
)
def test_bad_configuration_is_refused_without_residue(
    config: dict[str, str], path: str, sandbox: Sandbox, supervisor_cli: Run
) -> None:
    spec = sandbox.write(_valid(str(sandbox.marker)))
    result = supervisor_cli(str(spec), sandbox.env(**config))
    sandbox.assert_refused(result, (path,))
    sandbox.assert_no_residue()


@pytest.mark.parametrize(("alg", "key"), BAD_SIGNING)
def test_bad_signing_key_is_refused_and_never_echoed(
    alg: str, key: str, sandbox: Sandbox, supervisor_cli: Run
) -> None:
    spec = sandbox.write(_valid(str(sandbox.marker)))
    env = sandbox.env(
        CELLOS_EVENT_SIGNING=alg,
        CELLOS_EVENT_SIGNING_KID="ops-1",
        CELLOS_EVENT_SIGNING_KEY_BASE64=key,
    )
    result = supervisor_cli(str(spec), env)
    sandbox.assert_refused(result, ("CELLOS_EVENT_SIGNING_KEY_BASE64",))
    for text in (result.stdout, result.stderr):
        assert key not in text
        for fragment in (key[:12], key[-12:]):
            assert fragment not in text
    sandbox.assert_no_residue()


# -- cellos validate / cellos schema -----------------------------------------------------------


def test_validate_good_document(tmp_path: Path, cellos_cli: Run) -> None:
    spec = write_doc(tmp_path / "good.yaml", _valid(str(tmp_path / "ran"), cell_id="good-1"))
    result = cellos_cli(["validate", str(spec)], base_env(tmp_path))
    assert result.code == 0, result
    assert result.stdout == "ok: good-1\n"
    assert result.stderr == ""
    assert not (tmp_path / "ran").exists()
    assert not (tmp_path / "state").exists()


def test_validate_good_document_on_stdin(tmp_path: Path, cellos_cli: Run) -> None:
    text = json.dumps(_valid("/nonexistent/ran", cell_id="stdin-1"))
    result = cellos_cli(["validate", "-"], base_env(tmp_path), stdin=text)
    assert result.code == 0, result
    assert result.stdout == "ok: stdin-1\n"


def test_validate_example(tmp_path: Path, cellos_cli: Run) -> None:
    result = cellos_cli(["validate", str(REPO / "examples" / "hello.yaml")], base_env(tmp_path))
    assert result.code == 0, result
    assert result.stdout == "ok: hello\n"


@pytest.mark.parametrize(
    "name", ["json-truncated", "unknown-spec-key", "artifact-parent", "several-problems"]
)
def test_validate_bad_document(name: str, tmp_path: Path, cellos_cli: Run) -> None:
    case = next(c for c in BAD_DOCUMENTS if c.name == name)
    marker = tmp_path / "ran"
    document = case.build(str(marker))
    assert not isinstance(document, bytes)
    spec = write_doc(tmp_path / "bad.yaml", document)
    result = cellos_cli(["validate", str(spec)], base_env(tmp_path))
    assert result.code == 2, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines and all(ERROR_LINE.match(line) for line in lines), result
    named = {line.removeprefix("error: ").split(": ", 1)[0] for line in lines}
    assert set(_expected(case.paths, str(spec))) <= named
    assert not marker.exists()


def test_validate_nonexistent_file(tmp_path: Path, cellos_cli: Run) -> None:
    missing = tmp_path / "missing.yaml"
    result = cellos_cli(["validate", str(missing)], base_env(tmp_path))
    assert result.code == 2, result
    assert result.stderr.startswith(f"error: {missing}: cannot open")


@pytest.fixture
def schema(tmp_path: Path, cellos_cli: Run) -> dict[str, Any]:
    result = cellos_cli(["schema"], base_env(tmp_path))
    assert result.code == 0, result
    assert result.stderr == ""
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def test_schema_is_a_json_schema_of_the_document(schema: dict[str, Any]) -> None:
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    assert {"apiVersion", "kind", "spec"} <= set(schema["properties"])
    assert set(schema["required"]) == {"apiVersion", "kind", "spec"}
    assert schema["additionalProperties"] is False


def test_schema_accepts_the_example_and_rejects_unknown_keys(schema: dict[str, Any]) -> None:
    validator = jsonschema.validators.validator_for(schema)(schema)
    example = yaml.safe_load((REPO / "examples" / "hello.yaml").read_text(encoding="utf-8"))
    assert list(validator.iter_errors(example)) == []
    for where in (example, example["spec"], example["spec"]["run"]):
        where["unexpected"] = 1
        errors = list(validator.iter_errors(example))
        assert errors and all("unexpected" in e.message for e in errors)
        del where["unexpected"]
    assert list(validator.iter_errors(example)) == []


def test_schema_rejects_wrong_types(schema: dict[str, Any]) -> None:
    validator = jsonschema.validators.validator_for(schema)(schema)
    for build in (
        _changed(lifetime={"ttlSeconds": "600"}),
        _changed(run={"argv": "/bin/true"}),
        _changed(run={"env": {"CI": True}}),
        _changed(_set("kind", value="Pod")),
        _changed(_delete("spec", "id")),
    ):
        bad = build("/x")
        assert list(validator.iter_errors(bad)), bad


# -- inputs PyYAML or the model mishandle unless the loader guards against them -----------------

#: ``error: <path>: <reason>`` where a key that needs it is quoted as ``["..."]`` in the path.
QUOTED_ERROR_LINE = re.compile(r'^error: (?:[^:\s\[\]]|\[\d+\]|\["(?:[^"\\]|\\.)*"\])+: .+$')


@pytest.mark.parametrize(
    "spec_lines",
    [
        pytest.param("  x: 2024-13-01\n", id="impossible-date"),
        pytest.param("  x: 2024-02-30 10:00:00\n", id="impossible-timestamp"),
        pytest.param("  x: " + "1" * 5000 + "\n", id="int-over-4300-digits"),
        pytest.param("  x: !!int ''\n", id="empty-int-tag"),
        pytest.param("  x: !!bool maybe\n", id="bool-tag"),
        pytest.param("  x: !!timestamp soon\n", id="timestamp-tag"),
        pytest.param("  x: {[a]: 1}\n", id="unhashable-flow-key"),
        pytest.param("  ? [a, b]\n  : 1\n", id="unhashable-block-key"),
        pytest.param("  x: !!map [1]\n", id="map-tag-on-sequence"),
        pytest.param("  x: a\x01b\n", id="control-character"),
    ],
)
def test_yaml_pyyaml_cannot_construct_is_an_input_error(
    spec_lines: str, sandbox: Sandbox, supervisor_cli: Run
) -> None:
    """PyYAML raises plain ValueError/TypeError/KeyError/... (or a two-line ReaderError) here."""
    spec = sandbox.write(_yaml_text(str(sandbox.marker), spec_lines=spec_lines))
    result = supervisor_cli(str(spec), sandbox.env())
    sandbox.assert_refused(result, (str(spec),))
    assert "malformed YAML" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    sandbox.assert_no_residue()


@pytest.mark.parametrize(
    "key",
    ["x\ny", "x\rerror: spec.id: forged", "\x1b[2Jx", "a: b", "", "a.b", "x\u2028y"],
    ids=["newline", "forged-line", "ansi-escape", "colon", "empty", "dot", "line-separator"],
)
def test_unknown_key_is_quoted_in_a_one_line_error(
    key: str, sandbox: Sandbox, supervisor_cli: Run
) -> None:
    data = _valid(str(sandbox.marker))
    data["spec"]["run"][key] = 1
    spec = sandbox.write(json.dumps(data))
    result = supervisor_cli(str(spec), sandbox.env())
    assert result.code == 2, result
    lines = result.stderr.split("\n")
    assert lines[-1] == "" and len(lines) == 2, result
    assert QUOTED_ERROR_LINE.match(lines[0]), lines[0]
    assert lines[0].startswith("error: spec.run"), lines[0]
    assert lines[0].isascii() and lines[0].isprintable(), lines[0]
    sandbox.assert_no_residue()


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda d: d.update(api_version=d.pop("apiVersion")), "api_version"),
        (lambda d: d["spec"]["run"].update(working_directory="/elsewhere"), "working_directory"),
        (lambda d: d["spec"].update(lifetime={"ttl_seconds": 5}), "ttl_seconds"),
    ],
    ids=["api_version", "working_directory", "ttl_seconds"],
)
def test_snake_case_field_names_are_unknown_keys(
    change: Callable[[dict[str, Any]], None], path: str, sandbox: Sandbox, supervisor_cli: Run
) -> None:
    """The document's keys are camelCase only (as the schema says); the models' Python field
    names are not a second spelling."""
    data = _valid(str(sandbox.marker))
    change(data)
    spec = sandbox.write(data)
    result = supervisor_cli(str(spec), sandbox.env())
    sandbox.assert_refused(result, ())
    assert path in result.stderr
    sandbox.assert_no_residue()


def test_flow_style_yaml_document_is_read_as_yaml(tmp_path: Path, cellos_cli: Run) -> None:
    text = (
        "{apiVersion: cellos.io/v1, kind: ExecutionCell,\n"
        " spec: {id: flow, run: {argv: [/bin/true]}}}\n"
    )
    assert cellos_cli(["validate", "-"], base_env(tmp_path), stdin="---\n" + text).code == 0
    result = cellos_cli(["validate", "-"], base_env(tmp_path), stdin=text)
    assert result.code == 0, result
    assert result.stdout == "ok: flow\n"


#: ``"\ud800"`` in JSON (or YAML) is a lone surrogate: not Unicode text, not encodable as UTF-8.
SURROGATE_DOCUMENT = (
    '{"apiVersion": "cellos.io/v1", "kind": "ExecutionCell", "spec": {"id": "surrogate", '
    '"run": {"argv": ["/bin/touch", "MARKER"]}, "correlation": {"platform": "\\ud800"}}}'
)


def test_lone_surrogate_is_an_input_error_for_the_supervisor(
    sandbox: Sandbox, supervisor_cli: Run
) -> None:
    spec = sandbox.write(SURROGATE_DOCUMENT.replace("MARKER", str(sandbox.marker)))
    result = supervisor_cli(str(spec), sandbox.env())
    sandbox.assert_refused(result, ())
    sandbox.assert_no_residue()


def test_lone_surrogate_is_refused_by_validate(tmp_path: Path, cellos_cli: Run) -> None:
    result = cellos_cli(["validate", "-"], base_env(tmp_path), stdin=SURROGATE_DOCUMENT)
    assert result.code == 2, result
    assert ERROR_LINE.match(result.stderr), result
