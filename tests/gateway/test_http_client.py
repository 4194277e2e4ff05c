"""The providers' HTTP/1.1 client against real sockets: framing, keep-alive, failures, limits, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import signal
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

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
    # A loopback connect is instant, but the whole suite runs in one process on a shared machine: a generous bound,
    # so only what a test is about (the read) can time out.
    response = await client.post(url, b'{"q":1}', {"Authorization": "Bearer sk-x"}, 10.0, read_s, 15.0)
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


def _chunked(body: bytes, extra: bytes = b"") -> tuple[list[bytes], bool]:
    return [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n%s\r\n%s" % (extra, body)], False


@pytest.mark.parametrize("size_line", [b"5", b"05", b"0005", b"5;name=value", b"5 ;name", b"5\t; a=\"b c\""])
async def test_chunk_sizes_with_leading_zeros_and_extensions_are_read(serve, size_line: bytes) -> None:
    _, url = await serve(lambda _: _chunked(b"%s\r\nhello\r\n0\r\n\r\n" % size_line))
    client = HttpClient(4)
    assert await _post(client, url) == b"hello"
    await client.close()


@pytest.mark.parametrize("size_line", [b"-6", b"+5", b"0x5", b"0X5", b"5_0", b" 5", b"5 ", b"", b"g", b"5;\n",
                                       b"FFFFFFFFFFFFFFFFFFFFFFFF", b"2000001"])
async def test_a_chunk_size_outside_the_grammar_or_the_limit_is_a_protocol_error(serve, size_line: bytes) -> None:
    _, url = await serve(lambda _: _chunked(b"5\r\nhello\r\n%s\r\nworld\r\n0\r\n\r\n" % size_line))
    client = HttpClient(4, max_response_bytes=32 * 1024 * 1024)
    with pytest.raises(ProtocolError):
        await _post(client, url)
    await client.close()


@pytest.mark.parametrize("header", [b"Transfer-Encoding: gzip, chunked", b"Transfer-Encoding: xchunked",
                                    b"Transfer-Encoding: chunked, chunked", b"Transfer-Encoding: identity",
                                    b"Transfer-Encoding: chun ked",
                                    b"Transfer-Encoding: chunked\r\nContent-Length: 5", b"Content-Encoding: gzip",
                                    b"Content-Length: 5, 6", b"Content-Length: +5", b"Content-Length: 0x5",
                                    b"Content-Length: \xb2", b"Content-Length : 5", b"X-Folded: a\r\n b",
                                    b"X-Bare: a\nb"])
async def test_framing_headers_are_read_as_exact_tokens(serve, header: bytes) -> None:
    _, url = await serve(lambda _: ([b"HTTP/1.1 200 OK\r\n%s\r\n\r\n5\r\nhello\r\n0\r\n\r\n" % header], False))
    client = HttpClient(4)
    with pytest.raises(ProtocolError):
        await _post(client, url)
    await client.close()


async def test_chunked_as_a_token_and_repeated_equal_lengths_are_accepted(serve) -> None:
    _, url = await serve(lambda _: ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: , Chunked \r\n\r\n5\r\nhello\r\n0\r\n\r\n"], False))
    client = HttpClient(4)
    assert await _post(client, url) == b"hello"
    _, url = await serve(lambda _: _length(b"hello", b"Content-Length: 5\r\n"))
    assert await _post(client, url) == b"hello"
    await client.close()


@pytest.mark.parametrize("connection", [b"keep-alive, close", b"Close", b"upgrade,close"])
async def test_close_anywhere_in_the_connection_header_closes(serve, connection: bytes) -> None:
    upstream, url = await serve(lambda _: _length(JSON, b"Connection: %s\r\n" % connection))
    client = HttpClient(4)
    assert [await _post(client, url) for _ in range(2)] == [JSON] * 2
    assert upstream.connections == 2
    await client.close()


async def test_heads_past_the_size_or_count_limit_are_refused(serve) -> None:
    pad = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 100) for i in range(100))
    _, url = await serve(lambda _: _length(JSON, pad))
    client = HttpClient(4, max_head_bytes=8192)
    with pytest.raises(ProtocolError, match="head larger"):
        await _post(client, url)
    many = b"".join(b"X-Many-%d: m\r\n" % i for i in range(500))
    _, url = await serve(lambda _: _length(JSON, many))
    with pytest.raises(ProtocolError, match="headers"):
        await _post(client, url)
    await client.close()


async def test_a_whole_read_fails_once_it_passes_the_limit_not_at_the_end(serve) -> None:
    sent = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"%x\r\n%s\r\n" % (65536, b"z" * 65536)
        try:
            for _ in range(1600):
                writer.write(piece)
                await writer.drain()
                sent += len(piece)
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/chat"
    client = HttpClient(4, max_response_bytes=1024 * 1024)
    with pytest.raises(ProtocolError, match="larger than the limit"):
        await _post(client, url)
    await client.close()
    await asyncio.sleep(0.2)
    server.close()
    assert sent < 16 * 1024 * 1024, "the upstream was cut off long before its 100 MB"
    _, url = await serve(lambda _: _length(b"x" * 2048, b""))
    small = HttpClient(4, max_response_bytes=1024)
    with pytest.raises(ProtocolError, match="Content-Length"):
        await _post(small, url)
    await small.close()


_HEADS = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
          b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n"]
_PIECES = [b"HTTP/1.1 200 OK\r\n", b"Transfer-Encoding: chunked\r\n", b"Content-Length: -1\r\n", b"Connection: close\r\n",
           b"\r\n", b"\r", b"\n", b";ext=1", b"hello", b"0\r\n\r\n", b":", b"\xff"]
_valid_chunk = st.binary(min_size=1, max_size=12).map(lambda data: b"%x\r\n%s\r\n" % (len(data), data))
_odd_size = st.integers(-12, -1).map(lambda n: b"%d" % n) | st.sampled_from(
    [b"+5", b"0x5", b"5_0", b" 5", b"F" * 20, b"", b"z", b"0"])
_odd_chunk = st.tuples(_odd_size, st.sampled_from([b"", b";e=1"]), st.binary(max_size=12)).map(
    lambda parts: parts[0] + parts[1] + b"\r\n" + parts[2] + b"\r\n")
_noise = st.sampled_from(_PIECES) | st.binary(max_size=8)
# Mostly well-framed answers with a fault somewhere: random bytes alone rarely get past the status line.
_answers = st.tuples(st.sampled_from(_HEADS),
                     st.lists(st.one_of(_valid_chunk, _valid_chunk, _odd_chunk, _odd_chunk, _noise), max_size=12))


class _Stuck(Exception):
    pass


_interrupted: list[bool] = []


def _interrupt(signum: int, frame: object) -> None:
    # Noted before raising: the event loop turns an exception inside a protocol callback into a closed connection.
    _interrupted.append(True)
    raise _Stuck


async def _one_answer(wire: bytes) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(wire)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    client = HttpClient(2, max_head_bytes=4096, max_response_bytes=4096)
    try:
        await _post(client, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/", read_s=0.5)
    except (ProtocolError, ConnectionError, TimeoutError):
        pass
    finally:
        await client.close()
        server.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_answers)
@example((_HEADS[0], [b"5\r\nhello\r\n", b"-6\r\nabcdef\r\n"]))
def test_no_answer_makes_the_parser_loop_or_raise_anything_else(answer: tuple[bytes, list[bytes]]) -> None:
    wire = answer[0] + b"".join(answer[1])
    # An endless loop in the parser never yields to the event loop, so only a signal can stop it.
    _interrupted.clear()
    previous = signal.signal(signal.SIGALRM, _interrupt)
    signal.setitimer(signal.ITIMER_REAL, 10.0)
    try:
        asyncio.run(_one_answer(wire))
    except _Stuck:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not _interrupted, f"the parser did not finish with {wire!r}"
