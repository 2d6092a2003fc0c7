"""Building a Supervisor from environment variables (DESIGN.md §4, §6, §7)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import msgspec

from cellos.brokers import make_broker
from cellos.core.data_dirs import default_data_dir
from cellos.core.errors import PolicyRefused
from cellos.core.ports import EventSink
from cellos.exports.select import make_exporter
from cellos.hosts.registry import make_backend, make_reaper
from cellos.output.settings import output_settings
from cellos.supervisor.lifecycle import DEFAULT_TTL_SECONDS, Supervisor

PROFILES = ("portable", "hardened")
#: The JetStream sink's default (kept here so that composing without NATS imports no nats-py).
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


class Settings(msgspec.Struct, frozen=True):
    profile: str
    backend: str
    default_ttl_seconds: int


def read_settings(env: Mapping[str, str]) -> Settings:
    profile = env.get("CELLOS_DEPLOYMENT_PROFILE", "").strip() or "portable"
    if profile not in PROFILES:
        raise PolicyRefused(
            "CELLOS_DEPLOYMENT_PROFILE",
            f"unknown profile {profile!r} (expected {' or '.join(PROFILES)})",
        )
    raw_ttl = env.get("CELLOS_DEFAULT_TTL_SECONDS", "").strip() or str(DEFAULT_TTL_SECONDS)
    if not raw_ttl.isdigit() or int(raw_ttl) < 1:
        raise PolicyRefused("CELLOS_DEFAULT_TTL_SECONDS", "must be a positive integer")
    return Settings(
        profile=profile,
        backend=env.get("CELLOS_CELL_BACKEND", "").strip() or "cellos",
        default_ttl_seconds=int(raw_ttl),
    )


def default_dlq_dir() -> str:
    return default_data_dir("dlq")


def jetstream_wanted(env: Mapping[str, str]) -> bool:
    return bool(env.get("CELLOS_NATS_URL", "").strip()) or _flag(env, "CELL_OS_REQUIRE_JETSTREAM")


def _sinks(env: Mapping[str, str]) -> list[EventSink]:
    # Each sink module only when configured: one-shot supervisors pay for every import.
    sinks: list[EventSink] = []
    jetstream = jetstream_wanted(env)
    if jetstream:
        from cellos.sinks.jetstream import DEFAULT_URL, JetStreamSink

        sinks.append(
            JetStreamSink(
                env.get("CELLOS_NATS_URL", "").strip() or DEFAULT_URL,
                require=_flag(env, "CELL_OS_REQUIRE_JETSTREAM"),
            )
        )
    jsonl = env.get("CELL_OS_JSONL_EVENTS", "").strip()
    if jsonl:
        from cellos.sinks.jsonl import JsonlFileSink

        sinks.append(JsonlFileSink(jsonl))
    elif not jetstream and not _flag(env, "CELL_OS_USE_NOOP_SINK"):
        from cellos.sinks.jsonl import JsonlStreamSink

        # With no sink configured, events go to stderr rather than nowhere.
        sinks.append(JsonlStreamSink(sys.stderr))
    # Events JetStream cannot take are kept on disk: a DLQ is always there with JetStream.
    dlq = env.get("CELLOS_DLQ_DIR", "").strip() or (default_dlq_dir() if jetstream else "")
    if dlq:
        from cellos.sinks.dlq import DlqSink

        sinks = [DlqSink(s, dlq, getattr(s, "name", "sink")) for s in sinks]
    if not sinks:
        from cellos.sinks.noop import NoopSink

        sinks.append(NoopSink())
    return sinks


def build_supervisor(env: Mapping[str, str]) -> Supervisor:
    """Compose a supervisor; every refusal is a PolicyRefused naming the variable."""
    settings = read_settings(env)
    signer = None
    signing = env.get("CELLOS_EVENT_SIGNING", "").strip() not in ("", "off")
    # The format's default needs no check; any other value is checked by the signing module,
    # which is imported only then (an unsigned run must not pay for it).
    if signing or env.get("CELLOS_EVENT_SIGNING_FORMAT", "").strip() not in ("", "envelope"):
        # Signing (and its base64/cryptography imports) only when it is configured.
        from cellos.core.signing import format_from_env, signer_from_env

        format_from_env(env, signing=signing)  # refuses a bad format even with signing off
        signer = signer_from_env(env)
    if settings.profile == "hardened":
        if settings.backend == "stub":
            raise PolicyRefused(
                "CELLOS_CELL_BACKEND", "the hardened profile refuses the stub backend"
            )
        if _flag(env, "CELL_OS_USE_NOOP_SINK"):
            raise PolicyRefused(
                "CELL_OS_USE_NOOP_SINK", "the hardened profile refuses the noop sink"
            )
        if signer is None:
            raise PolicyRefused(
                "CELLOS_EVENT_SIGNING", "the hardened profile requires signed events"
            )
        if not _flag(env, "CELL_OS_REQUIRE_JETSTREAM"):
            raise PolicyRefused(
                "CELL_OS_REQUIRE_JETSTREAM", "the hardened profile requires JetStream (set it to 1)"
            )
    output = output_settings(
        env,
        (env.get("CELLOS_NATS_URL", "").strip() or DEFAULT_NATS_URL)
        if jetstream_wanted(env)
        else None,
    )
    # The export destination is checked before the backend exists: a refusal costs nothing.
    broker = make_broker(env)
    exporter = make_exporter(env, broker)
    backend = make_backend(settings.backend, env)
    return Supervisor(
        backend=backend,
        sinks=_sinks(env),
        broker=broker,
        exporter=exporter,
        signer=signer,
        host=os.uname().nodename,  # socket.gethostname() without importing socket
        default_ttl_seconds=settings.default_ttl_seconds,
        profile=settings.profile,
        reaper=make_reaper(env),
        output=output,
    )
