"""Leave a one-shot CLI process without the interpreter's finalisation.

After a cell, tearing down the interpreter (every module's objects, the garbage collector's
final passes) costs ~8 ms of a ``cellos-supervisor`` process's ~80: a tenth of what a CI
system pays per cell, for freeing memory the kernel frees anyway. Everything that carries
data is closed explicitly before this is called (sinks, logs, exports); the atexit handlers
still run and the standard streams are flushed. With any other thread alive the normal exit
is taken, because it waits for non-daemon threads to finish their work.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def exit_now(code: int) -> NoReturn:
    if threading.active_count() > 1:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            # A reader that went away (a closed pipe): its output is lost either way, and the
            # normal exit would not report it any better.
            pass
    os._exit(code)
