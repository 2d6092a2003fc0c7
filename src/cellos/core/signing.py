"""Event signing primitives (DESIGN.md §4).

The signed form of an event is a CloudEvent of type ``dev.cellos.events.signed_envelope.v1``
whose ``data`` is ``{"kid", "alg", "signature", "event"}``; the signature covers the RFC 8785
canonical bytes of the inner event. The envelope repeats the inner event's ``specversion``,
``source``, ``subject`` and ``time`` so routers can work on it without opening it; the
verifier requires those copies to equal the inner values and refuses any other envelope
attribute, so no envelope field can be edited without detection even though only the inner
event is signed. The envelope is a CloudEvent of its own and has its own ``id`` (a fresh
UUID; CloudEvents requires ``source`` + ``id`` to identify one event, and the envelope is not
the inner event); the inner event's ``id`` stays inside, and it is what de-duplication keys
on (:func:`cellos.core.envelopes.dedupe_id`). Editing the envelope ``id`` changes nothing a
verifier or the projection relies on.

Two *formats* share that envelope type (``CELLOS_EVENT_SIGNING_FORMAT``): ``envelope`` (the
default, above; Rust-compatible) and ``dsse``, where ``data`` is a DSSE envelope whose payload
is the same canonical bytes and whose Ed25519 signature covers their DSSE PAE
(:mod:`cellos.core.dsse`), so that any DSSE implementation verifies it. A format is one small
object (:class:`SigningFormat`): how to wrap an event and sign it, and how to parse an envelope
into the bytes its signature covers; key lookup and signature checks are shared. The attribute
binding (specversion, source, subject, time) is the same in both formats.

Secret hygiene: no error message or ``repr`` here ever contains key material, nor the value
of a signing environment variable (a key pasted into the wrong variable must not leak either).

The module does no I/O: ``cellos.verify.load_verify_keys`` reads verify-key files and hands the
parsed document to ``VerifyKeys.from_document``.
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

from cellos.core.canonical import canonical_bytes, copy_and_canonical, strict_loads
from cellos.core.errors import CellosError, InvalidSpec, PolicyRefused
from cellos.core.events import SIGNED_ENVELOPE

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

# cryptography, hashlib and hmac (OpenSSL) are imported where a key is used: a run without
# signing never loads them (cellos-supervisor's start time is a CI job's latency).


def _ed25519_public(material: bytes) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519PublicKey.from_public_bytes(material)


def _hmac_sha256(key: bytes, data: bytes) -> bytes:
    import hashlib
    import hmac

    return hmac.new(key, data, hashlib.sha256).digest()


ALG_ED25519: Final = "ed25519"
ALG_HMAC_SHA256: Final = "hmac-sha256"
ALGORITHMS: Final = frozenset({ALG_ED25519, ALG_HMAC_SHA256})

ENV_SIGNING: Final = "CELLOS_EVENT_SIGNING"
ENV_KID: Final = "CELLOS_EVENT_SIGNING_KID"
ENV_KEY: Final = "CELLOS_EVENT_SIGNING_KEY_BASE64"
ENV_FORMAT: Final = "CELLOS_EVENT_SIGNING_FORMAT"

FORMAT_ENVELOPE: Final = "envelope"
FORMAT_DSSE: Final = "dsse"
FORMAT_NAMES: Final = (FORMAT_ENVELOPE, FORMAT_DSSE)

ED25519_SEED_BYTES: Final = 32
ED25519_SIGNATURE_BYTES: Final = 64
#: Shorter HMAC keys are guessable; 16 bytes is the floor, keygen writes 32.
HMAC_MIN_KEY_BYTES: Final = 16

# Key ids end up in file names (keygen) and log lines, hence the conservative alphabet.
_KID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
KID_RULE: Final = "must match [A-Za-z0-9][A-Za-z0-9._-]{0,63} and must not contain '..'"

#: Attributes the envelope copies from the inner event (present iff present there).
BOUND_ATTRIBUTES: Final = ("specversion", "source", "subject", "time")
_REQUIRED_BOUND: Final = frozenset({"specversion", "source"})
_ENVELOPE_ATTRIBUTES: Final = frozenset(
    {*BOUND_ATTRIBUTES, "id", "type", "datacontenttype", "data"}
)
_ENVELOPE_DATA_KEYS: Final = frozenset({"kid", "alg", "signature", "event"})

# Verify-keys files are a handful of lines; the cap keeps a wrong path (a log, a device) cheap.


def is_valid_kid(kid: str) -> bool:
    return _KID_RE.fullmatch(kid) is not None and ".." not in kid


class SignatureInvalid(CellosError):
    """A signed envelope failed verification (exit status 1: verification is a runtime check).

    ``reason`` says why: unknown kid, alg mismatch, bad signature, envelope attributes not
    matching the inner event, extra envelope attributes, or malformed structure.
    """

    def __init__(self, reason: str) -> None:
        super().__init__("signed_envelope", reason)


# --- base64url ----------------------------------------------------------------------------

_B64URL_RE: Final = re.compile(r"[A-Za-z0-9_-]*")


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (RFC 4648 §5), the encoding of keys and signatures."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode base64url, with or without padding; raise ``ValueError`` on anything else.

    Only the canonical encoding is accepted (correct padding if any, zero trailing bits), so
    each byte string has exactly one accepted text form: a signature cannot be re-spelled
    without the change being visible. Messages never echo the input (it may be a key).
    """
    if not isinstance(text, str):
        raise ValueError("base64url input must be a string")
    body = text.rstrip("=")
    missing = -len(body) % 4
    if "+" in body or "/" in body:
        raise ValueError("not base64url: uses the standard alphabet ('+', '/'), not '-', '_'")
    if _B64URL_RE.fullmatch(body) is None or len(body) % 4 == 1:
        raise ValueError("not valid base64url")
    if len(text) != len(body) and len(text) - len(body) != missing:
        raise ValueError("base64url padding is wrong")
    raw = base64.urlsafe_b64decode(body + "=" * missing)
    if b64url_encode(raw) != body:
        raise ValueError("base64url is not canonical (non-zero trailing bits)")
    return raw


