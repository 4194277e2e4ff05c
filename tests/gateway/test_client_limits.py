"""Clients that trickle, idle or stop reading are cut after the configured times, and what they held is freed."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.conftest import ALICE_KEY, policy_text
from tests.fakes.openai_upstream import FakeOpenAI
from tests.served import Served, start_gateway

POLICY = """
server: {{header_timeout_s: 1, body_timeout_s: 1, keepalive_timeout_s: 1.5, write_timeout_s: 1, max_connections: 20}}
providers:
  up: {{type: openai, base_url: "{url}"}}
routes:
  chat-default: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
limits:
  - {{scope: user, max_parallel: 1}}
  # A token limit loads the tokenizer at start, so the memory baseline holds it: the stream this file cuts ends
  # without usage, which the gateway then counts with it.
  - {{scope: user, tokens: 1000000000/minute}}
"""

BIG_WORD = "x" * 60_000


@pytest.fixture
async def upstream(aiohttp_server) -> tuple[FakeOpenAI, object]:
    fake = FakeOpenAI(words=[BIG_WORD] * 400)
    return fake, await aiohttp_server(fake.app())


@pytest.fixture
async def served(tmp_path: Path, upstream) -> AsyncIterator[Served]:
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(POLICY, url=str(upstream[1].make_url("/v1"))))
    gateway = await start_gateway(path)
    yield gateway
    gateway.process.terminate()
    gateway.process.wait(timeout=30)


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sent before it closed the connection; fails if it is still open after `seconds`."""
    return await asyncio.wait_for(reader.read(), seconds)


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_request_head_that_trickles_in_is_cut(served: Served) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\n")
    for _ in range(3):
        await asyncio.sleep(0.3)
        writer.write(b"X-Drip: a\r\n")
    assert await _closed_within(reader, 5) == b""
    writer.close()


async def test_an_idle_keep_alive_connection_is_closed(served: Served) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    rest = await _closed_within(reader, 6)
    assert b'"status":"ok"' in rest
    writer.close()


async def test_a_body_that_never_arrives_is_a_408(served: Served) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ALICE_KEY.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 408"), head[:200]
    # aiohttp lingers up to 10 s for the rest of the body before it closes, so the client can read the answer.
    assert b'"code":"request_timeout"' in await _closed_within(reader, 15)
    writer.close()


async def test_a_client_that_stops_reading_is_cut_and_frees_its_slot_and_memory(served: Served) -> None:
    baseline_kb = _rss_kb(served.process.pid)
    body = orjson.dumps({"model": "chat-default", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    _reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.transport.set_write_buffer_limits(0)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ALICE_KEY.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    # Reading nothing: the gateway's writes back up, and after write_timeout_s it cuts the connection.
    async with aiohttp.ClientSession() as session:
        async def second_request() -> int:
            async with session.post(served.make_url("/v1/chat/completions"),
                                    headers={"Authorization": f"Bearer {ALICE_KEY}"},
                                    json={"model": "chat-default", "messages": [{"role": "user", "content": "hi"}]},
                                    timeout=aiohttp.ClientTimeout(total=5)) as resp:
                await resp.read()
                return resp.status

        # While the stalled stream holds the user's one max_parallel slot, a second request is refused...
        assert await second_request() == 429
        # ...and once the gateway has cut the stalled reader, the slot is free again.
        for _ in range(50):
            await asyncio.sleep(0.2)
            if await second_request() == 200:
                break
        else:
            raise AssertionError("the stalled client's max_parallel slot was never released")
    assert _rss_kb(served.process.pid) < baseline_kb + 64 * 1024
    writer.close()
    async with aiohttp.ClientSession() as session, session.get(served.make_url("/metrics")) as resp:
        assert 'lockgate_client_connections_cut_total{reason="write_timeout"} 1.0' in await resp.text()


async def test_connections_past_the_cap_get_a_503(served: Served) -> None:
    held = [await asyncio.open_connection("127.0.0.1", served.port) for _ in range(20)]
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 503"), answer[:100]
    assert b'"code":"too_many_connections"' in answer
    for _, held_writer in held:
        held_writer.close()
    writer.close()
