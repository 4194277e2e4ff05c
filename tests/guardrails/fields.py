"""Request bodies with a PII string placed in each text-bearing field, shared by unit and end-to-end tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from policies.tokens import encoding_for

EMAIL = "maria.gonzalez@acme-corp.com"
ENCODING = encoding_for("gpt-4o-mini")
Build = Callable[[str], dict[str, Any]]
HI = [{"role": "user", "content": "hi"}]


def user(content: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content, **extra}]}


def assistant(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [*HI, {"role": "assistant", **fields}]}


def tool(description: str = "Send a mail", parameters: dict | None = None) -> dict[str, Any]:
    function = {"name": "send_mail", "description": description,
                "parameters": parameters or {"type": "object", "properties": {"to": {"type": "string"}}}}
    return {"model": "m", "messages": HI, "tools": [{"type": "function", "function": function}]}


def call(arguments: str, name: str = "send_mail") -> list[dict]:
    return [{"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}]


CHAT_REQUESTS: dict[str, Build] = {
    "content string": lambda pii: user(f"write to {pii}"),
    "text part": lambda pii: user([{"type": "text", "text": f"write to {pii}"}]),
    "part without a type": lambda pii: user([{"text": f"write to {pii}"}]),
    "part of another type": lambda pii: user([{"type": "input_text", "text": f"write to {pii}"}]),
    "refusal part": lambda pii: assistant(content=[{"type": "refusal", "refusal": f"not {pii}"}]),
    "message name": lambda pii: user("hello", name=pii),
    "assistant refusal": lambda pii: assistant(content=None, refusal=f"I won't mail {pii}"),
    "assistant reasoning_content": lambda pii: assistant(content="ok", reasoning_content=f"the user is {pii}"),
    "tool call arguments": lambda pii: assistant(content=None, tool_calls=call(orjson.dumps({"to": pii}).decode())),
    "tool call arguments as an object": lambda pii: assistant(content=None, tool_calls=[
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"to": [pii]}}}]),
    "tool call name": lambda pii: assistant(content=None, tool_calls=call("{}", name=f"mail-{pii}")),
    "legacy function_call": lambda pii: assistant(content=None, function_call={"name": "f", "arguments": f'{{"to":"{pii}"}}'}),
    "tool message": lambda pii: {"model": "m", "messages": [
        {"role": "assistant", "content": None, "tool_calls": call("{}")},
        {"role": "tool", "tool_call_id": "call_1", "content": f"sent to {pii}"}]},
    "tool description": lambda pii: tool(description=f"Mail {pii}"),
    "parameter description": lambda pii: tool(parameters={"type": "object", "properties": {
        "to": {"type": "string", "description": f"for example {pii}"}}}),
    "parameter enum": lambda pii: tool(parameters={"type": "object", "properties": {
        "to": {"type": "string", "enum": ["a", pii]}}}),
    "legacy functions": lambda pii: {"model": "m", "messages": HI, "functions": [{"name": "f", "description": f"to {pii}"}]},
    "response_format schema": lambda pii: {"model": "m", "messages": HI, "response_format": {
        "type": "json_schema", "json_schema": {"name": "r", "schema": {"description": f"like {pii}"}}}},
    "prediction": lambda pii: {"model": "m", "messages": HI, "prediction": {"type": "content", "content": f"to {pii}"}},
}

COMPLETIONS_REQUESTS: dict[str, Build] = {
    "prompt string": lambda pii: {"prompt": f"mail {pii}"},
    "prompt strings": lambda pii: {"prompt": ["fine", f"mail {pii}"]},
    "suffix": lambda pii: {"prompt": "Dear", "suffix": f"regards, {pii}"},
    "prompt token ids": lambda pii: {"prompt": ENCODING.encode_ordinary(f"mail {pii} now")},
    "prompt token id lists": lambda pii: {"prompt": [[9906], ENCODING.encode_ordinary(f"mail {pii}")]},
}

EMBEDDINGS_REQUESTS: dict[str, Build] = {
    "input string": lambda pii: {"input": f"mail {pii}"},
    "input strings": lambda pii: {"input": ["fine", f"mail {pii}"]},
    "input token ids": lambda pii: {"input": ENCODING.encode_ordinary(f"mail {pii}")},
    "input token id lists": lambda pii: {"input": [ENCODING.encode_ordinary("fine"), ENCODING.encode_ordinary(pii)]},
}

REQUESTS = [("chat", name, build) for name, build in CHAT_REQUESTS.items()] + \
    [("completions", name, build) for name, build in COMPLETIONS_REQUESTS.items()] + \
    [("embeddings", name, build) for name, build in EMBEDDINGS_REQUESTS.items()]
