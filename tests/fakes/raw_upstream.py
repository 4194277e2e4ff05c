"""A misbehaving upstream on raw sockets: each answer is exactly the bytes its script writes, framing included.

The request's `model` picks the script (see `SCRIPTS`); `stream` in the request picks its streamed or whole form.
A script yields bytes to write (each one drained before the next, so a 100 MB answer is made as it is sent and
never held), a float (a pause in seconds) or HOLD (nothing more until the client closes). After a script the
connection stays open for another request, as a keep-alive upstream's would. Every request is kept as
(connection number, model).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import orjson

Piece = bytes | float
Script = Callable[[bool], Iterator[Piece]]

HOLD = -1.0
GOOD_TEXT = "A well-formed answer."
SECRET_KEY = "sk-raw-upstream-secret-7f3a9c"
HUGE_BYTES = 100 * 1024 * 1024
_PIECE = 64 * 1024


def head(status: int = 200, content_type: str = "application/json", framing: str = "Transfer-Encoding: chunked",
         extra: str = "") -> bytes:
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized"}.get(status, "Status")
    return f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n{extra}{framing}\r\n\r\n".encode("latin-1")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


END = b"0\r\n\r\n"
SSE = "text/event-stream"


def sse(data: object) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else orjson.dumps(data)) + b"\n\n"


def delta(content: str, finish: str | None = None) -> dict:
    return {"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": 1, "model": "raw",
            "choices": [{"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": finish}]}


USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def answer(content: str = GOOD_TEXT, usage: object = USAGE) -> dict:
    return {"id": "chatcmpl-raw", "object": "chat.completion", "created": 1, "model": "raw",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                         "finish_reason": "stop"}], "usage": usage}


def _whole(body: bytes, extra: str = "") -> Iterator[Piece]:
    yield head(framing=f"Content-Length: {len(body)}", extra=extra) + body


def _good_stream(extra: str = "") -> Iterator[Piece]:
    yield head(content_type=SSE, extra=extra)
    for word in GOOD_TEXT.split(" "):
        yield chunk(sse(delta(word + " ")))
    yield chunk(sse(delta("", "stop")) + sse({**delta(""), "choices": [], "usage": USAGE}) + b"data: [DONE]\n\n") + END


def good(stream: bool) -> Iterator[Piece]:
    return _good_stream() if stream else _whole(orjson.dumps(answer()))


def _started(stream: bool) -> Iterator[Piece]:
    """A head and one valid chunk of an answer, so what follows breaks a response that has begun."""
    if stream:
        yield head(content_type=SSE) + chunk(sse(delta("Hello ")))
    else:
        yield head() + chunk(b'{"id":"chatcmpl-raw",')


def bad_chunk_size(size: bytes) -> Script:
    def script(stream: bool) -> Iterator[Piece]:
        yield from _started(stream)
        yield size + b"\r\n" + b"x" * 64 + b"\r\n"
        yield HOLD
    return script


def endless_event(stream: bool) -> Iterator[Piece]:
    """An event (or JSON answer) that never ends: filler until the client gives up."""
    yield head(content_type=SSE) if stream else head()
    yield chunk(b'data: {"choices":[{"index":0,"delta":{"content":"' if stream else b'{"choices":[{"message":{"content":"')
    filler = chunk(b"a" * _PIECE)
    while True:
        yield filler


def huge(stream: bool) -> Iterator[Piece]:
    """100 MB: streamed as valid events of 32 KB of text each, whole as one chunked JSON answer."""
    if stream:
        yield head(content_type=SSE)
        event = chunk(sse(delta("b" * 32768)))
        for _ in range(-(-HUGE_BYTES // len(event))):
            yield event
        yield chunk(sse(delta("", "stop")) + sse({**delta(""), "choices": [], "usage": USAGE}) + b"data: [DONE]\n\n") + END
        return
    yield head() + chunk(b'{"id":"chatcmpl-raw","choices":[{"index":0,"message":{"role":"assistant","content":"')
    filler = chunk(b"c" * _PIECE)
    for _ in range(HUGE_BYTES // _PIECE):
        yield filler
    yield chunk(b'"},"finish_reason":"stop"}]}') + END


def huge_length(stream: bool) -> Iterator[Piece]:
    """A Content-Length of 100 MB, the body made lazily."""
    yield head(content_type=SSE if stream else "application/json", framing=f"Content-Length: {HUGE_BYTES}")
    filler = b"d" * _PIECE
    for _ in range(HUGE_BYTES // _PIECE):
        yield filler


def invalid_utf8(stream: bool) -> Iterator[Piece]:
    if stream:
        yield from _started(stream)
        yield chunk(b'data: {"choices":[{"index":0,"delta":{"content":"\xff\xfe"}}]}\n\n')
        yield HOLD
    else:
        body = orjson.dumps(answer("PLACEHOLDER")).replace(b"PLACEHOLDER", b"\xff\xfe")
        yield from _whole(body)


def invalid_utf8_name(stream: bool) -> Iterator[Piece]:
    """Invalid UTF-8 outside any JSON string: in an event's name, or in a whole answer's field name."""
    yield from _started(stream)
    if stream:
        yield chunk(b"event: \xff\xfe\ndata: {}\n\n")
        yield HOLD
    else:
        yield chunk(b'"\xff\xfe":1}') + END


def wrong_types(field: str) -> Script:
    """`field` given a type the protocol does not allow: in the second chunk of a stream, in a whole answer."""
    def malformed(data: dict) -> dict:
        if field == "usage":
            return {**data, "usage": {"prompt_tokens": "n/a", "completion_tokens": 1}}
        if field == "index":
            return {**data, "choices": [{**data["choices"][0], "index": "x"}]}
        return {**data, "choices": "nope"}

    def script(stream: bool) -> Iterator[Piece]:
        if stream:
            yield from _started(stream)
            yield chunk(sse(malformed(delta("world"))))
            yield HOLD
        else:
            yield from _whole(orjson.dumps(malformed(answer())))
    return script


def drip(stream: bool) -> Iterator[Piece]:
    """One byte a second: of the whole answer, or of a stream's body once its head is out."""
    if stream:
        wire = b"".join(piece for piece in _good_stream() if isinstance(piece, bytes))
        split = wire.index(b"\r\n\r\n") + 4
        yield wire[:split]
        wire = wire[split:]
    else:
        wire = b"".join(piece for piece in good(False) if isinstance(piece, bytes))
    for byte in wire:
        yield bytes([byte])
        yield 1.0


