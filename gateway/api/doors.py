"""What makes one front door differ from another: where its key is, how its body becomes the canonical (chat
completions) request, which guardrails read it, and how the answer, a stream and an error are written back in its
own wire format.

The governance pipeline (gateway/proxy.py) runs the same for every door; it only calls these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import orjson
from aiohttp import web

from gateway import guarding
from gateway.api import messages_guard, messages_wire, responses_output, responses_wire
from gateway.api.messages_stream import MessagesStream, NativeRelay
from gateway.api.responses_stream import ResponsesStream
from gateway.errors import GatewayError, bad_request
from gateway.exchange import Exchange
from gateway.providers import ChunkStream, Completion, Op
from gateway.providers.anthropic_native import NativeCompletion, NativeRequest, NativeStream

# The client headers an Anthropic upstream gets, and the longest value passed on.
_ANTHROPIC_HEADERS = ("anthropic-version", "anthropic-beta")
_MAX_HEADER_CHARS = 1024


class StreamEncoder(Protocol):
    """Turns the canonical chat chunks of one stream into the door's events."""

    def start(self) -> list[bytes]: ...

    def feed(self, chunk: dict) -> list[bytes]: ...

    def finish(self) -> list[bytes]: ...

    def error(self, err: GatewayError) -> list[bytes]: ...


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


@dataclass(frozen=True, slots=True)
class Door:
    """An OpenAI door whose wire format is the canonical one: bodies, answers and chunks pass as they are."""

    endpoint: str
    op: Op
    # Anthropic's stream opens with the prompt's token count, before the upstream has said it.
    announces_prompt_tokens: bool = False

    def credentials(self, request: web.Request) -> str | None:
        """The presented key; None when none was sent, "" when the header is not a bearer key."""
        return bearer_token(request)

    def missing_key_message(self) -> str:
        return "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."

    def prepare(self, body: dict) -> tuple[dict, object]:
        """The canonical request for this body, and what the door needs to write the answer back."""
        return body, None

    async def check_input(self, guards: guarding.RouteGuards, body: dict, state: object,
                          ex: Exchange) -> tuple[dict, object]:
        """The route's input guardrails: the canonical request and state to go on with (masked), or a raise."""
        return await guarding.check_request(guards, self.op, body, ex), state

    def native(self, state: object, request: web.Request) -> NativeRequest | None:
        """The request as the client sent it, for providers that speak this door's API (None: none do)."""
        return None

    async def check_output(self, guards: guarding.RouteGuards, completion: Completion, ex: Exchange) -> None:
        """The route's output guardrails on a whole answer: a raise, or the answer masked in place."""
        checked = await guarding.check_response(guards, self.op, completion.data, ex)
        if checked is not completion.data:
            completion.data, completion.body = checked, None

    def whole(self, completion: Completion, state: object) -> bytes:
        return completion.body or orjson.dumps(completion.data)

    def encoder(self, state: object, prompt_tokens: int, upstream: ChunkStream) -> StreamEncoder | None:
        """None: chunks are relayed as OpenAI chunks (the fast path)."""
        return None

    def stream_guard(self, guards: guarding.RouteGuards, upstream: ChunkStream) -> guarding.ChunkGuard:
        return guarding.StreamGuard(guards, "content" if self.op == "chat" else "text")

    def error_response(self, err: GatewayError) -> web.Response:
        return err.response()


@dataclass(frozen=True, slots=True)
class _Translator:
    """A door's stream translator (ResponsesStream, MessagesStream) seen as a StreamEncoder."""

    start: Callable[[], list[bytes]]
    feed: Callable[[dict], list[bytes]]
    finish: Callable[[], list[bytes]]
    error: Callable[[GatewayError], list[bytes]]


