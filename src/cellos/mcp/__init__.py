"""``cellos mcp``: a Model Context Protocol server whose every tool call is one cell.

The modules below the SDK boundary (:mod:`settings`, :mod:`documents`, :mod:`prelude`,
:mod:`runner`, :mod:`runlog`) import no ``mcp``; only :mod:`server` and :mod:`http` do, and
only ``cellos mcp`` imports them, so ``cellos-supervisor`` and the other subcommands start as
fast as before.
"""