def big_head(stream: bool) -> Iterator[Piece]:
    """100 KB of response headers."""
    pad = "".join(f"X-Pad-{i}: {'p' * 1000}\r\n" for i in range(100))
    yield from _good_stream(pad) if stream else _whole(orjson.dumps(answer()), pad)


def many_headers(stream: bool) -> Iterator[Piece]:
    pad = "".join(f"X-Many-{i}: m\r\n" for i in range(1000))
    yield from _good_stream(pad) if stream else _whole(orjson.dumps(answer()), pad)


def transfer_coding(codings: str) -> Script:
    def script(stream: bool) -> Iterator[Piece]:
        wire = b"".join(piece for piece in good(True) if isinstance(piece, bytes)) if stream else \
            head() + chunk(orjson.dumps(answer())) + END
        yield wire.replace(b"Transfer-Encoding: chunked", f"Transfer-Encoding: {codings}".encode())
    return script


def keep_alive_close(stream: bool) -> Iterator[Piece]:
    """A good answer whose Connection header asks to close, on a connection the fake keeps open anyway."""
    extra = "Connection: keep-alive, close\r\n"
    yield from _good_stream(extra) if stream else _whole(orjson.dumps(answer()), extra)


def _error_answer(status: int, message: str) -> Iterator[Piece]:
    body = orjson.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
    yield head(status, framing=f"Content-Length: {len(body)}") + body


def echo_secret(status: int) -> Script:
    """An error that quotes the provider's key back, as some upstreams do with a key they refuse."""
    def script(stream: bool) -> Iterator[Piece]:
        message = f"Incorrect API key provided: {SECRET_KEY}. Header was: Bearer {SECRET_KEY}"
        error = {"error": {"message": message, "type": "invalid_request_error", "param": SECRET_KEY, "code": "bad_key"}}
        body = orjson.dumps(error)
        yield head(status, framing=f"Content-Length: {len(body)}") + body
    return script


