"""The Messages door passed through natively to Anthropic targets, checked with the real anthropic SDK: the upstream
gets the client's own body and beta headers, the client gets Anthropic's own message and events, and governance
(guardrails, usage, records, failover) is the same as on the translated path."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import anthropic
import orjson
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api import messages_guard, messages_wire
from gateway.api.messages_guard import NativeStreamGuard
from gateway.context import GATEWAY
from gateway.errors import GatewayError
from gateway.exchange import Exchange
from gateway.guarding import RouteGuards, route_guards
from gateway.inference.transcript import Transcript
from gateway.providers import Usage
from gateway.providers.anthropic_native import NativeEvents
from gateway.providers.anthropic_translate import InvalidMessage
from guardrails import Guardrails
from policies.schema import DirectionGuardrails
from tests.conftest import ALICE_KEY
from tests.fakes.anthropic_upstream import REDACTED, SIGNATURE, THOUGHTS, WORDS, FakeAnthropic
from tests.fakes.openai_upstream import WORDS as OPENAI_WORDS
from tests.fakes.openai_upstream import FakeOpenAI

POLICY = """
providers:
  claude: {{type: anthropic, base_url: "{url}", api_key: "sk-ant-test", anthropic_version: "2023-06-01"}}
  claude-beta: {{type: anthropic, base_url: "{url}", api_key: "sk-ant-test", headers: {{anthropic-beta: "admin-beta-1"}}}}
  oa: {{type: openai, base_url: "{oa_url}"}}
routes:
  claude: {{targets: [{{provider: claude, model: claude-test-model}}]}}
  claude-beta: {{targets: [{{provider: claude-beta, model: claude-test-model}}]}}
  claude-redacted: {{targets: [{{provider: claude, model: redacted-thinking}}]}}
  claude-unknown: {{targets: [{{provider: claude, model: unknown-events}}]}}
  claude-malformed: {{targets: [{{provider: claude, model: malformed}}]}}
  claude-error-event: {{targets: [{{provider: claude, model: error-event}}]}}
  claude-masked:
    targets: [{{provider: claude, model: claude-test-model}}]
    guardrails: {{output: {{pii: mask}}}}
  claude-blocked-out:
    targets: [{{provider: claude, model: claude-test-model}}]
    guardrails: {{output: {{pii: block}}}}
  claude-guarded-in:
    targets: [{{provider: claude, model: claude-test-model}}]
    guardrails: {{input: {{pii: block}}}}
  claude-masked-in:
    targets: [{{provider: claude, model: claude-test-model}}]
    guardrails: {{input: {{pii: mask}}}}
  openai: {{targets: [{{provider: oa, model: gpt-4o-mini}}]}}
  failover: {{targets: [{{provider: claude, model: overloaded}}], fallbacks: [openai]}}
  failover-malformed: {{targets: [{{provider: claude, model: malformed}}], fallbacks: [openai]}}
  failover-malformed-start: {{targets: [{{provider: claude, model: malformed-start}}], fallbacks: [openai]}}
  claude-with-fallback:
    targets: [{{provider: claude, model: claude-test-model}}]
    fallbacks: [openai]
    retry: {{attempts: 2, backoff_ms: 1}}
prices:
  claude-test-model: {{input: 3, output: 15, cached_input: 0.3}}
inference_table:
  enabled: true
  clickhouse: "chdb://{chdb}"
  spool_dir: "{spool}"
  flush_interval_ms: 50
  mask_pii: false
