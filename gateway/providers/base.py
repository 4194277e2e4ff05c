"""The one small interface every provider implements, and the types that cross it.

Bodies and chunks are OpenAI-shaped dicts on both sides: a provider that speaks another wire format
translates at its edge, so nothing above it knows which provider served a request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import aiohttp

Op = Literal["chat", "completions", "embeddings"]
FailureKind = Literal["status", "timeout", "connect", "invalid", "reset"]


class UpstreamError(Exception):
    """A provider failed: `kind` says how, `status` is the upstream's HTTP status where there was one."""

    def __init__(self, kind: FailureKind, detail: str, status: int | None = None, error: dict | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.status = status
        self.error = error

    @property
    def condition(self) -> int | str:
        """What retry policies match on: the HTTP status, or the failure kind."""
        return self.status if self.kind == "status" and self.status is not None else self.kind


def _count(usage: dict, name: str, provider: str) -> int:
    value = usage.get(name)
    if value is None:
        return 0
    if type(value) is not int or value < 0:
        raise UpstreamError("invalid", f"{provider}: usage.{name} is not a token count ({type(value).__name__})")
    return value


@dataclass(slots=True)
class Usage:
    """Token counts of one answer, every kind apart. `prompt_tokens` counts them all, as OpenAI's usage does: cache
    reads (`cached_tokens`) and cache writes (`cache_write_tokens`, of which `cache_write_1h_tokens` were written
    for an hour) are parts of it. `reasoning_tokens` are part of `completion_tokens`. `estimated`: the upstream
    gave no usage, so the gateway counted with tiktoken."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False

    @classmethod
    def from_openai(cls, usage: object, provider: str = "upstream") -> Usage | None:
        """None when there is no usage; UpstreamError("invalid") when it is not shaped as OpenAI's.

        Cache reads are `prompt_tokens_details.cached_tokens` (OpenAI, Azure, vLLM), or DeepSeek's
        `prompt_cache_hit_tokens`; cache writes are `prompt_tokens_details.cache_write_tokens` (as the
        Anthropic translation and OpenRouter write them) with lockgate's `cache_write_1h_tokens` part.
        """
        if usage is None:
            return None
        if type(usage) is not dict:
            raise UpstreamError("invalid", f"{provider}: usage is not an object ({type(usage).__name__})")
        details = usage.get("prompt_tokens_details")
        completion_details = usage.get("completion_tokens_details")
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        # The usual usage, two counts and no details, is read without a call per field.
        if (type(prompt) is int and prompt >= 0 and type(completion) is int and completion >= 0 and details is None
                and completion_details is None and "prompt_cache_hit_tokens" not in usage):
            return cls(prompt, completion)
        if details is not None and type(details) is not dict:
            raise UpstreamError("invalid", f"{provider}: usage.prompt_tokens_details is not an object")
        if completion_details is not None and type(completion_details) is not dict:
            raise UpstreamError("invalid", f"{provider}: usage.completion_tokens_details is not an object")
        prompt, completion = _count(usage, "prompt_tokens", provider), _count(usage, "completion_tokens", provider)
        details = details or {}
        cached = (_count(details, "cached_tokens", provider) if details.get("cached_tokens") is not None
                  else _count(usage, "prompt_cache_hit_tokens", provider))
        # Parts never exceed their whole: a count an upstream got wrong cannot bill more than the prompt.
        cached = min(cached, prompt)
        written = min(_count(details, "cache_write_tokens", provider), prompt - cached)
        written_1h = min(_count(details, "cache_write_1h_tokens", provider), written)
        reasoning = min(_count(completion_details or {}, "reasoning_tokens", provider), completion)
        return cls(prompt, completion, cached, written, written_1h, reasoning)

    def openai_details(self) -> dict[str, int]:
        """`prompt_tokens_details` as the gateway writes it when it builds an OpenAI usage."""
        details = {"cached_tokens": self.cached_tokens, "cache_write_tokens": self.cache_write_tokens}
        if self.cache_write_1h_tokens:
            details["cache_write_1h_tokens"] = self.cache_write_1h_tokens
        return details


@dataclass(slots=True)
class Completion:
    """A whole (non-streamed) answer. `body` holds the upstream's bytes when they pass through as they are."""

    data: dict
    body: bytes | None
    usage: Usage | None


class UnsupportedOperation(Exception):
    def __init__(self, provider: str, op: Op) -> None:
        super().__init__(f"provider {provider!r} does not serve /v1/{op.replace('chat', 'chat/completions')}")


def _nothing_buffered() -> bool:
    return False


class LastEvent:
    """The data of the event the latest chunk was parsed from. A relay that changes nothing sends these bytes on
    instead of serializing the chunk again: a 20-chunk stream saves twenty encodings."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data: bytes | None = None


class ChunkStream:
    """An opened stream: the upstream accepted the request; iterate for chunk dicts, always aclose()."""

    def __init__(
        self,
        chunks: AsyncIterator[dict],
        on_close: Callable[[], Awaitable[None] | None],
        buffered: Callable[[], bool] | None = None,
        last_event: LastEvent | None = None,
    ) -> None:
        self._chunks = chunks
        self._on_close = on_close
        # True when the next chunk has already arrived, so a relay may hold its write and send both at once.
        # An attribute rather than a method: the relay asks once per chunk.
        self.buffered: Callable[[], bool] = buffered or _nothing_buffered
        self.last_event = last_event

    def __aiter__(self) -> AsyncIterator[dict]:
        return self._chunks

    async def aclose(self) -> None:
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()
        result = self._on_close()
        if result is not None:
            await result


class Provider:
    """Base for providers: lifetime hooks, and one method per way of answering."""

    ops: frozenset[str] = frozenset({"chat", "completions", "embeddings"})

    def __init__(self, name: str) -> None:
        self.name = name

    async def start(self) -> None:
        """Opens what the provider holds for its lifetime (client session, engine)."""

    async def close(self) -> None:
        """Releases it; called once, after the last request that used this provider."""

    @property
    def state(self) -> str:
        return "ready"

    async def complete(
        self, op: Op, body: dict, timeout: aiohttp.ClientTimeout, *, request_id: str = "", priority: int = 0
    ) -> Completion:
        raise UnsupportedOperation(self.name, op)

    async def stream(
        self, op: Op, body: dict, timeout: aiohttp.ClientTimeout, *, request_id: str = "", priority: int = 0
    ) -> ChunkStream:
        """Opens a stream. `request_id` and `priority` matter to engines that schedule, not to HTTP upstreams."""
        raise UnsupportedOperation(self.name, op)


# The fields the gateway itself reads (guardrails, transcripts, records) must have the types OpenAI documents;
# anything else in an answer passes through unchecked.
_TEXT_FIELDS = frozenset({"content", "refusal", "reasoning_content", "role", "text", "finish_reason", "name",
                          "arguments", "id", "type"})


def _text_problem(holder: dict) -> str | None:
    for key, value in holder.items():
        if value is None:
            continue
        if key in _TEXT_FIELDS:
            if type(value) is not str:
                return f"{key} is not a string"
        elif key == "index":
            if type(value) is not int or value < 0:
                return "index is not a non-negative integer"
        elif key == "logprobs":
            if type(value) is not dict:
                return "logprobs is not an object"
        elif key in ("delta", "message", "function"):
            if type(value) is not dict:
                return f"{key} is not an object"
            problem = _text_problem(value)
            if problem is not None:
                return f"{key}.{problem}"
        elif key == "tool_calls":
            problem = _items_problem("tool_calls", value)
            if problem is not None:
                return problem
    return None


def _items_problem(name: str, items: object) -> str | None:
    if type(items) is not list:
        return f"{name} is not a list"
    for item in items:
        problem = _text_problem(item) if type(item) is dict else "is not an object"
        if problem is not None:
            return f"{name}[].{problem}"
    return None


def _choices_problem(choices: object) -> str | None:
    return _items_problem("choices", choices)


def check_chunk(chunk: dict, provider: str) -> None:
    """Raises UpstreamError("invalid") for a stream chunk the gateway could not read safely."""
    choices = chunk.get("choices")
    if choices is not None:
        if type(choices) is not list:
            raise UpstreamError("invalid", f"{provider}: a stream chunk is malformed: choices is not a list")
        for choice in choices:
            if type(choice) is not dict:
                raise UpstreamError("invalid", f"{provider}: a stream chunk is malformed: a choice is not an object")
            delta = choice.get("delta")
            # Nearly every chunk carries one piece of content and nothing else: a few lookups prove it well-formed.
            if (type(delta) is dict and len(delta) == 1 and type(delta.get("content")) is str and len(choice) <= 4
                    and type(index := choice.get("index")) is int and index >= 0 and choice.get("finish_reason") is None
                    and choice.get("logprobs") is None):
                continue
            problem = _text_problem(choice)
            if problem is not None:
                raise UpstreamError("invalid", f"{provider}: a stream chunk is malformed: choices[].{problem}")
    usage = chunk.get("usage")
    if usage is not None:
        Usage.from_openai(usage, provider)


# The keys of a plain chat answer's choice and message; `annotations` is not read by the gateway.
_PLAIN_CHOICE = frozenset({"index", "message", "finish_reason", "logprobs"})
_PLAIN_MESSAGE = frozenset({"role", "content", "refusal", "annotations"})


def answer_usage(data: dict, op: Op, provider: str) -> Usage | None:
    """The usage of a whole answer, once its shape is known to be what `op` promises; else UpstreamError("invalid")."""
    if op == "embeddings":
        items = data.get("data")
        problem = None if type(items) is list and all(
            type(item) is dict and type(item.get("embedding")) in (list, str) for item in items
        ) else "data is not a list of embeddings"
    else:
        choices = data.get("choices")
        # Nearly every chat answer is one choice holding a role and a text: a few lookups prove it well-formed.
        if (op == "chat" and type(choices) is list and len(choices) == 1 and type(choice := choices[0]) is dict
                and _PLAIN_CHOICE.issuperset(choice) and type(message := choice.get("message")) is dict
                and _PLAIN_MESSAGE.issuperset(message) and type(message.get("content")) is str
                and type(message.get("role")) is str and message.get("refusal") is None
                and type(index := choice.get("index")) is int and index >= 0
                and type(choice.get("finish_reason")) is str and choice.get("logprobs") is None):
            return Usage.from_openai(data.get("usage"), provider)
        problem = _choices_problem(choices)
        if problem is None and op == "chat" and not all(type(choice.get("message")) is dict for choice in choices):
            problem = "a choice has no message"
    if problem is not None:
        raise UpstreamError("invalid", f"{provider}: the answer is malformed: {problem}")
    return Usage.from_openai(data.get("usage"), provider)
