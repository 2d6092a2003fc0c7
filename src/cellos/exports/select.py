"""Picking the one export destination from ``CELLOS_EXPORT_DIR``, ``_URL`` or ``_S3``.

The remote sinks are imported only when their variable is set: ``http`` brings ``socket`` and
``http.client``, ``s3`` brings boto3, and a plain run's cold start must not pay for either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from cellos.core.errors import PolicyRefused
from cellos.core.ports import ExportSink, SecretBroker

if TYPE_CHECKING:
    from cellos.exports.http import RetryPolicy

DESTINATION_VARS = ("CELLOS_EXPORT_DIR", "CELLOS_EXPORT_URL", "CELLOS_EXPORT_S3")
TOKEN_VAR = "CELLOS_EXPORT_TOKEN_SECRET"


def make_exporter(env: Mapping[str, str], broker: SecretBroker) -> ExportSink | None:
    """The configured export sink (None: none is); refusals name the variable (exit 2)."""
    chosen = [(var, env.get(var, "").strip()) for var in DESTINATION_VARS]
    chosen = [(var, value) for var, value in chosen if value]
    token_key = env.get(TOKEN_VAR, "").strip() or None
    if len(chosen) > 1:
        names = " and ".join(var for var, _ in chosen)
        raise PolicyRefused(
            chosen[1][0], f"only one export destination at a time ({names} are both set)"
        )
    if not chosen:
        if token_key is not None:
            raise PolicyRefused(TOKEN_VAR, "set without CELLOS_EXPORT_URL")
        return None
    var, value = chosen[0]
    if token_key is not None and var != "CELLOS_EXPORT_URL":
        raise PolicyRefused(TOKEN_VAR, f"only CELLOS_EXPORT_URL takes a token (not {var})")
    if var == "CELLOS_EXPORT_DIR":
        from cellos.exports.local import LocalExportSink

        return LocalExportSink(value)
    if var == "CELLOS_EXPORT_URL":
        from cellos.exports.http import HttpExportSink

        return HttpExportSink(value, broker=broker, token_key=token_key, retry=_retry_policy(env))
    from cellos.exports.s3 import S3ExportSink

    return S3ExportSink(value, env)


def _retry_policy(env: Mapping[str, str]) -> RetryPolicy:
    from cellos.exports.http import RetryPolicy

    raw = env.get("CELLOS_EXPORT_TIMEOUT_SECONDS", "").strip()
    if not raw:
        return RetryPolicy()
    try:
        timeout = float(raw)
    except ValueError:
        timeout = -1.0
    if not 0 < timeout <= 3600:
        raise PolicyRefused(
            "CELLOS_EXPORT_TIMEOUT_SECONDS", "must be a number of seconds in (0, 3600]"
        )
    return RetryPolicy(timeout_seconds=timeout)
