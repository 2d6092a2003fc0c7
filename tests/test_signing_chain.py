"""Canonical bytes, the run chain, signing envelopes, verify keys and keygen (real crypto)."""

from __future__ import annotations

import base64
import itertools
import json
import os
import stat
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellos.core import events as ev
from cellos.core.canonical import canonical_bytes, event_digest, sha256_hex, strict_loads
from cellos.core.chain import GENESIS, RunChain
from cellos.core.errors import InvalidSpec, PolicyRefused
from cellos.core.signing import (
    Ed25519Signer,
    HmacSigner,
    SignatureInvalid,
    Signer,
    VerifyKeys,
    b64url_decode,
    b64url_encode,
    signer_from_env,
    unwrap_signed,
    verify_keys_document,
    wrap_signed,
)
from cellos.keygen import write_keypair
from cellos.verify import load_verify_keys
from tests.conftest import CLOUDEVENTS_SCHEMA

SCHEMA_PATH = CLOUDEVENTS_SCHEMA
SEED = bytes(range(32))
HMAC_KEY = b"k" * 32


def assert_cloudevent(obj: dict[str, Any]) -> None:
    """Validate against the CloudEvents 1.0 JSON schema (and RFC 3339 time, not format-checked
    by jsonschema without an optional dependency)."""
    if not SCHEMA_PATH.is_file():
        pytest.fail(f"CloudEvents schema not found at {SCHEMA_PATH}")
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker()).validate(obj)
    assert obj["time"].endswith("Z")
    datetime.fromisoformat(obj["time"])


def sample_event(**data: Any) -> dict[str, Any]:
    return ev.new_event(ev.COMMAND_COMPLETED, "cell-1", data or {"exitCode": 0}, host="h1")


def ed_signer(kid: str = "k1") -> Ed25519Signer:
    return Ed25519Signer(kid, SEED)


# --- canonical -----------------------------------------------------------------------------


def test_canonical_bytes_are_jcs() -> None:
    assert canonical_bytes({"b": 1, "a": [1.0, "é", True, None]}) == (
        '{"a":[1,"é",true,null],"b":1}'.encode()
    )
    assert canonical_bytes({"a": 1, "b": 2}) == canonical_bytes({"b": 2, "a": 1})


