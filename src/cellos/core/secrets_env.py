"""How a secret key becomes the name of the environment variable that delivers it."""

from __future__ import annotations

import re

_NOT_ENV = re.compile(r"[^A-Za-z0-9_]")


def secret_env_name(key: str) -> str:
    """``npm-token`` -> ``NPM_TOKEN``: upper case, every other character becomes ``_``."""
    name = _NOT_ENV.sub("_", key).upper()
    return name if not name[0].isdigit() else f"_{name}"


#: Where a secret injected by the egress proxy (``authority.secretInjection``) is represented:
#: the workload gets a per-cell placeholder under this prefix, never the value.
PLACEHOLDER_PREFIX = "CELLOS_SECRET_PLACEHOLDER_"

#: Variables that point the workload's TLS clients at the cell's CA bundle (set by CellOS when
#: the cell has ``secretInjection``).
INJECTION_TRUST_VARIABLES = (
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "CURL_CA_BUNDLE",
)


def placeholder_env_name(key: str) -> str:
    """``npm-token`` -> ``CELLOS_SECRET_PLACEHOLDER_NPM_TOKEN``."""
    return PLACEHOLDER_PREFIX + secret_env_name(key).lstrip("_")
