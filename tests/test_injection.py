"""Secret injection by the L7 proxy, over real loopback sockets and real TLS.

A TLS server of the test's own (its own CA, given to the proxy as the upstream trust) records
every request it receives; the proxy terminates the client's TLS with a leaf of the cell's CA;
the client trusts only the cell's CA bundle. No namespace is needed: ``original_destination``
says where the client "dialled" (see tests/test_l7_proxy.py). The whole path inside a real cell
is tested in tests/test_secret_injection.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cellos.core.errors import InvalidSpec
from cellos.core.loading import validate_document
from cellos.core.ports import InjectedSecret
from cellos.network.cell_ca import CellCA
from cellos.network.injection import (
    REASON_ADDRESS_MISMATCH,
    REASON_INJECTED,
    REASON_OUTSIDE_HEADER,
    REASON_UPSTREAM_UNVERIFIED,
    REASON_WRONG_HOST,
    Injections,
)
from cellos.network.l7_proxy import InjectionSetup, L7Proxy
from cellos.network.proxies import upstream_context
from tests.tls_test_ca import write_test_pki


def sync(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a fresh event loop, bounded (no asyncio plugin needed)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        async def bounded() -> None:
            await asyncio.wait_for(test(*args, **kwargs), 30)

        asyncio.run(bounded())

    return wrapper


SECRET = "s3cr3t-Value-42"
OTHER_SECRET = "other-Secret-7"
HOST = "api.test"


@dataclass
class Recorder:
    """An HTTP/1.1 server that records each request (head and body) and answers 200."""

    port: int = 0
    requests: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = b""
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        body = await reader.readexactly(int(line.split(b":")[1]))
                    if line.lower().startswith(b"transfer-encoding:"):
                        body = await _read_chunked(reader)
                self.requests.append(head + body)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        data = await reader.readexactly(size + 2)
        body += data[:-2]
        if size == 0:
            return body


@dataclass
class Setup:
    proxy_port: int
    recorder: Recorder
    client_context: ssl.SSLContext
    events: list[dict[str, Any]]
    decisions: list[dict[str, Any]]


def secrets_for(placeholder: str, other_placeholder: str) -> list[InjectedSecret]:
    return [
        InjectedSecret("api-token", HOST, "Authorization", "Bearer {value}", placeholder, SECRET),
        InjectedSecret("other", "other.test", "X-Key", "{value}", other_placeholder, OTHER_SECRET),
    ]


PLACEHOLDER = "cellos-placeholder-" + "a" * 48
OTHER_PLACEHOLDER = "cellos-placeholder-" + "b" * 48


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, *, tls: bool, upstream_trusted: bool = True, resolved: bool = True
) -> AsyncIterator[Setup]:
    ca_file = write_test_pki(tmp_path, [HOST, "plain.test"])
    server_context = None
    if tls:
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_context.load_cert_chain(tmp_path / f"{HOST}.pem")
    recorder = Recorder()
    server = await asyncio.start_server(recorder.handle, "127.0.0.1", 0, ssl=server_context)
    recorder.port = server.sockets[0].getsockname()[1]

    cell_ca = CellCA("cell-1", [HOST, "other.test"])
    injections = Injections(cell_ca.hosts)
    injections.arm(secrets_for(PLACEHOLDER, OTHER_PLACEHOLDER))
    if resolved:  # what the cell's DNS proxy would have answered for the host
        injections.note_addresses(HOST, ["127.0.0.1"])
    events: list[dict[str, Any]] = []
    decisions: list[dict[str, Any]] = []
    untrusted = tmp_path / "untrusted"
    untrusted.mkdir()
    proxy = L7Proxy(
        [HOST, "other.test", "plain.test"],
        decisions.append,
        original_destination=lambda sock: ("127.0.0.1", recorder.port),
        injection=InjectionSetup(
            injections=injections,
            ca=cell_ca,
            upstream_context=upstream_context(
                str(ca_file) if upstream_trusted else str(write_test_pki(untrusted, []))
            ),
            on_event=events.append,
        ),
    )
    listener = socket.create_server(("127.0.0.1", 0))
    await proxy.start_on(listener)
    client_context = ssl.create_default_context(cadata=cell_ca.cert_pem.decode())
    try:
        yield Setup(listener.getsockname()[1], recorder, client_context, events, decisions)
    finally:
        await proxy.close()
        server.close()
        await server.wait_closed()


async def exchange(
    setup: Setup, data: bytes, *, server_name: str | None, answers: int = 1
) -> bytes:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        setup.proxy_port,
        ssl=setup.client_context if server_name else None,
        server_hostname=server_name,
    )
    writer.write(data)
    await writer.drain()
    got = b""
    while got.count(b"HTTP/1.1 200") < answers:
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        if not chunk:
            break
        got += chunk
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 5)
    return got


def request(host: str, *headers: str, body: bytes = b"") -> bytes:
    lines = ["POST /path HTTP/1.1", f"Host: {host}", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def no_secret_in(events: list[dict[str, Any]]) -> None:
    text = repr(events)
    assert SECRET not in text and OTHER_SECRET not in text
    assert PLACEHOLDER not in text and OTHER_PLACEHOLDER not in text


def reasons(events: list[dict[str, Any]]) -> set[tuple[str | None, str]]:
    return {(e["secretRef"], e["reasonCode"]) for e in events}


@sync
async def test_https_placeholder_in_the_named_header_becomes_the_secret(tmp_path: Path) -> None:
    async with running(tmp_path, tls=True) as setup:
        reply = await exchange(
            setup,
            request(HOST, f"Authorization: {PLACEHOLDER}", body=b"payload")
            + request(HOST, f"authorization: token {PLACEHOLDER}"),
            server_name=HOST,
            answers=2,
        )
        assert reply.count(b"HTTP/1.1 200 OK") == 2
        first, second = setup.recorder.requests
        assert f"Authorization: Bearer {SECRET}\r\n".encode() in first
        assert first.endswith(b"payload")
        assert f"authorization: Bearer {SECRET}\r\n".encode() in second
        assert PLACEHOLDER.encode() not in first + second
        assert reasons(setup.events) == {("api-token", REASON_INJECTED)}
        (event,) = setup.events
        assert event["decision"] == "injected" and event["header"] == "Authorization"
        assert event["serverName"] == HOST
        no_secret_in(setup.events)


@sync
async def test_placeholder_outside_the_named_header_is_passed_on_and_reported(
    tmp_path: Path,
) -> None:
    chunked = (
        (
            f"POST /x?t={PLACEHOLDER} HTTP/1.1\r\nHost: {HOST}\r\nX-Other: {PLACEHOLDER}\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n"
        ).encode()
        + b"5\r\nhello\r\n"
        + f"{len(PLACEHOLDER):x}\r\n{PLACEHOLDER}\r\n0\r\n\r\n".encode()
    )
    async with running(tmp_path, tls=True) as setup:
        await exchange(setup, chunked, server_name=HOST)
        (seen,) = setup.recorder.requests
        assert SECRET.encode() not in seen
        assert seen.count(PLACEHOLDER.encode()) == 3
        assert seen.endswith(b"hello" + PLACEHOLDER.encode())
        assert reasons(setup.events) == {("api-token", REASON_OUTSIDE_HEADER)}
        no_secret_in(setup.events)


@sync
async def test_another_secrets_placeholder_or_another_host_is_never_substituted(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, tls=False) as setup:
        # Plain HTTP to an allowed host that injects nothing: passed on as is, reported.
        await exchange(
            setup, request("plain.test", f"Authorization: {PLACEHOLDER}"), server_name=None
        )
        # The injection host over plain HTTP, but with the other secret's placeholder.
        await exchange(
            setup, request(HOST, f"Authorization: {OTHER_PLACEHOLDER}"), server_name=None
        )
        first, second = setup.recorder.requests
        assert f"Authorization: {PLACEHOLDER}".encode() in first
        assert f"Authorization: {OTHER_PLACEHOLDER}".encode() in second
        assert SECRET.encode() not in first + second and OTHER_SECRET.encode() not in second
        assert reasons(setup.events) == {
            ("api-token", REASON_WRONG_HOST),
            ("other", REASON_WRONG_HOST),
        }
        assert {e["requestHost"] for e in setup.events} == {"plain.test", HOST}
        no_secret_in(setup.events)


@sync
async def test_plain_http_to_the_injection_host_is_substituted(tmp_path: Path) -> None:
    async with running(tmp_path, tls=False) as setup:
        await exchange(
            setup, request(f"{HOST}:80", f"Authorization: {PLACEHOLDER}"), server_name=None
        )
        (seen,) = setup.recorder.requests
        assert f"Authorization: Bearer {SECRET}".encode() in seen
        assert reasons(setup.events) == {("api-token", REASON_INJECTED)}


@sync
async def test_plain_http_to_an_address_not_resolved_for_the_host_gets_no_secret(
    tmp_path: Path,
) -> None:
    # Plain HTTP proves nothing about the server: "Host: api.test" sent to the address of
    # another allowed name must not carry the secret there.
    async with running(tmp_path, tls=False, resolved=False) as setup:
        await exchange(setup, request(HOST, f"Authorization: {PLACEHOLDER}"), server_name=None)
        (seen,) = setup.recorder.requests
        assert SECRET.encode() not in seen
        assert f"Authorization: {PLACEHOLDER}".encode() in seen
        assert reasons(setup.events) == {("api-token", REASON_ADDRESS_MISMATCH)}


@sync
async def test_host_header_other_than_the_tls_server_name_gets_no_secret(tmp_path: Path) -> None:
    async with running(tmp_path, tls=True) as setup:
        await exchange(
            setup, request("other.test", f"X-Key: {OTHER_PLACEHOLDER}"), server_name=HOST
        )
        (seen,) = setup.recorder.requests
        assert OTHER_SECRET.encode() not in seen
        assert reasons(setup.events) == {("other", REASON_OUTSIDE_HEADER)}


@sync
async def test_an_upstream_that_fails_verification_never_sees_a_request(tmp_path: Path) -> None:
    async with running(tmp_path, tls=True, upstream_trusted=False) as setup:
        with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
            reply = await exchange(
                setup, request(HOST, f"Authorization: {PLACEHOLDER}"), server_name=HOST
            )
            if not reply:
                raise ConnectionError("closed")
        assert setup.recorder.requests == []
        assert reasons(setup.events) == {(None, REASON_UPSTREAM_UNVERIFIED)}


def test_the_cell_ca_only_vouches_for_the_injection_hosts(tmp_path: Path) -> None:
    ca = CellCA("cell-1", [HOST])
    with pytest.raises(ValueError, match="not a host of this cell CA"):
        ca.server_context("evil.test")
    # Name constraints: a client refuses even a leaf for another name signed by this CA.
    assert b"BEGIN CERTIFICATE" in ca.bundle()


def document(authority: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    run: dict[str, Any] = {"argv": ["/bin/true"]}
    if env:
        run["env"] = env
    return {
        "apiVersion": "cellos.io/v1",
        "kind": "ExecutionCell",
        "spec": {"id": "c", "authority": authority, "run": run},
    }


def injection_authority(**entry: Any) -> dict[str, Any]:
    base = {"secretRef": "tok", "host": HOST, "header": "Authorization", "format": "Bearer {value}"}
    return {
        "secretRefs": ["tok"],
        "egressRules": [{"host": HOST, "port": 443}],
        "secretInjection": [{**base, **entry}],
    }


@pytest.mark.parametrize(
    ("entry", "path", "words"),
    [
        ({"host": "evil.test"}, "host", "not reachable through the cell's L7 proxy"),
        ({"secretRef": "nope"}, "secretRef", "not in spec.authority.secretRefs"),
        ({"format": "Bearer"}, "format", "exactly once"),
        ({"format": "{value}{value}"}, "format", "exactly once"),
        ({"format": "a\r\nb: {value}"}, "format", "no CR, LF or NUL"),
        ({"header": "Content-Length"}, "header", "frames or routes the request"),
        ({"header": "Bad Header"}, "header", "not an HTTP header name"),
    ],
)
def test_validation_names_the_field(entry: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(InvalidSpec) as caught:
        validate_document(document(injection_authority(**entry)))
    where, reason = caught.value.problems[0]
    assert where == f"spec.authority.secretInjection[0].{path}"
    assert words in reason


def test_dns_allowlisted_host_with_a_443_rule_may_be_injected() -> None:
    authority = injection_authority(host="x.corp.test")
    authority["egressRules"] = [{"cidr": "10.0.0.0/8", "port": 443}]
    authority["dnsAuthority"] = {"hostnameAllowlist": ["*.corp.test"]}
    validate_document(document(authority))


def test_placeholder_and_ca_variables_may_not_be_declared() -> None:
    for name in ("CELLOS_SECRET_PLACEHOLDER_TOK", "SSL_CERT_FILE"):
        with pytest.raises(InvalidSpec) as caught:
            validate_document(document(injection_authority(), env={name: "x"}))
        assert name in caught.value.problems[0][1]
    # The secret's own variable is free: an injected secret is never delivered as TOK.
    validate_document(document(injection_authority(), env={"TOK": "x"}))


@pytest.mark.parametrize(
    "raw",
    [
        # Obsolete line folding: the parser does not guess where the header ends.
        f"GET / HTTP/1.1\r\nHost: {HOST}\r\nAuthorization:\r\n {PLACEHOLDER}\r\n\r\n",
        # Two different lengths: request smuggling territory.
        f"POST / HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 0\r\nContent-Length: 1\r\n"
        f"Authorization: {PLACEHOLDER}\r\n\r\nx",
        # An upgrade: what follows is not HTTP/1.1 any more.
        f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        f"X-Later: {PLACEHOLDER}\r\n\r\n",
    ],
    ids=["obs-fold", "conflicting-lengths", "upgrade"],
)
@sync
async def test_requests_the_parser_does_not_understand_get_no_secret(
    tmp_path: Path, raw: str
) -> None:
    async with running(tmp_path, tls=True) as setup:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", setup.proxy_port, ssl=setup.client_context, server_hostname=HOST
        )
        writer.write(raw.encode())
        await writer.drain()
        with contextlib.suppress(TimeoutError, ConnectionError, ssl.SSLError):
            await asyncio.wait_for(reader.read(100), 2)
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 5)
        await asyncio.sleep(0.2)
        seen = b"".join(setup.recorder.requests)
        assert SECRET.encode() not in seen
        assert all(e["decision"] == "refused" for e in setup.events), setup.events
        assert setup.events, "the placeholder was not reported"
        no_secret_in(setup.events)


def test_backends_without_an_egress_proxy_do_not_inject() -> None:
    from cellos.core.ports import SecretInjectingBackend
    from cellos.hosts.cellos.backend import CellosBackend
    from cellos.hosts.gvisor.backend import GvisorBackend
    from cellos.hosts.microvm.backend import MicrovmBackend
    from cellos.hosts.stub.backend import StubBackend

    assert issubclass(CellosBackend, SecretInjectingBackend)
    for backend in (GvisorBackend, MicrovmBackend, StubBackend):
        assert not issubclass(backend, SecretInjectingBackend), backend


def test_the_hardened_profile_counts_only_secrets_delivered_in_the_environment(
    tmp_path: Path,
) -> None:
    from cellos.brokers.memory import MemoryBroker
    from cellos.core.errors import PolicyRefused
    from cellos.hosts.cellos.backend import CellosBackend
    from cellos.supervisor.lifecycle import Supervisor
    from tests.conftest import require_sandbox

    require_sandbox()
    supervisor = Supervisor(
        backend=CellosBackend(state_root=str(tmp_path / "state")),
        sinks=[],
        broker=MemoryBroker(),
        exporter=None,
        profile="hardened",
    )
    injected_only = validate_document(document(injection_authority()))
    supervisor._check_policy(injected_only)  # the secret never enters the environment
    authority = injection_authority()
    authority["secretRefs"].append("plain")
    with pytest.raises(PolicyRefused, match="secretDelivery"):
        supervisor._check_policy(validate_document(document(authority)))


def test_secret_values_that_cannot_be_a_header_are_refused_without_showing_them() -> None:
    from cellos.core.errors import SecretBrokerError
    from cellos.supervisor.secret_delivery import deliver

    spec = validate_document(document(injection_authority())).spec
    for bad in ("line\r\nX-Evil: 1", "é-accent", ""):
        with pytest.raises(SecretBrokerError) as caught:
            deliver(spec, {"tok": bad})
        assert caught.value.path == "spec.authority.secretInjection[0].secretRef"
        assert bad not in caught.value.reason or not bad
    delivered = deliver(spec, {"tok": SECRET})
    assert set(delivered.env) == {"CELLOS_SECRET_PLACEHOLDER_TOK"}
    placeholder = delivered.env["CELLOS_SECRET_PLACEHOLDER_TOK"]
    assert SECRET not in placeholder and len(placeholder) > 40
    assert delivered.injected[0].header_value() == f"Bearer {SECRET}"
    assert SECRET not in repr(delivered.injected)
    # Unguessable: a new cell, a new placeholder.
    assert deliver(spec, {"tok": SECRET}).env["CELLOS_SECRET_PLACEHOLDER_TOK"] != placeholder


@sync
async def test_a_large_body_passes_through_terminated_tls_intact(tmp_path: Path) -> None:
    body = bytes(range(256)) * (16 * 1024)  # 4 MiB, every byte value
    async with running(tmp_path, tls=True) as setup:
        reply = await exchange(
            setup, request(HOST, f"Authorization: {PLACEHOLDER}", body=body), server_name=HOST
        )
        assert b"200 OK" in reply
        (seen,) = setup.recorder.requests
        assert seen.endswith(body)
        assert f"Authorization: Bearer {SECRET}".encode() in seen


@pytest.mark.parametrize(
    ("host", "seen"),
    [
        (b"Registry.Example:443", "registry.example"),
        (b"registry.example.", "registry.example"),
        (b"[0:0::1]:443", "::1"),
        (b"[::1]junk", None),
        (b"registry.example:http", None),
        (b"user@registry.example", None),
        (b"reg istry.example", None),
    ],
)
def test_the_relay_reads_a_host_header_as_the_l7_check_does(host: bytes, seen: str | None) -> None:
    """The host a relayed request names (which decides whether a secret may be injected
    into it, and what the events report) is parsed by the L7 check's own parser: a Host the
    check would call malformed names no host here either."""
    from cellos.network.http_relay import _parse_head
    from cellos.network.sni import parse_http_host

    request = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    head = _parse_head(request)
    assert head is not None
    assert head.host == seen
    assert parse_http_host(request).host == seen  # what the L7 check saw
