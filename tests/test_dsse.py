"""DSSE-signed events (``CELLOS_EVENT_SIGNING_FORMAT=dsse``).

Real supervisor runs through the CLI on the stub backend; an independent DSSE implementation
(securesystemslib, a test dependency only) verifies every event with the Ed25519 public key,
and so does ``cellos events verify``; a changed byte of the payload, the payloadType or the
signature is caught by both, and the verifier names the line.
"""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.dsse import Envelope as SslEnvelope
from securesystemslib.exceptions import VerificationError
from securesystemslib.signer import SSlibKey

from cellos.core import dsse, envelopes
from cellos.core.canonical import canonical_bytes
from cellos.core.envelopes import cell_id_of, dedupe_id, inner_event
from cellos.core.signing import (
    Ed25519Signer,
    HmacSigner,
    SignatureInvalid,
    VerifyKeys,
    unwrap_signed,
    wrap_signed,
)
from tests.conftest import REPO, CliResult, base_env, doc, write_doc

Run = Callable[..., CliResult]
KID = "dsse-key"


# --- a real run ---------------------------------------------------------------------------


def _keygen(tmp_path: Path, cellos_cli: Run, kid: str = KID) -> tuple[str, Path]:
    out = tmp_path / "keys"
    result = cellos_cli(["keygen", "--kid", kid, "--out-dir", str(out)], base_env(tmp_path))
    assert result.code == 0, result
    return (out / f"{kid}.key").read_text().strip(), out / f"{kid}.verify-keys.json"


def _run(
    tmp_path: Path, supervisor_cli: Run, key: str, events: Path, cell_id: str, **env: str
) -> CliResult:
    settings = {
        # The stub backend only: no sandbox, cgroup or namespace is made on the host.
        "CELLOS_CELL_BACKEND": "stub",
        "CELLOS_EVENT_SIGNING": "ed25519",
        "CELLOS_EVENT_SIGNING_KID": KID,
        "CELLOS_EVENT_SIGNING_KEY_BASE64": key,
        "CELL_OS_JSONL_EVENTS": str(events),
    }
    full = base_env(tmp_path, **{**settings, **env})
    spec = write_doc(tmp_path / f"{cell_id}.yaml", doc(cell_id, argv=["/bin/echo", "hi"]))
    return supervisor_cli(str(spec), full)


@pytest.fixture
def dsse_run(tmp_path: Path, supervisor_cli: Run, cellos_cli: Run) -> tuple[Path, Path, str]:
    key, keys_file = _keygen(tmp_path, cellos_cli)
    events = tmp_path / "events.jsonl"
    result = _run(
        tmp_path, supervisor_cli, key, events, "dsse-1", CELLOS_EVENT_SIGNING_FORMAT="dsse"
    )
    assert result.code == 0, result
    assert key not in result.stdout + result.stderr + events.read_text()
    return events, keys_file, key


def _ssl_key(keys_file: Path) -> SSlibKey:
    """The verify-keys file's Ed25519 public key, as securesystemslib's own key object."""
    entry = json.loads(keys_file.read_text())["keys"][0]
    raw = base64.urlsafe_b64decode(entry["publicKey"] + "=" * (-len(entry["publicKey"]) % 4))
    return SSlibKey(entry["kid"], "ed25519", "ed25519", {"public": raw.hex()})


def _ssl_verify(data: dict[str, Any], key: SSlibKey) -> None:
    # from_dict rewrites the signatures it is given: hand it a copy.
    SslEnvelope.from_dict(copy.deepcopy(data)).verify([key], 1)


def verify_cli(cellos_cli: Run, path: Path, keys: Path | None) -> CliResult:
    args = ["events", "verify", str(path)] + (["--keys", str(keys)] if keys else [])
    return cellos_cli(args, {"PATH": "/usr/bin:/bin"})


