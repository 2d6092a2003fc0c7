"""Leave a one-shot CLI process without the interpreter's finalisation.

After a cell, tearing down the interpreter (every module's objects, the garbage collector's
final passes) costs ~8 ms of a ``cellos-supervisor`` process's ~80: a tenth of what a CI
system pays per cell, for freeing memory the kernel frees anyway. Everything that carries
data is closed explicitly before this is called (sinks, logs, exports); the atexit handlers
still run and the standard streams are flushed. With another non-daemon thread alive the
normal exit is taken, because it waits for such threads to finish their work; daemon threads
(e.g. the idle event loop of the network proxies) are stopped at exit either way.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def exit_now(code: int) -> NoReturn:
    main = threading.main_thread()
    if any(t is not main and not t.daemon for t in threading.enumerate()):
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
