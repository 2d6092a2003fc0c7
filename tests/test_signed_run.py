"""A signed run's JSONL verifies with ``cellos events verify``; any single-line change fails."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, CliResult, base_env, doc, write_doc

Run = Callable[..., CliResult]


@pytest.fixture
def signed_run(
    tmp_path: Path, supervisor_cli: Run, cellos_cli: Run
) -> tuple[Path, Path, list[str]]:
    env = base_env(tmp_path)
    keygen = cellos_cli(["keygen", "--kid", "ci-key", "--out-dir", str(tmp_path / "keys")], env)
    assert keygen.code == 0, keygen
    key = (tmp_path / "keys" / "ci-key.key").read_text().strip()
    events = tmp_path / "events.jsonl"
    env.update(
        CELLOS_EVENT_SIGNING="ed25519",
        CELLOS_EVENT_SIGNING_KID="ci-key",
        CELLOS_EVENT_SIGNING_KEY_BASE64=key,
        CELL_OS_JSONL_EVENTS=str(events),
        CELLOS_EXPORT_DIR=str(tmp_path / "x"),
    )
    spec = write_doc(
        tmp_path / "c.yaml",
        doc(
            "signed-1",
            argv=["/bin/sh", "-c", "echo hi > a.txt"],
            export={"artifacts": [{"name": "a.txt", "path": "/workspace/a.txt"}]},
        ),
    )
    result = supervisor_cli(str(spec), env)
    assert result.code == 0, result
    assert key not in result.stdout + result.stderr + events.read_text()
    return events, tmp_path / "keys" / "ci-key.verify-keys.json", events.read_text().splitlines()


def verify(cellos_cli: Run, path: Path, keys: Path) -> CliResult:
    return cellos_cli(
        ["events", "verify", str(path), "--keys", str(keys)], {"PATH": "/usr/bin:/bin"}
    )


def test_signed_run_verifies(
    signed_run: tuple[Path, Path, list[str]], cellos_cli: Run, cloudevents_validator: Any
) -> None:
    events, keys, lines = signed_run
    result = verify(cellos_cli, events, keys)
    assert result.code == 0, result
    assert result.stdout.startswith(f"ok: {len(lines)} events in 1 run(s), signed")
    for line in lines:
        envelope = json.loads(line)
        assert envelope["type"] == "dev.cellos.events.signed_envelope.v1"
        assert envelope["data"]["alg"] == "ed25519" and envelope["data"]["kid"] == "ci-key"
        cloudevents_validator.validate(envelope)
        cloudevents_validator.validate(envelope["data"]["event"])


def _edit(line: str) -> str:
    envelope = json.loads(line)
    envelope["data"]["event"]["data"]["cellId"] = "someone-else"
    return json.dumps(envelope)


@pytest.mark.parametrize("change", ["delete", "swap", "edit"])
def test_any_single_line_change_fails_and_names_the_line(
    signed_run: tuple[Path, Path, list[str]], cellos_cli: Run, tmp_path: Path, change: str
) -> None:
    _, keys, lines = signed_run
    for index in range(len(lines)):
        changed = list(lines)
        if change == "delete":
            del changed[index]
            # Deleting the last line leaves a run without its summary: the run's new last line.
            expected_line = index + 1 if index < len(lines) - 1 else len(lines) - 1
        elif change == "swap":
            if index == len(lines) - 1:
                continue
            changed[index], changed[index + 1] = changed[index + 1], changed[index]
            expected_line = index + 1
        else:
            changed[index] = _edit(changed[index])
            expected_line = index + 1
        path = tmp_path / f"{change}-{index}.jsonl"
        path.write_text("\n".join(changed) + "\n")
        result = verify(cellos_cli, path, keys)
        assert result.code == 1, (change, index, result)
        assert result.stderr.startswith(f"error: {path}:{expected_line}: "), (change, index, result)


def test_wrong_key_fails(
    signed_run: tuple[Path, Path, list[str]], cellos_cli: Run, tmp_path: Path
) -> None:
    events, _, _ = signed_run
    other = cellos_cli(
        ["keygen", "--kid", "ci-key", "--out-dir", str(tmp_path / "other")],
        {"PATH": "/usr/bin:/bin"},
    )
    assert other.code == 0
    result = verify(cellos_cli, events, tmp_path / "other" / "ci-key.verify-keys.json")
    assert result.code == 1 and ":1: " in result.stderr


def test_example_document_runs(tmp_path: Path, supervisor_cli: Run) -> None:
    env = base_env(tmp_path, CELL_OS_USE_NOOP_SINK="1", CELLOS_EXPORT_DIR=str(tmp_path / "x"))
    result = supervisor_cli(str(REPO / "examples" / "hello.yaml"), env)
    assert result.code == 0, result
    assert result.stdout == "hello from cellos\n"
    assert (tmp_path / "x" / "hello" / "hello.txt").read_text() == "hello from cellos\n"