# --- signers ------------------------------------------------------------------------------


class Signer(Protocol):
    """Anything that signs event bytes under a key id, for one envelope format."""

    @property
    def kid(self) -> str: ...

    @property
    def alg(self) -> str:
        """``"ed25519"`` or ``"hmac-sha256"``."""
        ...

    @property
    def format(self) -> str:
        """The envelope format it signs for: ``"envelope"`` or ``"dsse"``."""
        ...

    def sign(self, data: bytes) -> bytes: ...


def _check_kid(kid: str) -> None:
    if not isinstance(kid, str) or not is_valid_kid(kid):
        raise ValueError(f"kid {KID_RULE}")


class Ed25519Signer:
    """Ed25519 over the canonical bytes; verifiers need only the public key."""

    def __init__(self, kid: str, seed: bytes, format: str = FORMAT_ENVELOPE) -> None:
        _check_kid(kid)
        if len(seed) != ED25519_SEED_BYTES:
            raise ValueError(f"Ed25519 seed must be {ED25519_SEED_BYTES} bytes, got {len(seed)}")
        if format not in FORMAT_NAMES:
            raise ValueError(f"format must be one of {', '.join(FORMAT_NAMES)}")
        self.kid = kid
        self.alg = ALG_ED25519
        self.format = format
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self._key = Ed25519PrivateKey.from_private_bytes(seed)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def public_key_bytes(self) -> bytes:
        """The raw 32-byte public key (what a verify-keys file carries)."""
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def __repr__(self) -> str:  # never the seed
        return f"Ed25519Signer(kid={self.kid!r}, format={self.format!r})"