@dataclass(frozen=True, slots=True)
class ResponsesDoor(Door):
    """OpenAI's Responses API, served through chat completions (stateless: no stored responses)."""

    def prepare(self, body: dict) -> tuple[dict, object]:
        translated = responses_wire.translate_request(body)
        return translated.chat, translated

    def whole(self, completion: Completion, state: object) -> bytes:
        assert isinstance(state, responses_wire.ResponsesRequest)
        return orjson.dumps(responses_output.response_from_chat(completion.data, state))

    def encoder(self, state: object, prompt_tokens: int, upstream: ChunkStream) -> StreamEncoder | None:
        assert isinstance(state, responses_wire.ResponsesRequest)
        stream = ResponsesStream(state)
        return _Translator(stream.start, stream.feed, stream.finish,
                           lambda err: stream.error(err.message, err.code or err.type, err.type))


def _anthropic_headers(request: web.Request) -> dict[str, str]:
    headers = {}
    for name in _ANTHROPIC_HEADERS:
        value = request.headers.get(name)
        if value is None:
            continue
        if len(value) > _MAX_HEADER_CHARS or not value.isascii() or not value.isprintable():
            raise bad_request(f"{name}: the header must be printable ASCII of at most {_MAX_HEADER_CHARS} characters.")
        if value.strip():
            headers[name] = value.strip()
    return headers


@dataclass(frozen=True, slots=True)
class MessagesDoor(Door):
    """Anthropic's Messages API: `x-api-key` or a bearer key, Anthropic's error shape; passed through natively to
    Anthropic targets, translated through chat for the others."""

    def credentials(self, request: web.Request) -> str | None:
        key = request.headers.get("x-api-key")
        return key.strip() if key is not None else bearer_token(request)

    def missing_key_message(self) -> str:
        return "x-api-key header is required (or 'Authorization: Bearer <key>')."

    def prepare(self, body: dict) -> tuple[dict, object]:
        translated = messages_wire.translate_request(body, lenient=True)
        return translated.chat, translated

    async def check_input(self, guards: guarding.RouteGuards, body: dict, state: object,
                          ex: Exchange) -> tuple[dict, object]:
        """Scans the client's own body, which native targets get; a masked one is translated again for the others."""
        assert isinstance(state, messages_wire.MessagesRequest)
        checked = await messages_guard.check_request(guards, state.original, ex)
        if checked is state.original:
            return body, state
        translated = messages_wire.translate_request(checked, lenient=True)
        return translated.chat, translated

    def native(self, state: object, request: web.Request) -> NativeRequest | None:
        assert isinstance(state, messages_wire.MessagesRequest)
        return NativeRequest(state.original, _anthropic_headers(request), state.untranslatable)

    async def check_output(self, guards: guarding.RouteGuards, completion: Completion, ex: Exchange) -> None:
        if isinstance(completion, NativeCompletion):
            await messages_guard.check_message(guards, completion, ex)
        else:
            await Door.check_output(self, guards, completion, ex)

    def whole(self, completion: Completion, state: object) -> bytes:
        if isinstance(completion, NativeCompletion):
            return completion.raw or orjson.dumps(completion.message)
        assert isinstance(state, messages_wire.MessagesRequest)
        return orjson.dumps(messages_wire.message_from_chat(completion.data, state))

    def encoder(self, state: object, prompt_tokens: int, upstream: ChunkStream) -> StreamEncoder | None:
        if isinstance(upstream, NativeStream):
            return NativeRelay()
        assert isinstance(state, messages_wire.MessagesRequest)
        stream = MessagesStream(state, input_tokens=prompt_tokens)
        return _Translator(stream.start, stream.feed, stream.finish, lambda err: stream.error(err.status, err.message))

    def stream_guard(self, guards: guarding.RouteGuards, upstream: ChunkStream) -> guarding.ChunkGuard:
        if isinstance(upstream, NativeStream):
            return messages_guard.NativeStreamGuard(guards)
        return Door.stream_guard(self, guards, upstream)

    def error_response(self, err: GatewayError) -> web.Response:
        return messages_wire.error_response(err)


CHAT = Door("chat", "chat")
COMPLETIONS = Door("completions", "completions")
EMBEDDINGS = Door("embeddings", "embeddings")
RESPONSES = ResponsesDoor("responses", "chat")
MESSAGES = MessagesDoor("messages", "chat", announces_prompt_tokens=True)
