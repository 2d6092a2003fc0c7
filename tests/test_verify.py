"""verify_events_file: signatures plus the run chain, over real JSONL files."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from cellos.core import events as ev
from cellos.core.chain import RunChain
from cellos.core.errors import InvalidSpec
from cellos.core.signing import Ed25519Signer, HmacSigner, Signer, VerifyKeys, wrap_signed
from cellos.verify import VerifyReport, verify_events_file
from tests.conftest import CLOUDEVENTS_SCHEMA

SCHEMA_PATH = CLOUDEVENTS_SCHEMA
SIGNER = Ed25519Signer("run-key", bytes(range(32)))
KEYS = VerifyKeys.from_signers(SIGNER)

# The shape of a real run: lifecycle, command, export, evidence, destroyed, summary (last).
RUN_SHAPE: list[tuple[str, dict[str, Any]]] = [
    (ev.LIFECYCLE_STARTED, {"cellId": "c1", "backend": "stub"}),
    (ev.PROCESS_SPAWNED, {"program": "/bin/true", "argc": 1}),
    (ev.COMMAND_COMPLETED, {"exitCode": 0, "durationMs": 12, "spawnError": None}),
    (ev.EXPORT_COMPLETED, {"name": "out.txt", "sizeBytes": 3, "sha256": "ab" * 32}),
    (ev.EVIDENCE_BUNDLE_EMITTED, {"specDigest": "cd" * 32}),
    (ev.LIFECYCLE_DESTROYED, {"cellId": "c1", "residue": []}),
    (ev.COMPLIANCE_SUMMARY, {"ttlSeconds": 60, "egressRuleCount": 0, "exitCode": 0}),
]
N = len(RUN_SHAPE)


def assert_cloudevent(obj: dict[str, Any]) -> None:
    if not SCHEMA_PATH.is_file():
        pytest.fail(f"CloudEvents schema not found at {SCHEMA_PATH}")
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker()).validate(obj)
    assert obj["time"].endswith("Z")
    datetime.fromisoformat(obj["time"])


def build_run(cell: str = "c1", run_id: str | None = None) -> list[dict[str, Any]]:
    """Stamped (unsigned) events of one complete run, schema-checked."""
    chain = RunChain(run_id)
    out = [chain.stamp(ev.new_event(t, cell, dict(d), host="h1")) for t, d in RUN_SHAPE]
    for event in out:
        assert_cloudevent(event)
    return out


def sign_all(events: list[dict[str, Any]], signer: Signer = SIGNER) -> list[dict[str, Any]]:
    envelopes = [wrap_signed(e, signer) for e in events]
    for envelope in envelopes:
        assert_cloudevent(envelope)
        assert_cloudevent(envelope["data"]["event"])
    return envelopes


def signed_lines() -> list[str]:
    return [json.dumps(e) for e in sign_all(build_run())]


def write(tmp_path: Path, lines: list[str], *, final_newline: bool = True) -> str:
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + ("\n" if final_newline and lines else ""))
    return str(path)


def check(
    tmp_path: Path, lines: list[str], keys: VerifyKeys | None = KEYS, **kw: Any
) -> VerifyReport:
    return verify_events_file(write(tmp_path, lines), keys, **kw)


def failed_at(report: VerifyReport) -> int:
    assert not report.ok
    assert report.first_error is not None
    return report.first_error[0]


# --- good files ----------------------------------------------------------------------------


def test_good_signed_file_passes(tmp_path: Path) -> None:
    report = check(tmp_path, signed_lines())
    assert report == VerifyReport(ok=True, events=N, runs=1, first_error=None)


def test_no_final_newline_is_fine(tmp_path: Path) -> None:
    path = write(tmp_path, signed_lines(), final_newline=False)
    assert verify_events_file(path, KEYS).ok


def test_hmac_signed_file_passes(tmp_path: Path) -> None:
    signer = HmacSigner("shared", b"s" * 32)
    lines = [json.dumps(e) for e in sign_all(build_run(), signer)]
    assert check(tmp_path, lines, VerifyKeys.from_signers(signer)).ok


def test_two_interleaved_runs_pass(tmp_path: Path) -> None:
    a = sign_all(build_run("c1"))
    b = sign_all(build_run("c2"))
    mixed = [x for pair in zip(a, b, strict=True) for x in pair]
    report = check(tmp_path, [json.dumps(e) for e in mixed])
    assert report == VerifyReport(ok=True, events=2 * N, runs=2, first_error=None)


def test_unsigned_file_passes_without_keys(tmp_path: Path) -> None:
    report = check(tmp_path, [json.dumps(e) for e in build_run()], keys=None)
    assert report.ok
    # Without keys, envelopes are opened structurally and the chain is still checked.
    assert check(tmp_path, signed_lines(), keys=None).ok


# --- single-line tampering of a signed run ------------------------------------------------


@pytest.mark.parametrize("index", range(N))
def test_deleting_any_line_fails_and_names_it(tmp_path: Path, index: int) -> None:
    lines = signed_lines()
    del lines[index]
    report = check(tmp_path, lines)
    # The gap is seen at the line that now takes the deleted one's place; deleting the final
    # summary leaves the run incomplete, reported at its (new) last line.
    expected = index + 1 if index < N - 1 else N - 1
    assert failed_at(report) == expected, report


@pytest.mark.parametrize("index", range(N - 1))
def test_swapping_adjacent_lines_fails_and_names_it(tmp_path: Path, index: int) -> None:
    lines = signed_lines()
    lines[index], lines[index + 1] = lines[index + 1], lines[index]
    assert failed_at(check(tmp_path, lines)) == index + 1


def _edit_data(envelope: dict[str, Any]) -> None:
    data = envelope["data"]["event"]["data"]
    key = next(iter(data))
    data[key] = "tampered"


def _edit_attr(attr: str) -> Callable[[dict[str, Any]], None]:
    def edit(envelope: dict[str, Any]) -> None:
        envelope[attr] = envelope[attr] + "x"

    return edit


EDITS: dict[str, Callable[[dict[str, Any]], None]] = {
    "inner data value": _edit_data,
    "envelope source": _edit_attr("source"),
    "envelope subject": _edit_attr("subject"),
    "envelope time": _edit_attr("time"),
    "envelope type": _edit_attr("type"),
    "inner time": lambda e: e["data"]["event"].update(time="2001-01-01T00:00:00Z"),
    # Always a different first character (a signature may already start with "A").
    "signature": lambda e: e["data"].update(
        signature=("B" if e["data"]["signature"][0] == "A" else "A") + e["data"]["signature"][1:]
    ),
}


@pytest.mark.parametrize("index", range(N))
@pytest.mark.parametrize("edit", sorted(EDITS))
def test_editing_any_line_fails_and_names_it(tmp_path: Path, index: int, edit: str) -> None:
    lines = signed_lines()
    envelope = json.loads(lines[index])
    EDITS[edit](envelope)
    lines[index] = json.dumps(envelope)
    if lines[index] == signed_lines()[index]:  # pragma: no cover - edit was a no-op
        pytest.skip("edit did not change the line")
    assert failed_at(check(tmp_path, lines)) == index + 1


def test_duplicated_line_fails(tmp_path: Path) -> None:
    lines = signed_lines()
    lines.insert(3, lines[2])
    assert failed_at(check(tmp_path, lines)) == 4


def test_event_after_summary_fails(tmp_path: Path) -> None:
    chain = RunChain()
    events = [chain.stamp(ev.new_event(t, "c1", d, host="h")) for t, d in RUN_SHAPE]
    events.append(chain.stamp(ev.new_event(ev.PROCESS_SPAWNED, "c1", {"argc": 0}, host="h")))
    report = check(tmp_path, [json.dumps(e) for e in sign_all(events)])
    assert failed_at(report) == N + 1
    assert report.first_error is not None and "after" in report.first_error[1]


# --- keys ----------------------------------------------------------------------------------


def test_unsigned_lines_fail_when_keys_are_given(tmp_path: Path) -> None:
    plain = [json.dumps(e) for e in build_run()]
    assert failed_at(check(tmp_path, plain)) == 1
    lines = signed_lines()
    lines[3] = json.dumps(json.loads(lines[3])["data"]["event"])  # one line unwrapped
    report = check(tmp_path, lines)
    assert failed_at(report) == 4
    assert report.first_error is not None and "unsigned" in report.first_error[1]


def test_wrong_key_fails(tmp_path: Path) -> None:
    impostor = VerifyKeys.from_signers(Ed25519Signer("run-key", b"\x07" * 32))
    report = check(tmp_path, signed_lines(), impostor)
    assert failed_at(report) == 1
    assert report.first_error is not None and "bad signature" in report.first_error[1]
    unknown = VerifyKeys.from_signers(Ed25519Signer("other", bytes(range(32))))
    report = check(tmp_path, signed_lines(), unknown)
    assert report.first_error is not None and "unknown kid" in report.first_error[1]


def test_attacker_resigning_with_own_key_fails(tmp_path: Path) -> None:
    # A whole run rewritten and signed by someone else's key under the trusted kid.
    forged = [json.dumps(e) for e in sign_all(build_run(), Ed25519Signer("run-key", b"\x09" * 32))]
    assert failed_at(check(tmp_path, forged)) == 1


# --- completeness and file format ----------------------------------------------------------


def test_truncated_interleaved_run_is_named(tmp_path: Path) -> None:
    a = sign_all(build_run("c1"))
    b = sign_all(build_run("c2"))
    mixed = [x for pair in zip(a, b, strict=True) for x in pair]
    del mixed[-2]  # run a's summary, which was on line 2N-1
    report = check(tmp_path, [json.dumps(e) for e in mixed])
    assert failed_at(report) == 2 * N - 3  # run a's destroyed event
    assert report.first_error is not None and "compliance summary" in report.first_error[1]
    assert check(tmp_path, [json.dumps(e) for e in mixed], require_complete=False).ok


def test_blank_and_malformed_lines_fail(tmp_path: Path) -> None:
    lines = signed_lines()
    assert failed_at(check(tmp_path, [*lines[:2], "", *lines[2:]])) == 3
    assert failed_at(check(tmp_path, [*lines, ""])) == N + 1  # a blank line after the last
    assert failed_at(check(tmp_path, [*lines[:4], "{not json", *lines[4:]])) == 5
    assert failed_at(check(tmp_path, [*lines[:1], "[1, 2]", *lines[1:]])) == 2
    duplicate_key = lines[1][:-1] + ', "type": "x"}'
    assert failed_at(check(tmp_path, [lines[0], duplicate_key, *lines[2:]])) == 2


def test_missing_chain_attributes_fail(tmp_path: Path) -> None:
    events = build_run()
    del events[2]["cellosprev"]
    events[2:] = sign_all(events[2:])
    lines = [json.dumps(e) for e in [*sign_all(events[:2]), *events[2:]]]
    assert failed_at(check(tmp_path, lines)) == 3
    plain = [json.dumps(ev.new_event(ev.COMPLIANCE_SUMMARY, "c", {}, host="h"))]
    assert failed_at(check(tmp_path, plain, keys=None)) == 1


def test_empty_file(tmp_path: Path) -> None:
    assert check(tmp_path, []).first_error == (0, "file contains no events")
    assert check(tmp_path, [], require_complete=False).ok


def test_unreadable_file_raises(tmp_path: Path) -> None:
    with pytest.raises(InvalidSpec):
        verify_events_file(str(tmp_path / "missing.jsonl"), KEYS)


def test_unkeyed_edit_is_caught_by_the_chain(tmp_path: Path) -> None:
    lines = [json.dumps(e) for e in build_run()]
    event = json.loads(lines[2])
    event["data"]["exitCode"] = 1
    lines[2] = json.dumps(event)
    # Without signatures the edit itself is invisible; the next link exposes it.
    assert failed_at(check(tmp_path, lines, keys=None)) == 4
