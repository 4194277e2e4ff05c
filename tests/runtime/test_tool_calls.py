"""Tool calls from the real engine with no tool parser configured: forced calls held to the tools' schemas."""

from __future__ import annotations

from typing import Any

import pytest

from runtime import EmbeddedEngine, InvalidRequestError
from runtime.openai_io import parse_chat_messages
from tests.runtime.tool_answers import finish_reasons, streamed_calls, well_formed_calls

pytestmark = [pytest.mark.runtime, pytest.mark.asyncio(loop_scope="session")]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"timezone": {"type": "string", "maxLength": 20}}, "required": ["timezone"]}}}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def tool_body(tool_choice: Any, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": [WEATHER, TIME],
            "tool_choice": tool_choice, "temperature": 0, "max_tokens": 80, **fields}


def assert_well_formed(calls: list[dict[str, Any]]) -> list[tuple[str, dict]]:
    return well_formed_calls(calls, [WEATHER, TIME])


@pytest.mark.parametrize(("tool_choice", "finish"), [(NAMED, "stop"), ("required", "tool_calls")])
async def test_a_forced_call_is_a_well_formed_tool_call_whole_and_streamed(
    engine: EmbeddedEngine, tool_choice: Any, finish: str
) -> None:
    whole = await engine.chat(tool_body(tool_choice), f"forced-{finish}")
    chunks = [chunk async for chunk in engine.stream_chat(tool_body(tool_choice), f"forced-{finish}-stream")]

    choice = whole["choices"][0]
    assert choice["message"]["content"] is None
    calls = assert_well_formed(choice["message"]["tool_calls"])
    assert calls
    if tool_choice is NAMED:
        assert [name for name, _ in calls] == ["get_weather"]
    assert choice["finish_reason"] == finish, "OpenAI ends a named call with stop, a required one with tool_calls"
    # Streamed: the SDK's way of adding up deltas gives the same calls, under one id each, then one finish.
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    together = streamed_calls(chunks)
    assert assert_well_formed(together) == calls
    # Each call opens with its id, type and whole name, as OpenAI streams them; later pieces carry arguments only.
    pieces = [piece for chunk in chunks for c in chunk["choices"] for piece in c["delta"].get("tool_calls", [])]
    openers = [piece for piece in pieces if "id" in piece]
    assert len(openers) == len(calls)
    assert all(piece["type"] == "function" and piece["function"]["name"] for piece in openers)
    assert all(set(piece["function"]) == {"arguments"} for piece in pieces if "id" not in piece)
    assert finish_reasons(chunks) == {0: [finish]}
    assert chunks[-1]["usage"] == whole["usage"]


async def test_every_choice_makes_its_own_calls_when_several_are_asked(engine: EmbeddedEngine) -> None:
    body = tool_body("required", n=2, temperature=1.0, seed=11)

    whole = await engine.chat(body, "forced-n")
    chunks = [chunk async for chunk in engine.stream_chat(body, "forced-n-stream")]

    assert [choice["index"] for choice in whole["choices"]] == [0, 1]
    for choice in whole["choices"]:
        assert assert_well_formed(choice["message"]["tool_calls"])
    ids = [call["id"] for index in (0, 1) for call in streamed_calls(chunks, index)]
    assert len(ids) == len(set(ids)) >= 2
    assert finish_reasons(chunks) == {0: ["tool_calls"], 1: ["tool_calls"]}


async def test_auto_without_a_tool_parser_is_a_400_that_says_why(engine: EmbeddedEngine) -> None:
    body = tool_body(None)
    del body["tool_choice"]

    for ask in (engine.chat, lambda b, rid: anext(engine.stream_chat(b, rid))):
        with pytest.raises(InvalidRequestError, match="tool_parser") as raised:
            await ask(body, "auto-refused")
        assert (raised.value.param, raised.value.code) == ("tool_choice", "unsupported_value")


async def test_tool_calls_and_results_in_the_history_reach_the_chat_template(engine: EmbeddedEngine,
                                                                             tokenizer: Any) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    history = [{"role": "user", "content": "What is the weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]
    body = {"messages": history, "tools": [WEATHER], "tool_choice": "none", "temperature": 0, "max_tokens": 30}

    reply = await engine.chat(body, "history")
    without_result = await engine.chat({**body, "messages": history[:2]}, "history-short")

    expected = tokenizer.apply_chat_template(parse_chat_messages(body), tools=[WEATHER], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
    assert reply["usage"]["prompt_tokens"] == len(expected)
    assert reply["usage"]["prompt_tokens"] > without_result["usage"]["prompt_tokens"]
    message = reply["choices"][0]["message"]
    assert "tool_calls" not in message and message["content"], "tool_choice none answers in text"
