"""Anthropic's Messages API passed through as it is: the client's own body and beta headers go up, Anthropic's
message and events come back.

The Messages door asks for this whenever a request reaches an Anthropic target, so fields the chat translation has
no place for (`cache_control`, `thinking`, `top_k`, new betas) survive. The answer is also read as chat: a whole
message as a chat completion, and each event as one chat chunk that carries the event, so usage, guardrails, the
transcript and the records work from the chat view as they do for every other stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import orjson

from gateway.providers.anthropic_translate import InvalidMessage, StreamTranslator, from_message, usage_from
from gateway.providers.base import ChunkStream, Completion, UnsupportedOperation

# The chunk key that holds the event a native stream's chunk was read from.
NATIVE_EVENT = "lockgate.native_event"
# Event types are relayed by name, so a name is only ever one of these (no line breaks, nothing to inject).
_EVENT_TYPE = re.compile(r"[a-z0-9_.:-]{1,64}")


@dataclass(frozen=True, slots=True)
class NativeRequest:
    """A Messages request as the client sent it (after the input guardrails), and what chat could not carry."""

    body: dict
    # The client's anthropic-version and anthropic-beta headers (absent ones are not keys).
    headers: dict[str, str]
    # Why a target that speaks only chat cannot serve it (the first field translation left out), or None.
    untranslatable: str | None = None


class UntranslatableRequest(UnsupportedOperation):
    """A Messages request routed to a chat-only target that cannot carry one of its fields."""

    def __init__(self, reason: str) -> None:
        Exception.__init__(self, f"{reason} (only an anthropic provider can serve this request as it is)")


@dataclass(slots=True)
class NativeCompletion(Completion):
    """A whole native answer: `data` is its chat view, `message` the Messages API message the client gets.

    `raw` holds the upstream's bytes while the message is as it sent it; `body` stays None, so records keep the
    chat view, which the inference table knows how to mask.
    """

    message: dict = field(default_factory=dict)
    raw: bytes | None = None

    def replace_message(self, message: dict) -> None:
        """Puts a changed (masked) message in place of the upstream's, with its chat view."""
        self.message, self.raw = message, None
        self.data = from_message(message)


class NativeStream(ChunkStream):
    """A stream whose every chunk carries, under NATIVE_EVENT, the upstream event it was read from."""


@dataclass(slots=True)
class NativeEvent:
    """One upstream event as the client will get it. Whoever changes `data` sets `raw` to None."""

    kind: str
    data: dict
    raw: bytes | None
    # Events sent just before this one (text a guardrail held back, released when its block stops).
    before: list[bytes] = field(default_factory=list)

    def encode(self) -> bytes:
        data = self.raw if self.raw is not None else orjson.dumps(self.data)
        event = b"event: " + self.kind.encode() + b"\ndata: " + data + b"\n\n"
        return b"".join(self.before) + event if self.before else event


class NativeEvents:
    """Reads a native stream event by event: checks it as the translated path would, and gives its chat chunk."""

    def __init__(self) -> None:
        self.translator = StreamTranslator()

    @property
    def finished(self) -> bool:
        return self.translator.finished

    def parse(self, name: str, raw: bytes) -> NativeEvent:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InvalidMessage("an event is not valid JSON") from None
        if type(data) is not dict:
            raise InvalidMessage("an event is not a JSON object")
        kind = data.get("type")
        if type(kind) is not str or not _EVENT_TYPE.fullmatch(kind):
            raise InvalidMessage("an event has no valid type")
        if name and name != kind:
            raise InvalidMessage(f"an event named {name!r} holds a {kind!r}")
        # Several data lines, or a lone CR, would be several lines on the client's side: such data is re-encoded.
        return NativeEvent(kind, data, raw if b"\n" not in raw and b"\r" not in raw else None)

    def chunk(self, event: NativeEvent) -> dict:
        """The event's chat chunk (no choices when chat has nothing for it), with the usage so far where it changes."""
        chunks = self.translator.feed(event.kind, event.data)
        chunk = chunks[0] if chunks else {"choices": []}
        if event.kind in ("message_start", "message_delta", "message_stop"):
            chunk["usage"] = usage_from(self.translator.usage)
        chunk[NATIVE_EVENT] = event
        return chunk


def upstream_headers(own: dict[str, str], client: dict[str, str]) -> dict[str, str]:
    """The provider's headers with the client's anthropic-version in place of its own and the client's betas added."""
    headers = dict(own)
    for name, value in client.items():
        spellings = [key for key in headers if key.lower() == name]
        if name == "anthropic-beta" and spellings:
            betas = (beta.strip() for header in [*(headers[key] for key in spellings), value] for beta in header.split(","))
            value = ",".join(dict.fromkeys(beta for beta in betas if beta))
        for key in spellings:
            del headers[key]
        headers[name] = value
    return headers
