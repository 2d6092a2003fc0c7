"""The default ``cellos`` backend: a host process with Linux isolation."""

from cellos.hosts.cellos.backend import CellosBackend

__all__ = ["CellosBackend"]
