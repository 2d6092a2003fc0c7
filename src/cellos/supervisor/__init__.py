"""The supervisor (L4-L6): lifecycle, composition from the environment, CLI."""

from cellos.supervisor.lifecycle import RunOutcome, Supervisor

__all__ = ["RunOutcome", "Supervisor"]
