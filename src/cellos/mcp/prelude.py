"""Getting a call's files into the cell's workspace, without a shell and without escaping.

The ExecutionCell document has no "files" field, and a launcher such as ``/bin/sh -c 'cat >
f <<EOF ...'`` would put the caller's bytes into shell syntax (quoting bugs, injection). Instead
each file travels as one environment variable of the cell, ``CELLOS_MCP_FILE_<n>`` =
``base64(name) "." base64(content)``, and a fixed, trusted prelude (:data:`PRELUDE`, run by the
host's Python inside the cell) decodes them into the workspace and ``execve``s the real argv
with those variables removed. The content is never parsed by anything but base64; names are
checked on the server (:func:`check_name`) and again by the prelude; files are created with
``O_EXCL | O_NOFOLLOW`` relative to the workspace. The document (and so its digest in the
events) records the files exactly, and no event carries environment values.

Linux caps one environment string at 128 KiB (``MAX_ARG_STRLEN``), hence
:data:`MAX_ENCODED_FILE_BYTES` per file.
"""

from __future__ import annotations

import base64
import re

ENV_PREFIX = "CELLOS_MCP_FILE_"
#: One ``NAME=value`` string must stay below the kernel's 128 KiB per-string limit.
MAX_ENCODED_FILE_BYTES = 120_000
_PART = re.compile(r"[A-Za-z0-9._+@=,-]{1,255}")

PRELUDE = """\
import base64, os, sys
P = "CELLOS_MCP_FILE_"
F = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
D = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
for key in sorted(k for k in os.environ if k.startswith(P)):
    head, _, body = os.environ.pop(key).partition(".")
    name = base64.b64decode(head, validate=True).decode()
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        sys.exit("cellos-mcp prelude: refusing file name %r" % name)
    fd = os.open(".", D)
    for part in parts[:-1]:
        try:
            os.mkdir(part, 0o755, dir_fd=fd)
        except FileExistsError:
            pass
        sub = os.open(part, D, dir_fd=fd)
        os.close(fd)
        fd = sub
    out = os.open(parts[-1], F, 0o644, dir_fd=fd)
    os.close(fd)
    with os.fdopen(out, "wb") as f:
        f.write(base64.b64decode(body, validate=True))
os.execve(sys.argv[1], sys.argv[1:], os.environ)
"""


def check_name(name: str) -> str | None:
    """Why ``name`` is not a usable workspace-relative file name, or None."""
    if not name or len(name.encode()) > 1024:
        return "must be 1 to 1024 bytes"
    parts = name.split("/")
    for part in parts:
        if part in (".", "..") or not _PART.fullmatch(part):
            return "must be a relative path of [A-Za-z0-9._+@=,-] parts (no '..', no '/' start)"
    return None


def encode_file(name: str, content: bytes) -> str:
    return base64.b64encode(name.encode()).decode() + "." + base64.b64encode(content).decode()


def prelude_argv(python: str, target: list[str]) -> list[str]:
    """Run :data:`PRELUDE` (isolated mode: no site, no user paths), then ``target``."""
    return [python, "-I", "-S", "-c", PRELUDE, *target]