def test_every_event_verifies_with_securesystemslib_and_cellos(
    dsse_run: tuple[Path, Path, str], cellos_cli: Run, cloudevents_validator: Any
) -> None:
    events, keys_file, _ = dsse_run
    key = _ssl_key(keys_file)
    lines = events.read_text().splitlines()
    assert len(lines) >= 3
    for line in lines:
        envelope = json.loads(line)
        cloudevents_validator.validate(envelope)
        assert envelope["type"] == "dev.cellos.events.signed_envelope.v1"
        assert envelope["datacontenttype"] == "application/vnd.dsse.envelope.v1+json"
        data = envelope["data"]
        assert data["payloadType"] == "application/cloudevents+json"
        assert [s["keyid"] for s in data["signatures"]] == [KID]
        accepted = SslEnvelope.from_dict(copy.deepcopy(data)).verify([key], 1)
        assert list(accepted) == [KID]
        # The payload is the inner event's canonical bytes; the envelope binds its attributes.
        payload = base64.b64decode(data["payload"])
        inner = json.loads(payload)
        assert payload == canonical_bytes(inner)
        assert inner_event(envelope) == inner
        for attr in ("specversion", "source", "subject", "time"):
            assert envelope.get(attr) == inner.get(attr)
        cloudevents_validator.validate(inner)
    result = verify_cli(cellos_cli, events, keys_file)
    assert result.code == 0, result
    assert result.stdout.startswith(f"ok: {len(lines)} events in 1 run(s), signed")
    # Without keys: chain integrity through the DSSE payloads.
    assert verify_cli(cellos_cli, events, None).code == 0


def _flip_b64(text: str, index: int) -> str:
    """``text`` with one base64 character changed to another (so it still decodes)."""
    new = "A" if text[index] != "A" else "B"
    return text[:index] + new + text[index + 1 :]


def _tamper(data: dict[str, Any], where: str) -> None:
    if where == "payload":
        # A character in the middle: its decoded bytes change (no padding-bit subtleties).
        data["payload"] = _flip_b64(data["payload"], len(data["payload"]) // 2)
    elif where == "payloadType":
        data["payloadType"] = data["payloadType"][:-1] + "N"  # ...+jsoN: one byte of PAE
    else:
        sig = data["signatures"][0]
        sig["sig"] = _flip_b64(sig["sig"], 10)


@pytest.mark.parametrize("where", ["payload", "payloadType", "signature"])
def test_one_changed_byte_is_detected_by_both(
    dsse_run: tuple[Path, Path, str], cellos_cli: Run, tmp_path: Path, where: str
) -> None:
    events, keys_file, _ = dsse_run
    key = _ssl_key(keys_file)
    lines = events.read_text().splitlines()
    for index in range(len(lines)):
        envelope = json.loads(lines[index])
        _tamper(envelope["data"], where)
        with pytest.raises(VerificationError):
            _ssl_verify(envelope["data"], key)
        changed = list(lines)
        changed[index] = json.dumps(envelope)
        path = tmp_path / f"{where}-{index}.jsonl"
        path.write_text("\n".join(changed) + "\n")
        result = verify_cli(cellos_cli, path, keys_file)
        assert result.code == 1, (where, index, result)
        assert result.stderr.startswith(f"error: {path}:{index + 1}: "), (where, index, result)


def test_mixed_envelope_and_dsse_runs_verify(
    tmp_path: Path, supervisor_cli: Run, cellos_cli: Run
) -> None:
    key, keys_file = _keygen(tmp_path, cellos_cli)
    events = tmp_path / "mixed.jsonl"
    for cell_id, fmt in (("env-1", "envelope"), ("dsse-2", "dsse"), ("default-3", "")):
        result = _run(
            tmp_path, supervisor_cli, key, events, cell_id, CELLOS_EVENT_SIGNING_FORMAT=fmt
        )
        assert result.code == 0, result
    types = {json.loads(line)["datacontenttype"] for line in events.read_text().splitlines()}
    assert types == {"application/json", "application/vnd.dsse.envelope.v1+json"}
    result = verify_cli(cellos_cli, events, keys_file)
    assert result.code == 0, result
    assert " in 3 run(s), signed" in result.stdout


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"CELLOS_EVENT_SIGNING_FORMAT": "jws"}, "must be one of envelope, dsse"),
        (
            {"CELLOS_EVENT_SIGNING_FORMAT": "dsse", "CELLOS_EVENT_SIGNING": "hmac"},
            "dsse requires CELLOS_EVENT_SIGNING=ed25519",
        ),
        (
            {"CELLOS_EVENT_SIGNING_FORMAT": "dsse", "CELLOS_EVENT_SIGNING": "off"},
            "dsse needs signing on",
        ),
        (
            {"CELLOS_EVENT_SIGNING_FORMAT": "bad", "CELLOS_EVENT_SIGNING": ""},
            "must be one of envelope, dsse",
        ),
    ],
)
def test_bad_format_configuration_is_refused(
    tmp_path: Path, supervisor_cli: Run, extra: dict[str, str], needle: str
) -> None:
    key = base64.urlsafe_b64encode(b"k" * 32).decode().rstrip("=")
    result = _run(tmp_path, supervisor_cli, key, tmp_path / "e.jsonl", "bad-1", **extra)
    assert result.code == 2, result
    assert result.stderr.startswith("error: CELLOS_EVENT_SIGNING_FORMAT: "), result
    assert needle in result.stderr
    assert "Traceback" not in result.stderr and key not in result.stdout + result.stderr


