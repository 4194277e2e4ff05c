"""A misbehaving upstream, byte for byte, behind a running `lockgate serve`: every client gets an OpenAI-shaped
outcome within the route's timeouts, /healthz keeps answering, memory stays bounded, no key leaks.

The fake (tests/fakes/raw_upstream.py) runs on its own thread and the gateway in its own process, so a gateway
that froze its event loop fails these tests instead of hanging them.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest

from tests.conftest import ALICE_KEY, policy_text, sdk
from tests.fakes.raw_upstream import GOOD_TEXT, HUGE_BYTES, SECRET_KEY, RawUpstream
from tests.served import Served, start_gateway

HI = [{"role": "user", "content": "hi"}]
TOTAL_S = 4.0
DRIP_TOTAL_S = 2.5
# The gateway may hold one whole answer up to max_response_bytes (32 MiB) while it is read, and the relay's
# buffers; a 100 MB answer held whole, or an unbounded event buffer, goes past this.
RSS_BOUND_BYTES = 100 * 1024 * 1024

# model: (non-streamed status and code, streamed: "head" if it fails before the stream starts, else "event")
INVALID = (502, "upstream_invalid_response")
CASES: dict[str, tuple[tuple[int, str], str]] = {
    "negative-chunk": (INVALID, "event"),
    "plus-chunk": (INVALID, "event"),
    "hex-prefix-chunk": (INVALID, "event"),
    "underscore-chunk": (INVALID, "event"),
    "space-chunk": (INVALID, "event"),
    "huge-chunk": (INVALID, "event"),
    "over-limit-chunk": (INVALID, "event"),
    "endless-event": (INVALID, "event"),
    "huge-length": (INVALID, "head"),
    "invalid-utf8": (INVALID, "event"),
    "invalid-utf8-name": (INVALID, "event"),
    "bad-usage": (INVALID, "event"),
    "bad-index": (INVALID, "event"),
    "bad-choices": (INVALID, "event"),
    "drip": ((504, "upstream_timeout"), "event"),
    "big-head": (INVALID, "head"),
    "many-headers": (INVALID, "head"),
    "gzip-chunked": (INVALID, "head"),
    "chunked-substring": (INVALID, "head"),
    "secret-401": ((502, "upstream_error"), "head"),
}
# Routes of the same names on an Anthropic provider.
CLAUDE_CASES = ["claude-bad-usage", "claude-bad-content", "claude-bad-delta"]
MALFORMED_WHOLE = [case for case in CASES if case not in ("drip", "secret-401")] + CLAUDE_CASES


def _policy() -> str:
    lines = [
        "providers:",
        f'  raw: {{{{type: openai, base_url: "{{url}}/v1", api_key: "{SECRET_KEY}",',
        f"        timeout: {{{{connect_ms: 1000, first_byte_ms: 1500, total_ms: {int(TOTAL_S * 1000)}}}}}}}}}",
        f'  raw-azure: {{{{type: azure, base_url: "{{url}}", api_key: "{SECRET_KEY}"}}}}',
        f'  raw-claude: {{{{type: anthropic, base_url: "{{url}}", api_key: "{SECRET_KEY}"}}}}',
        '  raw-small: {{type: openai, base_url: "{url}/v1", max_head_bytes: 1024, max_response_bytes: 65536,',
        "              max_event_bytes: 2048}}",
        "routes:",
        "  small-good: {{targets: [{{provider: raw-small, model: good}}]}}",
        "  small-huge: {{targets: [{{provider: raw-small, model: huge}}]}}",
        "  good: {{targets: [{{provider: raw, model: good}}]}}",
        "  keep-alive-close: {{targets: [{{provider: raw, model: keep-alive-close}}]}}",
        "  secret-400: {{targets: [{{provider: raw, model: secret-400}}]}}",
        "  long-error: {{targets: [{{provider: raw, model: long-error}}]}}",
        "  azure-secret: {{targets: [{{provider: raw-azure, model: secret-401}}]}}",
        "  claude-secret: {{targets: [{{provider: raw-claude, model: secret-401}}]}}",
        "  huge: {{targets: [{{provider: raw, model: huge}}], timeout: {{first_byte_ms: 5000, total_ms: 60000}}}}",
        "  retry-bad-index: {{targets: [{{provider: raw, model: bad-index}}], fallbacks: [good],",
        '                    retry: {{attempts: 3, backoff_ms: 1, "on": [invalid]}}}}',
        "  breaker-bad-usage: {{targets: [{{provider: raw, model: bad-usage}}], fallbacks: [good],",
        "                      circuit_breaker: {{failures: 2, cooldown_s: 600}}}}",
    ]
    for case in CLAUDE_CASES:
        lines.append(f"  {case}: {{{{targets: [{{{{provider: raw-claude, model: {case}}}}}]}}}}")
        lines.append(f"  fb-{case}: {{{{targets: [{{{{provider: raw-claude, model: {case}}}}}], fallbacks: [good]}}}}")
    for case in CASES:
        timeout = f", timeout: {{{{first_byte_ms: 1500, total_ms: {int(DRIP_TOTAL_S * 1000)}}}}}" if case == "drip" else ""
        lines.append(f"  {case}: {{{{targets: [{{{{provider: raw, model: {case}}}}}]{timeout}}}}}")
        lines.append(f"  fb-{case}: {{{{targets: [{{{{provider: raw, model: {case}}}}}], fallbacks: [good]{timeout}}}}}")
    # A token limit loads the tokenizer at start, so the memory baseline holds it: answers cut short or without
    # usage are counted with it.
    lines += ["limits:", "  - {{scope: user, tokens: 1000000000/minute}}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def raw() -> Iterator[RawUpstream]:
    with RawUpstream().in_thread() as fake:
        yield fake


@pytest.fixture(scope="module")
def gateway(raw: RawUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    path = tmp_path_factory.mktemp("broken-upstream") / "policy.yaml"
    path.write_text(policy_text(_policy(), url=raw.url))
    served = asyncio.run(start_gateway(path))
    yield served
    if served.process.poll() is None:
        served.process.terminate()
        served.process.wait(timeout=30)


async def _post(gateway: Served, model: str, stream: bool, timeout_s: float = 20.0) -> tuple[int, bytes]:
    body = orjson.dumps({"model": model, "messages": HI, "stream": stream})
    headers = {"Authorization": f"Bearer {ALICE_KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session, \
            session.post(gateway.make_url("/v1/chat/completions"), data=body, headers=headers) as resp:
        return resp.status, await resp.read()


def _error(payload: dict) -> dict:
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def _budget_s(case: str) -> float:
    """The route's total timeout, and generous room for a loaded machine."""
    return (DRIP_TOTAL_S if case == "drip" else TOTAL_S) + 5.0