def test_digests() -> None:
    assert sha256_hex(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert event_digest({"x": 1}) == sha256_hex(b'{"x":1}')


def test_canonical_refuses_unsafe_values() -> None:
    with pytest.raises(ValueError):
        canonical_bytes({"n": 2**60})
    with pytest.raises(ValueError):
        canonical_bytes({"n": float("nan")})


def test_strict_loads_refuses_duplicate_keys_and_nan() -> None:
    assert strict_loads('{"a": 1}') == {"a": 1}
    with pytest.raises(ValueError, match="duplicate"):
        strict_loads('{"a": 1, "a": 2}')
    with pytest.raises(ValueError):
        strict_loads('{"a": NaN}')


# --- run chain -----------------------------------------------------------------------------


def test_run_chain_sequences_and_links() -> None:
    chain = RunChain("run-1")
    assert chain.run_id == "run-1"
    originals = [sample_event(i=i) for i in range(4)]
    stamped = [chain.stamp(e) for e in originals]
    assert [s["cellosseq"] for s in stamped] == [0, 1, 2, 3]
    assert all(s["cellosrunid"] == "run-1" for s in stamped)
    assert stamped[0]["cellosprev"] == GENESIS
    for prev, cur in itertools.pairwise(stamped):
        assert cur["cellosprev"] == event_digest(prev)
    for original, s in zip(originals, stamped, strict=True):
        assert "cellosseq" not in original  # input untouched
        assert s is not original
        assert {k: v for k, v in s.items() if not k.startswith("cellos")} == original
        assert_cloudevent(s)


def test_run_chain_default_run_id_is_uuid() -> None:
    a, b = RunChain(), RunChain()
    assert a.run_id != b.run_id
    assert len(a.run_id) == 36


def test_run_chain_is_independent_of_later_mutation() -> None:
    chain = RunChain()
    event = sample_event(v=1)
    stamped = chain.stamp(event)
    event["data"]["v"] = 2
    assert stamped["data"]["v"] == 1
    assert chain.stamp(sample_event())["cellosprev"] == event_digest(stamped)


def test_run_chain_does_not_advance_on_bad_event() -> None:
    chain = RunChain()
    first = chain.stamp(sample_event())
    with pytest.raises(ValueError):
        chain.stamp(sample_event(n=float("inf")))
    second = chain.stamp(sample_event())
    assert second["cellosseq"] == 1
    assert second["cellosprev"] == event_digest(first)


def test_run_chain_is_thread_safe() -> None:
    chain = RunChain()
    out: list[dict[str, Any]] = []
    out_lock = threading.Lock()

    def work() -> None:
        for i in range(100):
            s = chain.stamp(sample_event(i=i))
            with out_lock:
                out.append(s)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ordered = sorted(out, key=lambda e: e["cellosseq"])
    assert [e["cellosseq"] for e in ordered] == list(range(800))
    assert ordered[0]["cellosprev"] == GENESIS
    for prev, cur in itertools.pairwise(ordered):
        assert cur["cellosprev"] == event_digest(prev)


# --- base64url -----------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"\x00", b"\xff\xfe", b"abc", bytes(range(33))])
def test_b64url_round_trip(data: bytes) -> None:
    text = b64url_encode(data)
    assert "=" not in text
    assert b64url_decode(text) == data
    assert b64url_decode(base64.urlsafe_b64encode(data).decode()) == data  # padded form


@pytest.mark.parametrize("garbage", ["a", "ab$c", "ab cd", "AB+/", "AA=", "AA===", "AB", "Zg=a"])
def test_b64url_rejects_garbage(garbage: str) -> None:
    # "AB" is non-canonical (trailing bits set; "AA" is the canonical form of b"\x00").
    with pytest.raises(ValueError):
        b64url_decode(garbage)


# --- signers and envelopes -----------------------------------------------------------------


@pytest.mark.parametrize("signer", [ed_signer(), HmacSigner("h1", HMAC_KEY)], ids=repr)
def test_sign_round_trip(signer: Ed25519Signer | HmacSigner) -> None:
    event = RunChain().stamp(sample_event())
    envelope = wrap_signed(event, signer)
    assert envelope["type"] == ev.SIGNED_ENVELOPE
    for attr in ("specversion", "source", "subject", "time"):
        assert envelope[attr] == event[attr]
    # The envelope is a CloudEvent of its own: its own id, the inner id kept inside.
    assert envelope["id"] != event["id"] and envelope["data"]["event"]["id"] == event["id"]
    assert wrap_signed(event, signer)["id"] != envelope["id"]
    assert envelope["datacontenttype"] == "application/json"
    assert set(envelope["data"]) == {"kid", "alg", "signature", "event"}
    assert envelope["data"]["alg"] == signer.alg
    assert_cloudevent(envelope)
    assert_cloudevent(envelope["data"]["event"])
    keys = VerifyKeys.from_signers(signer)
    # Survives a JSON round trip (what a sink and a verifier actually exchange).
    assert unwrap_signed(json.loads(json.dumps(envelope)), keys) == event


def test_ed25519_signature_is_over_canonical_bytes() -> None:
    signer = ed_signer()
    event = sample_event()
    envelope = wrap_signed(event, signer)
    sig = b64url_decode(envelope["data"]["signature"])
    keys = VerifyKeys.from_signers(signer)
    assert keys.verify("k1", "ed25519", canonical_bytes(event), sig)
    assert not keys.verify("k1", "hmac-sha256", canonical_bytes(event), sig)
    assert not keys.verify("nope", "ed25519", canonical_bytes(event), sig)
    assert len(signer.public_key_bytes()) == 32


def test_wrap_refuses_double_wrap_and_non_events() -> None:
    envelope = wrap_signed(sample_event(), ed_signer())
    with pytest.raises(ValueError):
        wrap_signed(envelope, ed_signer())
    with pytest.raises(ValueError):
        wrap_signed({"type": "x"}, ed_signer())


def _signed() -> tuple[dict[str, Any], VerifyKeys]:
    signer = ed_signer()
    return wrap_signed(RunChain().stamp(sample_event()), signer), VerifyKeys.from_signers(signer)


def _flip(text: str) -> str:
    return ("B" if text[0] != "B" else "C") + text[1:]


TAMPERS: dict[str, Any] = {
    "inner data": lambda e: e["data"]["event"]["data"].update(exitCode=1),
    "inner type": lambda e: e["data"]["event"].update(type=ev.COMMAND_COMPLETED + "x"),
    "inner chain seq": lambda e: e["data"]["event"].update(cellosseq=5),
    "envelope source": lambda e: e.update(source="/elsewhere"),
    "envelope subject": lambda e: e.update(subject="urn:cellos:cell:other"),
    "envelope time": lambda e: e.update(time="2000-01-01T00:00:00Z"),
    "envelope specversion": lambda e: e.update(specversion="1.1"),
    "envelope subject removed": lambda e: e.pop("subject"),
    "envelope type": lambda e: e.update(type="dev.cellos.events.other"),
    "envelope datacontenttype": lambda e: e.update(datacontenttype="text/plain"),
    "extra envelope attribute": lambda e: e.update(cellosseq=0),
    "extra data key": lambda e: e["data"].update(note="x"),
    "missing event": lambda e: e["data"].pop("event"),
    "unknown kid": lambda e: e["data"].update(kid="k2"),
    "alg mismatch": lambda e: e["data"].update(alg="hmac-sha256"),
    "signature flipped": lambda e: e["data"].update(signature=_flip(e["data"]["signature"])),
    "signature garbage": lambda e: e["data"].update(signature="!!"),
    "signature truncated": lambda e: e["data"].update(signature=e["data"]["signature"][:-4]),
    "data not object": lambda e: e.update(data="x"),
    "nested envelope": lambda e: e["data"]["event"].update(type=ev.SIGNED_ENVELOPE),
}


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_tampered_envelope_is_refused(name: str) -> None:
    envelope, keys = _signed()
    unwrap_signed(envelope, keys)  # sanity: the untouched one verifies
    TAMPERS[name](envelope)
    with pytest.raises(SignatureInvalid):
        unwrap_signed(envelope, keys)


def test_unwrap_refuses_non_objects_and_wrong_key() -> None:
    envelope, _ = _signed()
    with pytest.raises(SignatureInvalid):
        unwrap_signed([envelope], VerifyKeys.from_signers(ed_signer()))
    other = VerifyKeys.from_signers(Ed25519Signer("k1", b"\x01" * 32))
    with pytest.raises(SignatureInvalid, match="bad signature"):
        unwrap_signed(envelope, other)
    hmac_keys = VerifyKeys.from_signers(HmacSigner("k1", HMAC_KEY))
    with pytest.raises(SignatureInvalid, match="alg mismatch"):
        unwrap_signed(envelope, hmac_keys)


def test_hmac_wrong_key_fails() -> None:
    envelope = wrap_signed(sample_event(), HmacSigner("h", HMAC_KEY))
    with pytest.raises(SignatureInvalid, match="bad signature"):
        unwrap_signed(envelope, VerifyKeys.from_signers(HmacSigner("h", b"x" * 32)))


def test_signer_validation() -> None:
    with pytest.raises(ValueError):
        Ed25519Signer("k", b"short")
    with pytest.raises(ValueError):
        HmacSigner("k", b"x" * 15)
    with pytest.raises(ValueError):
        Ed25519Signer("../k", SEED)
    assert "k" * 32 not in repr(HmacSigner("h", HMAC_KEY))


# --- signer_from_env -----------------------------------------------------------------------


def env(mode: str, key: bytes | str | None, kid: str | None = "k1") -> dict[str, str]:
    out = {"CELLOS_EVENT_SIGNING": mode}
    if kid is not None:
        out["CELLOS_EVENT_SIGNING_KID"] = kid
    if key is not None:
        out["CELLOS_EVENT_SIGNING_KEY_BASE64"] = key if isinstance(key, str) else b64url_encode(key)
    return out


def test_signer_from_env_off() -> None:
    assert signer_from_env({}) is None
    assert signer_from_env({"CELLOS_EVENT_SIGNING": "off"}) is None


def test_signer_from_env_builds_signers() -> None:
    ed = signer_from_env(env("ed25519", SEED))
    assert isinstance(ed, Ed25519Signer)
    assert ed.public_key_bytes() == ed_signer().public_key_bytes()
    hm = signer_from_env(env("hmac", HMAC_KEY, kid="h1"))
    assert isinstance(hm, HmacSigner)
    assert (hm.kid, hm.alg) == ("h1", "hmac-sha256")
    # Padded base64url and a trailing newline (as read from a key file) are accepted.
    padded = base64.urlsafe_b64encode(SEED).decode() + "\n"
    assert isinstance(signer_from_env(env("ed25519", padded)), Ed25519Signer)


@pytest.mark.parametrize(
    ("config", "var"),
    [
        (env("rsa", SEED), "CELLOS_EVENT_SIGNING"),
        (env("ed25519", SEED, kid=None), "CELLOS_EVENT_SIGNING_KID"),
        (env("ed25519", SEED, kid="../etc"), "CELLOS_EVENT_SIGNING_KID"),
        (env("ed25519", None), "CELLOS_EVENT_SIGNING_KEY_BASE64"),
        (env("ed25519", SEED[:31]), "CELLOS_EVENT_SIGNING_KEY_BASE64"),
        (env("ed25519", SEED + b"x"), "CELLOS_EVENT_SIGNING_KEY_BASE64"),
        (env("hmac", b"x" * 15), "CELLOS_EVENT_SIGNING_KEY_BASE64"),
        (env("hmac", "not*base64url*at*all"), "CELLOS_EVENT_SIGNING_KEY_BASE64"),
    ],
)
def test_signer_from_env_refuses_bad_config(config: dict[str, str], var: str) -> None:
    with pytest.raises(PolicyRefused) as info:
        signer_from_env(config)
    assert info.value.path == var
    assert info.value.exit_code == 2


SECRET_LOOKING = [
    "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA",  # valid b64url, 34 bytes: wrong length
    "c2VjcmV0LXNlY3JldC1zZWNyZXQ+c2VjcmV0/XNlY3JldA",  # standard alphabet
    "c2VjcmV0LXNl!Y3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA",  # garbage character
    "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldB",  # non-canonical trailing bits
]


def _messages(exc: BaseException | None) -> list[str]:
    out: list[str] = []
    while exc is not None:
        out += [str(exc), repr(exc), *map(str, exc.args)]
        exc = exc.__cause__ or exc.__context__
    return out


@pytest.mark.parametrize("key", SECRET_LOOKING)
@pytest.mark.parametrize("mode", ["ed25519", "hmac"])
def test_policy_refused_never_contains_key(key: str, mode: str) -> None:
    config = env(mode, key)
    if mode == "hmac" and key == SECRET_LOOKING[0]:
        config = env(mode, key[:20])  # decodes to 15 bytes: too short for HMAC
        key = key[:20]
    with pytest.raises(PolicyRefused) as info:
        signer_from_env(config)
    for message in _messages(info.value):
        assert key not in message
        assert key[:12] not in message


def test_key_pasted_into_wrong_variable_is_not_echoed() -> None:
    key = b64url_encode(SEED)
    for config in (env(key, SEED), env("ed25519", SEED, kid=key + "/")):
        with pytest.raises(PolicyRefused) as info:
            signer_from_env(config)
        assert all(key not in m for m in _messages(info.value))


# --- verify keys files ---------------------------------------------------------------------


def write_json(path: Path, doc: Any) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


def test_verify_keys_load_round_trip(tmp_path: Path) -> None:
    signers: list[Signer] = [ed_signer("a"), HmacSigner("b", HMAC_KEY)]
    keys = load_verify_keys(write_json(tmp_path / "k.json", verify_keys_document(signers)))
    assert keys.kids == ("a", "b")
    assert len(keys) == 2
    for signer in signers:
        envelope = wrap_signed(sample_event(), signer)
        assert unwrap_signed(envelope, keys)["type"] == ev.COMMAND_COMPLETED


@pytest.mark.parametrize(
    ("doc", "where"),
    [
        ([], ""),
        ({"keys": []}, ":keys"),
        ({"keys": [], "extra": 1}, ""),
        ({"keys": ["x"]}, ":keys[0]"),
        ({"keys": [{"kid": "", "alg": "ed25519", "publicKey": "AA"}]}, ":keys[0].kid"),
        ({"keys": [{"kid": "a", "alg": "rsa", "publicKey": "AA"}]}, ":keys[0].alg"),
        ({"keys": [{"kid": "a", "alg": "ed25519", "publicKey": "AA"}]}, ":keys[0].publicKey"),
        ({"keys": [{"kid": "a", "alg": "ed25519", "publicKey": "!"}]}, ":keys[0].publicKey"),
        ({"keys": [{"kid": "a", "alg": "ed25519", "key": "AA"}]}, ":keys[0]"),
        ({"keys": [{"kid": "a", "alg": "hmac-sha256", "key": "AAAA"}]}, ":keys[0].key"),
        ({"keys": [{"kid": "a", "alg": "hmac-sha256"}]}, ":keys[0].key"),
    ],
)
def test_verify_keys_load_refuses_bad_documents(tmp_path: Path, doc: Any, where: str) -> None:
    path = write_json(tmp_path / "k.json", doc)
    with pytest.raises(InvalidSpec) as info:
        load_verify_keys(path)
    assert info.value.path == path + where


def test_verify_keys_load_refuses_duplicates_and_bad_files(tmp_path: Path) -> None:
    entry = verify_keys_document([ed_signer("a")])["keys"][0]
    with pytest.raises(InvalidSpec, match="duplicate kid"):
        load_verify_keys(write_json(tmp_path / "d.json", {"keys": [entry, entry]}))
    dup = tmp_path / "dupkey.json"
    dup.write_text('{"keys": [], "keys": []}')
    with pytest.raises(InvalidSpec, match="duplicate"):
        load_verify_keys(str(dup))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidSpec, match="not valid JSON"):
        load_verify_keys(str(bad))
    with pytest.raises(InvalidSpec, match="cannot read"):
        load_verify_keys(str(tmp_path / "missing.json"))