"""

HI = [{"role": "user", "content": "hi"}]
THINKING = {"type": "enabled", "budget_tokens": 1024}
PII_WORDS = ["Write to ", "jane.doe@exa", "mple.com", " today."]


@pytest.fixture
async def served(make_gateway, fake_openai, aiohttp_server,
                 tmp_path: Path) -> tuple[FakeAnthropic, FakeOpenAI, TestServer]:
    fake = FakeAnthropic()
    upstream = await aiohttp_server(fake.app())
    oa_fake, oa_upstream = fake_openai
    server = await make_gateway(POLICY, url=str(upstream.make_url("")), oa_url=str(oa_upstream.make_url("/v1")),
                                chdb=tmp_path / "chdb", spool=tmp_path / "spool")
    return fake, oa_fake, server


@pytest.fixture
async def claude(served) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(base_url=str(served[2].make_url("")), api_key=ALICE_KEY, max_retries=0,
                                      timeout=20)
    yield client
    await client.close()


async def _rows(server: TestServer, route: str) -> list[dict]:
    gateway = server.app[GATEWAY]
    await gateway.drain_masking()
    assert gateway.writer is not None and await asyncio.to_thread(gateway.writer.flush, 60)
    columns = ["endpoint", "status", "streamed", "provider", "model", "prompt_tokens", "completion_tokens",
               "cached_tokens", "cache_write_tokens", "cache_write_1h_tokens", "cost_micro_usd", "error_code",
               "guardrail_action", "request_payload", "response_payload", "fallbacks"]
    rows = await asyncio.to_thread(gateway.writer.query, f"SELECT {', '.join(columns)} FROM lockgate.inference FINAL "
                                                         f"WHERE route = '{route}' ORDER BY ts")
    return [dict(zip(columns, row, strict=True)) for row in rows]


async def _raw_stream(server: TestServer, body: dict, headers: dict[str, str] | None = None) -> list[tuple[str, dict]]:
    """The gateway's SSE answer as (event name, data) pairs, read without the SDK."""
    async with aiohttp.ClientSession() as session, session.post(
            server.make_url("/v1/messages"), json={**body, "stream": True},
            headers={"x-api-key": ALICE_KEY, **(headers or {})}) as response:
        assert response.status == 200
        raw = await response.read()
    events = []
    for frame in raw.decode().split("\n\n"):
        if frame.strip():
            name, data = frame.split("\n", 1)
            events.append((name.removeprefix("event: "), orjson.loads(data.removeprefix("data: "))))
    return events


