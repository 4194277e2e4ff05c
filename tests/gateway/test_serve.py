"""`lockgate serve` as a user runs it: hot reload, SIGHUP, workers on one port, draining on SIGTERM, quiet logs."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.conftest import ALICE_KEY, policy_text, sdk
from tests.fakes.openai_upstream import WORDS, FakeOpenAI
from tests.served import Served, start_gateway

POLICY = """
server: {{watch_interval_s: 0.2, shutdown_timeout_s: 10}}
providers:
  up: {{type: openai, base_url: "{url}", api_key: "sk-upstream-very-secret"}}
routes:
  chat-default: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
"""


@pytest.fixture
async def upstream(aiohttp_server):
    fake = FakeOpenAI(chunk_delay_s=0.2)
    return await aiohttp_server(fake.app())


@pytest.fixture
async def served(tmp_path: Path, upstream) -> AsyncIterator[Served]:
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(POLICY, url=str(upstream.make_url("/v1"))))
    gateway = await start_gateway(path)
    yield gateway
    if gateway.process.poll() is None:
        gateway.process.terminate()
        gateway.process.wait(timeout=30)


async def _models(served: Served) -> list[str]:
    return sorted(m.id for m in (await sdk(served).models.list()).data)


async def _wait_for(predicate, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.1)):
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


async def test_file_changes_reload_and_a_broken_file_keeps_the_old_version(served: Served) -> None:
    text = served.path.read_text()
    served.path.write_text(text.replace("routes:\n", "routes:\n  chat-new: {targets: [{provider: up}]}\n"))

    async def has_new() -> bool:
        return "chat-new" in await _models(served)

    await _wait_for(has_new)
    broken = text.replace("routes:\n", "routes:\n  chat-bad: {targets: [{provider: nowhere}]}\n")
    served.path.write_text(broken)
    bad_line = broken.splitlines().index("  chat-bad: {targets: [{provider: nowhere}]}") + 1
    await asyncio.sleep(1.0)
    assert await _models(served) == ["chat-default", "chat-new"]
    reply = await sdk(served).chat.completions.create(model="chat-new", messages=[{"role": "user", "content": "x"}])
    assert reply.choices[0].message.content == "".join(WORDS)
    served.process.send_signal(signal.SIGTERM)
    logs = served.logs()
    assert "policy reload rejected" in logs
    assert f"policy.yaml:{bad_line}: routes.chat-bad.targets[0].provider" in logs


async def test_sighup_reloads(served: Served) -> None:
    text = served.path.read_text()
    stat = served.path.stat()
    served.path.write_text(text.replace("routes:\n", "routes:\n  chat-hup: {targets: [{provider: up}]}\n"))
    os.utime(served.path, (stat.st_atime, stat.st_mtime))
    served.process.send_signal(signal.SIGHUP)

    async def has_hup() -> bool:
        return "chat-hup" in await _models(served)

    await _wait_for(has_hup)


async def test_sigterm_drains_an_in_flight_stream(served: Served) -> None:
    stream = await sdk(served).chat.completions.create(
        model="chat-default", messages=[{"role": "user", "content": "hi"}], stream=True)
    text = ""
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and not text:
            served.process.send_signal(signal.SIGTERM)
        text += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert text == "".join(WORDS)
    assert served.process.wait(timeout=30) == 0


async def test_no_secret_reaches_the_logs(served: Served) -> None:
    client = sdk(served)
    await client.chat.completions.create(model="chat-default", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        await sdk(served, key="lg-wrong-key-123456").chat.completions.create(
            model="chat-default", messages=[{"role": "user", "content": "hi"}])
    served.process.send_signal(signal.SIGTERM)
    logs = served.logs()
    assert "serving on" in logs
    for secret in (ALICE_KEY, "lg-wrong-key-123456", "sk-upstream-very-secret", "Bearer"):
        assert secret not in logs


async def test_workers_share_one_port(tmp_path: Path, upstream) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(POLICY, url=str(upstream.make_url("/v1"))))
    gateway = await start_gateway(path, "--workers", "2")
    try:
        pids = set()
        for _ in range(200):
            async with aiohttp.ClientSession() as session, session.get(gateway.make_url("/healthz")) as resp:
                pids.add((await resp.json())["pid"])
            if len(pids) == 2:
                break
            await asyncio.sleep(0.05)
        assert len(pids) == 2 and gateway.process.pid not in pids
        reply = await sdk(gateway).chat.completions.create(model="chat-default",
                                                           messages=[{"role": "user", "content": "x"}])
        assert reply.choices[0].message.content
    finally:
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(timeout=30) == 0
