"""cellos.core.libc: C calls through ``_ctypes`` alone, and the modules that use it load
neither ctypes nor ipaddress."""

from __future__ import annotations

import _ctypes
import errno
import ipaddress
import os
import socket

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


@pytest.mark.parametrize(
    "address", ["10.0.0.1", "169.254.7.2", "::1", "fd00:ce11::1", "::ffff:1.2.3.4"]
)
def test_rtnl_reads_addresses_as_ipaddress_did(address: str) -> None:
    from cellos.network import rtnl

    ip = ipaddress.ip_address(address)
    family, packed = rtnl._packed(address)
    assert packed == ip.packed
    assert family == (socket.AF_INET if ip.version == 4 else socket.AF_INET6)


@pytest.mark.parametrize("address", ["", "10.0.0", "010.0.0.1", "10.0.0.1/24", "host", "::g"])
def test_rtnl_refuses_what_ipaddress_refused(address: str) -> None:
    from cellos.network import rtnl

    with pytest.raises(ValueError):
        ipaddress.ip_address(address)
    with pytest.raises(ValueError, match="not an IPv4 or IPv6 address"):
        rtnl._packed(address)


def test_rtnl_and_libc_load_neither_ctypes_nor_ipaddress() -> None:
    proc = _python(
        "import sys, cellos.network.rtnl, cellos.core.libc\n"
        "print(sorted(m for m in ('ctypes', 'ipaddress') if m in sys.modules))"
    )
    assert proc.stdout.strip() == "[]", (proc.stdout, proc.stderr)
