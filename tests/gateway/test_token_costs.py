"""Every kind of token billed at its own price, for each provider family and front door (issue 16).

The upstreams answer with their providers' documented usage objects (tests/fakes/recorded_usage.py); the client's
usage, the row's token columns, `cost_micro_usd` and the budget's spend are compared with figures computed by hand
below, in integer micro-dollars.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import pytest
from aiohttp.test_utils import TestServer

from gateway.context import GATEWAY
from policies.tokens import count_prompt_tokens, count_text_tokens
from tests.conftest import ADMIN_KEY, ALICE_KEY, sdk
from tests.fakes.recorded_usage import TEXT, WORDS, RecordedUpstream

POLICY = """
providers:
  oa: {{type: openai, base_url: "{url}/v1"}}
  az: {{type: azure, base_url: "{url}", api_key: "az-key"}}
  claude: {{type: anthropic, base_url: "{url}", api_key: "sk-ant-test"}}
routes:
  gpt-reasoning: {{targets: [{{provider: oa, model: openai-reasoning}}]}}
  azure-reasoning: {{targets: [{{provider: az, model: openai-reasoning}}]}}
  deepseek: {{targets: [{{provider: oa, model: deepseek}}]}}
  openrouter: {{targets: [{{provider: oa, model: openrouter}}]}}
  claude: {{targets: [{{provider: claude, model: claude-cached}}]}}
  claude-5m: {{targets: [{{provider: claude, model: claude-5m}}]}}
  no-usage: {{targets: [{{provider: oa, model: no-usage}}]}}
  cut-short: {{targets: [{{provider: oa, model: cut-short}}]}}
budgets:
  - {{scope: user, usd: 100, per: day}}
limits:
  - {{scope: user, tokens: 10000000/day}}
prices:
  openai-reasoning: {{input: 2.5, output: 10, cached_input: 1.25}}
  deepseek: {{input: 0.27, output: 1.10, cached_input: 0.07}}
  openrouter: {{input: 3, output: 15, cached_input: 0.3, cache_write: 3.75}}
  claude-cached: {{input: 1.00, output: 5.00, cached_input: 0.10}}
  claude-5m: {{input: 1.00, output: 5.00, cached_input: 0.10}}
  no-usage: {{input: 1, output: 2}}
  cut-short: {{input: 1, output: 2}}
inference_table:
  enabled: true
  clickhouse: "chdb://{chdb}"
  spool_dir: "{spool}"
  flush_interval_ms: 50
