"""The providers' HTTP/1.1 client against real sockets: framing, keep-alive, failures, limits, TLS."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.providers.h11client import ConnectError, HttpClient, ProtocolError

JSON = b'{"ok":true}'
Reply = Callable[[bytes], tuple[list[bytes], bool]]


class Upstream:
    """A socket server answering each request with the pieces its script returns, closing after them if told."""

    def __init__(self, script: Reply, gap_s: float = 0.0) -> None:
        self.script = script
        self.gap_s = gap_s
        self.connections = 0
        self.requests: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                self.requests.append(head + await reader.readexactly(length))
                pieces, close = self.script(head)
                for piece in pieces:
                    writer.write(piece)
                    await writer.drain()
                    if self.gap_s:
                        await asyncio.sleep(self.gap_s)
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., object]]:
    servers: list[tuple[asyncio.Server, Upstream]] = []

    async def start(script: Reply, gap_s: float = 0.0, tls: ssl.SSLContext | None = None) -> tuple[Upstream, str]:
        upstream = Upstream(script, gap_s)
        server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0, ssl=tls)
        servers.append((server, upstream))
        port = server.sockets[0].getsockname()[1]
        return upstream, f"{'https://localhost' if tls else 'http://127.0.0.1'}:{port}/v1/chat"

    yield start
    for server, upstream in servers:
        server.close()
        for writer in upstream.writers:
            writer.close()
        await server.wait_closed()


def _length(body: bytes, extra: bytes = b"", close: bool = False) -> tuple[list[bytes], bool]:
    return [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
            % (extra, len(body), body)], close


async def _post(client: HttpClient, url: str, read_s: float | None = 2.0) -> bytes:
    response = await client.post(url, b'{"q":1}', {"Authorization": "Bearer sk-x"}, 1.0, read_s, 5.0)
    try:
        return await response.read()
    finally:
        response.release()


async def test_a_content_length_answer_is_read_and_its_connection_reused(serve) -> None:
    upstream, url = await serve(lambda _: _length(JSON))
    client = HttpClient(4)
    assert [await _post(client, url) for _ in range(3)] == [JSON] * 3
    assert upstream.connections == 1
    head = upstream.requests[0]
    assert head.startswith(b"POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"Authorization: Bearer sk-x\r\nContent-Length: 7\r\n\r\n" in head and head.endswith(b'{"q":1}')
    await client.close()


async def test_a_chunked_answer_is_decoded_however_its_bytes_are_split(serve) -> None:
    wire = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"7;ext=1\r\ndata: a\r\n" b"11\r\n\n\ndata: bcdefghij\r\n" b"0\r\nTrailer: x\r\n\r\n")
    upstream, url = await serve(lambda _: ([wire[i:i + 3] for i in range(0, len(wire), 3)], False), gap_s=0.001)
    client = HttpClient(4)
    response = await client.post(url, b"{}", {}, 1.0, 2.0, 5.0)
    pieces = []
    while piece := await response.readany():
        pieces.append(piece)
    response.release()
    assert b"".join(pieces) == b"data: a\n\ndata: bcdefghij"
    assert len(pieces) > 1, "pieces are handed over as they arrive"
    assert await _post(client, url) == b"data: a\n\ndata: bcdefghij"
    assert upstream.connections == 1
    await client.close()


async def test_connection_close_is_honoured(serve) -> None:
    upstream, url = await serve(lambda _: _length(JSON, b"Connection: close\r\n", close=True))
    client = HttpClient(4)
    assert [await _post(client, url) for _ in range(2)] == [JSON] * 2
    assert upstream.connections == 2
    await client.close()


async def test_an_answer_without_length_or_chunks_ends_with_its_connection(serve) -> None:
    upstream, url = await serve(lambda _: ([b"HTTP/1.1 200 OK\r\n\r\n", JSON, b" more"], True), gap_s=0.01)
    client = HttpClient(4)
    assert [await _post(client, url) for _ in range(2)] == [JSON + b" more"] * 2
    assert upstream.connections == 2
    await client.close()


async def test_an_answer_left_unread_closes_its_connection(serve) -> None:
    upstream, url = await serve(lambda _: ([b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nhalf", b"more"], False),
                                gap_s=0.05)
    client = HttpClient(4)
    response = await client.post(url, b"{}", {}, 1.0, 2.0, 5.0)
    response.release()
    assert await _post(client, url) == b"halfmore"
    assert upstream.connections == 2
    await client.close()


async def test_a_large_answer_is_read_whole_and_a_slow_stream_reader_loses_nothing(serve) -> None:
    big = bytes(range(256)) * 12_000
    _, url = await serve(lambda _: _length(big))
    client = HttpClient(4)
    assert await _post(client, url) == big
    response = await client.post(url, b"{}", {}, 1.0, 2.0, 5.0)
    await asyncio.sleep(0.1)
    received = b""
    while piece := await response.readany():
        received += piece
    response.release()
    assert received == big
    await client.close()


async def test_an_upstream_that_hangs_up_midway_is_a_connection_error(serve) -> None:
    _, url = await serve(lambda _: ([b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"], True))
    client = HttpClient(4)
    response = await client.post(url, b"{}", {}, 1.0, 2.0, 5.0)
    with pytest.raises(ConnectionError):
        await response.read()
    response.release()
    await client.close()


async def test_garbage_is_a_protocol_error(serve) -> None:
    _, url = await serve(lambda _: ([b"SSH-2.0-OpenSSH\r\n\r\n"], False))
    client = HttpClient(4)
    with pytest.raises(ProtocolError):
        await client.post(url, b"{}", {}, 1.0, 2.0, 5.0)
    await client.close()


async def test_silence_past_the_read_timeout_is_a_timeout(serve) -> None:
    _, url = await serve(lambda _: ([], False))
    client = HttpClient(4)
    with pytest.raises(TimeoutError):
        await _post(client, url, read_s=0.1)
    await client.close()


async def test_an_unreachable_upstream_is_a_connect_error() -> None:
    client = HttpClient(4)
    with pytest.raises(ConnectError):
        await _post(client, "http://127.0.0.1:9/v1/chat")
    await client.close()


async def test_the_pool_limit_queues_requests_on_the_open_connections(serve) -> None:
    upstream, url = await serve(lambda _: _length(JSON), gap_s=0.02)
    client = HttpClient(2)
    assert await asyncio.gather(*(_post(client, url) for _ in range(6))) == [JSON] * 6
    assert upstream.connections == 2
    await client.close()


def _self_signed(folder: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    client = ssl.create_default_context(cafile=str(folder / "cert.pem"))
    return server, client


async def test_https_upstreams_are_reached_over_verified_tls(serve, tmp_path: Path) -> None:
    server_tls, client_tls = _self_signed(tmp_path)
    upstream, url = await serve(lambda _: _length(JSON), tls=server_tls)
    client = HttpClient(4, client_tls)
    assert [await _post(client, url) for _ in range(2)] == [JSON] * 2
    assert upstream.connections == 1
    await client.close()
    untrusting = HttpClient(4)
    with pytest.raises(ConnectError):
        await _post(untrusting, url)
    await untrusting.close()
