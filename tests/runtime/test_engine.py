"""The embedded engine answers OpenAI-shaped requests with the real vLLM engine on the CPU."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from runtime import EmbeddedEngine, EngineState, InvalidRequestError

pytestmark = [pytest.mark.runtime, pytest.mark.asyncio(loop_scope="session")]

QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."


def chat_body(content: str = QUESTION, **fields: Any) -> dict[str, Any]:
    return {"model": "small", "messages": [{"role": "user", "content": content}], "temperature": 0, **fields}


async def wait_until(condition: Callable[[], bool], what: str, limit_s: float = 20.0) -> None:
    for _ in range(int(limit_s / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


async def test_chat_answers_with_a_chat_completion(engine: EmbeddedEngine) -> None:
    reply = await engine.chat(chat_body(), "chat-basic")

    assert engine.status.state is EngineState.READY
    assert reply["object"] == "chat.completion"
    assert reply["id"] == "chatcmpl-chat-basic"
    assert reply["model"] == "small"
    assert reply["choices"] == [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}]


async def test_usage_counts_equal_the_tokenizers(engine: EmbeddedEngine, tokenizer: Any) -> None:
    body = chat_body()
    reply = await engine.chat(body, "chat-usage")
    cut = await engine.chat({**body, "max_tokens": 4}, "chat-usage-cut")

    templated = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True)
    usage = reply["usage"]
    assert usage["prompt_tokens"] == len(templated["input_ids"])
    # The answer's tokens plus the end-of-turn token the model generated to stop.
    assert usage["completion_tokens"] == len(tokenizer.encode(reply["choices"][0]["message"]["content"])) + 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert cut["usage"]["completion_tokens"] == len(tokenizer.encode(cut["choices"][0]["message"]["content"])) == 4


async def test_prefix_cache_hits_are_reported_as_cached_tokens(engine: EmbeddedEngine) -> None:
    # A prompt of many blocks: the second time, vLLM's prefix cache holds all its full blocks.
    document = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(40))
    body = chat_body(f"{document}\nHow many lines are there?", max_tokens=2)
    first = await engine.chat(body, "prefix-first")
    second = await engine.chat(body, "prefix-second")
    chunks = [chunk async for chunk in engine.stream_chat(body, "prefix-stream")]

    prompt = first["usage"]["prompt_tokens"]
    assert prompt > 300 and first["usage"]["prompt_tokens_details"]["cached_tokens"] < prompt // 2
    for usage in (second["usage"], chunks[-1]["usage"]):
        assert usage["prompt_tokens"] == prompt
        assert prompt // 2 < usage["prompt_tokens_details"]["cached_tokens"] < prompt


async def test_stream_yields_role_deltas_finish_then_usage(engine: EmbeddedEngine) -> None:
    whole = await engine.chat(chat_body(), "stream-reference")
    chunks = [chunk async for chunk in engine.stream_chat(chat_body(), "stream-chat")]

    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = chunks[1:-2]
    assert len(deltas) > 1, "the answer should arrive in pieces"
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in deltas)
    assert "".join(chunk["choices"][0]["delta"]["content"] for chunk in deltas) == ANSWER
    assert chunks[-2]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == whole["usage"]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_token_limit_cuts_the_answer(engine: EmbeddedEngine, field: str) -> None:
    reply = await engine.chat(chat_body(**{field: 3}), f"limit-{field}")

    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 3
    assert ANSWER.startswith(reply["choices"][0]["message"]["content"])


async def test_stop_sequence_ends_the_answer_before_it(engine: EmbeddedEngine) -> None:
    reply = await engine.chat(chat_body(stop=[" Paris", "Berlin"]), "stop-list")
    single = await engine.chat(chat_body(stop="France"), "stop-string")

    assert reply["choices"][0]["message"]["content"] == "The capital of France is"
    assert reply["choices"][0]["finish_reason"] == "stop"
    # vLLM's server names the sequence that matched; the Messages door answers it as `stop_sequence`.
    assert reply["choices"][0]["stop_reason"] == " Paris"
    assert single["choices"][0]["message"]["content"] == "The capital of "


async def test_completions_continue_a_text_prompt(engine: EmbeddedEngine, tokenizer: Any) -> None:
    body = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    reply = await engine.completions(body, "cmpl-text")
    chunks = [chunk async for chunk in engine.stream_completions(body, "cmpl-stream")]

    assert reply["object"] == "text_completion"
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9,
                              "prompt_tokens_details": {"cached_tokens": 0}}
    streamed = "".join(chunk["choices"][0]["text"] for chunk in chunks if chunk["choices"])
    assert streamed == reply["choices"][0]["text"]
    assert chunks[-1]["usage"] == reply["usage"]
    by_ids = await engine.completions({**body, "prompt": tokenizer.encode(body["prompt"])}, "cmpl-ids")
    assert by_ids["choices"][0]["text"] == reply["choices"][0]["text"]


async def test_several_choices_are_returned_when_asked(engine: EmbeddedEngine) -> None:
    reply = await engine.chat(chat_body(n=2, temperature=1.0, seed=7, max_tokens=4, ignore_eos=True), "n-two")

    assert [choice["index"] for choice in reply["choices"]] == [0, 1]
    assert all(choice["finish_reason"] == "length" for choice in reply["choices"])
    assert reply["usage"]["completion_tokens"] == 8


async def test_prompt_longer_than_the_context_is_an_invalid_request(engine: EmbeddedEngine) -> None:
    with pytest.raises(InvalidRequestError, match="maximum context length is 1024 tokens") as raised:
        await engine.chat(chat_body("hello " * 1100), "too-long")
    assert (raised.value.param, raised.value.code) == ("messages", "context_length_exceeded")


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"temperature": 3}, "temperature", "invalid_value"),
        ({"top_p": "high"}, "top_p", "invalid_value"),
        ({"max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"n": 0}, "n", "invalid_value"),
        ({"stop": [1]}, "stop", "invalid_value"),
        ({"messages": []}, "messages", "invalid_value"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content", "unsupported_value"),
        ({"tools": [{"type": "function"}]}, "tools[0]", "unsupported_value"),
        ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
         None, "invalid_value"),
    ],
)
async def test_bad_parameters_are_invalid_requests_naming_the_field_and_code(
    engine: EmbeddedEngine, fields: dict[str, Any], param: str | None, code: str
) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        await engine.chat(chat_body(**fields), f"bad-{param}-{code}")
    assert (raised.value.param, raised.value.code) == (param, code)


async def test_a_generating_engine_refuses_embeddings(engine: EmbeddedEngine) -> None:
    with pytest.raises(InvalidRequestError, match="does not serve embeddings"):
        await engine.embeddings({"input": "hello"}, "emb-wrong-engine")


async def test_closing_a_stream_aborts_its_request(engine: EmbeddedEngine) -> None:
    stream = engine.stream_chat(chat_body(ignore_eos=True, max_tokens=500), "disconnect")
    async for chunk in stream:
        if chunk["choices"][0]["delta"].get("content"):
            break
    assert engine.load.running == 1

    await stream.aclose()

    await wait_until(lambda: engine.load.running == 0, "the engine dropped the request")
    assert engine.load.kv_cache_usage == 0.0


async def test_cancelling_a_request_aborts_it(engine: EmbeddedEngine) -> None:
    waiting = asyncio.create_task(engine.chat(chat_body(ignore_eos=True, max_tokens=500), "cancelled"))
    await wait_until(lambda: engine.load.running == 1, "the request started")

    waiting.cancel()

    await wait_until(lambda: engine.load.running == 0, "the engine dropped the request")
    assert waiting.cancelled()


async def test_a_second_request_is_served_while_a_long_one_streams(engine: EmbeddedEngine) -> None:
    long_stream = engine.stream_chat(chat_body(ignore_eos=True, max_tokens=400), "long")
    await anext(long_stream)

    short = await engine.chat(chat_body(max_tokens=5), "short")

    assert short["usage"]["completion_tokens"] == 5
    assert engine.load.running == 1, "the long answer is still being generated"
    await long_stream.aclose()


async def test_lower_priority_number_is_served_first_when_requests_queue(engine: EmbeddedEngine) -> None:
    finished: list[str] = []

    async def ask(name: str, priority: int, max_tokens: int) -> None:
        await engine.chat(chat_body(ignore_eos=True, max_tokens=max_tokens), name, priority=priority)
        finished.append(name)

    # Both engine slots busy: the shorter one frees its slot first, the longer one holds the other.
    busy = [asyncio.create_task(ask("busy-short", 5, 15)), asyncio.create_task(ask("busy-long", 5, 300))]
    await wait_until(lambda: engine.load.running == 2, "both slots busy")
    batch = asyncio.create_task(ask("batch", 5, 3))
    await wait_until(lambda: engine.load.waiting == 1, "the batch request queued")
    reserved = asyncio.create_task(ask("reserved", 0, 3))
    await wait_until(lambda: engine.load.waiting == 2, "the reserved request queued")

    await asyncio.gather(batch, reserved)

    assert finished.index("reserved") < finished.index("batch")
    busy[1].cancel()
    await asyncio.gather(*busy, return_exceptions=True)
    await wait_until(lambda: engine.load.running == 0, "the long request dropped")