def test_verify_keys_errors_never_contain_hmac_key(tmp_path: Path) -> None:
    short = b64url_encode(b"secretsecret")  # 12 bytes: too short
    path = write_json(
        tmp_path / "k.json", {"keys": [{"kid": "h", "alg": "hmac-sha256", "key": short}]}
    )
    with pytest.raises(InvalidSpec) as info:
        load_verify_keys(path)
    assert all(short not in m for m in _messages(info.value))
    broken = tmp_path / "broken.json"
    broken.write_text('{"keys": [{"kid": "h", "alg": "hmac-sha256", "key": "c2VjcmV0c2VjcmV0" ')
    with pytest.raises(InvalidSpec) as info:
        load_verify_keys(str(broken))
    assert all("c2VjcmV0c2VjcmV0" not in m for m in _messages(info.value))
    hmac_keys = VerifyKeys.from_signers(HmacSigner("h", HMAC_KEY))
    assert b64url_encode(HMAC_KEY) not in repr(hmac_keys.get("h"))


# --- keygen --------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ed25519", "hmac"])
def test_keygen_writes_usable_keys(tmp_path: Path, alg: str) -> None:
    out = tmp_path / "keys"
    result = write_keypair(str(out), "ops-2024.1", alg)
    key_mode = stat.S_IMODE(os.stat(result.key_path).st_mode)
    assert key_mode == 0o600
    verify_mode = stat.S_IMODE(os.stat(result.verify_keys_path).st_mode)
    if alg == "hmac":
        assert verify_mode == 0o600  # it holds the secret
    else:
        assert verify_mode & 0o077 in (0o044, 0o004, 0o040, 0)  # public; umask decides
    key_text = Path(result.key_path).read_text().strip()
    lines = result.env_lines
    assert lines[0] == f"CELLOS_EVENT_SIGNING={alg}"
    assert lines[1] == "CELLOS_EVENT_SIGNING_KID=ops-2024.1"
    assert lines[2].startswith('CELLOS_EVENT_SIGNING_KEY_BASE64="$(cat ')
    assert key_text not in "\n".join(lines)
    signer = signer_from_env(env(alg, key_text, kid="ops-2024.1"))
    assert signer is not None
    envelope = wrap_signed(sample_event(), signer)
    keys = load_verify_keys(result.verify_keys_path)
    assert unwrap_signed(envelope, keys)["id"] == envelope["data"]["event"]["id"]
    if alg == "ed25519":
        assert key_text not in Path(result.verify_keys_path).read_text()