def _message(**fields: object) -> dict:
    return {"type": "message", "id": "msg_raw", "model": "raw", "role": "assistant",
            "content": [{"type": "text", "text": GOOD_TEXT}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 3, "output_tokens": 4}, **fields}


def anthropic_wrong_types(field: str) -> Script:
    """Messages API answers with `field` of a type the API does not allow (a message whole, events streamed)."""
    def script(stream: bool) -> Iterator[Piece]:
        if not stream:
            malformed = {"usage": {"usage": {"input_tokens": "n/a"}}, "content": {"content": [{"type": "text", "text": 5}]},
                         "delta": {"stop_reason": ["end_turn"]}}[field]
            yield from _whole(orjson.dumps(_message(**malformed)))
            return
        start = {"type": "message_start", "message": {"id": "msg_raw", "model": "raw", "usage": {"input_tokens": 3}}}
        broken = {"usage": {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": "n/a"}},
                  "content": {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 5}},
                  "delta": {"type": "content_block_delta", "index": 0, "delta": "x"}}[field]
        yield head(content_type=SSE) + chunk(b"event: message_start\n" + sse(start))
        yield chunk(b"event: %s\n" % broken["type"].encode() + sse(broken))
        if field == "usage":
            yield chunk(b"event: message_stop\n" + sse({"type": "message_stop"}))
        yield HOLD
    return script


SCRIPTS: dict[str, Script] = {
    "good": good,
    "negative-chunk": bad_chunk_size(b"-6"),
    "plus-chunk": bad_chunk_size(b"+5"),
    "hex-prefix-chunk": bad_chunk_size(b"0x5"),
    "underscore-chunk": bad_chunk_size(b"5_0"),
    "space-chunk": bad_chunk_size(b" 5"),
    "huge-chunk": bad_chunk_size(b"FFFFFFFFFFFFFFFFFFFFFFFF"),
    "over-limit-chunk": bad_chunk_size(b"2000001"),
    "endless-event": endless_event,
    "huge": huge,
    "huge-length": huge_length,
    "invalid-utf8": invalid_utf8,
    "invalid-utf8-name": invalid_utf8_name,
    "bad-usage": wrong_types("usage"),
    "bad-index": wrong_types("index"),
    "bad-choices": wrong_types("choices"),
    "drip": drip,
    "big-head": big_head,
    "many-headers": many_headers,
    "gzip-chunked": transfer_coding("gzip, chunked"),
    "chunked-substring": transfer_coding("xchunked"),
    "keep-alive-close": keep_alive_close,
    "secret-401": echo_secret(401),
    "secret-400": echo_secret(400),
    "long-error": lambda stream: _error_answer(500, "e" * 100_000),
    "claude-bad-usage": anthropic_wrong_types("usage"),
    "claude-bad-content": anthropic_wrong_types("content"),
    "claude-bad-delta": anthropic_wrong_types("delta"),
}


class RawUpstream:
    """Serves SCRIPTS on 127.0.0.1; `start()` in a running loop, or `in_thread()` to keep it off the test's loop."""

    def __init__(self) -> None:
        self.requests: list[tuple[int, str]] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connection_models(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for connection, model in list(self.requests):
            out.setdefault(connection, []).append(model)
        return out

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    @contextlib.contextmanager
    def in_thread(self) -> Iterator[RawUpstream]:
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.start())
            started.set()
            loop.run_forever()

        thread = threading.Thread(target=run, name="raw-upstream", daemon=True)
        thread.start()
        assert started.wait(10), "the raw upstream did not start"
        try:
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(self.close(), loop).result(5)
            for task in asyncio.all_tasks(loop):
                loop.call_soon_threadsafe(task.cancel)
            time.sleep(0.1)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                request_head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in request_head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                body = orjson.loads(await reader.readexactly(length))
                model = str(body.get("model", ""))
                self.requests.append((number, model))
                for piece in SCRIPTS.get(model, good)(bool(body.get("stream"))):
                    if piece == HOLD:
                        await reader.read()
                        return
                    if isinstance(piece, float):
                        await asyncio.sleep(piece)
                    else:
                        writer.write(piece)
                        await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
