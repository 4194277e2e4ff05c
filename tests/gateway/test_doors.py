"""The Responses and Anthropic Messages doors, through the real SDKs, governed exactly like chat completions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import anthropic
import openai
import pytest

from gateway.context import GATEWAY
from tests.conftest import ALICE_KEY, BOB_KEY, sdk
from tests.fakes.openai_upstream import WORDS, Answer, FakeOpenAI

POLICY = """
roles:
  chatter: {{models: ["chat-*"]}}
bindings:
  - {{user: alice, role: chatter}}
  - {{user: bob, role: chatter}}
providers:
  up: {{type: openai, base_url: "{url}", api_key: "sk-doors-upstream"}}
  tools: {{type: openai, base_url: "{tools_url}"}}
  leaky: {{type: openai, base_url: "{leaky_url}"}}
routes:
  chat-default: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
  chat-tools: {{targets: [{{provider: tools, model: gpt-4o-mini}}]}}
  chat-guarded:
    targets: [{{provider: up, model: gpt-4o-mini}}]
    guardrails: {{input: {{pii: block}}}}
  chat-masked:
    targets: [{{provider: leaky, model: gpt-4o-mini}}]
    guardrails: {{output: {{pii: mask}}}}
  secret-route: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
limits:
  - {{scope: user, requests: 4/minute, routes: ["chat-default"]}}
inference_table:
  enabled: true
  clickhouse: "chdb://{chdb}"
  spool_dir: "{spool}"
  flush_interval_ms: 50