async def test_the_upstream_gets_the_clients_own_body_and_beta_headers(served, claude) -> None:
    fake, oa_fake, _ = served
    system = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral",
                                                                                            "ttl": "1h"}}]}]
    extra = {"top_k": 5, "future_field": {"nested": [1, "two"]}, "service_tier": "auto"}
    message = await claude.messages.create(
        model="claude", max_tokens=2000, system=system, messages=messages, thinking=THINKING,
        metadata={"user_id": "u-1"}, extra_body=extra,
        extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14", "anthropic-version": "2024-10-22"})
    sent, headers = fake.requests[-1]
    assert sent == {"model": "claude-test-model", "max_tokens": 2000, "system": system, "messages": messages,
                    "thinking": THINKING, "metadata": {"user_id": "u-1"}, **extra}
    assert headers["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    assert headers["anthropic-version"] == "2024-10-22" and headers["x-api-key"] == "sk-ant-test"
    assert ALICE_KEY not in str(headers)
    # The model is named as the upstream said, not as the route the client asked for.
    assert message.model == "claude-test-model"
    assert not oa_fake.requests

    async with claude.messages.stream(model="claude-beta", max_tokens=50, messages=HI, extra_body=extra,
                                      extra_headers={"anthropic-beta": "b-2"}) as stream:
        await stream.get_final_message()
    sent, headers = fake.requests[-1]
    assert sent == {"model": "claude-test-model", "max_tokens": 50, "messages": HI, "stream": True, **extra}
    assert headers["anthropic-beta"] == "admin-beta-1,b-2"


async def test_without_the_header_the_providers_anthropic_version_is_sent(served) -> None:
    fake, _, server = served
    events = await _raw_stream(server, {"model": "claude", "max_tokens": 50, "messages": HI})
    assert fake.requests[-1][1]["anthropic-version"] == "2023-06-01" and "anthropic-beta" not in fake.requests[-1][1]
    assert events[0][0] == "message_start" and events[-1][0] == "message_stop"


async def test_thinking_blocks_reach_the_sdk_created_and_streamed(claude) -> None:
    message = await claude.messages.create(model="claude", max_tokens=2000, messages=HI, thinking=THINKING)
    thinking, text = message.content
    assert (thinking.type, thinking.thinking, thinking.signature) == ("thinking", "".join(THOUGHTS), SIGNATURE)
    assert text.text == "".join(WORDS)

    async with claude.messages.stream(model="claude-redacted", max_tokens=2000, messages=HI,
                                      thinking=THINKING) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert [block.type for block in final.content] == ["thinking", "redacted_thinking", "text"]
    assert final.content[0].thinking == "".join(THOUGHTS) and final.content[0].signature == SIGNATURE
    assert final.content[1].data == REDACTED and final.content[2].text == "".join(WORDS)
    assert kinds.count("thinking") == len(THOUGHTS) and "signature" in kinds
    # On a route with somewhere to fall back to, the stream's first event is read before the answer starts.
    async with claude.messages.stream(model="claude-with-fallback", max_tokens=2000, messages=HI,
                                      thinking=THINKING) as stream:
        final = await stream.get_final_message()
    assert [block.type for block in final.content] == ["thinking", "text"] and final.content[0].signature == SIGNATURE


async def test_unknown_event_and_delta_types_are_relayed(served, claude) -> None:
    _, _, server = served
    events = await _raw_stream(server, {"model": "claude-unknown", "max_tokens": 50, "messages": HI})
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "ping", "future_event"]
    assert events[2][1] == {"type": "future_event", "detail": {"note": "from a newer API"}}
    assert {"type": "future_delta", "payload": "opaque"} in [data.get("delta") for _, data in events]
    async with claude.messages.stream(model="claude-unknown", max_tokens=50, messages=HI) as stream:
        text = "".join([piece async for piece in stream.text_stream])
    assert text == "".join(WORDS)


async def test_usage_with_cache_tokens_is_charged_and_recorded(served, claude) -> None:
    fake, _, server = served
    fake.cache_creation_tokens = 7
    message = await claude.messages.create(model="claude", max_tokens=50, messages=HI)
    assert (message.usage.cache_read_input_tokens, message.usage.cache_creation_input_tokens) == (3, 7)
    async with claude.messages.stream(model="claude", max_tokens=50, messages=HI) as stream:
        final = await stream.get_final_message()
    assert final.usage.cache_creation_input_tokens == 7 and final.usage.output_tokens == len(WORDS)
    whole, streamed = await _rows(server, "claude")
    for row, usage in ((whole, message.usage), (streamed, final.usage)):
        prompt = usage.input_tokens + 3 + 7
        assert (row["endpoint"], row["status"], row["provider"], row["model"]) == ("messages", 200, "claude",
                                                                                   "claude-test-model")
        assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (prompt, 3,
                                                                                          usage.output_tokens)
        # Cache writes at the default 1.25x the input price ($3.75/1M), as Anthropic bills a 5-minute write.
        assert (row["cache_write_tokens"], row["cache_write_1h_tokens"]) == (7, 0)
        assert row["cost_micro_usd"] == round((prompt - 3 - 7) * 3 + 3 * 0.3 + 7 * 3.75 + usage.output_tokens * 15)
    assert streamed["streamed"] == 1
    assert orjson.loads(streamed["response_payload"])["choices"][0]["message"]["content"] == "".join(WORDS)


async def test_the_same_request_to_an_openai_target_is_translated(served, claude) -> None:
    fake, oa_fake, _ = served
    message = await claude.messages.create(model="openai", max_tokens=50, messages=HI, thinking=THINKING,
                                           extra_body={"top_k": 5}, extra_headers={"anthropic-beta": "b-1"})
    assert message.content[-1].text == "".join(OPENAI_WORDS) and message.model == "openai"
    _, sent, headers = oa_fake.requests[-1]
    assert sent["messages"] == HI and "top_k" not in sent and "thinking" not in sent
    assert "anthropic-beta" not in headers
    assert not fake.requests


async def test_a_streamed_answer_is_masked_for_the_client_and_in_the_table(served, claude) -> None:
    fake, _, server = served
    fake.words = list(PII_WORDS)
    async with claude.messages.stream(model="claude-masked", max_tokens=50, messages=HI) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == final.content[0].text == "Write to <EMAIL_ADDRESS> today."
    whole = await claude.messages.create(model="claude-masked", max_tokens=50, messages=HI)
    assert whole.content[0].text == "Write to <EMAIL_ADDRESS> today."
    rows = await _rows(server, "claude-masked")
    assert [row["guardrail_action"] for row in rows] == ["mask", "mask"]
    for row in rows:
        payload = orjson.loads(row["response_payload"])
        assert payload["choices"][0]["message"]["content"] == "Write to <EMAIL_ADDRESS> today."
        assert "jane" not in row["response_payload"]


async def test_thinking_is_masked_as_output_and_a_streamed_block_ends_with_an_error(served, claude) -> None:
    fake, _, _ = served
    fake.thoughts = ["Mail jane.doe@exa", "mple.com later."]
    async with claude.messages.stream(model="claude-masked", max_tokens=2000, messages=HI,
                                      thinking=THINKING) as stream:
        final = await stream.get_final_message()
    assert final.content[0].thinking == "Mail <EMAIL_ADDRESS> later." and final.content[0].signature == SIGNATURE
    fake.words = list(PII_WORDS)
    async with claude.messages.stream(model="claude-blocked-out", max_tokens=50, messages=HI) as stream:
        with pytest.raises(anthropic.APIStatusError) as blocked:
            async for _ in stream.text_stream:
                pass
    assert "EMAIL_ADDRESS" in str(blocked.value.body) and "jane" not in str(blocked.value.body)


async def test_input_guardrails_read_every_text_field_of_the_clients_body(served, claude) -> None:
    fake, _, _ = served
    tool_turns = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "lookup",
                                           "input": {"who": {"mail": "jane.doe@example.com"}}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": [{"type": "text", "text": "call 212-555-0199"}]}]},
    ]
    for messages, system in ((HI, [{"type": "text", "text": "Reply to jane.doe@example.com"}]),
                             (tool_turns, None)):
        with pytest.raises(anthropic.BadRequestError) as refused:
            await claude.messages.create(model="claude-guarded-in", max_tokens=50, messages=messages,
                                         **({"system": system} if system else {}))
        assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert not fake.requests
    await claude.messages.create(model="claude-masked-in", max_tokens=50, messages=tool_turns, thinking=THINKING,
                                 system=[{"type": "text", "text": "Reply to jane.doe@example.com",
                                          "cache_control": {"type": "ephemeral"}}])
    sent = fake.requests[-1][0]
    assert sent["system"] == [{"type": "text", "text": "Reply to <EMAIL_ADDRESS>", "cache_control": {"type": "ephemeral"}}]
    assert sent["messages"][1]["content"][0]["input"] == {"who": {"mail": "<EMAIL_ADDRESS>"}}
    assert sent["messages"][2]["content"][0]["content"][0]["text"] == "call <PHONE_NUMBER>"
    assert sent["thinking"] == THINKING


