"""The control plane's HTTP side (DESIGN.md §1, L7): ``cellos serve`` and ``cellos events tail``.

* :mod:`cellos.server.projection` -- pure fold of ``CELLOS_EVENTS`` into per-cell state;
* :mod:`cellos.server.app` -- the HTTP API (aiohttp) over that projection, kept current by an
  ordered JetStream consumer;
* :mod:`cellos.server.submit` -- putting a submitted document on the work queue;
* :mod:`cellos.server.tail` -- following the stream while verifying signatures and chains;
* :mod:`cellos.server.cli` -- the ``serve`` and ``events tail`` subcommands.

Nothing here is imported by ``cellos.cli`` at start-up except :mod:`cellos.server.cli`, whose
handlers import the rest lazily.
"""
