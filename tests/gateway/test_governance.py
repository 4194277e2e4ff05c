"""RBAC, rate limits, budgets and the admin API, through the real `openai` SDK."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.conftest import ADMIN_KEY, ALICE_KEY, BOB_KEY, policy_text, sdk
from tests.redis_server import free_port
from tests.served import start_gateway

HI = [{"role": "user", "content": "hi there, how are you today?"}]

RBAC = """
roles:
  analyst: {{models: ["chat-*"]}}
  admin: {{models: ["*"], admin: true}}
bindings:
  - {{group: data-science, role: analyst}}
  - {{user: root, role: admin}}
providers:
  up: {{type: openai, base_url: "{url}"}}
routes:
  chat-default: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
  embed-small: {{targets: [{{provider: up, model: text-embedding-3-small}}]}}
"""


async def test_rbac_denies_by_default_and_lists_only_allowed_routes(make_gateway, fake_openai) -> None:
    _, upstream = fake_openai
    server = await make_gateway(RBAC, url=str(upstream.make_url("/v1")))
    alice, bob = sdk(server, ALICE_KEY), sdk(server, BOB_KEY)
    assert (await alice.chat.completions.create(model="chat-default", messages=HI)).choices
    with pytest.raises(openai.PermissionDeniedError) as info:
        await alice.embeddings.create(model="embed-small", input="x")
    assert "embed-small" in info.value.message and info.value.code == "model_not_permitted"
    assert "role" not in info.value.message and "casbin" not in info.value.message.lower()
    with pytest.raises(openai.PermissionDeniedError):
        await bob.chat.completions.create(model="chat-default", messages=HI)
    assert [m.id for m in (await alice.models.list()).data] == ["chat-default"]
    assert (await bob.models.list()).data == []
    with pytest.raises(openai.NotFoundError):
        await alice.models.retrieve("embed-small")
    assert sorted(m.id for m in (await sdk(server, ADMIN_KEY).models.list()).data) == ["chat-default", "embed-small"]


LIMITS = """
providers:
  up: {{type: openai, base_url: "{url}"}}
routes:
  chat-default: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
limiter: {{storage: "{storage}", on_error: {on_error}, timeout_ms: 300}}
limits:
  - {{scope: user, requests: {requests}/minute}}
  - {{scope: user, tokens: 100000/hour}}
"""


async def test_rate_limits_answer_429_with_openai_headers(make_gateway, fake_openai) -> None:
    _, upstream = fake_openai
    server = await make_gateway(LIMITS, url=str(upstream.make_url("/v1")), storage="memory://", on_error="deny",
                                requests=3)
    alice = sdk(server)
    for remaining in (2, 1, 0):
        raw = await alice.chat.completions.with_raw_response.create(model="chat-default", messages=HI)
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        assert raw.headers["x-ratelimit-remaining-requests"] == str(remaining)
        assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
        assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 100000
        assert raw.headers["x-ratelimit-reset-requests"]
    with pytest.raises(openai.RateLimitError) as info:
        await alice.chat.completions.create(model="chat-default", messages=HI)
    headers = info.value.response.headers
    assert headers["x-ratelimit-remaining-requests"] == "0" and int(headers["retry-after"]) >= 1
    assert info.value.code == "rate_limit_exceeded"
    assert (await sdk(server, BOB_KEY).chat.completions.create(model="chat-default", messages=HI)).choices


async def _token_counter(server, key: str = "user:alice") -> int:
    async with aiohttp.ClientSession() as session, session.get(
            server.make_url("/admin/limits"), params={"scope": key},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
        assert resp.status == 200
        counters = (await resp.json())["counters"]
    return next(w["used"] for w in counters["windows"] if w["kind"] == "tokens")


async def test_streamed_and_whole_answers_charge_the_same_tokens(make_gateway, fake_openai) -> None:
    _, upstream = fake_openai
    server = await make_gateway(LIMITS, url=str(upstream.make_url("/v1")), storage="memory://", on_error="deny",
                                requests=100)
    alice = sdk(server)
    reply = await alice.chat.completions.create(model="chat-default", messages=HI)
    after_whole = await _token_counter(server)
    stream = await alice.chat.completions.create(model="chat-default", messages=HI, stream=True)
    async for _ in stream:
        pass
    after_stream = await _token_counter(server)
    assert reply.usage is not None
    assert after_whole > reply.usage.completion_tokens > 0
    assert after_stream - after_whole == after_whole


async def test_token_limit_refuses_a_prompt_larger_than_what_remains(make_gateway, fake_openai) -> None:
    _, upstream = fake_openai
    server = await make_gateway(LIMITS.replace("100000/hour", "60/hour"), url=str(upstream.make_url("/v1")),
                                storage="memory://", on_error="deny", requests=100)
    alice = sdk(server)
    await alice.chat.completions.create(model="chat-default", messages=HI)
    with pytest.raises(openai.RateLimitError) as info:
        await alice.chat.completions.create(model="chat-default", messages=HI * 5)
    assert "token" in info.value.message.lower()


BUDGET = """
providers:
  up: {{type: openai, base_url: "{url}"}}
