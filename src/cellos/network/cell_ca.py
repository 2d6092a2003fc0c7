"""A cell's own certificate authority, for the L7 proxy's TLS termination (secretInjection).

Generated when the cell is created; its private key lives only in the supervisor's memory
(never in a file, never in the cell) and is gone with the cell. The CA is name-constrained to
the cell's injection hosts, so even a certificate it issued could not vouch for any other name.
Leaf certificates (one per host, issued on first use) reach OpenSSL through a ``memfd``: no key
material is ever written to a file system.

What the cell gets is :meth:`CellCA.bundle`: the host's trusted CAs plus this CA's certificate,
bound read-only into the cell and named by ``SSL_CERT_FILE`` and friends.
"""

from __future__ import annotations

import datetime
import os
import ssl
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cellos.network.allowlist import normalize_name

#: Where the host's trusted CAs are, when OpenSSL's defaults name no file.
HOST_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")
#: Longer than any cell may live (30 days), so no cell outlives its CA.
_VALIDITY = datetime.timedelta(days=31)
_SKEW = datetime.timedelta(hours=1)


def host_trust_bundle() -> bytes:
    """The host's trusted CA certificates (PEM), or nothing if the host has no bundle file."""
    paths = ssl.get_default_verify_paths()
    for path in (paths.cafile, paths.openssl_cafile, *HOST_BUNDLES):
        if path and os.path.isfile(path):
            try:
                with open(path, "rb") as fh:
                    return fh.read()
            except OSError:
                continue
    return b""


class CellCA:
    """The per-cell CA. ``hosts``: the names it may issue for (the injection hosts)."""

    def __init__(self, cell_id: str, hosts: list[str]) -> None:
        if not hosts:
            raise ValueError("a cell CA needs at least one host")
        self.hosts = sorted({normalize_name(h) for h in hosts})
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CellOS"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"CellOS injection CA {cell_id}"[:64]),
            ]
        )
        public = self._key.public_key()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.NameConstraints(
                    permitted_subtrees=[x509.DNSName(h) for h in self.hosts],
                    excluded_subtrees=None,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._lock = threading.Lock()

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def bundle(self) -> bytes:
        """What the cell trusts: the host's CAs and this one (PEM)."""
        host = host_trust_bundle()
        if host and not host.endswith(b"\n"):
            host += b"\n"
        return host + self.cert_pem

    def server_context(self, host: str) -> ssl.SSLContext:
        """A TLS server context presenting a leaf for ``host`` (one of :attr:`hosts`)."""
        host = normalize_name(host)
        if host not in self.hosts:
            raise ValueError(f"{host!r} is not a host of this cell CA")
        with self._lock:
            context = self._contexts.get(host)
            if context is None:
                context = self._new_context(host)
                self._contexts[host] = context
            return context

    def _new_context(self, host: str) -> ssl.SSLContext:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        issuer = self.cert.subject
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        pem = (
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            + leaf.public_bytes(serialization.Encoding.PEM)
            + self.cert_pem
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # The proxy reads HTTP/1.1 only; a client offering h2 falls back to it.
        context.set_alpn_protocols(["http/1.1"])
        _load_chain_from_memory(context, pem)
        return context


def _load_chain_from_memory(context: ssl.SSLContext, pem: bytes) -> None:
    """``load_cert_chain`` wants a path: give it an anonymous in-memory file."""
    fd = os.memfd_create("cellos-leaf", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