@pytest.mark.parametrize("case", list(CASES) + CLAUDE_CASES)
async def test_a_whole_answer_from_a_broken_upstream_is_an_openai_error(gateway: Served, case: str) -> None:
    (status, code), _ = CASES.get(case, (INVALID, "event"))
    started = time.monotonic()
    got_status, raw_body = await _post(gateway, case, False)
    assert time.monotonic() - started < _budget_s(case)
    assert got_status == status, raw_body[:300]
    assert _error(orjson.loads(raw_body))["code"] == code
    with pytest.raises(openai.APIStatusError) as info:
        await sdk(gateway).chat.completions.create(model=case, messages=HI)
    assert info.value.status_code == status and info.value.code == code


@pytest.mark.parametrize("case", list(CASES) + CLAUDE_CASES)
async def test_a_stream_from_a_broken_upstream_ends_with_an_error_event_and_a_clean_end(gateway: Served, case: str) -> None:
    (status, code), where = CASES.get(case, (INVALID, "event"))
    started = time.monotonic()
    got_status, raw_body = await _post(gateway, case, True)
    assert time.monotonic() - started < _budget_s(case)
    if where == "head":
        assert got_status == status and _error(orjson.loads(raw_body))["code"] == code
        with pytest.raises(openai.APIStatusError) as status_info:
            await sdk(gateway).chat.completions.create(model=case, messages=HI, stream=True)
        assert status_info.value.status_code == status
        return
    # aiohttp read the chunked body to its terminating chunk: no second head inside it, the error event last.
    assert got_status == 200 and b"HTTP/1." not in raw_body
    events = [block for block in raw_body.split(b"\n\n") if block]
    assert _error(orjson.loads(events[-1].removeprefix(b"data: ")))["code"] == code
    stream = await sdk(gateway).chat.completions.create(model=case, messages=HI, stream=True)
    with pytest.raises(openai.APIError) as info:
        async for _ in stream:
            pass
    assert not isinstance(info.value, openai.APIStatusError | openai.APIConnectionError)
    assert isinstance(info.value.body, dict) and info.value.body["code"] == code


@pytest.mark.parametrize("case", MALFORMED_WHOLE)
async def test_a_route_with_a_fallback_serves_the_fallback_for_a_malformed_answer(gateway: Served, case: str) -> None:
    reply = await sdk(gateway).chat.completions.create(model=f"fb-{case}", messages=HI)
    assert reply.choices[0].message.content == GOOD_TEXT


async def test_malformed_answers_are_retried_and_count_towards_the_breaker(gateway: Served, raw: RawUpstream) -> None:
    def asked(model: str) -> int:
        return sum(1 for _, m in list(raw.requests) if m == model)

    before = asked("bad-index")
    reply = await sdk(gateway).chat.completions.create(model="retry-bad-index", messages=HI)
    assert reply.choices[0].message.content == GOOD_TEXT and asked("bad-index") - before == 3
    before = asked("bad-usage")
    for _ in range(4):
        reply = await sdk(gateway).chat.completions.create(model="breaker-bad-usage", messages=HI)
        assert reply.choices[0].message.content == GOOD_TEXT
    assert asked("bad-usage") - before == 2, "the breaker opened after two malformed answers"


