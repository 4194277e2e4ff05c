"""What the Responses and Messages translations share: SSE framing, object ids, and reading chat completions."""

from __future__ import annotations

import os
from typing import NamedTuple

import orjson


def sse(name: str, data: dict) -> bytes:
    """One named server-sent event; both APIs name every event and repeat the name as the payload's `type`."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def random_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def text_of(value: object) -> str:
    """A chat field that should hold text; anything else a broken upstream sent there counts as no text."""
    return value if type(value) is str else ""


def reasoning_of(fields: dict) -> str:
    """The reasoning text of a chat message or delta: vLLM and DeepSeek call it `reasoning_content`, others `reasoning`."""
    return text_of(fields.get("reasoning_content")) or text_of(fields.get("reasoning"))


def first_choice(data: dict) -> dict:
    choices = data.get("choices")
    if type(choices) is list and choices and type(choices[0]) is dict:
        return choices[0]
    return {}


class ChatTokens(NamedTuple):
    prompt: int
    cached: int
    completion: int
    reasoning: int
    cache_write: int
    cache_write_1h: int


def chat_tokens(usage: object) -> ChatTokens:
    """The token counts of a chat usage object (prompt, cache reads, completion, reasoning, cache writes and their
    1-hour part); 0 for what is missing."""
    if type(usage) is not dict:
        return ChatTokens(0, 0, 0, 0, 0, 0)
    prompt_details = usage.get("prompt_tokens_details")
    prompt_details = prompt_details if type(prompt_details) is dict else {}
    completion_details = usage.get("completion_tokens_details")
    return ChatTokens(
        _count(usage.get("prompt_tokens")),
        _count(prompt_details.get("cached_tokens")),
        _count(usage.get("completion_tokens")),
        _count(completion_details.get("reasoning_tokens")) if type(completion_details) is dict else 0,
        _count(prompt_details.get("cache_write_tokens")),
        _count(prompt_details.get("cache_write_1h_tokens")),
    )


def _count(value: object) -> int:
    return value if type(value) is int and value > 0 else 0


def tool_call_deltas(delta: dict) -> list[tuple[int, dict]]:
    """The (index, tool call delta) pairs of a chat delta, skipping entries no upstream should send."""
    calls = delta.get("tool_calls")
    if type(calls) is not list:
        return []
    return [(call["index"], call) for call in calls if type(call) is dict and type(call.get("index")) is int]


def call_function(call: dict) -> tuple[str, str]:
    """The name and arguments (pieces of them, in a delta) of a chat tool call."""
    function = call.get("function")
    if type(function) is not dict:
        return "", ""
    return text_of(function.get("name")), text_of(function.get("arguments"))
