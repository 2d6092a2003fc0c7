"""Generate an event-signing key and the matching verify-keys file (DESIGN.md §4).

Writes, in ``out_dir``:

* ``<kid>.key`` -- base64url of the Ed25519 32-byte seed, or of a random 32-byte HMAC key;
  mode 0600. This is what ``CELLOS_EVENT_SIGNING_KEY_BASE64`` is set from.
* ``<kid>.verify-keys.json`` -- the ``VerifyKeys`` document for ``cellos events verify``.
  For Ed25519 it holds only the public key and may be shared (mode 0644 minus umask). For
  HMAC it necessarily holds the secret key itself (a symmetric verifier can also forge), so
  it is written 0600 and must be handled like the key file.

Files are created with ``O_CREAT|O_EXCL|O_NOFOLLOW``: an existing file -- or a symlink planted
where a key is about to be written -- is never overwritten or followed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
from dataclasses import dataclass
from typing import Final

from cellos.core.errors import InvalidSpec
from cellos.core.signing import (
    ALG_ED25519,
    ALG_HMAC_SHA256,
    ED25519_SEED_BYTES,
    ENV_KEY,
    ENV_KID,
    ENV_SIGNING,
    KID_RULE,
    Ed25519Signer,
    HmacSigner,
    Signer,
    b64url_encode,
    is_valid_kid,
    verify_keys_document,
)

_HMAC_KEY_BYTES: Final = 32
# Accepted spellings of ``alg``: the env-var value ("hmac") and the key-file value.
_ALGS: Final = {"ed25519": ALG_ED25519, "hmac": ALG_HMAC_SHA256, "hmac-sha256": ALG_HMAC_SHA256}
_ENV_MODE: Final = {ALG_ED25519: "ed25519", ALG_HMAC_SHA256: "hmac"}


@dataclass(frozen=True)
class KeygenResult:
    kid: str
    #: ``"ed25519"`` or ``"hmac-sha256"``.
    alg: str
    key_path: str
    verify_keys_path: str

    @property
    def env_lines(self) -> tuple[str, ...]:
        """Shell lines that enable signing with this key (the key is read from its file)."""
        key_file = shlex.quote(os.path.abspath(self.key_path))
        return (
            f"{ENV_SIGNING}={_ENV_MODE[self.alg]}",
            f"{ENV_KID}={self.kid}",
            f'{ENV_KEY}="$(cat {key_file})"',
        )


def _open_new(path: str, mode: int) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, mode)
    except FileExistsError:
        raise InvalidSpec(path, "already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise InvalidSpec(path, f"cannot create: {exc.strerror}") from None


def _write_all(fd: int, text: str) -> None:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())  # a key that is announced but not on disk after a crash is lost


def write_keypair(out_dir: str, kid: str, alg: str = "ed25519") -> KeygenResult:
    """Create ``<kid>.key`` and ``<kid>.verify-keys.json`` in ``out_dir`` (created 0700 if absent).

    ``alg`` is ``ed25519`` (default), ``hmac`` or ``hmac-sha256``. Raises ``InvalidSpec`` for a
    bad kid or alg, an existing target file, or a directory that cannot be written; on failure
    no file is left behind.
    """
    if not is_valid_kid(kid):
        raise InvalidSpec("kid", KID_RULE)
    algorithm = _ALGS.get(alg)
    if algorithm is None:
        raise InvalidSpec("alg", "must be ed25519 or hmac")
    try:
        os.makedirs(out_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise InvalidSpec(out_dir, f"cannot create directory: {exc.strerror}") from None

    secret = secrets.token_bytes(
        ED25519_SEED_BYTES if algorithm == ALG_ED25519 else _HMAC_KEY_BYTES
    )
    signer: Signer = (
        Ed25519Signer(kid, secret) if algorithm == ALG_ED25519 else HmacSigner(kid, secret)
    )
    key_path = os.path.join(out_dir, f"{kid}.key")
    verify_path = os.path.join(out_dir, f"{kid}.verify-keys.json")
    verify_mode = 0o644 if algorithm == ALG_ED25519 else 0o600

    contents = (
        (key_path, 0o600, b64url_encode(secret) + "\n"),
        (verify_path, verify_mode, json.dumps(verify_keys_document([signer]), indent=2) + "\n"),
    )
    # Reserve both names before writing anything, so a clash on the second one cannot leave
    # an orphan key behind; remove what we created if anything fails afterwards.
    created: list[str] = []
    unwritten: list[int] = []  # descriptors not yet handed over to (and closed by) _write_all
    try:
        for path, mode, _ in contents:
            unwritten.append(_open_new(path, mode))
            created.append(path)
        for _, _, text in contents:
            _write_all(unwritten.pop(0), text)
    except BaseException:
        for fd in unwritten:
            os.close(fd)
        for path in created:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        raise
    return KeygenResult(kid=kid, alg=algorithm, key_path=key_path, verify_keys_path=verify_path)