def test_events_verify_does_not_need_securesystemslib(dsse_run: tuple[Path, Path, str]) -> None:
    events, keys_file, _ = dsse_run
    # securesystemslib made unimportable: verification must not touch it.
    script = (
        "import sys; sys.modules['securesystemslib'] = None\n"
        "from cellos.cli import main\n"
        f"code = main(['events', 'verify', {str(events)!r}, '--keys', {str(keys_file)!r}])\n"
        "assert not any(m.startswith('securesystemslib') and sys.modules[m] for m in sys.modules)\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert proc.returncode == 0, proc


# --- units: the format itself ------------------------------------------------------------


SEED = bytes(range(32))


def _event(**extra: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": "e-1",
        "source": "urn:cellos:host:h",
        "type": "dev.cellos.events.cell.lifecycle.v1.started",
        "subject": "urn:cellos:cell:c-1",
        "time": "2026-01-01T00:00:00Z",
        "data": {"cellId": "c-1", "n": 1},
        **extra,
    }


def test_pae_is_the_spec_vector() -> None:
    # DSSE protocol.md, "Test Vectors".
    expected = b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    assert dsse.pae("http://example.com/HelloWorld", b"hello world") == expected


def test_readers_open_dsse_envelopes_like_the_default_format() -> None:
    assert envelopes._DSSE_CONTENT_TYPE == dsse.CONTENT_TYPE
    event = _event()
    for signer in (Ed25519Signer("k", SEED), Ed25519Signer("k", SEED, "dsse")):
        wire = wrap_signed(event, signer)
        assert inner_event(wire) == event
        assert dedupe_id(wire) == "e-1"
        assert cell_id_of(inner_event(wire)) == "c-1"
        assert unwrap_signed(wire, VerifyKeys.from_signers(signer)) == event


def test_dsse_verify_refusals() -> None:
    signer = Ed25519Signer("k", SEED, "dsse")
    keys = VerifyKeys.from_signers(signer)
    wire = wrap_signed(_event(), signer)

    # A validly signed but non-canonical payload: one byte form per event.
    loose = json.dumps(_event(), indent=1).encode()
    other = copy.deepcopy(wire)
    other["data"]["payload"] = dsse.b64encode(loose)
    other["data"]["signatures"][0]["sig"] = dsse.b64encode(
        signer.sign(dsse.pae(dsse.PAYLOAD_TYPE, loose))
    )
    with pytest.raises(SignatureInvalid, match="not the canonical"):
        unwrap_signed(other, keys)

    # An outer attribute edited: bound to the payload's value.
    other = copy.deepcopy(wire)
    other["subject"] = "urn:cellos:cell:someone-else"
    with pytest.raises(SignatureInvalid, match="'subject' does not match"):
        unwrap_signed(other, keys)

    # Two signatures, or URL-safe base64: refused (one kid, one spelling).
    other = copy.deepcopy(wire)
    other["data"]["signatures"].append(dict(other["data"]["signatures"][0]))
    with pytest.raises(SignatureInvalid, match="exactly one signature"):
        unwrap_signed(other, keys)
    other = copy.deepcopy(wire)
    other["data"]["payload"] = other["data"]["payload"].replace("+", "-").replace("/", "_")
    if other["data"]["payload"] != wire["data"]["payload"]:
        with pytest.raises(SignatureInvalid, match="DSSE payload"):
            unwrap_signed(other, keys)

    # A DSSE envelope whose kid names an HMAC key: no algorithm confusion.
    hmac_keys = VerifyKeys.from_signers(HmacSigner("k", b"s" * 32))
    with pytest.raises(SignatureInvalid, match="ed25519 keys only"):
        unwrap_signed(wire, hmac_keys)
    with pytest.raises(ValueError, match="Ed25519 only"):
        wrap_signed(_event(), _HmacDsse())
    assert "k" * 3 not in repr(signer)


class _HmacDsse(HmacSigner):
    """An HMAC signer claiming the dsse format (signer_from_env never makes one)."""

    format = "dsse"  # type: ignore[misc]

    def __init__(self) -> None:
        super().__init__("h", b"s" * 32)


def test_server_projection_and_readers_fold_a_dsse_run(dsse_run: tuple[Path, Path, str]) -> None:
    """The API server's projection, its event items and the MCP run log read DSSE envelopes
    exactly as they read the plain events they carry."""
    from cellos.mcp.runlog import _run_id
    from cellos.server.hub import event_item
    from cellos.server.projection import Projection

    events, _, _ = dsse_run
    lines = events.read_text().splitlines()
    wires = [json.loads(line) for line in lines]
    inners = [inner_event(w) for w in wires]
    signed, plain = Projection(), Projection()
    for seq, (wire, inner) in enumerate(zip(wires, inners, strict=True), start=1):
        assert signed.apply(seq, wire) == plain.apply(seq, inner) == "dsse-1"
        item = event_item(seq, "cellos.events.x", lines[seq - 1].encode())
        assert item["signed"] is True and item["cellId"] == "dsse-1"
        assert item["runSeq"] == seq - 1 and item["type"] == inner["type"]  # type: ignore[index]
        assert _run_id(lines[seq - 1].encode()) == inner["cellosrunid"]  # type: ignore[index]
    assert signed.skipped == plain.skipped == []
    assert signed.cells["dsse-1"].state == plain.cells["dsse-1"].state


def test_the_documented_recipe_verifies_with_securesystemslib_only(
    dsse_run: tuple[Path, Path, str], tmp_path: Path
) -> None:
    """docs/events.md's recipe, run as written: it verifies a real run, and refuses a
    tampered payload."""
    text = (REPO / "docs" / "events.md").read_text(encoding="utf-8")
    block = text.split("<!-- dsse-recipe: tests/test_dsse.py runs this block -->\n```python\n")[1]
    script = tmp_path / "verify_dsse.py"
    script.write_text(block.split("```")[0], encoding="utf-8")
    assert "cellos" not in script.read_text().replace("cellosrunid", "").replace("cellosseq", "")
    events, keys_file, _ = dsse_run

    def run(path: Path) -> subprocess.CompletedProcess[str]:
        # -I: isolated mode; the script sees the venv's site-packages, not the repo's src.
        cmd = [sys.executable, "-I", str(script), str(path), str(keys_file)]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, check=False)

    ok = run(events)
    lines = events.read_text().splitlines()
    assert ok.returncode == 0, ok
    assert len(ok.stdout.splitlines()) == len(lines)
    envelope = json.loads(lines[1])
    _tamper(envelope["data"], "payload")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], json.dumps(envelope), *lines[2:]]) + "\n")
    refused = run(bad)
    assert refused.returncode != 0 and "VerificationError" in refused.stderr


def test_a_deeply_nested_payload_is_a_clear_failure_not_a_crash(
    dsse_run: tuple[Path, Path, str], cellos_cli: Run, tmp_path: Path
) -> None:
    events, keys_file, _ = dsse_run
    lines = events.read_text().splitlines()
    envelope = json.loads(lines[0])
    envelope["data"]["payload"] = dsse.b64encode(b"[" * 200_000 + b"]" * 200_000)
    assert inner_event(envelope) is None
    path = tmp_path / "deep.jsonl"
    path.write_text("\n".join([json.dumps(envelope), *lines[1:]]) + "\n")
    result = verify_cli(cellos_cli, path, keys_file)
    assert result.code == 1 and "Traceback" not in result.stderr, result
    assert result.stderr.startswith(f"error: {path}:1: DSSE payload is nested too deeply"), result
