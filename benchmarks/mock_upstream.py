"""A near-zero-cost OpenAI-compatible upstream for load tests: a raw asyncio protocol answering precomputed bytes.

Every POST is answered as a chat completion; a body that contains `"stream":true` (or `"stream": true`) gets an
SSE stream of `chunks` content chunks, a finish chunk, a usage chunk and `data: [DONE]`, in chunked transfer
encoding. No JSON is parsed or built per request, so the upstream's own cost stays out of the gateway's figures.

Run it alone with `python -m benchmarks.mock_upstream --port 9100 --chunks 20`; it prints `listening on PORT`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from dataclasses import dataclass
from typing import cast

import orjson
import uvloop

MODEL = "mock-model"
_STREAM_MARKERS = (b'"stream":true', b'"stream": true')


@dataclass(frozen=True)
class MockReplies:
    """The complete response bytes (status line to last byte) the mock sends."""

    completion: bytes
    stream_head: bytes
    stream_events: tuple[bytes, ...]


def _http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def build_replies(chunks: int = 20, word: str = " token") -> MockReplies:
    """A non-streamed completion of `chunks` words, and the same completion as a stream of `chunks` chunks."""
    usage = {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks,
             "prompt_tokens_details": {"cached_tokens": 0}}
    completion = orjson.dumps({
        "id": "chatcmpl-mock", "object": "chat.completion", "created": 1_700_000_000, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": word * chunks, "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": usage, "system_fingerprint": "fp_mock",
    })
    completion_reply = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(completion), completion))
    base = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": MODEL}

    def event(data: dict) -> bytes:
        return _http_chunk(b"data: " + orjson.dumps(data) + b"\n\n")

    def choice(delta: dict, finish: str | None) -> dict:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                "usage": None}

    events = [event(choice({"role": "assistant", "content": ""}, None))]
    events += [event(choice({"content": word}, None)) for _ in range(chunks)]
    events.append(event(choice({}, "stop")))
    events.append(event({**base, "choices": [], "usage": usage}))
    events.append(_http_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
    return MockReplies(completion_reply, head, tuple(events))


class MockUpstreamProtocol(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests may be pipelined."""

    def __init__(self, replies: MockReplies, chunk_gap_s: float) -> None:
        self.replies = replies
        self.stream_whole = replies.stream_head + b"".join(replies.stream_events)
        self.chunk_gap_s = chunk_gap_s
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.pacing: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pacing is not None:
            self.pacing.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.pacing is None:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            body_start = head_end + 4
            length = _content_length(self.buffer[:head_end])
            if len(self.buffer) < body_start + length:
                return
            body = self.buffer[body_start:body_start + length]
            self.buffer = self.buffer[body_start + length:]
            self._answer(any(marker in body for marker in _STREAM_MARKERS))

    def _answer(self, stream: bool) -> None:
        assert self.transport is not None
        if not stream:
            self.transport.write(self.replies.completion)
        elif self.chunk_gap_s <= 0:
            self.transport.write(self.stream_whole)
        else:
            self.pacing = asyncio.get_running_loop().create_task(self._paced_stream())

    async def _paced_stream(self) -> None:
        assert self.transport is not None
        self.transport.write(self.replies.stream_head)
        for chunk in self.replies.stream_events:
            await asyncio.sleep(self.chunk_gap_s)
            self.transport.write(chunk)
        self.pacing = None
        if self.buffer:
            self.data_received(b"")


def _content_length(head: bytes) -> int:
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    end = lower.find(b"\r\n", at + 2)
    return int(lower[at + 17:end if end >= 0 else len(lower)])


async def start_mock_upstream(
    host: str = "127.0.0.1", port: int = 0, chunks: int = 20, chunk_gap_s: float = 0.0
) -> asyncio.Server:
    """Starts serving in the running loop; `server.sockets[0].getsockname()[1]` is the bound port."""
    replies = build_replies(chunks)
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: MockUpstreamProtocol(replies, chunk_gap_s), host, port, backlog=2048)


async def _serve(host: str, port: int, chunks: int, chunk_gap_s: float) -> None:
    server = await start_mock_upstream(host, port, chunks, chunk_gap_s)
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per streamed answer")
    parser.add_argument("--chunk-gap-ms", type=float, default=0.0, help="pause before each stream event; 0 sends at once")
    args = parser.parse_args(argv)
    uvloop.run(_serve(args.host, args.port, args.chunks, args.chunk_gap_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
