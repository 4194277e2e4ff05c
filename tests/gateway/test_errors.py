"""Every error answers in OpenAI's shape, so the SDK raises the exception it would against OpenAI."""

from __future__ import annotations

import aiohttp
import openai
import pytest

from tests.conftest import ALICE_KEY, sdk

POLICY = """
server: {{max_request_bytes: 2048}}
providers:
  up: {{type: openai, base_url: "{url}", timeout: {{first_byte_ms: 500, total_ms: 2000}}}}
  down: {{type: openai, base_url: "http://127.0.0.1:9/v1", timeout: {{connect_ms: 500}}}}
routes:
  chat-default: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
  broken-500: {{targets: [{{provider: up, model: fail-500}}]}}
  broken-400: {{targets: [{{provider: up, model: fail-400}}]}}
  broken-401: {{targets: [{{provider: up, model: fail-401}}]}}
  broken-429: {{targets: [{{provider: up, model: fail-429}}]}}
  garbage: {{targets: [{{provider: up, model: garbage}}]}}
  error-200: {{targets: [{{provider: up, model: error-200}}]}}
  hang: {{targets: [{{provider: up, model: hang}}]}}
  cut-stream: {{targets: [{{provider: up, model: cut-stream}}]}}
  error-stream: {{targets: [{{provider: up, model: error-stream}}]}}
  reset-stream: {{targets: [{{provider: up, model: reset-stream}}]}}
  hang-stream: {{targets: [{{provider: up, model: hang-stream}}]}}
  unreachable: {{targets: [{{provider: down, model: x}}]}}
"""

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def server(make_gateway, fake_openai):
    _, upstream = fake_openai
    return await make_gateway(POLICY, url=str(upstream.make_url("/v1")))


async def _raw(server, body: bytes, key: str | None = ALICE_KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    async with aiohttp.ClientSession() as session, \
            session.post(server.make_url("/v1/chat/completions"), data=body, headers=headers) as resp:
        return resp.status, await resp.json()


def _assert_shape(payload: dict) -> dict:
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


async def test_missing_and_unknown_keys_are_401(server) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        await sdk(server, key="lg-not-a-real-key").chat.completions.create(model="chat-default", messages=HI)
    assert info.value.code == "invalid_api_key"
    assert "lg-not-a-real-key" not in str(info.value)
    status, payload = await _raw(server, b'{"model": "chat-default", "messages": []}', key=None)
    assert status == 401 and _assert_shape(payload)["code"] == "invalid_api_key"


async def test_malformed_json_is_400(server) -> None:
    status, payload = await _raw(server, b'{"model": "chat-default", "messages": [')
    assert status == 400 and _assert_shape(payload)["code"] == "invalid_json"
    status, payload = await _raw(server, b'["not", "an", "object"]')
    assert status == 400


@pytest.mark.parametrize("depth", [64, 65, 300])
async def test_bodies_nested_past_the_depth_limit_are_400_and_those_at_it_are_served(server, depth: int) -> None:
    # The body is the first level; the rest nest in a field the gateway passes on.
    nested = b'{"a":' * (depth - 1) + b"1" + b"}" * (depth - 1)
    body = b'{"model":"chat-default","messages":[{"role":"user","content":"hi"}],"metadata":' + nested + b"}"
    status, payload = await _raw(server, body)
    if depth <= 64:
        assert status == 200, payload
    else:
        assert status == 400 and "nested deeper than 64 levels" in _assert_shape(payload)["message"]


async def test_brackets_inside_strings_do_not_count_as_nesting(server) -> None:
    body = b'{"model":"chat-default","messages":[{"role":"user","content":"' + b"[{" * 500 + b'"}]}'
    status, payload = await _raw(server, body)
    assert status == 200, payload


async def test_body_over_the_limit_is_413(server) -> None:
    big = [{"role": "user", "content": "x" * 4096}]
    with pytest.raises(openai.APIStatusError) as info:
        await sdk(server).chat.completions.create(model="chat-default", messages=big)
    assert info.value.status_code == 413
    assert info.value.code == "request_too_large"


async def test_unknown_model_is_404(server) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await sdk(server).chat.completions.create(model="gpt-9", messages=HI)
    assert info.value.code == "model_not_found" and info.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        await sdk(server).models.retrieve("gpt-9")


async def test_missing_fields_are_400(server) -> None:
    status, payload = await _raw(server, b'{"model": "chat-default"}')
    assert status == 400 and _assert_shape(payload)["param"] == "messages"
    status, payload = await _raw(server, b'{"messages": [{"role": "user", "content": "x"}]}')
    assert status == 400 and payload["error"]["param"] == "model"
    with pytest.raises(openai.BadRequestError):
        await sdk(server).chat.completions.create(model="chat-default", messages=[])


@pytest.mark.parametrize(
    ("route", "status", "code"),
    [
        ("broken-500", 502, "upstream_error"),
        ("broken-401", 502, "upstream_error"),
        ("garbage", 502, "upstream_invalid_response"),
        ("error-200", 502, "upstream_invalid_response"),
        ("unreachable", 502, "upstream_unavailable"),
        ("hang", 504, "upstream_timeout"),
    ],
)
async def test_upstream_failures_are_5xx(server, route: str, status: int, code: str) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        await sdk(server).chat.completions.create(model=route, messages=HI)
    assert info.value.status_code == status
    assert info.value.code == code


async def test_upstream_client_errors_and_rate_limits_keep_their_meaning(server) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(server).chat.completions.create(model="broken-400", messages=HI)
    assert "scripted failure 400" in info.value.message
    with pytest.raises(openai.RateLimitError):
        await sdk(server).chat.completions.create(model="broken-429", messages=HI)


async def test_upstream_secret_never_reaches_the_client(server) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        await sdk(server).chat.completions.create(model="broken-401", messages=HI)
    assert "sk-" not in str(info.value.body)


@pytest.mark.parametrize("route", ["cut-stream", "error-stream", "reset-stream", "hang-stream"])
async def test_a_stream_that_fails_midway_ends_with_an_error_event(server, route: str) -> None:
    stream = await sdk(server).chat.completions.create(model=route, messages=HI, stream=True)
    with pytest.raises(openai.APIError) as info:
        async for _ in stream:
            pass
    assert info.value.message


async def test_unknown_paths_and_methods_answer_in_openai_shape(server) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/v1/nothing-here")) as resp:
            assert resp.status == 404 and _assert_shape(await resp.json())
        async with session.get(server.make_url("/v1/chat/completions")) as resp:
            assert resp.status == 405 and _assert_shape(await resp.json())