def test_keygen_refuses_overwrite_and_bad_input(tmp_path: Path) -> None:
    first = write_keypair(str(tmp_path), "k1")
    before = Path(first.key_path).read_text()
    with pytest.raises(InvalidSpec, match="refusing to overwrite"):
        write_keypair(str(tmp_path), "k1")
    assert Path(first.key_path).read_text() == before
    for kid in ("", "../x", "a..b", "-x", "a/b", "x" * 65):
        with pytest.raises(InvalidSpec):
            write_keypair(str(tmp_path), kid)
    with pytest.raises(InvalidSpec):
        write_keypair(str(tmp_path), "k2", "rsa")


def test_keygen_leaves_nothing_when_second_file_clashes(tmp_path: Path) -> None:
    (tmp_path / "k3.verify-keys.json").write_text("{}")
    with pytest.raises(InvalidSpec):
        write_keypair(str(tmp_path), "k3")
    assert not (tmp_path / "k3.key").exists()


def test_keygen_does_not_follow_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "target"
    (tmp_path / "k4.key").symlink_to(target)
    with pytest.raises(InvalidSpec):
        write_keypair(str(tmp_path), "k4")
    assert not target.exists()


# The fast path (json.dumps for plain values) must give exactly the rfc8785 library's bytes,
# and refuse exactly what it refuses.
_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(alphabet=st.characters(), max_size=12)
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(alphabet=st.characters(), max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=1500, deadline=None)
@given(_json_values)
def test_canonical_bytes_match_the_reference_jcs_implementation(value: object) -> None:
    import rfc8785

    try:
        expected: bytes | type[BaseException] = rfc8785.dumps(value)
    except ValueError:
        expected = ValueError
    try:
        got: bytes | type[BaseException] = canonical_bytes(value)
    except ValueError:
        got = ValueError
    assert got == expected, value


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=5), _json_values, max_size=5))
def test_copy_and_digest_is_a_deep_copy_and_the_jcs_digest(value: dict[str, object]) -> None:
    import copy

    import rfc8785

    from cellos.core.canonical import copy_and_digest

    before = copy.deepcopy(value)
    try:
        reference = sha256_hex(rfc8785.dumps(value))
    except ValueError:
        with pytest.raises(ValueError):
            copy_and_digest(value)
        return
    copied, digest = copy_and_digest(value)
    assert digest == reference and copied == value
    value["mutated"] = [1]
    for item in value.values():
        if isinstance(item, (list, dict)):
            item.clear()
    assert copied == before  # nothing of the copy is shared with the original
