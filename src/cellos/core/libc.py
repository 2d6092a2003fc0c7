"""Calls into C libraries (libc's mount, unshare, setns, prctl, ...) without importing ctypes.

``import ctypes`` and ``ctypes.CDLL(None)`` cost ~2.6 ms (median of 9 fresh interpreters):
``ctypes/__init__.py`` builds dozens of classes and imports ``ctypes._endian``, on the path of
a one-shot ``cellos-supervisor`` that calls a handful of C functions. Calling them needs only
``_ctypes`` (~0.6 ms; this whole module ~0.8 ms), the C half of the standard library's ctypes:
its ``_SimpleCData`` and ``CFuncPtr`` are the very types ctypes' own ``c_int``, ``c_char_p``
and ``CDLL`` functions are built on, so argument conversion, results and errno are ctypes'.

Only what CellOS calls is here: a few simple C types, :func:`function` (one C function, called
as ``CDLL(..., use_errno=True)`` calls it) and :func:`errno`.
"""

from __future__ import annotations

import _ctypes
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

# Each class is defined as in ctypes/__init__.py (its ``_type_`` is a struct format code). A
# direct subclass of _SimpleCData: a function returning one gives a plain Python value.
# typeshed declares _SimpleCData generic; at run time it cannot be subscripted.


class Int(_ctypes._SimpleCData):  # type: ignore[type-arg]
    """C ``int`` (ctypes.c_int)."""

    _type_ = "i"


class UInt(_ctypes._SimpleCData):  # type: ignore[type-arg]
    """C ``unsigned int`` (ctypes.c_uint; also ``uint32_t`` on Linux, as ctypes.c_uint32)."""

    _type_ = "I"


class Long(_ctypes._SimpleCData):  # type: ignore[type-arg]
    """C ``long`` (ctypes.c_long)."""

    _type_ = "l"


class ULong(_ctypes._SimpleCData):  # type: ignore[type-arg]
    """C ``unsigned long`` (ctypes.c_ulong)."""

    _type_ = "L"


class VoidP(_ctypes._SimpleCData):  # type: ignore[type-arg]
    """C ``void *`` (ctypes.c_void_p): an int or None (NULL) as argument and result."""

    _type_ = "P"


class CharP(_ctypes._SimpleCData):  # type: ignore[type-arg]
    """C ``char *`` (ctypes.c_char_p): bytes or None (NULL) as argument and result."""

    _type_ = "z"


CType: TypeAlias = type[Int | UInt | Long | ULong | VoidP | CharP]


class _Function(_ctypes.CFuncPtr):
    """A C function as ``CDLL(..., use_errno=True)`` makes one: cdecl, errno saved after the
    call (see :func:`errno`)."""

    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
    _restype_ = Int


#: dlopen handles by soname (None: the process's own symbols); never closed.
_handles: dict[str | None, int] = {}


def _handle(library: str | None) -> int:
    handle = _handles.get(library)
    if handle is None:
        try:
            # ctypes' CDLL default mode; _ctypes adds RTLD_NOW. typeshed's signature omits
            # None (dlopen(NULL): the main program and what it loaded).
            loaded = _ctypes.dlopen(library, _ctypes.RTLD_LOCAL)  # type: ignore[arg-type]
        except OSError as exc:
            raise OSError(f"cannot load the C library {library}: {exc}") from exc
        handle = _handles.setdefault(library, loaded)
    return handle


def function(
    name: str, restype: CType | None, argtypes: Sequence[CType], library: str | None = None
) -> Callable[..., Any]:
    """The C function ``name`` of ``library`` (a soname such as ``"libc.so.6"``,
    loaded once; None: the process's own symbols, libc's among them), taking ``argtypes`` and
    returning ``restype`` (None: void). A library that cannot be loaded or a missing symbol
    raises OSError."""
    func = _Function(_ctypes.dlsym(_handle(library), name))
    func.restype = restype
    func.argtypes = argtypes
    return func


def errno() -> int:
    """The errno saved by the calling thread's last :func:`function` call (as
    ``ctypes.get_errno()``)."""
    return _ctypes.get_errno()


# The two that more than one module calls: network namespaces (rtnl) and the gVisor secrets
# tmpfs (hosts/secret_files).
mount = function("mount", Int, [CharP, CharP, CharP, ULong, VoidP])
umount2 = function("umount2", Int, [CharP, Int])