async def test_a_malformed_answer_is_an_error_the_sdk_raises_never_a_hang(served, claude) -> None:
    _, _, server = served
    with pytest.raises(anthropic.InternalServerError) as whole:
        await claude.messages.create(model="claude-malformed", max_tokens=50, messages=HI)
    assert whole.value.status_code == 502 and whole.value.body["error"]["type"] == "api_error"
    for route in ("claude-malformed", "claude-error-event"):
        async with claude.messages.stream(model=route, max_tokens=50, messages=HI) as stream:
            with pytest.raises(anthropic.APIStatusError) as streamed:
                await asyncio.wait_for(stream.get_final_message(), 20)
        assert streamed.value.body["type"] == "error"
    events = await _raw_stream(server, {"model": "claude-malformed", "max_tokens": 50, "messages": HI})
    assert [name for name, _ in events] == ["message_start", "ping", "content_block_start", "content_block_delta",
                                            "error"]
    rows = await _rows(server, "claude-malformed")
    assert [(row["status"], row["error_code"]) for row in rows] == [(502, "upstream_invalid_response")] * 3


async def test_a_failing_anthropic_target_fails_over_to_an_openai_one_by_translation(served, claude) -> None:
    fake, oa_fake, server = served
    message = await claude.messages.create(model="failover", max_tokens=50, messages=HI, thinking=THINKING)
    assert message.content[-1].text == "".join(OPENAI_WORDS)
    async with claude.messages.stream(model="failover", max_tokens=50, messages=HI) as stream:
        text = "".join([piece async for piece in stream.text_stream])
    assert text == "".join(OPENAI_WORDS)
    malformed = await claude.messages.create(model="failover-malformed", max_tokens=50, messages=HI)
    assert malformed.content[-1].text == "".join(OPENAI_WORDS)
    async with claude.messages.stream(model="failover-malformed-start", max_tokens=50, messages=HI) as stream:
        text = "".join([piece async for piece in stream.text_stream])
    assert text == "".join(OPENAI_WORDS)
    assert len(fake.requests) == 4 and len(oa_fake.requests) == 4
    assert oa_fake.requests[-1][1]["messages"] == HI
    rows = await _rows(server, "failover")
    assert [(row["status"], row["provider"]) for row in rows] == [(200, "oa"), (200, "oa")]
    assert all(row["fallbacks"] for row in rows)


