"""nftables through its JSON API: commands are data, never concatenated strings.

Commands go through ``libnftables`` (the library the ``nft`` tool is built on) in this
process, over one netlink socket kept open for the process's life: a cell's whole table is
one transaction of ~0.2 ms, where spawning ``nft`` costs ~5 ms per call, and a deletion
costs the spawned tool a further RCU grace period (10-30 ms here) when it closes its socket.
Without the library (``libnftables.so.1`` not installed), the ``nft`` binary is spawned as
before. A context is bound to the network namespace it was created in; :func:`run` with
``netns=`` creates a short-lived one inside that namespace.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import threading
from typing import Any

from cellos.core.errors import HostError
from cellos.network.netlink import NETLINK_NETFILTER

Json = dict[str, Any]

#: libnftables output flag: JSON (in 1.0.x it also makes the library parse JSON input).
_OUTPUT_JSON = 1 << 4
#: libnftables >= 1.0.7 input flag: JSON.
_INPUT_JSON = 1 << 1


def nft_binary() -> str:
    import shutil  # only without libnftables (with bz2, lzma: ~3 ms of a cold egress cell)

    found = shutil.which("nft") or ("/usr/sbin/nft" if os.path.exists("/usr/sbin/nft") else None)
    if found is None:
        raise HostError("nft", "nftables (nft) is not installed; run scripts/setup.sh")
    return found


class _Library:
    """The ``libnftables`` entry points this module uses, typed for ctypes."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libnftables.so.1", use_errno=True)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_free.restype = None
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_output_set_flags.restype = None
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_int
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_char_p
        self.input_flags = getattr(lib, "nft_ctx_input_set_flags", None)
        if self.input_flags is not None:
            self.input_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
            self.input_flags.restype = ctypes.c_uint
        self.lib = lib


_library: _Library | None = None
_library_missing = False
_library_lock = threading.Lock()


def _load() -> _Library | None:
    global _library, _library_missing
    with _library_lock:
        if _library is None and not _library_missing:
            try:
                _library = _Library()
            except OSError:
                _library_missing = True
        return _library


_creating = threading.Lock()


def _netfilter_sockets() -> set[int]:
    """This process's descriptors that are netfilter netlink sockets."""
    import _socket  # the C module: ``socket`` costs ~2 ms to import
    import stat

    found = set()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = _socket.socket(fileno=fd)
        except OSError:
            continue  # the listing's own descriptor, closed since
        try:
            if sock.family == _socket.AF_NETLINK and sock.proto == NETLINK_NETFILTER:
                found.add(fd)
        finally:
            sock.detach()
    return found


class Context:
    """One libnftables context: one netlink socket, in the namespace of the creating thread.
    Commands on one context are serialised (the library is not thread-safe per context).

    The library does not expose its socket; :attr:`socket_fd` is the netfilter socket that
    creating the context added (creations are serialised, and nothing else in this process
    opens one). It is made close-on-exec (libmnl opens it inheritable), and a
    short-lived helper can hold it on (:mod:`cellos.network.link_release`)."""

    def __init__(self, library: _Library) -> None:
        self._lib = library.lib
        with _creating:
            before = _netfilter_sockets()
            ctx = self._lib.nft_ctx_new(0)
            opened = _netfilter_sockets() - before if ctx else set()
        if not ctx:
            raise HostError("nftables", "libnftables could not create a context")
        self._ctx: int | None = ctx
        self.socket_fd = opened.pop() if len(opened) == 1 else None
        if self.socket_fd is not None:
            os.set_inheritable(self.socket_fd, False)
        self._lib.nft_ctx_output_set_flags(ctx, _OUTPUT_JSON)
        if library.input_flags is not None:
            library.input_flags(ctx, _INPUT_JSON)
        self._lib.nft_ctx_buffer_output(ctx)
        self._lib.nft_ctx_buffer_error(ctx)
        self._lock = threading.Lock()

    def command(self, text: str) -> tuple[int, str, str]:
        """(status, output, error) of one command buffer (nft syntax or a JSON document)."""
        with self._lock:
            if self._ctx is None:
                raise HostError("nftables", "the nftables context is closed")
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, text.encode())
            out = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
            err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
        return rc, out.decode(errors="replace"), err.decode(errors="replace")

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None


_host: Context | None = None
_host_lock = threading.Lock()


def _host_context() -> Context | None:
    """The process's context in the host's network namespace (None: no libnftables)."""
    global _host
    library = _load()
    if library is None:
        return None
    with _host_lock:
        if _host is None:
            _host = Context(library)
        return _host


def host_socket() -> int | None:
    """The descriptor of this process's nftables socket in the host's namespace, if it has
    one open (None: no context yet, or no libnftables)."""
    with _host_lock:
        return _host.socket_fd if _host is not None else None


def _in_netns_context(netns: str) -> Context | None:
    library = _load()
    if library is None:
        return None
    from cellos.network.rtnl import in_netns

    return in_netns(netns, lambda: Context(library))


def _failure(stderr: str, code: int) -> HostError:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    error = next((line for line in reversed(lines) if line.startswith("Error")), None)
    return HostError("nftables", error or (lines[-1] if lines else f"nft exited {code}"))


def run(commands: list[Json], netns: str | None = None) -> None:
    """Apply a batch atomically (one JSON document is one transaction), in the network
    namespace at ``netns`` when given."""
    doc = json.dumps({"nftables": commands})
    ctx = _in_netns_context(netns) if netns else _host_context()
    if ctx is not None:
        try:
            rc, _out, err = ctx.command(doc)
        finally:
            if netns:
                ctx.close()
        if rc != 0:
            raise _failure(err, rc)
        return
    prefix = ["/usr/bin/nsenter", f"--net={netns}", "--"] if netns else []
    proc = subprocess.run(
        [*prefix, nft_binary(), "-j", "-f", "-"],
        input=doc,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        raise _failure(proc.stderr, proc.returncode)


def match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def meta(key: str) -> Json:
    return {"meta": {"key": key}}


def payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}
