"""Every text-bearing field of each API, in and out: PII placed there is found, blocked and masked in place."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardrails import Guardrails, Unscannable
from guardrails.bodies import MAX_DEPTH, MAX_TEXT_FIELDS, request_texts
from tests.guardrails.fields import EMAIL, ENCODING, REQUESTS, Build, assistant, call, tool, user


def _choice(**message: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": None, **message},
                         "finish_reason": "stop"}]}


def _entries(*tokens: str) -> list[dict]:
    return [{"token": t, "logprob": -0.1, "bytes": list(t.encode()), "top_logprobs": []} for t in tokens]


CHAT_RESPONSES: dict[str, Build] = {
    "content": lambda pii: _choice(content=f"Write to {pii}."),
    "content parts": lambda pii: _choice(content=[{"type": "text", "text": f"Write to {pii}."}]),
    "refusal": lambda pii: _choice(refusal=f"I cannot share {pii}."),
    "reasoning_content": lambda pii: _choice(content="Done.", reasoning_content=f"The user is {pii}."),
    "reasoning": lambda pii: _choice(content="Done.", reasoning=f"The user is {pii}."),
    "tool call arguments": lambda pii: _choice(tool_calls=call(orjson.dumps({"to": pii}).decode())),
    "legacy function_call": lambda pii: _choice(function_call={"name": "f", "arguments": f'{{"to": "{pii}"}}'}),
    "audio transcript": lambda pii: _choice(audio={"id": "a", "data": "AAAA", "transcript": f"Write to {pii}."}),
    "logprobs tokens": lambda pii: {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Done."},
                                                 "logprobs": {"content": _entries("Write", " to ", pii), "refusal": None}}]},
    "top logprobs": lambda pii: {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Done"},
                                              "logprobs": {"content": [{"token": "Done", "logprob": -0.1, "bytes": None,
                                                                        "top_logprobs": _entries(pii)}]}}]},
    "logprobs bytes": lambda pii: {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Done"},
                                                "logprobs": {"content": [{"token": "Done", "logprob": -0.1,
                                                                          "bytes": list(pii.encode())}]}}]},
}

COMPLETIONS_RESPONSES: dict[str, Build] = {
    "text": lambda pii: {"choices": [{"index": 0, "text": f"Write to {pii}.", "logprobs": None}]},
    "logprobs tokens": lambda pii: {"choices": [{"index": 0, "text": "Done.", "logprobs": {
        "tokens": ["Write", " to ", pii], "token_logprobs": [-1, -1, -1], "top_logprobs": None, "text_offset": [0, 5, 9]}}]},
    "top logprobs": lambda pii: {"choices": [{"index": 0, "text": "Done", "logprobs": {
        "tokens": ["Done"], "token_logprobs": [-1], "top_logprobs": [{"Done": -1, pii: -2}], "text_offset": [0]}}]},
}

RESPONSES = [("chat", name, build) for name, build in CHAT_RESPONSES.items()] + \
    [("completions", name, build) for name, build in COMPLETIONS_RESPONSES.items()]


def _shows(body: Any) -> str:
    """Everything a client or the table would see, token ids read back as text."""
    def decoded(value: Any) -> Any:
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            return ENCODING.decode(value)
        if isinstance(value, list):
            return [decoded(v) for v in value]
        if isinstance(value, dict):
            return {k: decoded(v) for k, v in value.items()}
        return value
    return orjson.dumps(decoded(body)).decode()


@pytest.mark.parametrize(("op", "name", "build"), REQUESTS, ids=[f"{op}: {name}" for op, name, _ in REQUESTS])
async def test_pii_in_any_request_field_is_blocked_and_masked(guard: Guardrails, op: str, name: str, build: Build) -> None:
    body = build(EMAIL)
    original = orjson.dumps(body)
    blocked = await guard.scan_request(body, op, "block", "off", ENCODING)  # type: ignore[arg-type]
    assert blocked.blocked and "EMAIL_ADDRESS" in (blocked.message or "")
    masked = await guard.scan_request(body, op, "mask", "off", ENCODING)  # type: ignore[arg-type]
    shown = _shows(masked.body)
    assert EMAIL not in shown and "<EMAIL_ADDRESS>" in shown
    assert orjson.dumps(body) == original, "the client's body was changed in place"
    clean = build("nobody in particular")
    assert not (await guard.scan_request(clean, op, "block", "off", ENCODING)).blocked  # type: ignore[arg-type]


@pytest.mark.parametrize(("op", "name", "build"), RESPONSES, ids=[f"{op}: {name}" for op, name, _ in RESPONSES])
async def test_pii_in_any_answer_field_is_blocked_and_masked(guard: Guardrails, op: str, name: str, build: Build) -> None:
    body = build(EMAIL)
    blocked = await guard.scan_response(body, op, "block", "off")  # type: ignore[arg-type]
    assert blocked.blocked and "EMAIL_ADDRESS" in (blocked.message or "")
    masked = await guard.scan_response(body, op, "mask", "off")  # type: ignore[arg-type]
    assert EMAIL not in _shows(masked.body)
    clean = build("nobody in particular")
    verdict = await guard.scan_response(clean, op, "mask", "off")  # type: ignore[arg-type]
    assert verdict.body is clean and not verdict.findings


async def test_logprobs_are_dropped_with_the_text_they_spell(guard: Guardrails) -> None:
    text = f"Write to {EMAIL}."
    body = {"choices": [
        {"index": 0, "message": {"role": "assistant", "content": text},
         "logprobs": {"content": _entries("Write", " to ", EMAIL, "."), "refusal": None}},
        {"index": 1, "message": {"role": "assistant", "content": "Fine."},
         "logprobs": {"content": _entries("Fine", "."), "refusal": None}}]}
    masked = (await guard.scan_response(body, "chat", "mask", "off")).body
    assert masked["choices"][0]["message"]["content"] == "Write to <EMAIL_ADDRESS>."
    assert masked["choices"][0]["logprobs"] is None
    assert masked["choices"][1] is body["choices"][1], "a clean choice keeps its logprobs"
    findings = (await guard.scan_response(body, "chat", "flag", "off")).findings
    assert [(f.entity_type, f.count) for f in findings] == [("EMAIL_ADDRESS", 1)], "tokens that spell the text count once"


@pytest.mark.parametrize("logprobs", ["not an object", {"content": "a string"}, {"content": [{"token": 7}]},
                                      {"content": [{"token": "a", "bytes": [999]}]}, {"tokens": "x"}])
async def test_malformed_logprobs_are_dropped_where_text_may_change(guard: Guardrails, logprobs: Any) -> None:
    op = "completions" if isinstance(logprobs, dict) and "tokens" in logprobs else "chat"
    choice = {"index": 0, "text": "ok"} if op == "completions" else {"index": 0, "message": {"content": "ok"}}
    body = {"choices": [{**choice, "logprobs": logprobs}]}
    for action in ("mask", "block"):
        assert (await guard.scan_response(body, op, action, "off")).body["choices"][0]["logprobs"] is None  # type: ignore[arg-type]
    assert (await guard.scan_response(body, op, "flag", "off")).body is body  # type: ignore[arg-type]


async def test_masked_token_ids_go_back_as_token_ids(guard: Guardrails) -> None:
    body = {"prompt": [ENCODING.encode_ordinary("fine"), ENCODING.encode_ordinary(f"mail {EMAIL} today")]}
    masked = (await guard.scan_request(body, "completions", "mask", "off", ENCODING)).body
    assert masked["prompt"][0] is body["prompt"][0]
    assert all(isinstance(t, int) for t in masked["prompt"][1])
    assert ENCODING.decode(masked["prompt"][1]) == "mail <EMAIL_ADDRESS> today"


@pytest.mark.parametrize("prompt", [[10**12], [-1], [ENCODING.n_vocab + 10_000], [1, "a"], ["a", 1], [[1, 2.5]]])
async def test_values_that_are_not_token_ids_are_unscannable(guard: Guardrails, prompt: list) -> None:
    with pytest.raises(Unscannable):
        await guard.scan_request({"prompt": prompt}, "completions", "flag", "off", ENCODING)


def test_the_walk_is_bounded() -> None:
    with pytest.raises(Unscannable, match="text fields"):
        request_texts({"input": ["a"] * (MAX_TEXT_FIELDS + 1)}, "embeddings")
    nested: Any = "x"
    for _ in range(MAX_DEPTH + 2):
        nested = [nested]
    with pytest.raises(Unscannable, match="deeper"):
        request_texts(assistant(content=None, tool_calls=[{"function": {"arguments": nested}}]), "chat")
    with pytest.raises(Unscannable, match="values to walk"):
        request_texts({"messages": [], "tools": [[0] * 1000] * 1000}, "chat")


JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
                    max_leaves=20)


def _plant(value: Any, pii: str, choice: int) -> Any:
    """The value with the PII string put at one of its leaves (or around it when it has none)."""
    if isinstance(value, dict) and value:
        key = sorted(value)[choice % len(value)]
        return {**value, key: _plant(value[key], pii, choice // 3)}
    if isinstance(value, list) and value:
        i = choice % len(value)
        return [*value[:i], _plant(value[i], pii, choice // 3), *value[i + 1:]]
    return {"planted": pii}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=JSON, choice=st.integers(0, 1000), where=st.sampled_from(["arguments", "parameters", "content"]))
def test_pii_anywhere_in_structured_fields_is_masked(guard: Guardrails, shape: Any, choice: int, where: str) -> None:
    planted = _plant(shape, EMAIL, choice)
    if where == "arguments":
        body = assistant(content=None, tool_calls=[{"id": "c", "type": "function",
                                                     "function": {"name": "f", "arguments": planted}}])
    elif where == "parameters":
        body = tool(parameters=planted)
    else:
        body = user([{"type": "text", "text": planted}])
    masked = asyncio.run(guard.scan_request(body, "chat", "mask", "off")).body
    assert EMAIL not in orjson.dumps(masked).decode()
    assert EMAIL in orjson.dumps(body).decode()
