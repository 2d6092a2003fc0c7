"""Logging that costs nothing until a message is logged.

``import logging`` (with ``traceback``, ``string``, ``tokenize`` ...) is a measurable share of
a one-shot ``cellos-supervisor`` start, and a clean run logs nothing. So modules log through
:func:`get_logger`, which imports and configures :mod:`logging` on the first message.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import logging

#: The CLIs' format; the level comes from ``CELLOS_LOG_LEVEL`` (default WARNING).
FORMAT = "cellos: %(levelname)s: %(message)s"
_configure_on_first_use = False


def configure() -> None:
    """Called by the CLIs: stderr, :data:`FORMAT`, ``CELLOS_LOG_LEVEL``; applied now if
    :mod:`logging` is already loaded, else when the first message is logged."""
    global _configure_on_first_use
    import sys

    if "logging" in sys.modules:
        _apply()
    else:
        _configure_on_first_use = True


def _apply() -> None:
    import logging

    logging.basicConfig(level=os.environ.get("CELLOS_LOG_LEVEL", "WARNING").upper(), format=FORMAT)


class LazyLogger:
    def __init__(self, name: str) -> None:
        self.name = name
        self._logger: logging.Logger | None = None

    def _get(self) -> logging.Logger:
        if self._logger is None:
            global _configure_on_first_use
            import logging

            if _configure_on_first_use:
                _configure_on_first_use = False
                _apply()
            self._logger = logging.getLogger(self.name)
        return self._logger

    def debug(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self._get().debug(msg, *args, **kwargs)

    def info(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self._get().info(msg, *args, **kwargs)

    def warning(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self._get().warning(msg, *args, **kwargs)

    def error(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self._get().error(msg, *args, **kwargs)

    def exception(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self._get().exception(msg, *args, **kwargs)

    def isEnabledFor(self, level: int) -> bool:
        return self._get().isEnabledFor(level)


def get_logger(name: str) -> LazyLogger:
    return LazyLogger(name)
