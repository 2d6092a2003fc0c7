"""The ``stub`` backend: no isolation at all (seed contract, DESIGN.md §5)."""

from cellos.hosts.stub.backend import StubBackend

__all__ = ["StubBackend"]
