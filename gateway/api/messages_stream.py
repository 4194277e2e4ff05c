"""Chat completion chunks as the Messages API's streamed events, as the anthropic SDKs accumulate them.

`message_start` and a `ping` first; then one content block at a time (`content_block_start`, its
`content_block_delta`s, `content_block_stop`), indexed from 0; then `message_delta` with the stop reason and the
final usage, and `message_stop`. A failure after the start is an `error` event, which ends the stream.
A native stream (an Anthropic target) needs none of this: `NativeRelay` sends the upstream's own events.
"""

from __future__ import annotations

import orjson

from gateway.api.messages_wire import MessagesRequest, error_event, messages_usage, stop_of
from gateway.api.wire import call_function, first_choice, random_id, reasoning_of, sse, text_of, tool_call_deltas
from gateway.errors import GatewayError
from gateway.providers.anthropic_native import NATIVE_EVENT, NativeEvent

PING = sse("ping", {"type": "ping"})

_EMPTY_BLOCKS = {"text": {"type": "text", "text": ""}, "thinking": {"type": "thinking", "thinking": "", "signature": ""}}
_DELTA_TYPES = {"text": "text_delta", "thinking": "thinking_delta"}
# A text delta is nearly every event of a stream: written from bytes, in the key order of the dict form.
_TEXT_DELTA_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
_TEXT_DELTA_MIDDLE = b',"delta":{"type":"text_delta","text":'
_TEXT_DELTA_TAIL = b"}}\n\n"


class MessagesStream:
    """Turns one chat stream into Messages events; `feed` each chunk, then `finish` (or `error` on a failure).

    `input_tokens` is the gateway's count of the prompt, for `message_start`: chat streams tell the real count only
    at their end, and `message_delta` then carries it.
    """

    def __init__(self, request: MessagesRequest, input_tokens: int = 0, message_id: str | None = None) -> None:
        self.request = request
        self.id = message_id or random_id("msg_")
        self.model = text_of(request.chat.get("model"))
        self.input_tokens = input_tokens
        self.started = False
        self.finished = False
        self._last_index = -1
        self._open: str | None = None
        self._calls: dict[int, int] = {}
        self._usage: object = None
        self._ending: dict = {}

    def start(self) -> list[bytes]:
        """`message_start` and a `ping`; sent by the first `feed` if not called before."""
        self.started = True
        usage = {"input_tokens": self.input_tokens, "output_tokens": 0, "cache_creation_input_tokens": 0,
                 "cache_read_input_tokens": 0}
        message = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": usage}
        return [sse("message_start", {"type": "message_start", "message": message}), PING]

    def feed(self, chunk: dict) -> list[bytes]:
        """The events for one chat.completion.chunk (a usage-only chunk gives none: its usage waits for `finish`)."""
        out = [] if self.started else self.start()
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        choice = first_choice(chunk)
        delta = choice.get("delta")
        if type(delta) is dict:
            if len(delta) == 1 and self._open == "text" and type(piece := delta.get("content")) is str:
                if piece:
                    out.append(_TEXT_DELTA_HEAD + b"%d" % self._last_index + _TEXT_DELTA_MIDDLE + orjson.dumps(piece)
                               + _TEXT_DELTA_TAIL)
            else:
                if self.request.thinking:
                    self._text("thinking", reasoning_of(delta), out)
                self._text("text", text_of(delta.get("content")), out)
                for index, call in tool_call_deltas(delta):
                    self._call(index, call, out)
        if choice.get("finish_reason") is not None:
            self._ending = choice
        return out

    def _begin(self, kind: str, block: dict, out: list[bytes]) -> int:
        self._close(out)
        self._last_index += 1
        self._open = kind
        out.append(sse("content_block_start", {"type": "content_block_start", "index": self._last_index,
                                               "content_block": block}))
        return self._last_index

    def _close(self, out: list[bytes]) -> None:
        if self._open is not None:
            self._open = None
            out.append(sse("content_block_stop", {"type": "content_block_stop", "index": self._last_index}))

    def _delta(self, index: int, delta: dict, out: list[bytes]) -> None:
        out.append(sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))

    def _text(self, kind: str, piece: str, out: list[bytes]) -> None:
        if not piece:
            return
        if self._open != kind:
            self._begin(kind, _EMPTY_BLOCKS[kind], out)
        self._delta(self._last_index, {"type": _DELTA_TYPES[kind], kind: piece}, out)

    def _call(self, chat_index: int, call: dict, out: list[bytes]) -> None:
        name, arguments = call_function(call)
        index = self._calls.get(chat_index)
        if index is None:
            block = {"type": "tool_use", "id": text_of(call.get("id")) or random_id("toolu_"), "name": name, "input": {}}
            index = self._calls[chat_index] = self._begin("tool_use", block, out)
        if arguments:
            self._delta(index, {"type": "input_json_delta", "partial_json": arguments}, out)

    def finish(self, usage: dict | None = None) -> list[bytes]:
        """The events that end the stream: the last block's stop, `message_delta` and `message_stop`.

        `usage` is the chat usage when it did not come in a fed chunk.
        """
        out = [] if self.started else self.start()
        self.finished = True
        if usage is not None:
            self._usage = usage
        if self._last_index < 0:
            self._begin("text", _EMPTY_BLOCKS["text"], out)
        self._close(out)
        stop_reason, stop_sequence = stop_of(self._ending, self.request, bool(self._calls))
        # The counts are totals that replace those of message_start, so none is sent that the upstream did not give.
        counts = messages_usage(self._usage) if self._usage else {"output_tokens": 0}
        out.append(sse("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                         "usage": counts}))
        out.append(sse("message_stop", {"type": "message_stop"}))
        return out

    def error(self, status: int, message: str) -> list[bytes]:
        """The `error` event for a failure after the start, typed by status as Anthropic types errors."""
        out = [] if self.started else self.start()
        self.finished = True
        out.append(error_event(status, message))
        return out


class NativeRelay:
    """The events of a native stream as the upstream sent them (masked where the route's output guardrails said).

    Each chunk carries its event; the upstream's own `message_start` opens the stream and its `message_stop` ends it.
    """

    def start(self) -> list[bytes]:
        return []

    def feed(self, chunk: dict) -> list[bytes]:
        event: NativeEvent | None = chunk.get(NATIVE_EVENT)
        return [event.encode()] if event is not None else []

    def finish(self) -> list[bytes]:
        return []

    def error(self, err: GatewayError) -> list[bytes]:
        return [error_event(err.status, err.message)]
