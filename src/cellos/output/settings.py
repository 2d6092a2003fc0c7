"""Output settings from ``CELLOS_*`` variables; a bad value names its variable (exit 2)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from cellos.core.data_dirs import default_data_dir
from cellos.core.errors import PolicyRefused
from cellos.output.pipeline import DEFAULT_LOG_MAX_BYTES, OutputSettings

#: ``CELLOS_LOGS`` bounds and the publisher's buffer (per stream), when NATS is configured.
DEFAULT_LOGS_MAX_BYTES = 1 << 30
DEFAULT_LOGS_MAX_AGE_SECONDS = 7 * 24 * 3600
DEFAULT_LOGS_BUFFER_BYTES = 8 << 20
_OFF = {"off", "none", "0"}


def _positive(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise PolicyRefused(name, f"must be a positive integer (bytes or seconds), not {raw!r}")
    return int(raw)


def output_settings(env: Mapping[str, str], nats_url: str | None) -> OutputSettings:
    """The durable log (``CELLOS_LOG_DIR``, ``CELLOS_LOG_MAX_BYTES``) and, with ``nats_url``,
    the live publisher (``CELLOS_LOGS_MAX_BYTES``, ``CELLOS_LOGS_MAX_AGE_SECONDS``,
    ``CELLOS_LOGS_BUFFER_BYTES``)."""
    raw_dir = env.get("CELLOS_LOG_DIR", "").strip()
    if raw_dir.lower() in _OFF:
        log_dir: str | None = None
    elif raw_dir:
        if not os.path.isabs(raw_dir):
            raise PolicyRefused("CELLOS_LOG_DIR", f"must be an absolute path, not {raw_dir!r}")
        log_dir = raw_dir
    else:
        log_dir = default_data_dir("logs")
    max_bytes = _positive(env, "CELLOS_LOG_MAX_BYTES", DEFAULT_LOG_MAX_BYTES)
    stream_max = _positive(env, "CELLOS_LOGS_MAX_BYTES", DEFAULT_LOGS_MAX_BYTES)
    max_age = _positive(env, "CELLOS_LOGS_MAX_AGE_SECONDS", DEFAULT_LOGS_MAX_AGE_SECONDS)
    buffer = _positive(env, "CELLOS_LOGS_BUFFER_BYTES", DEFAULT_LOGS_BUFFER_BYTES)
    publisher = None
    if nats_url:
        # Imported only here: a supervisor without NATS never loads nats-py for its output.
        from cellos.output.natslogs import LogPublisher, LogsStreamConfig

        publisher = LogPublisher(nats_url, LogsStreamConfig(stream_max, max_age, buffer))
    return OutputSettings(log_dir=log_dir, log_max_bytes=max_bytes, publisher=publisher)