async def test_content_chat_cannot_carry_passes_natively_and_is_refused_on_chat_targets(served, claude) -> None:
    fake, oa_fake, _ = served
    document = {"role": "user", "content": [
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "A cat sat."}},
        {"type": "text", "text": "Summarise."}]}
    tools = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 1}]
    await claude.messages.create(model="claude", max_tokens=50, messages=[document], tools=tools)
    assert fake.requests[-1][0]["messages"] == [document] and fake.requests[-1][0]["tools"] == tools
    counted = await claude.messages.count_tokens(model="claude", messages=[document], tools=tools)
    assert counted.input_tokens > 0
    with pytest.raises(anthropic.BadRequestError) as refused:
        await claude.messages.create(model="openai", max_tokens=50, messages=[document])
    assert "messages.0.content.0.type" in refused.value.body["error"]["message"]
    assert not oa_fake.requests


# Below: the native stream's reading and guarding on its own, against whatever an upstream may send.

EMAIL = "jane.doe@example.com"
CARD = "4111 1111 1111 1111"
TEXT = f"Write to {EMAIL} and pay with {CARD} today."

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**40) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
# The address always ends in a space: "jane.doe@example.comhi" is no address (its TLD is not one), so no guardrail
# masks it, streamed or whole.
texts = st.sampled_from(["", "hi", f"{EMAIL} ", "jane.doe@exa", "mple.com ", CARD, "a\nb\rc"]) | st.text(max_size=12) \
    | json_values
# Ids, signatures and encrypted data are not scanned (as on every door), so they never hold the address here.
opaque = st.text(max_size=12) | json_values
indexes = st.integers(-1, 3) | json_values
kinds = st.sampled_from(["text", "thinking", "tool_use", "redacted_thinking", "server_tool_use", "future_block"])
blocks = st.fixed_dictionaries({"type": st.one_of(kinds, kinds, kinds, json_values)}, optional={
    "text": texts, "thinking": texts, "name": texts, "id": opaque, "input": json_values, "data": opaque,
    "content": json_values, "signature": opaque, "citations": json_values})
delta_kinds = st.sampled_from(["text_delta", "thinking_delta", "input_json_delta", "signature_delta", "citations_delta",
                               "future_delta"])
deltas = st.fixed_dictionaries({"type": st.one_of(delta_kinds, delta_kinds, delta_kinds, json_values)}, optional={
    "text": texts, "thinking": texts, "partial_json": texts, "signature": opaque, "citation": json_values})
counts = st.integers(0, 10**6) | st.integers(0, 10**6) | json_values
usages = st.fixed_dictionaries({}, optional={"input_tokens": counts, "output_tokens": counts,
                                             "cache_read_input_tokens": counts})
events = st.one_of(
    st.builds(lambda usage, content: {"type": "message_start", "message": {"id": "msg_1", "model": "m", "usage": usage,
                                                                          "content": content}},
              usages, st.just([]) | st.lists(blocks, max_size=2) | json_values),
    st.builds(lambda index, block: {"type": "content_block_start", "index": index, "content_block": block},
              indexes, blocks),
    st.builds(lambda index, delta: {"type": "content_block_delta", "index": index, "delta": delta}, indexes, deltas),
    st.builds(lambda index: {"type": "content_block_stop", "index": index}, indexes),
    st.builds(lambda usage: {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage}, usages),
    st.sampled_from([{"type": "message_stop"}, {"type": "ping"}, {"type": "Bad Type"}, {"type": 3}]),
    st.builds(lambda detail: {"type": "future_event", "detail": detail}, json_values),
    st.dictionaries(st.text(max_size=6), json_values, max_size=3),
)
junk = st.sampled_from([b"{", b"[1]", b'"x"', b"\xff\xfe", b"{}\n"])