"""

TOOL = Answer(content=None, tool_arguments=[['{"to": "a', 'nn"}']])
# The address is cut across chunks, as a model would stream it.
LEAK = Answer(content=["Write to ", "jane.d", "oe@exa", "mple.com", " today."])
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def doors(make_gateway, fake_openai, aiohttp_server, tmp_path: Path):
    _, upstream = fake_openai
    tools = await aiohttp_server(FakeOpenAI(answer=TOOL).app())
    leaky = await aiohttp_server(FakeOpenAI(answer=LEAK).app())
    return await make_gateway(POLICY, url=str(upstream.make_url("/v1")), tools_url=str(tools.make_url("/v1")),
                              leaky_url=str(leaky.make_url("/v1")), chdb=tmp_path / "chdb", spool=tmp_path / "spool")


@pytest.fixture
async def claude(doors) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(base_url=str(doors.make_url("")), api_key=ALICE_KEY, max_retries=0, timeout=20)
    yield client
    await client.close()


async def test_responses_create_and_stream(doors) -> None:
    client = sdk(doors)
    response = await client.responses.create(model="chat-default", input="hi", instructions="be brief")
    assert response.output_text == "".join(WORDS)
    assert response.usage is not None and response.usage.output_tokens == len(WORDS)
    async with client.responses.stream(model="chat-default", input=[{"role": "user", "content": "hi"}]) as stream:
        deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == "".join(WORDS) == final.output_text
    assert final.usage is not None and final.usage.output_tokens == len(WORDS)


async def test_responses_function_call_round_trip(doors) -> None:
    client = sdk(doors)
    tools = [{"type": "function", "name": "send_mail", "parameters": {"type": "object", "properties": {}}}]
    first = await client.responses.create(model="chat-tools", input="mail ann", tools=tools)
    call = next(item for item in first.output if item.type == "function_call")
    assert call.name == "send_mail" and call.arguments == '{"to": "ann"}'
    async with client.responses.stream(model="chat-tools", input="mail ann", tools=tools) as stream:
        final = await stream.get_final_response()
    assert next(item for item in final.output if item.type == "function_call").arguments == '{"to": "ann"}'
    follow_up = [{"role": "user", "content": "mail ann"}, call.model_dump(exclude_none=True),
                 {"type": "function_call_output", "call_id": call.call_id, "output": "sent"}]
    second = await client.responses.create(model="chat-default", input=follow_up, tools=tools)
    assert second.output_text == "".join(WORDS)


async def test_responses_stateless_fields_are_a_clear_400(doors) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await sdk(doors).responses.create(model="chat-default", input="hi", previous_response_id="resp_1")
    assert raised.value.param == "previous_response_id"


async def test_messages_create_stream_tools_and_count_tokens(claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(model="chat-default", max_tokens=50, system="be brief",
                                           messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text == "".join(WORDS) and message.stop_reason == "end_turn"
    assert message.usage.output_tokens == len(WORDS)
    async with claude.messages.stream(model="chat-default", max_tokens=50, messages=HI) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "".join(WORDS) and final.usage.output_tokens == len(WORDS)
    tool = await claude.messages.create(model="chat-tools", max_tokens=50, messages=HI, tools=[
        {"name": "send_mail", "input_schema": {"type": "object", "properties": {}}}])
    use = next(block for block in tool.content if block.type == "tool_use")
    assert use.name == "send_mail" and use.input == {"to": "ann"} and tool.stop_reason == "tool_use"
    counted = await claude.messages.count_tokens(model="chat-default", messages=HI)
    assert counted.input_tokens > 0


async def test_messages_errors_raise_the_anthropic_sdks_own_exceptions(doors, claude) -> None:
    with pytest.raises(anthropic.AuthenticationError):
        bad = anthropic.AsyncAnthropic(base_url=str(doors.make_url("")), api_key="lg-nope-000000", max_retries=0)
        try:
            await bad.messages.create(model="chat-default", max_tokens=5, messages=HI)
        finally:
            await bad.close()
    with pytest.raises(anthropic.PermissionDeniedError):
        await claude.messages.create(model="secret-route", max_tokens=5, messages=HI)
    with pytest.raises(anthropic.NotFoundError):
        await claude.messages.create(model="no-such-route", max_tokens=5, messages=HI)
    with pytest.raises(anthropic.BadRequestError):
        await claude.messages.create(model="chat-default", max_tokens=0, messages=HI)
    with pytest.raises(anthropic.BadRequestError) as blocked:
        await claude.messages.create(model="chat-guarded", max_tokens=5,
                                     messages=[{"role": "user", "content": "mail jane@example.com"}])
    assert "EMAIL_ADDRESS" in str(blocked.value)


async def test_limits_count_across_doors_and_every_door_is_recorded(doors, claude) -> None:
    bob = sdk(doors, BOB_KEY)
    await bob.chat.completions.create(model="chat-default", messages=HI)
    await bob.responses.create(model="chat-default", input="hi")
    bob_claude = anthropic.AsyncAnthropic(base_url=str(doors.make_url("/anthropic")), api_key=BOB_KEY, max_retries=0)
    try:
        await bob_claude.messages.create(model="chat-default", max_tokens=5, messages=HI)
        async with bob_claude.messages.stream(model="chat-default", max_tokens=5, messages=HI) as stream:
            await stream.get_final_message()
        with pytest.raises(anthropic.RateLimitError):
            await bob_claude.messages.create(model="chat-default", max_tokens=5, messages=HI)
    finally:
        await bob_claude.close()
    with pytest.raises(openai.RateLimitError):
        await bob.responses.create(model="chat-default", input="hi")
    gateway = doors.app[GATEWAY]
    await gateway.drain_masking()
    assert gateway.writer is not None and await asyncio.to_thread(gateway.writer.flush, 60)
    rows = await asyncio.to_thread(gateway.writer.query, "SELECT endpoint, status, streamed, completion_tokens "
                                   "FROM lockgate.inference FINAL WHERE user = 'bob' ORDER BY ts")
    assert [(endpoint, status) for endpoint, status, _, _ in rows] == [
        ("chat", 200), ("responses", 200), ("messages", 200), ("messages", 200), ("messages", 429),
        ("responses", 429)]
    assert [tokens for _, status, _, tokens in rows if status == 200] == [len(WORDS)] * 4
    assert rows[3][2] == 1


async def _streamed_text(door: str, client: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic, model: str) -> str:
    if door == "chat":
        stream = await client.chat.completions.create(model=model, messages=HI, stream=True)
        return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    if door == "responses":
        async with client.responses.stream(model=model, input="hi") as events:
            return (await events.get_final_response()).output_text
    async with claude.messages.stream(model=model, max_tokens=50, messages=HI) as events:
        return "".join([text async for text in events.text_stream])


@pytest.mark.parametrize("door", ["chat", "responses", "messages"])
async def test_every_door_gets_the_same_rbac_block_and_streamed_mask(doors, claude, door: str) -> None:
    client = sdk(doors)
    denied = {"chat": openai.PermissionDeniedError, "responses": openai.PermissionDeniedError,
              "messages": anthropic.PermissionDeniedError}[door]
    blocked = {"chat": openai.BadRequestError, "responses": openai.BadRequestError,
               "messages": anthropic.BadRequestError}[door]
    pii = "mail jane@example.com"
    with pytest.raises(denied):
        await _streamed_text(door, client, claude, "secret-route")
    with pytest.raises(blocked) as refused:
        if door == "chat":
            await client.chat.completions.create(model="chat-guarded", messages=[{"role": "user", "content": pii}])
        elif door == "responses":
            await client.responses.create(model="chat-guarded", input=pii)
        else:
            await claude.messages.create(model="chat-guarded", max_tokens=5, messages=[{"role": "user", "content": pii}])
    assert "EMAIL_ADDRESS" in str(refused.value)
    text = await _streamed_text(door, client, claude, "chat-masked")
    assert text == "Write to <EMAIL_ADDRESS> today."
    gateway = doors.app[GATEWAY]
    await gateway.drain_masking()
    assert gateway.writer is not None and await asyncio.to_thread(gateway.writer.flush, 60)
    rows = await asyncio.to_thread(gateway.writer.query, "SELECT route, status, response_payload FROM lockgate.inference "
                                   f"FINAL WHERE endpoint = '{door}' ORDER BY ts")
    assert [(route, status) for route, status, _ in rows] == [("secret-route", 403), ("chat-guarded", 400),
                                                            ("chat-masked", 200)]
    assert "jane.doe@example.com" not in rows[2][2] and "<EMAIL_ADDRESS>" in rows[2][2]