class HmacSigner:
    """HMAC-SHA256; symmetric, so every verifier holds the signing key too.

    ``envelope`` format only: a DSSE signature names no algorithm, and DSSE verifiers treat a
    verification key as public; with HMAC every such "verifier" could also forge.
    """

    format: Final = FORMAT_ENVELOPE

    def __init__(self, kid: str, key: bytes) -> None:
        _check_kid(kid)
        if len(key) < HMAC_MIN_KEY_BYTES:
            raise ValueError(f"HMAC key must be at least {HMAC_MIN_KEY_BYTES} bytes")
        self.kid = kid
        self.alg = ALG_HMAC_SHA256
        self._key = bytes(key)

    def sign(self, data: bytes) -> bytes:
        return _hmac_sha256(self._key, data)

    def key_bytes(self) -> bytes:
        """The shared secret (for writing a verify-keys file; handle as a secret)."""
        return self._key

    def __repr__(self) -> str:  # never the key
        return f"HmacSigner(kid={self.kid!r})"


def signer_from_env(env: Mapping[str, str]) -> Signer | None:
    """The signer configured by ``CELLOS_EVENT_SIGNING*``, or ``None`` when signing is off.

    Raises ``PolicyRefused(<variable name>, reason)`` on a bad configuration; the reason never
    contains a variable's value.
    """
    mode = env.get(ENV_SIGNING, "").strip()
    fmt = format_from_env(env, signing=mode not in ("", "off"))
    if mode in ("", "off"):
        return None
    if mode not in ("ed25519", "hmac"):
        raise PolicyRefused(ENV_SIGNING, "must be one of off, ed25519, hmac")
    if fmt == FORMAT_DSSE and mode != "ed25519":
        raise PolicyRefused(
            ENV_FORMAT,
            f"dsse requires {ENV_SIGNING}=ed25519 (a DSSE signature names no algorithm and DSSE "
            "verifiers treat keys as public; an HMAC key would let every verifier forge events)",
        )
    kid = env.get(ENV_KID, "").strip()
    if not kid:
        raise PolicyRefused(ENV_KID, f"is required when {ENV_SIGNING}={mode}")
    if not is_valid_kid(kid):
        raise PolicyRefused(ENV_KID, KID_RULE)
    key_text = env.get(ENV_KEY, "").strip()
    if not key_text:
        raise PolicyRefused(ENV_KEY, f"is required when {ENV_SIGNING}={mode}")
    try:
        key = b64url_decode(key_text)
    except ValueError as exc:
        # ``from None``: the traceback must not carry anything derived from the key text.
        raise PolicyRefused(ENV_KEY, str(exc)) from None
    if mode == "ed25519":
        if len(key) != ED25519_SEED_BYTES:
            raise PolicyRefused(
                ENV_KEY,
                f"must decode to a {ED25519_SEED_BYTES}-byte Ed25519 seed, got {len(key)} bytes",
            )
        return Ed25519Signer(kid, key, fmt)
    if len(key) < HMAC_MIN_KEY_BYTES:
        raise PolicyRefused(
            ENV_KEY, f"must decode to at least {HMAC_MIN_KEY_BYTES} bytes, got {len(key)}"
        )
    return HmacSigner(kid, key)


def format_from_env(env: Mapping[str, str], *, signing: bool) -> str:
    """``CELLOS_EVENT_SIGNING_FORMAT``: ``envelope`` (default) or ``dsse``.

    ``dsse`` while signing is off is refused rather than ignored: whoever set it expects DSSE
    signatures, and a run that silently emits unsigned events would surprise them late.
    Pure string checks: composition calls it before deciding to import this module's callers.
    """
    fmt = env.get(ENV_FORMAT, "").strip() or FORMAT_ENVELOPE
    if fmt not in FORMAT_NAMES:
        raise PolicyRefused(ENV_FORMAT, f"must be one of {', '.join(FORMAT_NAMES)}")
    if fmt == FORMAT_DSSE and not signing:
        raise PolicyRefused(ENV_FORMAT, f"dsse needs signing on ({ENV_SIGNING}=ed25519)")
    return fmt


# --- envelopes ----------------------------------------------------------------------------


