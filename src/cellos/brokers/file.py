"""``CELLOS_BROKER=file``: key ``npm-token`` is read from ``$CELLOS_SECRET_FILE_NPM_TOKEN``.

The file is opened with O_NOFOLLOW, must be a regular file of at most 64 KiB, and one trailing
newline is stripped (editors add one).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping

from cellos.core.errors import SecretBrokerError
from cellos.core.secrets_env import secret_env_name

MAX_SECRET_BYTES = 64 << 10


class FileBroker:
    name = "file"

    def __init__(self, env: Mapping[str, str]) -> None:
        self._paths = {k: v for k, v in env.items() if k.startswith("CELLOS_SECRET_FILE_")}

    def resolve(self, cell_id: str, key: str) -> str:
        var = f"CELLOS_SECRET_FILE_{secret_env_name(key)}"
        path = self._paths.get(var)
        if not path:
            raise SecretBrokerError(key, f"secret not found in broker 'file' (set {var})")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise SecretBrokerError(
                key, f"cannot open the file named by {var}: {exc.strerror}"
            ) from None
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SecretBrokerError(key, f"the file named by {var} is not a regular file")
            data = fh.read(MAX_SECRET_BYTES + 1)
        if len(data) > MAX_SECRET_BYTES:
            raise SecretBrokerError(
                key, f"the file named by {var} is larger than {MAX_SECRET_BYTES} bytes"
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise SecretBrokerError(key, f"the file named by {var} is not UTF-8") from None
        text = text[:-1] if text.endswith("\n") else text
        if "\x00" in text:
            raise SecretBrokerError(key, f"the file named by {var} contains NUL")
        return text

    def revoke(self, cell_id: str) -> None:
        return None
