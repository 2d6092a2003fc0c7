"""Secret brokers (L3); :func:`make_broker` picks one from ``CELLOS_BROKER``."""

from __future__ import annotations

from collections.abc import Mapping

from cellos.brokers.env import EnvBroker
from cellos.brokers.file import FileBroker
from cellos.brokers.memory import MemoryBroker
from cellos.core.errors import PolicyRefused
from cellos.core.ports import SecretBroker

__all__ = ["EnvBroker", "FileBroker", "MemoryBroker", "make_broker"]


def make_broker(env: Mapping[str, str]) -> SecretBroker:
    name = env.get("CELLOS_BROKER", "").strip() or "memory"
    if name == "memory":
        return MemoryBroker()
    if name == "env":
        return EnvBroker(env)
    if name == "file":
        return FileBroker(env)
    if name == "vault-approle":
        raise PolicyRefused(
            "CELLOS_BROKER", "broker 'vault-approle' is not available in this build"
        )
    raise PolicyRefused("CELLOS_BROKER", f"unknown broker {name!r} (expected memory, env or file)")
