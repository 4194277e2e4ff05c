"""Reading tool calls out of answers and chunks, as a client (the OpenAI SDK) does."""

from __future__ import annotations

import json
from typing import Any

import jsonschema


def well_formed_calls(calls: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[tuple[str, dict]]:
    """Each call is an OpenAI function call whose arguments fit its function's schema; returns (name, arguments)."""
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in tools}
    out = []
    for call in calls:
        assert call["type"] == "function" and call["id"]
        arguments = json.loads(call["function"]["arguments"])
        jsonschema.validate(arguments, schemas[call["function"]["name"]])
        out.append((call["function"]["name"], arguments))
    return out


def streamed_calls(chunks: list[dict[str, Any]], index: int = 0) -> list[dict[str, Any]]:
    """The tool calls of one choice, put together from its deltas as the OpenAI SDK does."""
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            if choice["index"] != index:
                continue
            for piece in choice["delta"].get("tool_calls", []):
                call = calls.setdefault(piece["index"], {"function": {"name": "", "arguments": ""}})
                if "id" in piece:
                    call["id"], call["type"] = piece["id"], piece["type"]
                call["function"]["name"] += piece["function"].get("name", "")
                call["function"]["arguments"] += piece["function"].get("arguments", "")
    return [calls[position] for position in sorted(calls)]


def finish_reasons(chunks: list[dict[str, Any]]) -> dict[int, list[str]]:
    reasons: dict[int, list[str]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            if choice["finish_reason"] is not None:
                reasons.setdefault(choice["index"], []).append(choice["finish_reason"])
    return reasons
