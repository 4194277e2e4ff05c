"""The embedded vLLM runtime behind the gateway, driven with the `openai` SDK (real engine on the CPU)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import anthropic
import jsonschema
import openai
import orjson
import psutil
import pytest
import pytest_asyncio

from runtime import prepare_model
from tests.conftest import ADMIN_KEY, ALICE_KEY, policy_text, sdk
from tests.served import Served, start_gateway

pytestmark = [pytest.mark.runtime, pytest.mark.asyncio(loop_scope="module")]


POLICY = """
providers:
  local:
    type: embedded
    model: "{model}"
    engine: {{max_model_len: 1024, max_num_seqs: 4}}
    tool_parser: hermes
routes:
  chat-small: {{targets: [{{provider: local}}]}}
  chat-guarded: {{targets: [{{provider: local}}], guardrails: {{input: {{pii: block}}}}}}
"""

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                            "parameters": WEATHER_PARAMETERS}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def model_path() -> Path:
    return prepare_model("smollm2-135m-instruct")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> AsyncIterator[Served]:
    path = tmp_path_factory.mktemp("embedded") / "policy.yaml"
    path.write_text(policy_text(POLICY, model=str(model_path)))
    served = await start_gateway(path, ready_timeout_s=300)
    yield served
    served.process.send_signal(signal.SIGTERM)
    served.process.wait(timeout=60)


async def _engine(gateway: Served) -> dict:
    async with aiohttp.ClientSession() as session, session.get(gateway.make_url("/readyz")) as resp:
        return (await resp.json())["engines"]["local"]


async def test_chat_and_usage_equal_to_the_tokenizer(gateway: Served, model_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    reply = await sdk(gateway).chat.completions.create(model="chat-small", messages=QUESTION, temperature=0,
                                                        max_tokens=30)
    text = reply.choices[0].message.content or ""
    assert "Paris" in text
    prompt_ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens >= len(tokenizer.encode(text, add_special_tokens=False))


async def test_streaming_matches_the_whole_answer(gateway: Served) -> None:
    client = sdk(gateway)
    whole = await client.chat.completions.create(model="chat-small", messages=QUESTION, temperature=0, max_tokens=30)
    stream = await client.chat.completions.create(model="chat-small", messages=QUESTION, temperature=0, max_tokens=30,
                                                  stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


async def test_max_tokens_and_stop_are_honoured(gateway: Served) -> None:
    client = sdk(gateway)
    cut = await client.chat.completions.create(model="chat-small", messages=QUESTION, temperature=0, max_tokens=3)
    assert cut.choices[0].finish_reason == "length" and cut.usage is not None and cut.usage.completion_tokens == 3
    stopped = await client.chat.completions.create(model="chat-small", messages=QUESTION, temperature=0,
                                                   max_tokens=30, stop=["Paris"])
    assert "Paris" not in (stopped.choices[0].message.content or "")
    assert stopped.choices[0].finish_reason == "stop"


async def test_a_client_disconnect_aborts_the_engine_request(gateway: Served) -> None:
    client = sdk(gateway)
    stream = await client.chat.completions.create(
        model="chat-small", messages=[{"role": "user", "content": "Write a very long story about a dragon."}],
        max_tokens=900, stream=True, extra_body={"ignore_eos": True})
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 3:
            break
    await stream.close()
    # 900 tokens take about a minute here: an engine still at work long after the close would show it.
    deadline = time.monotonic() + 20
    while (await _engine(gateway))["running"] and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert (await _engine(gateway))["running"] == 0


async def test_a_second_request_is_not_blocked_by_the_first(gateway: Served) -> None:
    client = sdk(gateway).with_options(timeout=180)
    long_done = asyncio.Event()

    async def long() -> None:
        await client.chat.completions.create(model="chat-small", messages=QUESTION, max_tokens=150,
                                             extra_body={"ignore_eos": True})
        long_done.set()

    task = asyncio.create_task(long())
    await asyncio.sleep(1.0)
    short = await client.chat.completions.create(model="chat-small", messages=QUESTION, max_tokens=5)
    assert short.choices[0].message.content and not long_done.is_set()
    await task


async def test_governance_and_guardrails_apply_to_embedded_models(gateway: Served) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(gateway).chat.completions.create(
            model="chat-guarded", messages=[{"role": "user", "content": "mail jane@example.com"}])
    assert info.value.code == "content_policy_violation"
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(gateway).chat.completions.create(
            model="chat-small", messages=[{"role": "user", "content": "word " * 2000}])
    assert "token" in info.value.message.lower() or "long" in info.value.message.lower()
    assert info.value.code == "context_length_exceeded"
    models = await sdk(gateway, ADMIN_KEY).models.list()
    assert {"chat-small", "chat-guarded"} <= {m.id for m in models.data}


async def test_forced_tool_calls_come_back_as_openai_tool_calls(gateway: Served) -> None:
    client = sdk(gateway).with_options(timeout=180)
    named = await client.chat.completions.create(
        model="chat-small", messages=ASK_WEATHER, tools=[WEATHER], temperature=0, max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    stream = await client.chat.completions.create(
        model="chat-small", messages=ASK_WEATHER, tools=[WEATHER], temperature=0, max_tokens=80,
        tool_choice="required", stream=True)
    chunks = [chunk async for chunk in stream]

    call = named.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(orjson.loads(call.function.arguments), WEATHER_PARAMETERS)
    assert named.choices[0].finish_reason == "stop"
    pieces = [piece for chunk in chunks if chunk.choices for piece in chunk.choices[0].delta.tool_calls or []]
    assert pieces[0].id and pieces[0].function.name == "get_weather"
    jsonschema.validate(orjson.loads("".join(piece.function.arguments or "" for piece in pieces)), WEATHER_PARAMETERS)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


async def test_auto_tool_choice_on_a_template_without_tools_is_a_400_saying_why(gateway: Served) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(gateway).chat.completions.create(model="chat-small", messages=ASK_WEATHER, tools=[WEATHER])

    assert (info.value.code, info.value.param) == ("unsupported_value", "tool_choice")
    assert "chat template" in info.value.message


async def test_response_format_and_logprobs_reach_the_client(gateway: Served) -> None:
    client = sdk(gateway).with_options(timeout=180)
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 30}}, "required": ["capital"],
              "additionalProperties": False}
    shaped = await client.chat.completions.create(
        model="chat-small", messages=QUESTION, temperature=0, max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}})
    scored = await client.chat.completions.create(model="chat-small", messages=QUESTION, temperature=0, max_tokens=8,
                                                  logprobs=True, top_logprobs=2)

    jsonschema.validate(orjson.loads(shaped.choices[0].message.content or ""), schema)
    content = scored.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == scored.choices[0].message.content
    assert all(len(entry.top_logprobs) == 2 for entry in content)


async def test_the_responses_and_messages_doors_get_tool_calls_from_the_embedded_model(gateway: Served) -> None:
    client = sdk(gateway).with_options(timeout=180)
    response = await client.responses.create(
        model="chat-small", input="What is the weather in Paris?", tool_choice="required", max_output_tokens=80,
        tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMETERS, "strict": True}])
    claude = anthropic.AsyncAnthropic(base_url=gateway.make_url(""), api_key=ALICE_KEY, max_retries=0, timeout=180)
    try:
        message = await claude.messages.create(
            model="chat-small", max_tokens=80, messages=ASK_WEATHER, tool_choice={"type": "any"},
            tools=[{"name": "get_weather", "description": "The current weather", "input_schema": WEATHER_PARAMETERS}])
    finally:
        await claude.close()

    calls = [item for item in response.output if item.type == "function_call"]
    assert [call.name for call in calls] == ["get_weather"]
    jsonschema.validate(orjson.loads(calls[0].arguments), WEATHER_PARAMETERS)
    uses = [block for block in message.content if block.type == "tool_use"]
    assert [use.name for use in uses] == ["get_weather"]
    jsonschema.validate(uses[0].input, WEATHER_PARAMETERS)
    assert message.stop_reason == "tool_use"


async def test_sigterm_stops_the_engine_and_leaves_no_process(tmp_path: Path, model_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(POLICY, model=str(model_path)).replace("max_num_seqs: 4", "max_num_seqs: 2"))
    served = await start_gateway(path, ready_timeout_s=300)
    children = psutil.Process(served.process.pid).children(recursive=True)
    assert children, "the engine core runs in a child process"
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=90) == 0
    _, alive = psutil.wait_procs(children, timeout=30)
    assert alive == []