@pytest.mark.parametrize("stream", [False, True])
async def test_the_limits_are_the_providers_own(gateway: Served, stream: bool) -> None:
    status, body = await _post(gateway, "small-good", stream)
    assert status == 200 and GOOD_TEXT.split()[0].encode() in body
    status, body = await _post(gateway, "small-huge", stream)
    if stream:
        assert status == 200 and b"upstream_invalid_response" in body and b"limit of 2048 bytes" in body
    else:
        assert status == 502 and "limit of 65536 bytes" in _error(orjson.loads(body))["message"]


@pytest.mark.parametrize("stream", [False, True])
async def test_connection_keep_alive_close_means_close(gateway: Served, raw: RawUpstream, stream: bool) -> None:
    for _ in range(3):
        status, _ = await _post(gateway, "keep-alive-close", stream)
        assert status == 200
    for models in raw.connection_models().values():
        assert "keep-alive-close" not in models[:-1], f"a connection was reused after it asked to close: {models}"


async def test_healthz_answers_within_a_second_while_broken_upstreams_are_served(gateway: Served) -> None:
    nasty = [(case, stream) for case in ("negative-chunk", "endless-event", "drip", "huge-chunk", "invalid-utf8")
             for stream in (False, True)]
    calls = [asyncio.create_task(_post(gateway, case, stream)) for case, stream in nasty]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
        for _ in range(20):
            async with session.get(gateway.make_url("/healthz")) as resp:
                assert resp.status == 200
            await asyncio.sleep(0.1)
    outcomes = await asyncio.gather(*calls)
    assert all(status in (200, 502, 504) for status, _ in outcomes)
    assert gateway.process.poll() is None
    reply = await sdk(gateway).chat.completions.create(model="good", messages=HI)
    assert reply.choices[0].message.content == GOOD_TEXT


def _tree_rss_bytes(root: int) -> int:
    """Resident memory of the gateway process and its children."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
        todo.extend(int(child) for child in children)
    return total


async def _read_stream_to_the_end(gateway: Served) -> tuple[int, bytes]:
    """Reads a 100 MB stream as it comes, keeping only its size and its last bytes."""
    body = orjson.dumps({"model": "huge", "messages": HI, "stream": True})
    headers = {"Authorization": f"Bearer {ALICE_KEY}", "Content-Type": "application/json"}
    size, tail = 0, b""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session, \
            session.post(gateway.make_url("/v1/chat/completions"), data=body, headers=headers) as resp:
        async for piece in resp.content.iter_any():
            size += len(piece)
            tail = (tail + piece)[-200:]
    return size, tail


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
async def test_memory_stays_bounded_while_100_mb_answers_are_served(gateway: Served) -> None:
    pid = gateway.process.pid
    await _post(gateway, "good", False)
    baseline = _tree_rss_bytes(pid)
    whole = [asyncio.create_task(_post(gateway, model, False, 120)) for model in ("huge", "huge-length", "endless-event")]
    streamed = asyncio.create_task(_read_stream_to_the_end(gateway))
    endless = asyncio.create_task(_post(gateway, "endless-event", True, 120))
    peak = baseline
    tasks = [*whole, streamed, endless]
    while not all(task.done() for task in tasks):
        peak = max(peak, _tree_rss_bytes(pid))
        await asyncio.sleep(0.05)
    assert peak - baseline < RSS_BOUND_BYTES, f"RSS grew by {(peak - baseline) >> 20} MB"
    assert [(await task)[0] for task in whole] == [502, 502, 502]
    size, tail = await streamed
    assert size > HUGE_BYTES * 0.99 and tail.endswith(b"data: [DONE]\n\n")
    status, body = await endless
    assert status == 200 and b"upstream_invalid_response" in body


async def test_the_provider_key_reaches_neither_the_client_nor_the_log(gateway: Served) -> None:
    for model in ("secret-401", "azure-secret", "claude-secret"):
        for stream in (False, True):
            status, body = await _post(gateway, model, stream)
            assert status == 502 and SECRET_KEY not in body.decode()
    status, body = await _post(gateway, "secret-400", False)
    error = _error(orjson.loads(body))
    assert status == 400 and SECRET_KEY not in body.decode() and "Incorrect API key provided" in error["message"]
    await asyncio.sleep(0.2)
    assert SECRET_KEY not in gateway.log_path.read_text(errors="replace")


async def test_an_upstream_error_message_reaches_the_client_shortened(gateway: Served) -> None:
    status, body = await _post(gateway, "long-error", False)
    assert status == 502 and 100 < len(_error(orjson.loads(body))["message"]) < 1000
