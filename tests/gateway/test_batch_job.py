"""The batch line engine (`gateway.batch.run_job`) on a real gateway and a fake upstream: every line through the
governance pipeline as its submitter; limits slow it, budgets end it, a cancel stops it."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from gateway.batch import Line, LineError, LineResult, Slots, parse_line, run_job
from gateway.context import GATEWAY
from tests.conftest import ALICE_KEY

ROUTES = """
roles:
  analyst: {{models: ["chat-*", "embed-*"]}}
bindings:
  - {{user: alice, role: analyst}}
providers:
  up: {{type: openai, base_url: "{url}"}}
routes:
  chat-default: {{targets: [{{provider: up, model: gpt-4o-mini}}], batch: {{concurrency: 2}}}}
  chat-guarded: {{targets: [{{provider: up, model: gpt-4o-mini}}], guardrails: {{input: {{pii: block}}}}}}
  chat-stuck: {{targets: [{{provider: up, model: hang}}], timeout: {{total_ms: 600000}}}}
  embed-small: {{targets: [{{provider: up, model: text-embedding-3-small}}]}}
  secret-model: {{targets: [{{provider: up, model: gpt-4o}}]}}
guardrails:
  pii: {{entities: [US_SSN, EMAIL_ADDRESS]}}
"""


def _chat(custom_id: str, route: str = "chat-default", text: str = "hello there") -> Line:
    return Line(custom_id, "/v1/chat/completions", {"model": route, "messages": [{"role": "user", "content": text}]})


async def _run(server, lines: list[Line], done: set[str] | None = None, expires_in_s: float = 3600,
               cancelled=lambda: False, slots: Slots | None = None) -> dict[str, LineResult]:
    gateway = server.app[GATEWAY]
    principal = gateway.policy.keyring.authenticate(ALICE_KEY)
    results: dict[str, LineResult] = {}

    def emit(result: LineResult) -> None:
        assert result.custom_id not in results, "a line was answered twice"
        results[result.custom_id] = result

    await run_job(gateway, principal, lines, done or set(), slots=slots or Slots(), batch_id="batch_test",
                  expires_at=time.time() + expires_in_s, cancelled=cancelled, emit=emit)
    return results


async def test_every_line_is_answered_as_its_submitter_with_refusals_in_their_status(make_gateway, fake_openai) -> None:
    fake, upstream = fake_openai
    server = await make_gateway(ROUTES, url=str(upstream.make_url("/v1")))
    lines = [_chat("ok-1"), _chat("ok-2"), _chat("forbidden", "secret-model"),
             _chat("pii", "chat-guarded", "my SSN is 536-22-1234"), _chat("no-route", "nope"),
             Line("emb", "/v1/embeddings", {"model": "embed-small", "input": ["a", "b"]}),
             Line("streamed", "/v1/chat/completions", {**_chat("x").body, "stream": True})]
    results = await _run(server, lines, done={"ok-2"})
    assert set(results) == {"ok-1", "forbidden", "pii", "no-route", "emb", "streamed"}
    assert results["ok-1"].status_code == 200 and results["ok-1"].body["choices"][0]["message"]["content"]
    assert results["emb"].status_code == 200 and len(results["emb"].body["data"]) == 2
    assert results["forbidden"].status_code == 403
    assert results["forbidden"].body["error"]["code"] == "model_not_permitted"
    assert results["pii"].status_code == 400 and "536-22-1234" not in orjson.dumps(results["pii"].body).decode()
    assert results["no-route"].status_code == 404
    assert results["streamed"].status_code == 400 and results["streamed"].body["error"]["param"] == "stream"
    assert not results["ok-1"].failed and results["pii"].failed
    # The upstream saw the two lines that passed governance and no other.
    assert sorted(path for path, _, _ in fake.requests) == ["/v1/chat/completions", "/v1/embeddings"]
    line = orjson.loads(results["forbidden"].to_line())
    assert line["custom_id"] == "forbidden" and line["id"].startswith("batch_req_") and line["error"] is None
    assert line["response"]["status_code"] == 403 and line["response"]["request_id"] == results["forbidden"].request_id


async def test_a_rate_limit_slows_the_batch_without_failing_a_line(make_gateway, fake_openai) -> None:
    _, upstream = fake_openai
    server = await make_gateway(ROUTES + "limits:\n  - {{scope: user, requests: 2/second}}\n",
                                url=str(upstream.make_url("/v1")))
    started = time.monotonic()
    results = await _run(server, [_chat(f"line-{i}") for i in range(6)])
    assert [r.status_code for r in results.values()] == [200] * 6
    # Two a second: the last two lines cannot have passed before the third second began.
    assert time.monotonic() - started >= 2.0


async def test_a_line_still_refused_when_the_batch_expires_gets_batch_expired(make_gateway, fake_openai) -> None:
    _, upstream = fake_openai
    server = await make_gateway(ROUTES + "limits:\n  - {{scope: user, requests: 1/hour}}\n",
                                url=str(upstream.make_url("/v1")))
    # Windows follow the clock. Near an hour's end, the refusal's Retry-After (what is left of the hour) would fall
    # inside the batch's 20 s, and "second" would rightly wait and pass: so the lines start in a fresh hour then.
    left_of_hour_s = 3600 - time.time() % 3600
    if left_of_hour_s < 30:
        await asyncio.sleep(left_of_hour_s + 0.5)
    # One at a time, so "first" is the line the hour's one request goes to; the refusal's Retry-After (most of an
    # hour, waited 30 s at most) reaches past the window, so "second" expires at once instead of waiting.
    results = await _run(server, [_chat("first"), _chat("second")], expires_in_s=20, slots=Slots(override=1))
    assert results["first"].status_code == 200
    assert results["second"].status_code is None and results["second"].error["code"] == "batch_expired"
    assert orjson.loads(results["second"].to_line())["response"] is None


async def test_an_exhausted_budget_fails_the_remaining_lines_with_the_budget_error(make_gateway, fake_openai) -> None:
    fake, upstream = fake_openai
    budget = ("budgets:\n  - {{scope: user, usd: 0.0001, per: day}}\n"
              "prices:\n  gpt-4o-mini: {{input: 1.0, output: 2.0}}\n")
    server = await make_gateway(ROUTES + budget, url=str(upstream.make_url("/v1")))
    lines = [Line(f"line-{i}", "/v1/chat/completions", {**_chat("x").body, "max_tokens": 5}) for i in range(8)]
    results = await _run(server, lines, slots=Slots(override=1))
    statuses = [results[f"line-{i}"].status_code for i in range(8)]
    assert statuses[0] == 200 and 429 in statuses
    first_refused = statuses.index(429)
    assert statuses[first_refused:] == [429] * (8 - first_refused)
    assert {results[f"line-{i}"].body["error"]["code"] for i in range(first_refused, 8)} == {"budget_exceeded"}
    assert len(fake.requests) == first_refused


async def test_a_cancel_stops_the_batch_within_seconds(make_gateway, fake_openai) -> None:
    _, upstream = fake_openai
    server = await make_gateway(ROUTES, url=str(upstream.make_url("/v1")))
    flag = asyncio.Event()
    asyncio.get_running_loop().call_later(1.0, flag.set)
    started = time.monotonic()
    results = await _run(server, [_chat(f"stuck-{i}", "chat-stuck") for i in range(20)], cancelled=flag.is_set)
    assert time.monotonic() - started < 10
    assert results == {}


def test_input_lines_are_checked_as_openai_checks_them() -> None:
    good = b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}}'
    assert parse_line(good, 1, "/v1/embeddings") == Line("a", "/v1/embeddings", {"model": "m", "input": "x"})
    cases = {
        b"{not json": "invalid_json_line",
        b"[1]": "invalid_json_line",
        b'{"method": "POST", "url": "/v1/embeddings", "body": {}}': "missing_required_parameter",
        b'{"custom_id": "a", "method": "GET", "url": "/v1/embeddings", "body": {}}': "invalid_value",
        b'{"custom_id": "a", "method": "POST", "url": "/v1/images", "body": {}}': "invalid_url",
        b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}': "url_mismatch",
        b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": "x"}': "missing_required_parameter",
    }
    for raw, code in cases.items():
        with pytest.raises(LineError) as info:
            parse_line(raw, 7, "/v1/embeddings")
        assert info.value.code == code and info.value.item()["line"] == 7
