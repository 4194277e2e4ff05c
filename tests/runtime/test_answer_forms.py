"""Structured outputs, logprobs and several choices from the real engine, whole and streamed."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from runtime import EmbeddedEngine

pytestmark = [pytest.mark.runtime, pytest.mark.asyncio(loop_scope="session")]

CITY_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "country", "is_capital"],
               "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30},
                              "is_capital": {"type": "boolean"}}}


def chat_body(content: str = "What is the capital of France? Answer in JSON.", **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, **fields}


def streamed_text(chunks: list[dict[str, Any]], index: int = 0) -> str:
    return "".join(choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"]
                   if choice["index"] == index)


@pytest.mark.parametrize("response_format", [
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True}},
])
async def test_response_format_holds_the_answer_to_json_whole_and_streamed(
    engine: EmbeddedEngine, response_format: dict[str, Any]
) -> None:
    body = chat_body(response_format=response_format, max_tokens=120)

    whole = await engine.chat(body, f"format-{response_format['type']}")
    chunks = [chunk async for chunk in engine.stream_chat(body, f"format-{response_format['type']}-stream")]

    answer = json.loads(whole["choices"][0]["message"]["content"])
    assert isinstance(answer, dict)
    if response_format["type"] == "json_schema":
        jsonschema.validate(answer, CITY_SCHEMA)
    assert whole["choices"][0]["finish_reason"] == "stop"
    assert json.loads(streamed_text(chunks)) == answer


async def test_chat_logprobs_spell_the_answer_with_the_most_likely_alternatives(engine: EmbeddedEngine) -> None:
    body = chat_body("What is the capital of France?", max_tokens=12, logprobs=True, top_logprobs=3)

    whole = await engine.chat(body, "logprobs")
    chunks = [chunk async for chunk in engine.stream_chat(body, "logprobs-stream")]

    choice = whole["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(entry["token"] for entry in content) == choice["message"]["content"]
    assert b"".join(bytes(entry["bytes"]) for entry in content).decode() == choice["message"]["content"]
    for entry in content:
        alternatives = entry["top_logprobs"]
        assert len(alternatives) == 3
        assert [alt["logprob"] for alt in alternatives] == sorted((alt["logprob"] for alt in alternatives), reverse=True)
        # Greedy decoding picks the most likely token every time.
        assert (alternatives[0]["token"], alternatives[0]["logprob"]) == (entry["token"], entry["logprob"])
        assert entry["logprob"] <= 0
    # Streamed, each chunk carries the logprobs of the tokens it carries.
    streamed = []
    for chunk in chunks[1:-1]:
        for piece in chunk["choices"]:
            if piece.get("logprobs"):
                assert "".join(e["token"] for e in piece["logprobs"]["content"]) == piece["delta"].get("content", "")
                streamed.extend(piece["logprobs"]["content"])
    assert streamed == content


async def test_logprobs_are_absent_unless_asked_and_top_zero_gives_none_alternatives(engine: EmbeddedEngine) -> None:
    plain = await engine.chat(chat_body(max_tokens=3), "no-logprobs")
    bare = await engine.chat(chat_body(max_tokens=3, logprobs=True), "logprobs-bare")

    assert "logprobs" not in plain["choices"][0]
    assert [entry["top_logprobs"] for entry in bare["choices"][0]["logprobs"]["content"]] == [[], [], []]


async def test_completion_logprobs_are_openais_legacy_object(engine: EmbeddedEngine) -> None:
    body = {"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "logprobs": 2}

    whole = await engine.completions(body, "cmpl-logprobs")
    chunks = [chunk async for chunk in engine.stream_completions(body, "cmpl-logprobs-stream")]

    choice = whole["choices"][0]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["text_offset"] == [sum(map(len, logprobs["tokens"][:i])) for i in range(len(logprobs["tokens"]))]
    for token, chosen, alternatives in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"],
                                           strict=True):
        assert 1 <= len(alternatives) <= 3 and alternatives[token] == chosen
        assert max(alternatives.values()) == chosen, "greedy decoding picks the most likely token"
    streamed_tokens = [token for chunk in chunks if chunk["choices"] and chunk["choices"][0]["logprobs"]
                       for token in chunk["choices"][0]["logprobs"]["tokens"]]
    streamed_offsets = [offset for chunk in chunks if chunk["choices"] and chunk["choices"][0]["logprobs"]
                        for offset in chunk["choices"][0]["logprobs"]["text_offset"]]
    assert (streamed_tokens, streamed_offsets) == (logprobs["tokens"], logprobs["text_offset"])


async def test_several_choices_stream_with_one_index_each(engine: EmbeddedEngine) -> None:
    body = chat_body("Tell me a word.", n=3, temperature=1.0, seed=5, max_tokens=6)

    whole = await engine.chat(body, "n-whole")
    chunks = [chunk async for chunk in engine.stream_chat(body, "n-stream")]

    assert [choice["index"] for choice in whole["choices"]] == [0, 1, 2]
    assert all(len(chunk["choices"]) == 1 for chunk in chunks[:-1])
    roles = [chunk["choices"][0]["index"] for chunk in chunks if chunk["choices"]
             and chunk["choices"][0]["delta"].get("role") == "assistant"]
    finishes = [chunk["choices"][0]["index"] for chunk in chunks if chunk["choices"]
                and chunk["choices"][0]["finish_reason"] is not None]
    assert sorted(roles) == sorted(finishes) == [0, 1, 2]
    assert all(streamed_text(chunks, index) for index in range(3))
    assert chunks[-1]["usage"]["completion_tokens"] <= 18
    # A fixed seed gives the same choices, streamed or not.
    assert [streamed_text(chunks, index) for index in range(3)] == [c["message"]["content"] for c in whole["choices"]]