def wrap_signed(event: dict[str, Any], signer: Signer) -> dict[str, Any]:
    """The signed-envelope CloudEvent carrying ``event``.

    The inner event is deep-copied so later mutation by the caller cannot desynchronise it
    from the signature. Raises ``ValueError`` if ``event`` is already an envelope, lacks a
    required CloudEvents attribute, or cannot be canonicalised.
    """
    if event.get("type") == SIGNED_ENVELOPE:
        raise ValueError("event is already a signed envelope")
    for attr in (*_REQUIRED_BOUND, "id", "type"):
        if not isinstance(event.get(attr), str) or not event[attr]:
            raise ValueError(f"event lacks the CloudEvents attribute {attr!r}")
    fmt = _FORMATS.get(getattr(signer, "format", FORMAT_ENVELOPE))
    if fmt is None:
        raise ValueError("signer has an unknown envelope format")
    inner, data = copy_and_canonical(event)
    envelope: dict[str, Any] = {attr: inner[attr] for attr in BOUND_ATTRIBUTES if attr in inner}
    envelope["id"] = str(uuid.uuid4())
    envelope["type"] = SIGNED_ENVELOPE
    envelope["datacontenttype"] = fmt.content_type
    envelope["data"] = fmt.wrap(inner, data, signer)
    return envelope


@dataclass(frozen=True)
class Envelope:
    """A structurally valid envelope, its signature not yet checked.

    ``signed`` is what the signature covers: the inner event's canonical bytes (``envelope``
    format) or their DSSE PAE (``dsse``).
    """

    kid: str
    alg: str
    signature: bytes = field(repr=False)
    event: dict[str, Any] = field(repr=False)
    signed: bytes = field(repr=False)
    format: str = FORMAT_ENVELOPE


class SigningFormat(Protocol):
    """One envelope format: what goes into the envelope's ``data``, and back.

    ``wrap`` gets the inner event (already a private copy) and its canonical bytes and
    returns the envelope ``data``, signed; ``parse`` checks the ``data`` of an envelope
    whose ``datacontenttype`` is this format's and returns its kid, alg, signature, the
    inner event and the bytes the signature covers (``SignatureInvalid`` if malformed).
    """

    name: str
    content_type: str

    def wrap(self, inner: dict[str, Any], canonical: bytes, signer: Signer) -> dict[str, Any]: ...

    def parse(self, data: Any) -> Envelope: ...


class _EnvelopeFormat:
    """``{kid, alg, signature, event}``; the signature covers the canonical bytes."""

    name = FORMAT_ENVELOPE
    content_type = "application/json"

    def wrap(self, inner: dict[str, Any], canonical: bytes, signer: Signer) -> dict[str, Any]:
        return {
            "kid": signer.kid,
            "alg": signer.alg,
            "signature": b64url_encode(signer.sign(canonical)),
            "event": inner,
        }

    def parse(self, data: Any) -> Envelope:
        if not isinstance(data, dict) or set(data) != _ENVELOPE_DATA_KEYS:
            raise SignatureInvalid("envelope data must have exactly kid, alg, signature, event")
        kid, alg, sig_text, inner = data["kid"], data["alg"], data["signature"], data["event"]
        if not isinstance(kid, str) or not kid:
            raise SignatureInvalid("envelope kid must be a non-empty string")
        if not isinstance(alg, str) or not isinstance(sig_text, str):
            raise SignatureInvalid("envelope alg and signature must be strings")
        if not isinstance(inner, dict):
            raise SignatureInvalid("envelope event must be a JSON object")
        try:
            signature = b64url_decode(sig_text)
        except ValueError as exc:
            raise SignatureInvalid(f"signature: {exc}") from None
        try:
            signed = canonical_bytes(inner)
        except ValueError as exc:
            raise SignatureInvalid(f"inner event has no canonical form: {exc}") from None
        return Envelope(kid, alg, signature, inner, signed, self.name)


