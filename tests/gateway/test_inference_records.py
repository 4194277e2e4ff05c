"""Every request through the gateway becomes exactly one correct row in the ClickHouse inference table."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest

from gateway.context import GATEWAY
from tests.conftest import ALICE_KEY, sdk

POLICY = """
providers:
  up: {{type: openai, base_url: "{url}", api_key: "sk-upstream-secret-123"}}
routes:
  chat-default: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
  chat-guarded: {{targets: [{{provider: up, model: gpt-4o-mini}}], guardrails: {{input: {{pii: block}}}}}}
  chat-broken: {{targets: [{{provider: up, model: fail-500}}]}}
limits:
  - {{scope: user, requests: 5/minute}}
prices:
  gpt-4o-mini: {{input: 0.15, output: 0.60}}
inference_table:
  enabled: true
  clickhouse: "chdb://{chdb}"
  spool_dir: "{spool}"
  flush_interval_ms: 50
  mask_pii: true
"""

HI = [{"role": "user", "content": "hello, my email is jane@example.com"}]


@pytest.fixture
async def gateway(make_gateway, fake_openai, tmp_path: Path):
    fake, upstream = fake_openai
    server = await make_gateway(POLICY, url=str(upstream.make_url("/v1")), chdb=tmp_path / "chdb",
                                spool=tmp_path / "spool")
    return fake, server


async def _rows(server, where: str = "1") -> list[dict]:
    gw = server.app[GATEWAY]
    await gw.drain_masking()
    writer = gw.writer
    assert writer is not None
    assert await asyncio.to_thread(writer.flush, 60)
    columns = ["request_id", "route", "user", "key_id", "status", "error_code", "streamed", "prompt_tokens",
               "completion_tokens", "cost_micro_usd", "provider", "model", "ratelimit_outcome", "guardrail_action",
               "toString(guardrail_findings)", "request_payload", "response_payload", "metadata", "ttft_ms",
               "toString(date)", "policy_version", "attempts"]
    rows = await asyncio.to_thread(writer.query, f"SELECT {', '.join(columns)} FROM lockgate.inference FINAL "
                                                 f"WHERE {where} ORDER BY ts")
    return [dict(zip(columns, row, strict=True)) for row in rows]


async def test_each_kind_of_request_is_one_correct_row(gateway) -> None:
    fake, server = gateway
    client = sdk(server)
    raw = await client.chat.completions.with_raw_response.create(
        model="chat-default", messages=HI, user="end-user-7", metadata={"team": "search"},
        extra_headers={"x-lockgate-tags": "env=prod, app=ranker"})
    ok = raw.parse()
    stream = await client.chat.completions.create(model="chat-default", messages=HI, stream=True)
    streamed_text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model", messages=HI)
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="chat-guarded", messages=HI)
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="chat-broken", messages=HI)
    async with aiohttp.ClientSession() as session, session.post(
            server.make_url("/v1/chat/completions"), data=b"{not json",
            headers={"Authorization": f"Bearer {ALICE_KEY}"}) as resp:
        assert resp.status == 400
    for _ in range(2):
        try:
            await client.chat.completions.create(model="chat-default", messages=HI)
        except openai.RateLimitError:
            break
    rows = await _rows(server)
    by_status: dict[int, list[dict]] = {}
    for row in rows:
        by_status.setdefault(row["status"], []).append(row)
    assert len(rows) == 8 and len({r["request_id"] for r in rows}) == 8

    first, second = by_status[200][:2]
    assert first["request_id"] == raw.headers["x-request-id"]
    assert (first["user"], first["key_id"], first["route"]) == ("alice", "alice-laptop", "chat-default")
    assert (first["provider"], first["model"], first["attempts"]) == ("up", "gpt-4o-mini", 1)
    assert ok.usage is not None
    assert (first["prompt_tokens"], first["completion_tokens"]) == (ok.usage.prompt_tokens, ok.usage.completion_tokens)
    assert first["cost_micro_usd"] == round(ok.usage.prompt_tokens * 0.15 + ok.usage.completion_tokens * 0.60)
    assert first["metadata"] == {"user": "end-user-7", "team": "search", "tag.env": "prod", "tag.app": "ranker"}
    assert len(first["toString(date)"]) == 10 and len(first["policy_version"]) == 12
    request = orjson.loads(first["request_payload"])
    assert request["messages"][0]["content"] == "hello, my email is <EMAIL_ADDRESS>"
    assert orjson.loads(first["response_payload"])["choices"][0]["message"]["content"] == ok.choices[0].message.content

    assert second["streamed"] and second["ttft_ms"] > 0
    assert (second["prompt_tokens"], second["completion_tokens"]) == (first["prompt_tokens"], first["completion_tokens"])
    assert second["cost_micro_usd"] == first["cost_micro_usd"]
    assert orjson.loads(second["response_payload"])["choices"][0]["message"]["content"] == streamed_text

    assert by_status[404][0]["error_code"] == "model_not_found"
    guard_row = next(r for r in by_status[400] if r["route"] == "chat-guarded")
    assert guard_row["guardrail_action"] == "block" and "EMAIL_ADDRESS" in guard_row["toString(guardrail_findings)"]
    assert any(r["error_code"] == "invalid_json" for r in by_status[400])
    assert by_status[502][0]["error_code"] == "upstream_error" and by_status[502][0]["route"] == "chat-broken"
    limited = by_status[429][0]
    assert limited["ratelimit_outcome"] == "refused:rate_limit_exceeded" and limited["completion_tokens"] == 0
    for row in rows:
        for secret in ("sk-upstream-secret-123", ALICE_KEY):
            assert secret not in row["request_payload"] and secret not in row["response_payload"]
    assert len(fake.requests) == 4
