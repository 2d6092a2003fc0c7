"""The ``gvisor`` backend: cells under runsc's user-space kernel."""

from cellos.hosts.gvisor.backend import GvisorBackend

__all__ = ["GvisorBackend"]