class _DsseFormat:
    """A DSSE envelope (one Ed25519 signature, keyid = kid) over the canonical bytes."""

    name = FORMAT_DSSE

    def __init__(self) -> None:
        from cellos.core import dsse

        self._dsse = dsse
        self.content_type = dsse.CONTENT_TYPE

    def wrap(self, inner: dict[str, Any], canonical: bytes, signer: Signer) -> dict[str, Any]:
        if signer.alg != ALG_ED25519:  # signer_from_env refuses this; a guard for direct use
            raise ValueError("the dsse format signs with Ed25519 only")
        d = self._dsse
        signature = signer.sign(d.pae(d.PAYLOAD_TYPE, canonical))
        return {
            "payloadType": d.PAYLOAD_TYPE,
            "payload": d.b64encode(canonical),
            "signatures": [{"keyid": signer.kid, "sig": d.b64encode(signature)}],
        }

    def parse(self, data: Any) -> Envelope:
        d = self._dsse
        if not isinstance(data, dict) or set(data) != d.DATA_KEYS:
            raise SignatureInvalid(
                "DSSE envelope must have exactly payloadType, payload, signatures"
            )
        payload_type, sigs = data["payloadType"], data["signatures"]
        # Checked against the one type we sign; the signature covers it too (PAE), so this is
        # for a clear reason, not for security.
        if payload_type != d.PAYLOAD_TYPE:
            raise SignatureInvalid(f"DSSE payloadType must be {d.PAYLOAD_TYPE}")
        # Exactly one signature: CellOS signs with one key, and "which kid signed" must have
        # one answer (the verifier reports it, the projection trusts it).
        if not isinstance(sigs, list) or len(sigs) != 1:
            raise SignatureInvalid("DSSE envelope must have exactly one signature")
        sig = sigs[0]
        if not isinstance(sig, dict) or set(sig) != d.SIGNATURE_KEYS:
            raise SignatureInvalid("DSSE signature must have exactly keyid, sig")
        kid = sig["keyid"]
        if not isinstance(kid, str) or not kid:
            raise SignatureInvalid("DSSE keyid must be a non-empty string")
        try:
            signature = d.b64decode(sig["sig"])
        except ValueError as exc:
            raise SignatureInvalid(f"DSSE sig: {exc}") from None
        try:
            payload = d.b64decode(data["payload"])
        except ValueError as exc:
            raise SignatureInvalid(f"DSSE payload: {exc}") from None
        try:
            inner = strict_loads(payload)
        except ValueError as exc:  # includes bad UTF-8 and duplicate keys
            raise SignatureInvalid(f"DSSE payload is not a JSON event: {exc}") from None
        except RecursionError:  # a shallow line can carry a deeply nested payload
            raise SignatureInvalid("DSSE payload is nested too deeply") from None
        if not isinstance(inner, dict):
            raise SignatureInvalid("DSSE payload must be a JSON object")
        # One byte form per event: the payload must be exactly what the signer writes, so the
        # chain digest (over canonical bytes) and the signed bytes describe the same thing.
        try:
            canonical = canonical_bytes(inner)
        except ValueError as exc:
            raise SignatureInvalid(f"inner event has no canonical form: {exc}") from None
        if canonical != payload:
            raise SignatureInvalid("DSSE payload is not the canonical (RFC 8785) event")
        return Envelope(kid, ALG_ED25519, signature, inner, d.pae(payload_type, payload), self.name)


class _Formats:
    """Formats by name, each built on first use (DSSE's module loads only for DSSE)."""

    _classes: Final[dict[str, type[_EnvelopeFormat] | type[_DsseFormat]]] = {
        FORMAT_ENVELOPE: _EnvelopeFormat,
        FORMAT_DSSE: _DsseFormat,
    }

    def __init__(self) -> None:
        self._built: dict[str, SigningFormat] = {}

    def get(self, name: str) -> SigningFormat | None:
        if name not in self._built:
            cls = self._classes.get(name)
            if cls is None:
                return None
            self._built[name] = cls()
        return self._built[name]

    def for_content_type(self, content_type: Any) -> SigningFormat | None:
        for name in self._classes:
            fmt = self.get(name)
            if fmt is not None and fmt.content_type == content_type:
                return fmt
        return None


_FORMATS: Final = _Formats()


def _same(a: Any, b: Any) -> bool:
    # Type-strict: JSON's 1, 1.0 and true compare equal in Python but are different values.
    return type(a) is type(b) and a == b