"""

# prompt, cache reads, cache writes, 1-hour writes, completion, reasoning, cost and savings (µ$), worked by hand:
EXPECTED: dict[str, tuple[int, int, int, int, int, int, int, int]] = {
    # (2006 - 1920) x 2.5 + 1920 x 1.25 + 300 x 10 = 215 + 2,400 + 3,000; saved 1920 x (2.5 - 1.25)
    "gpt-reasoning": (2006, 1920, 0, 0, 300, 256, 5615, 2400),
    "azure-reasoning": (2006, 1920, 0, 0, 300, 256, 5615, 2400),
    # 36 x 0.27 + 64 x 0.07 + 20 x 1.10 = 9.72 + 4.48 + 22 = 36.2 -> 36; saved 64 x 0.20 = 12.8 -> 13
    "deepseek": (100, 64, 0, 0, 20, 12, 36, 13),
    # 10 x 3 + 1500 x 3.75 (the write price given: a relay is not known to be Anthropic) + 40 x 15 = 30 + 5,625 + 600
    "openrouter": (1510, 0, 1500, 0, 40, 0, 6255, 0),
    # Writes unpriced, served by Anthropic, so at its rates (1.25x and 2x input):
    # 10 x 1 + 2000 x 0.10 + 400 x 1.25 + 600 x 2 + 50 x 5 = 10 + 200 + 500 + 1,200 + 250; saved 2000 x 0.90
    "claude": (3010, 2000, 1000, 600, 50, 0, 2160, 1800),
    # The figure: 10 + 200 + 1000 x 1.25 + 250 = 1,710 (it was recorded at 1,460)
    "claude-5m": (3010, 2000, 1000, 0, 50, 0, 1710, 1800),
}
COLUMNS = ["prompt_tokens", "cached_tokens", "cache_write_tokens", "cache_write_1h_tokens", "completion_tokens",
           "reasoning_tokens", "cost_micro_usd", "cache_savings_micro_usd", "usage_estimated", "endpoint", "streamed",
           "status", "request_id", "error_code"]
HI = [{"role": "user", "content": "Summarise the cached document."}]


@pytest.fixture
async def served(make_gateway, aiohttp_server, tmp_path: Path) -> tuple[RecordedUpstream, TestServer]:
    fake = RecordedUpstream()
    upstream = await aiohttp_server(fake.app())
    server = await make_gateway(POLICY, url=str(upstream.make_url("")).rstrip("/"), chdb=tmp_path / "chdb",
                                spool=tmp_path / "spool")
    return fake, server


async def _rows(server: TestServer, route: str) -> list[dict[str, Any]]:
    gateway = server.app[GATEWAY]
    await gateway.drain_masking()
    assert gateway.writer is not None and await asyncio.to_thread(gateway.writer.flush, 60)
    rows = await asyncio.to_thread(gateway.writer.query, f"SELECT {', '.join(COLUMNS)} FROM lockgate.inference FINAL "
                                                         f"WHERE route = '{route}' ORDER BY ts")
    return [dict(zip(COLUMNS, row, strict=True)) for row in rows]


async def _admin_limits(server: TestServer) -> dict:
    async with aiohttp.ClientSession() as session, session.get(
            server.make_url("/admin/limits"), params={"scope": "user:alice"},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
        assert resp.status == 200
        return (await resp.json())["counters"]


def _columns(row: dict[str, Any]) -> tuple[int, ...]:
    return tuple(row[name] for name in COLUMNS[:8])


@pytest.mark.parametrize("route", sorted(EXPECTED))
async def test_chat_usage_rows_and_cost_match_the_hand_computed_figures(served, route: str) -> None:
    _, server = served
    client = sdk(server)
    reply = await client.chat.completions.create(model=route, messages=HI)
    stream = await client.chat.completions.create(model=route, messages=HI, stream=True,
                                                  stream_options={"include_usage": True})
    usages = [chunk.usage async for chunk in stream if chunk.usage is not None]
    prompt, cached, written, _, completion, reasoning, _, _ = EXPECTED[route]
    for usage in (reply.usage, usages[-1]):
        assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, completion)
        if reasoning:
            assert usage.completion_tokens_details.reasoning_tokens == reasoning
        if route == "deepseek":
            # An OpenAI-compatible answer passes through as its server wrote it: DeepSeek's own cache fields.
            assert usage.model_dump()["prompt_cache_hit_tokens"] == cached
            continue
        details = usage.prompt_tokens_details.model_dump()
        assert details["cached_tokens"] == cached
        assert (details["cache_write_tokens"] or 0) == written
    whole, streamed = await _rows(server, route)
    for row in (whole, streamed):
        assert _columns(row) == EXPECTED[route], row
        assert row["usage_estimated"] is False and row["status"] == 200
    assert (whole["streamed"], streamed["streamed"]) == (False, True)


async def test_the_anthropic_translation_tells_the_client_each_kind(served) -> None:
    _, server = served
    reply = await sdk(server).chat.completions.create(model="claude", messages=HI)
    details = reply.usage.prompt_tokens_details.model_dump()
    assert (details["cached_tokens"], details["cache_write_tokens"], details["cache_write_1h_tokens"]) == (2000, 1000,
                                                                                                          600)


async def test_messages_door_native_and_translated(served) -> None:
    _, server = served
    client = anthropic.AsyncAnthropic(base_url=str(server.make_url("")), api_key=ALICE_KEY, max_retries=0, timeout=20)
    try:
        native = await client.messages.create(model="claude", max_tokens=100, messages=HI)
        async with client.messages.stream(model="claude", max_tokens=100, messages=HI) as stream:
            native_streamed = await stream.get_final_message()
        translated = await client.messages.create(model="openrouter", max_tokens=100, messages=HI)
        async with client.messages.stream(model="openrouter", max_tokens=100, messages=HI) as stream:
            translated_streamed = await stream.get_final_message()
    finally:
        await client.close()
    for message in (native, native_streamed):
        usage = message.usage
        assert (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens,
                usage.output_tokens) == (10, 2000, 1000, 50)
        assert (usage.cache_creation.ephemeral_5m_input_tokens, usage.cache_creation.ephemeral_1h_input_tokens) == (400,
                                                                                                                    600)
    for message in (translated, translated_streamed):
        usage = message.usage
        assert (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens,
                usage.output_tokens) == (10, 0, 1500, 40)
    # A translated stream's counts come in its message_delta, where the SDK keeps no split by time to live.
    assert translated.usage.cache_creation.ephemeral_5m_input_tokens == 1500
    for route in ("claude", "openrouter"):
        rows = await _rows(server, route)
        assert [row["endpoint"] for row in rows] == ["messages", "messages"]
        assert all(_columns(row) == EXPECTED[route] for row in rows), rows


async def test_responses_door_reports_cache_reads_writes_and_reasoning(served) -> None:
    _, server = served
    client = sdk(server)
    reasoning = await client.responses.create(model="gpt-reasoning", input="Summarise the cached document.")
    claude = await client.responses.create(model="claude", input="Summarise the cached document.")
    assert (reasoning.usage.input_tokens, reasoning.usage.input_tokens_details.cached_tokens,
            reasoning.usage.output_tokens, reasoning.usage.output_tokens_details.reasoning_tokens) == (2006, 1920, 300,
                                                                                                      256)
    assert (claude.usage.input_tokens, claude.usage.input_tokens_details.cached_tokens,
            claude.usage.input_tokens_details.model_dump()["cache_write_tokens"]) == (3010, 2000, 1000)
    for route in ("gpt-reasoning", "claude"):
        (row,) = await _rows(server, route)
        assert row["endpoint"] == "responses" and _columns(row) == EXPECTED[route]


async def test_budgets_and_token_limits_charge_what_the_rows_record(served) -> None:
    _, server = served
    client = sdk(server)
    for route in EXPECTED:
        await client.chat.completions.create(model=route, messages=HI)
    rows = [row for route in EXPECTED for row in await _rows(server, route)]
    assert sum(row["cost_micro_usd"] for row in rows) == sum(expected[6] for expected in EXPECTED.values())
    counters = await _admin_limits(server)
    budget = counters["budgets"][0]
    assert round(budget["spent_usd"] * 1e6) == sum(row["cost_micro_usd"] for row in rows) and budget["reserved_usd"] == 0
    # Token windows hold the upstream's prompt count, not only the gateway's own (a few tokens for HI), and the
    # completion: every token the upstreams billed.
    tokens = next(window["used"] for window in counters["windows"] if window["kind"] == "tokens")
    assert tokens == sum(row["prompt_tokens"] + row["completion_tokens"] for row in rows)


async def test_an_answer_without_usage_is_counted_with_tiktoken_and_marked(served) -> None:
    _, server = served
    client = sdk(server)
    reply = await client.chat.completions.create(model="no-usage", messages=HI)
    stream = await client.chat.completions.create(model="no-usage", messages=HI, stream=True)
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    assert reply.usage is None and reply.choices[0].message.content == text == TEXT
    prompt = count_prompt_tokens("no-usage", "chat", {"model": "no-usage", "messages": HI})
    completion = count_text_tokens("no-usage", TEXT)
    assert prompt > 10 and completion > 3
    rows = await _rows(server, "no-usage")
    assert len(rows) == 2
    for row in rows:
        assert row["usage_estimated"] is True
        assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)
        assert row["cost_micro_usd"] == prompt * 1 + completion * 2
    budget = (await _admin_limits(server))["budgets"][0]
    assert round(budget["spent_usd"] * 1e6) == 2 * (prompt + completion * 2)


async def test_a_stream_cut_short_is_charged_for_what_was_sent(served) -> None:
    _, server = served
    async with aiohttp.ClientSession() as session, session.post(
            server.make_url("/v1/chat/completions"), headers={"Authorization": f"Bearer {ALICE_KEY}"},
            json={"model": "cut-short", "messages": HI, "stream": True}) as resp:
        body = await resp.text()
        # The row is written once the handler has counted the answer, after its last byte: wait for it.
        for _ in range(100):
            rows = await _rows(server, "cut-short")
            if rows:
                break
            await asyncio.sleep(0.1)
        (row,) = rows
    assert resp.status == 200 and '"error"' in body and "[DONE]" not in body
    assert row["status"] == 502 and row["usage_estimated"] is True
    completion = count_text_tokens("cut-short", "".join(WORDS))
    prompt = count_prompt_tokens("cut-short", "chat", {"model": "cut-short", "messages": HI})
    assert (row["prompt_tokens"], row["completion_tokens"], row["cost_micro_usd"]) == (prompt, completion,
                                                                                      prompt + 2 * completion)
