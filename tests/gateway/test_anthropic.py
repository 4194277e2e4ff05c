"""Chat completions served by Anthropic's Messages API; the fake upstream is checked by the real SDK."""

from __future__ import annotations

import anthropic
import openai
import pytest

from tests.conftest import sdk
from tests.fakes.anthropic_upstream import WORDS

POLICY = """
providers:
  claude: {{type: anthropic, base_url: "{url}", api_key: "sk-ant-test"}}
  claude-badkey: {{type: anthropic, base_url: "{url}", api_key: "sk-ant-wrong"}}
routes:
  chat-claude: {{targets: [{{provider: claude, model: claude-test-model}}]}}
  chat-overloaded: {{targets: [{{provider: claude, model: overloaded}}]}}
  chat-badkey: {{targets: [{{provider: claude-badkey, model: claude-test-model}}]}}
"""

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


async def test_the_fake_speaks_the_messages_api_as_the_sdk_reads_it(fake_anthropic) -> None:
    _, upstream = fake_anthropic
    client = anthropic.AsyncAnthropic(base_url=str(upstream.make_url("")), api_key="sk-ant-test", max_retries=0)
    message = await client.messages.create(model="claude-test-model", max_tokens=100,
                                           messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text == "".join(WORDS)
    assert message.stop_reason == "end_turn" and message.usage.input_tokens > 0
    async with client.messages.stream(model="claude-test-model", max_tokens=100,
                                      messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "".join(WORDS)
    assert final.usage.output_tokens == len(WORDS)
    tool_message = await client.messages.create(
        model="claude-test-model", max_tokens=100, messages=[{"role": "user", "content": "weather?"}],
        tools=[{"name": "get_weather", "input_schema": {"type": "object"}}])
    assert tool_message.content[1].type == "tool_use" and tool_message.content[1].input == {"city": "Paris"}
    with pytest.raises(anthropic.AuthenticationError):
        await anthropic.AsyncAnthropic(base_url=str(upstream.make_url("")), api_key="nope", max_retries=0) \
            .messages.create(model="x", max_tokens=5, messages=[{"role": "user", "content": "hi"}])


@pytest.fixture
async def gateway(make_gateway, fake_anthropic):
    fake, upstream = fake_anthropic
    return fake, await make_gateway(POLICY, url=str(upstream.make_url("")))


async def test_chat_is_translated_both_ways(gateway) -> None:
    fake, server = gateway
    reply = await sdk(server).chat.completions.create(
        model="chat-claude", max_tokens=50, temperature=0.2, stop="END",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "".join(WORDS)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == 3
    sent, headers = fake.requests[-1]
    assert sent["system"] == "Be brief."
    assert sent["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert sent["max_tokens"] == 50 and sent["temperature"] == 0.2 and sent["stop_sequences"] == ["END"]
    assert sent["model"] == "claude-test-model"
    assert headers["x-api-key"] == "sk-ant-test" and headers["anthropic-version"] == "2023-06-01"


async def test_max_tokens_maps_to_length(gateway) -> None:
    _, server = gateway
    reply = await sdk(server).chat.completions.create(
        model="chat-claude", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content == "".join(WORDS[:2])


async def test_streamed_chat_is_translated_with_usage(gateway) -> None:
    _, server = gateway
    stream = await sdk(server).chat.completions.create(
        model="chat-claude", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(WORDS)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(WORDS)


async def test_tool_calls_are_translated(gateway) -> None:
    fake, server = gateway
    reply = await sdk(server).chat.completions.create(
        model="chat-claude", messages=[{"role": "user", "content": "weather in Paris?"}], tools=[WEATHER_TOOL],
        tool_choice="required")
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and call.function.arguments == '{"city":"Paris"}'
    assert fake.requests[-1][0]["tool_choice"] == {"type": "any"}
    assert fake.requests[-1][0]["tools"][0]["input_schema"]["required"] == ["city"]
    stream = await sdk(server).chat.completions.create(
        model="chat-claude", messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER_TOOL], stream=True)
    arguments = ""
    async for chunk in stream:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            arguments += delta.function.arguments or ""
    assert arguments == '{"city":"Paris"}'
    follow_up = await sdk(server).chat.completions.create(model="chat-claude", messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "toolu_fake1", "type": "function",
                                                               "function": {"name": "get_weather",
                                                                            "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_fake1", "content": "sunny"},
    ])
    sent = fake.requests[-1][0]["messages"]
    assert sent[1]["content"][0] == {"type": "tool_use", "id": "toolu_fake1", "name": "get_weather",
                                     "input": {"city": "Paris"}}
    assert sent[2]["content"][0] == {"type": "tool_result", "tool_use_id": "toolu_fake1", "content": "sunny"}
    assert follow_up.choices[0].message.content


async def test_anthropic_failures_map_to_openai_errors(gateway) -> None:
    _, server = gateway
    with pytest.raises(openai.APIStatusError) as info:
        await sdk(server).chat.completions.create(model="chat-overloaded", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502
    with pytest.raises(openai.APIStatusError) as info:
        await sdk(server).chat.completions.create(model="chat-badkey", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502 and "sk-ant" not in str(info.value.body)


async def test_endpoints_anthropic_cannot_serve_are_400(gateway) -> None:
    _, server = gateway
    with pytest.raises(openai.BadRequestError):
        await sdk(server).embeddings.create(model="chat-claude", input="x")
    with pytest.raises(openai.BadRequestError):
        await sdk(server).completions.create(model="chat-claude", prompt="x")