def parse_envelope(envelope: Any) -> Envelope:
    """Check an envelope's structure and attribute binding, without any key.

    Raises ``SignatureInvalid`` for anything but a well-formed envelope whose copied attributes
    equal the inner event's. Used by ``unwrap_signed``, and by a verifier without keys that
    still checks the run chain.
    """
    if not isinstance(envelope, dict):
        raise SignatureInvalid("envelope is not a JSON object")
    if envelope.get("type") != SIGNED_ENVELOPE:
        raise SignatureInvalid(f"not a signed envelope (type must be {SIGNED_ENVELOPE})")
    extra = sorted(set(envelope) - _ENVELOPE_ATTRIBUTES)
    if extra:
        raise SignatureInvalid(f"unexpected envelope attribute(s): {', '.join(map(repr, extra))}")
    fmt = _FORMATS.for_content_type(envelope.get("datacontenttype"))
    if fmt is None:
        raise SignatureInvalid(
            "envelope datacontenttype must be application/json (envelope format) or "
            "application/vnd.dsse.envelope.v1+json (dsse format)"
        )
    env = fmt.parse(envelope.get("data"))
    inner = env.event
    if not isinstance(inner.get("type"), str) or inner["type"] == SIGNED_ENVELOPE:
        raise SignatureInvalid("inner event must have a type and must not be an envelope")
    if not isinstance(envelope.get("id"), str) or not envelope["id"]:
        raise SignatureInvalid("envelope 'id' must be a non-empty string")
    if not isinstance(inner.get("id"), str) or not inner["id"]:
        raise SignatureInvalid("inner event lacks 'id'")
    for attr in BOUND_ATTRIBUTES:
        if attr in _REQUIRED_BOUND and attr not in inner:
            raise SignatureInvalid(f"inner event lacks {attr!r}")
        if (attr in envelope) != (attr in inner) or not _same(envelope.get(attr), inner.get(attr)):
            raise SignatureInvalid(f"envelope {attr!r} does not match the inner event")
    return env


# --- verification keys --------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyKey:
    """One verification key: an Ed25519 public key, or an HMAC secret (``repr`` hides it)."""

    kid: str
    alg: str
    material: bytes = field(repr=False)

    def verify(self, data: bytes, signature: bytes) -> bool:
        if self.alg == ALG_ED25519:
            if len(signature) != ED25519_SIGNATURE_BYTES:
                return False
            from cryptography.exceptions import InvalidSignature

            try:
                _ed25519_public(self.material).verify(signature, data)
            except InvalidSignature:
                return False
            return True
        if self.alg == ALG_HMAC_SHA256:
            import hmac

            return hmac.compare_digest(_hmac_sha256(self.material, data), signature)
        return False


def verify_key_entry(signer: Signer) -> dict[str, str]:
    """The verify-keys file entry for ``signer`` (for HMAC it contains the secret key)."""
    if isinstance(signer, Ed25519Signer):
        return {
            "kid": signer.kid,
            "alg": ALG_ED25519,
            "publicKey": b64url_encode(signer.public_key_bytes()),
        }
    if isinstance(signer, HmacSigner):
        return {"kid": signer.kid, "alg": ALG_HMAC_SHA256, "key": b64url_encode(signer.key_bytes())}
    raise TypeError(f"no verify-key form for {type(signer).__name__}")


def verify_keys_document(signers: Iterable[Signer]) -> dict[str, Any]:
    """A whole verify-keys document: ``{"keys": [...]}``."""
    return {"keys": [verify_key_entry(s) for s in signers]}