@st.composite
def frames(draw: st.DrawFn) -> list[tuple[str, bytes]]:
    """A well-formed stream of random blocks and deltas, then damaged: foreign events and junk put in anywhere."""
    out: list[dict] = [{"type": "message_start", "message": {"id": "msg_1", "model": "m", "usage": draw(usages)}}]
    for index, block in enumerate(draw(st.lists(blocks, max_size=3))):
        out.append({"type": "content_block_start", "index": index, "content_block": block})
        out.extend({"type": "content_block_delta", "index": index, "delta": delta}
                   for delta in draw(st.lists(deltas, max_size=4)))
        out.append({"type": "content_block_stop", "index": index})
    out += [{"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": draw(usages)},
            {"type": "message_stop"}]
    for _ in range(draw(st.integers(0, 3))):
        out.insert(draw(st.integers(0, len(out))), draw(events))
    raw = [(draw(st.sampled_from(["", "own", "own", "message_stop"])), orjson.dumps(event)) for event in out]
    if draw(st.booleans()) and draw(st.booleans()):
        raw.insert(draw(st.integers(0, len(raw))), ("", draw(junk)))
    return raw


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    running = asyncio.new_event_loop()
    yield running
    running.close()


@pytest.fixture(scope="module")
def masking() -> RouteGuards:
    guard = Guardrails(["EMAIL_ADDRESS", "CREDIT_CARD"])
    return route_guards(guard, DirectionGuardrails(), DirectionGuardrails(pii="mask"), False)


async def _read(guards: RouteGuards, raw_frames: list[tuple[str, bytes]]) -> tuple[list[bytes], list[dict]]:
    """What the client and the transcript would get, until the stream ends or is refused as the pipeline refuses it."""
    events, guard = NativeEvents(), NativeStreamGuard(guards)
    sent: list[bytes] = []
    chunks: list[dict] = []
    for name, raw in raw_frames:
        try:
            event = events.parse(name if name != "own" else orjson.loads(raw).get("type", ""), raw)
            chunk = events.chunk(event)
        except (InvalidMessage, orjson.JSONDecodeError, AttributeError):
            break
        if "usage" in chunk:
            Usage.from_openai(chunk["usage"])
        try:
            if not await guard.filter(chunk):
                break
        except GatewayError as err:
            assert err.status == 502
            break
        chunks.append(chunk)
        sent.append(event.encode())
        if events.finished:
            break
    return sent, chunks


def _sse(sent: list[bytes]) -> list[tuple[str, dict]]:
    out = []
    for frame in b"".join(sent).split(b"\n\n")[:-1]:
        name, data = frame.split(b"\n")
        assert name.startswith(b"event: ") and data.startswith(b"data: ") and b"\r" not in frame
        parsed = orjson.loads(data[6:])
        assert parsed["type"] == name[7:].decode()
        out.append((parsed["type"], parsed))
    return out


@settings(max_examples=300, deadline=None)
@given(raw_frames=frames())
def test_whatever_an_upstream_streams_is_relayed_well_formed_or_refused(loop, masking, raw_frames) -> None:
    sent, chunks = loop.run_until_complete(_read(masking, raw_frames))
    _sse(sent)
    transcript = Transcript("content")
    for chunk in chunks:
        transcript.add(chunk)
    assert EMAIL not in orjson.dumps(transcript.payload(None)).decode()
    assert EMAIL not in b"".join(sent).decode()


def _stream_of(kind: str, text: str, opening: int, cuts: list[int]) -> list[tuple[str, bytes]]:
    points = sorted({opening, *(cut for cut in cuts if cut > opening), len(text)})
    pieces = [text[a:b] for a, b in itertools.pairwise(points)]
    delta_type, field = {"text": ("text_delta", "text"), "thinking": ("thinking_delta", "thinking"),
                         "tool_use": ("input_json_delta", "partial_json")}[kind]
    block = {"type": kind, "id": "toolu_1", "name": "send", "input": {}} if kind == "tool_use" else \
        {"type": kind, kind: text[:opening]}
    events = [{"type": "message_start", "message": {"id": "msg_1", "model": "m", "usage": {"input_tokens": 5}}},
              {"type": "content_block_start", "index": 0, "content_block": block},
              *({"type": "content_block_delta", "index": 0, "delta": {"type": delta_type, field: piece}}
                for piece in pieces),
              {"type": "content_block_stop", "index": 0},
              {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}},
              {"type": "message_stop"}]
    return [(event["type"], orjson.dumps(event)) for event in events]


