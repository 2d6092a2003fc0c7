"""cellos.core.libc: C calls through ``_ctypes`` alone, and the modules that use it load
neither ctypes nor ipaddress."""

from __future__ import annotations

import _ctypes
import errno
import os

import pytest

from cellos.core import libc
from tests.test_cold_start import _python


def test_an_int_result_and_the_errno_it_left() -> None:
    close = libc.function("close", libc.Int, [libc.Int])
    assert close(-1) == -1
    assert libc.errno() == errno.EBADF
    access = libc.function("access", libc.Int, [libc.CharP, libc.Int])
    assert access(b"/nonexistent/cellos", os.F_OK) == -1
    assert libc.errno() == errno.ENOENT
    assert access(b"/", os.F_OK) == 0


def test_arguments_are_converted_by_their_types() -> None:
    strlen = libc.function("strlen", libc.ULong, [libc.CharP])
    assert strlen(b"hello") == 5
    with pytest.raises(_ctypes.ArgumentError):
        strlen("not bytes")
    close = libc.function("close", libc.Int, [libc.Int])
    with pytest.raises(_ctypes.ArgumentError):
        close(b"3")


def test_pointer_results_from_a_named_library(monkeypatch: pytest.MonkeyPatch) -> None:
    getenv = libc.function("getenv", libc.CharP, [libc.CharP], library="libc.so.6")
    monkeypatch.setenv("CELLOS_LIBC_TEST", "value")
    assert getenv(b"CELLOS_LIBC_TEST") == b"value"
    monkeypatch.delenv("CELLOS_LIBC_TEST")
    assert getenv(b"CELLOS_LIBC_TEST") is None  # NULL

    strdup = libc.function("strdup", libc.VoidP, [libc.CharP], library="libc.so.6")
    length = libc.function("strlen", libc.ULong, [libc.VoidP], library="libc.so.6")
    free = libc.function("free", None, [libc.VoidP], library="libc.so.6")
    copy = strdup(b"four")
    assert isinstance(copy, int) and copy != 0
    assert length(copy) == 4
    assert free(copy) is None


def test_a_missing_library_or_symbol_is_an_os_error() -> None:
    with pytest.raises(OSError, match=r"libcellos-missing\.so\.1"):
        libc.function("anything", libc.Int, [], library="libcellos-missing.so.1")
    with pytest.raises(OSError, match="cellos_no_such_function"):
        libc.function("cellos_no_such_function", libc.Int, [])


def test_rtnl_and_libc_load_neither_ctypes_nor_ipaddress() -> None:
    proc = _python(
        "import sys, cellos.network.rtnl, cellos.core.libc\n"
        "print(sorted(m for m in ('ctypes', 'ipaddress') if m in sys.modules))"
    )
    assert proc.stdout.strip() == "[]", (proc.stdout, proc.stderr)