def _parse_key_entry(entry: Any, where: str) -> VerifyKey:
    if not isinstance(entry, dict):
        raise InvalidSpec(where, "must be an object")
    kid, alg = entry.get("kid"), entry.get("alg")
    if not isinstance(kid, str) or not kid:
        raise InvalidSpec(f"{where}.kid", "must be a non-empty string")
    if alg not in ALGORITHMS:
        raise InvalidSpec(f"{where}.alg", "must be ed25519 or hmac-sha256")
    # Unknown fields are refused: a typo in a security config must not pass silently.
    material_field = "publicKey" if alg == ALG_ED25519 else "key"
    extra = sorted(set(entry) - {"kid", "alg", material_field})
    if extra:
        raise InvalidSpec(where, f"unexpected field(s) for {alg}: {', '.join(extra)}")
    text = entry.get(material_field)
    if not isinstance(text, str):
        raise InvalidSpec(f"{where}.{material_field}", "must be a base64url string")
    try:
        material = b64url_decode(text)
    except ValueError as exc:
        raise InvalidSpec(f"{where}.{material_field}", str(exc)) from None
    if alg == ALG_ED25519:
        try:
            _ed25519_public(material)
        except ValueError:
            raise InvalidSpec(
                f"{where}.publicKey", "must decode to a 32-byte Ed25519 public key"
            ) from None
    elif len(material) < HMAC_MIN_KEY_BYTES:
        raise InvalidSpec(f"{where}.key", f"must decode to at least {HMAC_MIN_KEY_BYTES} bytes")
    return VerifyKey(kid=kid, alg=alg, material=material)


class VerifyKeys:
    """The keys a verifier trusts, by kid.

    File format: ``{"keys": [{"kid", "alg": "ed25519", "publicKey"} |
    {"kid", "alg": "hmac-sha256", "key"}]}``, values base64url. An HMAC entry is the signing
    secret itself, so such a file must be protected like the key.
    """

    def __init__(self, keys: Iterable[VerifyKey]) -> None:
        self._keys: dict[str, VerifyKey] = {}
        for key in keys:
            if key.kid in self._keys:
                raise ValueError(f"duplicate kid {key.kid!r}")
            self._keys[key.kid] = key

    @classmethod
    def from_document(cls, doc: Any, source: str = "verify-keys") -> VerifyKeys:
        """Parse a decoded verify-keys document; ``InvalidSpec(<source>:<field>, reason)``."""
        if not isinstance(doc, dict) or set(doc) != {"keys"} or not isinstance(doc["keys"], list):
            raise InvalidSpec(source, 'must be an object with exactly one field, "keys" (a list)')
        if not doc["keys"]:
            raise InvalidSpec(f"{source}:keys", "must list at least one key")
        keys = [_parse_key_entry(e, f"{source}:keys[{i}]") for i, e in enumerate(doc["keys"])]
        seen: set[str] = set()
        for i, key in enumerate(keys):
            if key.kid in seen:
                raise InvalidSpec(f"{source}:keys[{i}].kid", f"duplicate kid {key.kid!r}")
            seen.add(key.kid)
        return cls(keys)

    @classmethod
    def from_signers(cls, *signers: Signer) -> VerifyKeys:
        """The keys that verify what ``signers`` sign (self-checks and tests)."""
        return cls.from_document(verify_keys_document(signers))

    def get(self, kid: str) -> VerifyKey | None:
        return self._keys.get(kid)

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, kid: str, alg: str, data: bytes, signature: bytes) -> bool:
        """True iff ``kid`` is known, its alg is ``alg`` and ``signature`` is valid."""
        key = self._keys.get(kid)
        return key is not None and key.alg == alg and key.verify(data, signature)


def verify_envelope(envelope: Any, keys: VerifyKeys) -> Envelope:
    """A verified envelope of either format; ``SignatureInvalid(reason)`` otherwise."""
    env = parse_envelope(envelope)
    key = keys.get(env.kid)
    if key is None:
        raise SignatureInvalid(f"unknown kid {env.kid!r}")
    if key.alg != env.alg:
        if env.format == FORMAT_DSSE:
            raise SignatureInvalid(
                f"DSSE envelopes are verified with ed25519 keys only; key {env.kid!r} is {key.alg}"
            )
        raise SignatureInvalid(
            f"alg mismatch: envelope says {env.alg!r}, key {env.kid!r} is {key.alg}"
        )
    if not key.verify(env.signed, env.signature):
        raise SignatureInvalid(f"bad signature (kid {env.kid!r})")
    return env


def unwrap_signed(envelope: Any, keys: VerifyKeys) -> dict[str, Any]:
    """The inner event of a verified envelope (either format); ``SignatureInvalid`` otherwise."""
    return verify_envelope(envelope, keys).event