@settings(max_examples=120, deadline=None)
@given(kind=st.sampled_from(["text", "thinking", "tool_use"]), opening=st.integers(0, len(TEXT)),
       cuts=st.lists(st.integers(0, len(TEXT)), max_size=6))
def test_a_streamed_block_masks_like_its_whole_text_however_it_is_cut(loop, masking, kind: str, opening: int,
                                                                      cuts: list[int]) -> None:
    text = orjson.dumps({"to": EMAIL, "card": CARD}).decode() if kind == "tool_use" else TEXT
    opening = 0 if kind == "tool_use" else min(opening, len(text))
    sent, chunks = loop.run_until_complete(_read(masking, _stream_of(kind, text, opening, cuts)))
    expected = masking.guard.scan_text(text, "output", "mask", "off").body  # type: ignore[union-attr]
    field = {"text": "text", "thinking": "thinking", "tool_use": "partial_json"}[kind]
    got = ""
    for name, data in _sse(sent):
        if name == "content_block_start" and kind != "tool_use":
            got += data["content_block"][kind]
        elif name == "content_block_delta":
            got += data["delta"][field]
    assert got == expected and EMAIL not in got
    transcript = Transcript("content")
    for chunk in chunks:
        transcript.add(chunk)
    message = transcript.payload(None)["choices"][0]["message"]
    kept = {"text": message["content"], "thinking": message.get("reasoning_content"),
            "tool_use": (message.get("tool_calls") or [{}])[0].get("function", {}).get("arguments")}[kind]
    assert kept == expected


# Valid bodies but for what translation leaves out, with the address in any text field.
said = st.sampled_from([EMAIL, f"mail {EMAIL} now"]) | st.text(max_size=8)
names = st.text(max_size=6)
sources = st.fixed_dictionaries({"type": st.just("text"), "data": said}, optional={"media_type": names}) \
    | st.fixed_dictionaries({"type": st.just("content"),
                             "content": st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": said}),
                                                 max_size=2)}) \
    | st.fixed_dictionaries({"type": st.sampled_from(["base64", "url", "file"])},
                            optional={"media_type": names, "data": names, "url": names, "file_id": names})
parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": said}), min_size=1, max_size=2)
request_blocks = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image", "tool_use", "tool_result", "document", "thinking", "search_result"])},
    optional={"text": said, "id": names, "tool_use_id": names, "name": said, "title": said,
              "input": st.dictionaries(names, said | st.dictionaries(names, said, max_size=2), max_size=2),
              "content": said | parts, "source": sources, "cache_control": st.just({"type": "ephemeral"})})
request_bodies = st.fixed_dictionaries(
    {"model": st.just("m"), "max_tokens": st.just(50),
     "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "user", "assistant"]),
                                                 "content": said | st.lists(request_blocks, max_size=3)}),
                          min_size=1, max_size=3)},
    optional={"system": said | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": said}), max_size=2),
              "tools": st.lists(st.fixed_dictionaries({"name": said, "input_schema": st.dictionaries(names, said)},
                                                      optional={"description": said,
                                                                "type": st.sampled_from(["custom", "web_search"])}),
                                max_size=2),
              "thinking": st.just(THINKING), "top_k": json_values})


@pytest.fixture(scope="module")
def masking_input(masking: RouteGuards) -> RouteGuards:
    return route_guards(masking.guard, DirectionGuardrails(pii="mask"), DirectionGuardrails(), False)


@settings(max_examples=300, deadline=None)
@given(body=request_bodies)
def test_any_messages_body_is_refused_with_a_400_or_masked_wherever_chat_would_carry_it(
        loop, masking_input: RouteGuards, body: dict) -> None:
    try:
        messages_wire.translate_request(body, lenient=True)
    except GatewayError as err:
        assert err.status == 400
        return
    try:
        masked = loop.run_until_complete(messages_guard.check_request(masking_input, body, Exchange("messages")))
    except GatewayError as err:
        assert err.status == 400 and err.code == "content_not_checkable"
        return
    chat = messages_wire.translate_request(masked, lenient=True).chat
    assert EMAIL not in orjson.dumps(chat).decode()