routes:
  chat-default: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
limiter: {{reserve_completion_tokens: 20}}
budgets:
  - {{scope: user, usd: 0.0001, per: day}}
prices:
  gpt-4o-mini: {{input: 1.0, output: 2.0}}
"""


async def _budget(server, scope: str = "user:alice") -> dict:
    async with aiohttp.ClientSession() as session, session.get(
            server.make_url("/admin/limits"), params={"scope": scope},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
        assert resp.status == 200
        return (await resp.json())["counters"]["budgets"][0]


async def test_a_budget_reserves_each_request_and_refuses_what_would_not_fit(make_gateway, fake_openai) -> None:
    # 100 micro-dollars a day; a request reserves its prompt (~15 tokens at $1/M) plus 20 completion tokens
    # at $2/M (~55), and really costs its prompt plus 6 completion tokens (~27).
    _, upstream = fake_openai
    server = await make_gateway(BUDGET, url=str(upstream.make_url("/v1")))
    alice = sdk(server)
    costs = []
    for _ in range(2):
        reply = await alice.chat.completions.create(model="chat-default", messages=HI)
        assert reply.usage is not None
        costs.append(reply.usage.prompt_tokens + 2 * reply.usage.completion_tokens)
    budget = await _budget(server)
    assert round(budget["spent_usd"] * 1e6) == sum(costs) and budget["reserved_usd"] == 0
    with pytest.raises(openai.RateLimitError) as info:
        await alice.chat.completions.create(model="chat-default", messages=HI)
    assert info.value.code == "budget_exceeded"
    remains = 100 - sum(costs)
    assert f"Budget exceeded for user:alice: ${sum(costs) / 1e6:f}".rstrip("0") in info.value.message
    assert f"${remains / 1e6:f}".rstrip("0") + " remains" in info.value.message
    assert "max_tokens" in info.value.message
    # A smaller max_tokens fits in what remains.
    assert (await alice.chat.completions.create(model="chat-default", messages=HI, max_tokens=2)).choices
    assert (await sdk(server, BOB_KEY).chat.completions.create(model="chat-default", messages=HI)).choices


async def test_a_request_that_could_cost_more_than_the_budget_is_refused_up_front(make_gateway, fake_openai) -> None:
    _, upstream = fake_openai
    server = await make_gateway(BUDGET, url=str(upstream.make_url("/v1")))
    with pytest.raises(openai.RateLimitError) as info:
        await sdk(server).chat.completions.create(model="chat-default", messages=HI, max_completion_tokens=1000)
    assert info.value.code == "budget_exceeded" and "$0.0001 remains" in info.value.message
    assert fake_openai[0].requests == []
    assert (await _budget(server))["spent_usd"] == 0


async def test_admin_api_needs_the_admin_capability(make_gateway, fake_openai) -> None:
    _, upstream = fake_openai
    server = await make_gateway(RBAC, url=str(upstream.make_url("/v1")))
    async with aiohttp.ClientSession() as session:
        for key, status in ((ALICE_KEY, 403), (ADMIN_KEY, 200)):
            async with session.get(server.make_url("/admin/policy"),
                                   headers={"Authorization": f"Bearer {key}"}) as resp:
                assert resp.status == status
                body = await resp.json()
        assert len(body["version"]) == 12 and len(body["sha256"]) == 64
        async with session.post(server.make_url("/admin/reload"),
                                headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
            assert resp.status == 200 and (await resp.json())["reloaded"] is False
        async with session.get(server.make_url("/admin/limits"), params={"scope": "nonsense"},
                               headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["param"] == "scope"


async def test_two_gateway_processes_on_one_redis_admit_exactly_n(tmp_path: Path, fake_openai, redis_url) -> None:
    _, upstream = fake_openai
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(LIMITS, url=str(upstream.make_url("/v1")), storage=redis_url, on_error="deny",
                                requests=10))
    first, second = await asyncio.gather(start_gateway(path), start_gateway(path))
    try:
        async def one(gateway) -> bool:
            try:
                await sdk(gateway).chat.completions.create(model="chat-default", messages=HI)
                return True
            except openai.RateLimitError:
                return False

        results = await asyncio.gather(*(one(g) for _ in range(15) for g in (first, second)))
        assert sum(results) == 10
    finally:
        for gateway in (first, second):
            gateway.process.send_signal(signal.SIGTERM)
            gateway.process.wait(timeout=30)


@pytest.mark.parametrize("on_error", ["deny", "allow"])
async def test_redis_outage_follows_on_error_and_limits_resume(make_gateway, fake_openai, own_redis,
                                                               on_error: str) -> None:
    _, upstream = fake_openai
    server = await make_gateway(LIMITS, url=str(upstream.make_url("/v1")), storage=own_redis.url, on_error=on_error,
                                requests=2)
    alice = sdk(server)
    await alice.chat.completions.create(model="chat-default", messages=HI)
    own_redis.stop()
    if on_error == "deny":
        with pytest.raises(openai.APIStatusError) as info:
            await alice.chat.completions.create(model="chat-default", messages=HI)
        assert info.value.status_code == 503 and info.value.code == "limiter_unavailable"
    else:
        for _ in range(3):
            assert (await alice.chat.completions.create(model="chat-default", messages=HI)).choices
    own_redis.start()
    await alice.chat.completions.create(model="chat-default", messages=HI)
    await alice.chat.completions.create(model="chat-default", messages=HI)
    with pytest.raises(openai.RateLimitError):
        await alice.chat.completions.create(model="chat-default", messages=HI)


async def test_the_redis_password_reaches_no_answer_and_no_log(make_gateway, fake_openai,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    _, upstream = fake_openai
    storage = f"redis://gw-limiter-user:Hunter2-redis-pw@127.0.0.1:{free_port()}/0"
    server = await make_gateway(LIMITS, url=str(upstream.make_url("/v1")), storage=storage, on_error="deny",
                                requests=5)
    with pytest.raises(openai.APIStatusError) as info:
        await sdk(server).chat.completions.create(model="chat-default", messages=HI)
    assert info.value.status_code == 503 and info.value.code == "limiter_unavailable"
    async with aiohttp.ClientSession() as session:
        for path in ("/admin/policy", "/admin/limits?scope=user:alice"):
            async with session.get(server.make_url(path), headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
                assert "Hunter2" not in await resp.text()
    assert "redis://:***@127.0.0.1" in caplog.text
    assert "Hunter2" not in caplog.text + info.value.message and "gw-limiter-user" not in caplog.text
