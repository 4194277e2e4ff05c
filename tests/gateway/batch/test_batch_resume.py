"""A batch survives its gateway: killed mid-batch and started again, it finishes with every line exactly once; with
two workers, one runs each batch and a cancel reaches it through either."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from gateway.batch.store import recorded_ids
from tests.conftest import policy_text, sdk
from tests.gateway.batch.conftest import SlowOpenAI, chat_line, finished, result_lines, submit
from tests.served import Served, start_gateway

POLICY = """
providers:
  up: {{type: openai, base_url: "{url}"}}
routes:
  chat-slow: {{targets: [{{provider: up, model: gpt-4o-mini}}], batch: {{concurrency: 2}}}}
batch: {{data_dir: "{data}", poll_interval_s: 0.1}}
"""

LINES = 30


@pytest.fixture
async def slow_policy(aiohttp_server, tmp_path: Path) -> tuple[SlowOpenAI, Path]:
    fake = SlowOpenAI(0.25)
    upstream = await aiohttp_server(fake.app())
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(POLICY, url=str(upstream.make_url("/v1")), data=tmp_path / "batches"))
    return fake, path


@pytest.fixture
async def gateways() -> AsyncIterator[list[Served]]:
    started: list[Served] = []
    yield started
    for gateway in started:
        if gateway.process.poll() is None:
            gateway.process.kill()
            gateway.process.wait(timeout=30)


async def _completed(client, batch_id: str) -> int:
    counts = (await client.batches.retrieve(batch_id)).request_counts
    return counts.completed + counts.failed if counts is not None else 0


async def test_a_gateway_killed_mid_batch_and_restarted_runs_each_line_exactly_once(slow_policy, gateways,
                                                                                    tmp_path: Path) -> None:
    fake, path = slow_policy
    first = await start_gateway(path)
    gateways.append(first)
    client = sdk(first)  # type: ignore[arg-type]
    created = await submit(client, [chat_line(f"line-{i:02}", "chat-slow") for i in range(LINES)])
    async with asyncio.timeout(60):
        while await _completed(client, created.id) < 6:
            await asyncio.sleep(0.05)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=30)
    folder = tmp_path / "batches" / "batches" / created.id
    on_disk = orjson.loads((folder / "batch.json").read_bytes())["batch"]
    kept = len(recorded_ids(folder / "output.jsonl"))
    assert on_disk["status"] == "in_progress" and 6 <= kept < LINES

    second = await start_gateway(path)
    gateways.append(second)
    client = sdk(second)  # type: ignore[arg-type]
    batch = await finished(client, created.id)
    assert batch.status == "completed" and batch.error_file_id is None, batch
    assert batch.request_counts is not None and batch.request_counts.completed == LINES
    output = await result_lines(client, batch.output_file_id)
    assert sorted(output) == [f"line-{i:02}" for i in range(LINES)]
    # The usage is what the kept answers carry: the lines answered before the kill count once, the lost answers of
    # those in flight not at all.
    usage = [line["response"]["body"]["usage"] for line in output.values()]
    assert batch.usage is not None and batch.model == "chat-slow"
    assert batch.usage.input_tokens == sum(u["prompt_tokens"] for u in usage) > 0
    assert batch.usage.output_tokens == sum(u["completion_tokens"] for u in usage) > 0
    # Only the lines in flight at the kill (at most the route's concurrency) were sent twice: their first answers
    # reached nobody.
    assert LINES <= len(fake.requests) <= LINES + 2


async def test_with_two_workers_one_runs_a_batch_and_either_cancels_it(slow_policy, gateways) -> None:
    fake, path = slow_policy
    served = await start_gateway(path, "--workers", "2")
    gateways.append(served)
    client = sdk(served)  # type: ignore[arg-type]
    whole = await finished(client, (await submit(client, [chat_line(f"w{i}", "chat-slow") for i in range(8)])).id)
    assert whole.status == "completed" and len(await result_lines(client, whole.output_file_id)) == 8
    assert len(fake.requests) == 8
    created = await submit(client, [chat_line(f"c{i:02}", "chat-slow") for i in range(LINES)])
    async with asyncio.timeout(60):
        while await _completed(client, created.id) < 2:
            await asyncio.sleep(0.05)
    assert (await client.batches.cancel(created.id)).status == "cancelling"
    batch = await finished(client, created.id, timeout_s=15)
    assert batch.status == "cancelled" and batch.request_counts is not None
    assert 2 <= batch.request_counts.completed < LINES
    served.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(served.process.wait, 60) == 0


def test_a_torn_last_result_line_is_cut_away(tmp_path: Path) -> None:
    results = tmp_path / "output.jsonl"
    whole = b'{"custom_id":"a","response":null}\n{"custom_id":"b","response":null}\n'
    results.write_bytes(whole + b'{"custom_id":"c","resp')
    assert recorded_ids(results) == ["a", "b"]
    assert results.read_bytes() == whole
    results.write_bytes(b'{"custom_id":"c"')
    assert recorded_ids(results) == [] and results.read_bytes() == b""
    assert recorded_ids(tmp_path / "missing.jsonl") == []
    assert not os.path.exists(tmp_path / "missing.jsonl")
