"""The stream guard on every streamed text field: held back across pieces, masked, blocked, never crashed by a shape."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from gateway.guarding import StreamGuard, route_guards
from guardrails import Guardrails
from policies.schema import DirectionGuardrails

EMAIL = "jane.doe@example.com"
CARD = "4111 1111 1111 1111"
TEXT = f"Write to {EMAIL} and pay with {CARD} today."


@pytest.fixture(scope="module")
def guard() -> Guardrails:
    return Guardrails(["EMAIL_ADDRESS", "CREDIT_CARD"])


def _stream_guard(guard: Guardrails, action: str = "mask", field: str = "content") -> StreamGuard:
    return StreamGuard(route_guards(guard, DirectionGuardrails(), DirectionGuardrails(pii=action), False), field)  # type: ignore[arg-type]


def _chunk(*choices: dict) -> dict:
    return {"object": "chat.completion.chunk", "choices": list(choices)}


async def _run(stream_guard: StreamGuard, chunks: list[dict]) -> list[dict]:
    out = []
    for chunk in chunks:
        assert await stream_guard.filter(chunk)
        out.append(chunk)
    rest = await stream_guard.finish()
    return out + ([rest] if rest is not None else [])


def _texts(chunks: list[dict]) -> dict[tuple, str]:
    """What a client puts together from the chunks: each choice's fields and each tool call's arguments."""
    texts: dict[tuple, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice.get("delta") or {}
            for name in ("content", "refusal", "reasoning_content"):
                if delta.get(name):
                    texts[(choice["index"], name)] = texts.get((choice["index"], name), "") + delta[name]
            for call in delta.get("tool_calls") or ():
                arguments = (call.get("function") or {}).get("arguments") or ""
                key = (choice["index"], "tool", call["index"])
                texts[key] = texts.get(key, "") + arguments
    return texts


@pytest.mark.parametrize("split", range(1, len(TEXT), 3))
async def test_every_field_masks_like_the_whole_text_at_any_split(guard: Guardrails, split: int) -> None:
    whole = guard.scan_text(TEXT, "output", "mask", "off").body
    head, tail = TEXT[:split], TEXT[split:]
    chunks = [
        _chunk({"index": 0, "delta": {"role": "assistant", "content": head, "reasoning_content": head}}),
        _chunk({"index": 1, "delta": {"refusal": head}},
               {"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "a", "type": "function",
                                                      "function": {"name": "send", "arguments": head}},
                                                     {"index": 1, "function": {"arguments": tail}}]}}),
        _chunk({"index": 0, "delta": {"content": tail, "reasoning_content": tail,
                                      "tool_calls": [{"index": 0, "function": {"arguments": tail}},
                                                     {"index": 1, "function": {"arguments": tail}}]}}),
        _chunk({"index": 1, "delta": {"refusal": tail}, "finish_reason": "stop"}),
        _chunk({"index": 0, "delta": {}, "finish_reason": "tool_calls"}),
    ]
    texts = _texts(await _run(_stream_guard(guard), chunks))
    assert texts == {(0, "content"): whole, (0, "reasoning_content"): whole, (1, "refusal"): whole,
                     (0, "tool", 0): whole, (0, "tool", 1): guard.scan_text(tail + tail, "output", "mask", "off").body}


async def test_text_held_when_the_upstream_ends_without_a_finish_reason_comes_in_a_last_chunk(guard: Guardrails) -> None:
    stream_guard = _stream_guard(guard)
    chunks = [_chunk({"index": 2, "delta": {"content": f"mail {EMAIL}",
                                            "tool_calls": [{"index": 3, "function": {"arguments": '{"to": "' + EMAIL}}]}})]
    out = await _run(stream_guard, chunks)
    assert _texts(out[:1]) == {(2, "content"): "mail ", (2, "tool", 3): '{"to": '}
    assert out[-1]["choices"][0]["index"] == 2 and out[-1]["choices"][0]["finish_reason"] is None
    assert _texts(out) == {(2, "content"): "mail <EMAIL_ADDRESS>", (2, "tool", 3): '{"to": "<EMAIL_ADDRESS>'}
    assert EMAIL not in orjson.dumps(out).decode()
    assert [(f.entity_type, f.count) for f in stream_guard.findings()] == [("EMAIL_ADDRESS", 1)] * 2


async def test_a_block_in_tool_call_arguments_ends_the_stream(guard: Guardrails) -> None:
    stream_guard = _stream_guard(guard, "block")
    first = _chunk({"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"card": "4111 1111'}}]}})
    assert await stream_guard.filter(first)
    assert "4111" not in orjson.dumps(first).decode()
    assert not await stream_guard.filter(_chunk({"index": 0, "delta": {
        "tool_calls": [{"index": 0, "function": {"arguments": ' 1111 1111"}'}}]}}))
    assert "CREDIT_CARD" in (stream_guard.message or "")


@pytest.mark.parametrize(("action", "kept"), [("mask", False), ("block", False), ("flag", True)])
async def test_streamed_logprobs_are_dropped_where_the_text_may_change(guard: Guardrails, action: str, kept: bool) -> None:
    logprobs = {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}]}
    chunk = _chunk({"index": 0, "delta": {"content": "Hi there"}, "logprobs": logprobs})
    assert await _stream_guard(guard, action).filter(chunk)
    assert (chunk["choices"][0]["logprobs"] is not None) is kept


MALFORMED: list[Any] = [
    {"choices": f"mail {EMAIL}"},
    {"choices": [f"mail {EMAIL}", {"index": 0, "delta": {"content": "ok"}}]},
    {"choices": [{"index": "x", "delta": {"content": f"mail {EMAIL} now"}, "finish_reason": "stop"}]},
    {"choices": [{"index": None, "delta": f"mail {EMAIL}"}]},
    {"choices": [{"index": 0, "delta": {"content": {"text": EMAIL}, "refusal": [EMAIL]}}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": f"mail {EMAIL}"}}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [EMAIL, {"index": "y", "function": EMAIL}]}}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1.5, "function": {"arguments": {"to": EMAIL}}}]}}]},
    {"choices": [{"index": 0, "delta": {"function_call": EMAIL, "audio": {"transcript": f"to {EMAIL} ok"}}}]},
    {"choices": [{"index": 0, "text": EMAIL}]},
]


@pytest.mark.parametrize("chunk", MALFORMED)
async def test_malformed_chunks_never_crash_the_guard_nor_carry_text_past_it(guard: Guardrails, chunk: Any) -> None:
    stream_guard = _stream_guard(guard)
    filtered = copy.deepcopy(chunk)
    assert await stream_guard.filter(filtered)
    rest = await stream_guard.finish()
    assert EMAIL not in orjson.dumps([filtered, rest]).decode()


async def test_completions_text_is_scanned_per_choice(guard: Guardrails) -> None:
    stream_guard = _stream_guard(guard, field="text")
    chunks = [{"choices": [{"index": 0, "text": "mail jane.do"}, {"index": 1, "text": "card 4111 1111 "}]},
              {"choices": [{"index": 1, "text": "1111 1111 ok", "finish_reason": "stop"},
                           {"index": 0, "text": "e@example.com ok", "finish_reason": "stop"}]}]
    out = await _run(stream_guard, chunks)
    texts: dict[int, str] = {}
    for chunk in out:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: "mail <EMAIL_ADDRESS> ok", 1: "card **** **** **** 1111 ok"}
