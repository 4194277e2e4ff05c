"""What makes one front door differ from another: where its key is, how its body becomes the canonical (chat
completions) request, and how the answer, a stream and an error are written back in its own wire format.

The governance pipeline (gateway/proxy.py) runs the same for every door; it only calls these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import orjson
from aiohttp import web

from gateway.api import messages_wire, responses_wire
from gateway.api.messages_stream import MessagesStream
from gateway.api.responses_stream import ResponsesStream
from gateway.errors import GatewayError
from gateway.providers import Op


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

    def whole(self, data: dict, raw: bytes | None, state: object) -> bytes:
        return raw or orjson.dumps(data)

    def encoder(self, state: object, prompt_tokens: int) -> StreamEncoder | None:
        """None: chunks are relayed as OpenAI chunks (the fast path)."""
        return None

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

    def whole(self, data: dict, raw: bytes | None, state: object) -> bytes:
        assert isinstance(state, responses_wire.ResponsesRequest)
        return orjson.dumps(responses_wire.response_from_chat(data, state))

    def encoder(self, state: object, prompt_tokens: int) -> StreamEncoder | None:
        assert isinstance(state, responses_wire.ResponsesRequest)
        stream = ResponsesStream(state)
        return _Translator(stream.start, stream.feed, stream.finish,
                           lambda err: stream.error(err.message, err.code or err.type, err.type))


@dataclass(frozen=True, slots=True)
class MessagesDoor(Door):
    """Anthropic's Messages API: `x-api-key` or a bearer key, Anthropic's error shape, translated through chat."""

    def credentials(self, request: web.Request) -> str | None:
        key = request.headers.get("x-api-key")
        return key.strip() if key is not None else bearer_token(request)

    def missing_key_message(self) -> str:
        return "x-api-key header is required (or 'Authorization: Bearer <key>')."

    def prepare(self, body: dict) -> tuple[dict, object]:
        translated = messages_wire.translate_request(body)
        return translated.chat, translated

    def whole(self, data: dict, raw: bytes | None, state: object) -> bytes:
        assert isinstance(state, messages_wire.MessagesRequest)
        return orjson.dumps(messages_wire.message_from_chat(data, state))

    def encoder(self, state: object, prompt_tokens: int) -> StreamEncoder | None:
        assert isinstance(state, messages_wire.MessagesRequest)
        stream = MessagesStream(state, input_tokens=prompt_tokens)
        return _Translator(stream.start, stream.feed, stream.finish, lambda err: stream.error(err.status, err.message))

    def error_response(self, err: GatewayError) -> web.Response:
        return messages_wire.error_response(err)


CHAT = Door("chat", "chat")
COMPLETIONS = Door("completions", "completions")
EMBEDDINGS = Door("embeddings", "embeddings")
RESPONSES = ResponsesDoor("responses", "chat")
MESSAGES = MessagesDoor("messages", "chat", announces_prompt_tokens=True)
