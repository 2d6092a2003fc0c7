"""How a secret key becomes the name of the environment variable that delivers it."""

from __future__ import annotations

import re

_NOT_ENV = re.compile(r"[^A-Za-z0-9_]")


def secret_env_name(key: str) -> str:
    """``npm-token`` -> ``NPM_TOKEN``: upper case, every other character becomes ``_``."""
    name = _NOT_ENV.sub("_", key).upper()
    return name if not name[0].isdigit() else f"_{name}"
