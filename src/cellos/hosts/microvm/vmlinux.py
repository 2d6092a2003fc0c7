"""The uncompressed ELF kernel (``vmlinux``) inside a bzImage (``vmlinuz``), for Firecracker.

Firecracker boots only an uncompressed ELF kernel on x86_64 (it has no bzImage loader), and
Debian ships the cloud kernel as a bzImage only. The bzImage's setup header says where its
compressed payload is (``payload_offset``/``payload_length``, boot protocol 2.08+); the payload
is the whole ELF ``vmlinux``, compressed with the kernel's ``CONFIG_KERNEL_*`` method.
Debian's cloud kernel uses LZ4 (the kernel's "legacy" LZ4 frame: raw blocks, which the
``lz4`` package's block API decodes; 0.1 s for the 53 MB kernel, where a pure-Python decoder
took 11.6 s). gzip, xz and lzma payloads use the standard library; any other method is
refused by name.
"""

from __future__ import annotations

import gzip
import lzma
import struct

from cellos.core.errors import HostError

_ELF = b"\x7fELF"
_LZ4_LEGACY = 0x184C2102
#: A legacy frame's blocks hold at most this much (lz4's LEGACY_BLOCKSIZE).
_LZ4_BLOCK = 8 << 20
#: The setup header's fields (Documentation/arch/x86/boot.rst).
_SETUP_SECTS, _HEADER, _VERSION, _PAYLOAD = 0x1F1, 0x202, 0x206, 0x248


def extract_vmlinux(bzimage: bytes, where: str) -> bytes:
    """The ELF kernel of a bzImage; HostError naming ``where`` when it is not one, or its
    payload is compressed with a method this build cannot decode."""
    if len(bzimage) < 0x250 or bzimage[_HEADER : _HEADER + 4] != b"HdrS":
        raise HostError(where, "not a bzImage (no HdrS setup header)")
    if struct.unpack_from("<H", bzimage, _VERSION)[0] < 0x0208:
        raise HostError(where, "boot protocol older than 2.08 (no payload offset)")
    start = ((bzimage[_SETUP_SECTS] or 4) + 1) * 512
    offset, length = struct.unpack_from("<II", bzimage, _PAYLOAD)
    payload = bzimage[start + offset : start + offset + length]
    if payload.startswith(b"\x1f\x8b"):
        kernel = gzip.decompress(payload)
    elif payload.startswith(b"\xfd7zXZ\x00") or payload.startswith(b"\x5d\x00"):
        kernel = lzma.decompress(payload)
    elif len(payload) >= 4 and struct.unpack_from("<I", payload)[0] == _LZ4_LEGACY:
        kernel = _lz4_legacy(payload, where)
    else:
        raise HostError(
            where,
            f"kernel payload compressed with an unsupported method (magic {payload[:4].hex()}; "
            "gzip, xz, lzma and lz4 are supported)",
        )
    if not kernel.startswith(_ELF):
        raise HostError(where, "the decompressed kernel is not an ELF file")
    return kernel


def _lz4_legacy(payload: bytes, where: str) -> bytes:
    """The kernel's LZ4 legacy frame: the magic, then blocks of ``<u32 size><LZ4 block>``
    (each at most 8 MiB uncompressed); the kernel build appends the uncompressed size, read
    here as a block that does not fit."""
    import lz4.block

    out = bytearray()
    pos = 4
    while pos + 4 <= len(payload):
        (size,) = struct.unpack_from("<I", payload, pos)
        pos += 4
        if size == _LZ4_LEGACY:
            continue  # a concatenated frame
        if pos + size > len(payload):
            break  # the trailing uncompressed-size word
        try:
            out += lz4.block.decompress(payload[pos : pos + size], uncompressed_size=_LZ4_BLOCK)
        except lz4.block.LZ4BlockError:
            raise HostError(where, "malformed LZ4 kernel payload") from None
        pos += size
    return bytes(out)
