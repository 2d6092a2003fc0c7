"""Entry points of the commands whose start is latency: ``cellos-supervisor`` (:func:`supervisor`).

A CI system starts one supervisor process per cell. Importing what it needs allocates ~13,000
objects that live as long as the process (classes, functions, msgspec's types, typing's
aliases); every 700 allocations the cyclic garbage collector walks the young ones, finds
nothing to free and promotes them: ~18 collections, ~2.5 ms of a ~55 ms run. So the imports run
with the collector paused, and what they made is then frozen (:func:`gc.freeze`: moved where
no later collection walks it) before collection resumes for the run itself.

This module sits outside the ``cellos`` package on purpose: importing anything inside it runs
``cellos/__init__.py`` (and msgspec) first, before a pause could begin.
"""

import gc


def supervisor() -> None:
    gc.disable()
    try:
        from cellos.core.fast_exit import exit_now
        from cellos.supervisor.cli import main
    finally:
        gc.freeze()
        gc.enable()
    exit_now(main())
