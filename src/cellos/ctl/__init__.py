"""``cellctl``: a thin command-line client of the ``cellos serve`` HTTP API (DESIGN.md §1, L7).

Standard library only (``urllib``): it imports nothing of the server, the supervisor or NATS.
"""
