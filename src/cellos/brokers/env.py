"""``CELLOS_BROKER=env``: the value of key ``npm-token`` is ``$CELLOS_SECRET_NPM_TOKEN``."""

from __future__ import annotations

from collections.abc import Mapping

from cellos.core.errors import SecretBrokerError
from cellos.core.secrets_env import secret_env_name


class EnvBroker:
    name = "env"

    def __init__(self, env: Mapping[str, str]) -> None:
        # Copy only our own variables: nothing else of the supervisor's environment is kept.
        self._values = {
            k: v
            for k, v in env.items()
            if k.startswith("CELLOS_SECRET_") and not k.startswith("CELLOS_SECRET_FILE_")
        }

    def resolve(self, cell_id: str, key: str) -> str:
        var = f"CELLOS_SECRET_{secret_env_name(key)}"
        if var not in self._values:
            raise SecretBrokerError(key, f"secret not found in broker 'env' (set {var})")
        return self._values[var]

    def revoke(self, cell_id: str) -> None:
        return None
