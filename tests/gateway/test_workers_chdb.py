"""`workers: 2` on the embedded engine (chdb): both workers serve, one writer process (the supervisor's) writes for
both, and after SIGTERM the table holds one row per request, none left in the spool.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ALICE_KEY, policy_text
from tests.fakes.openai_upstream import FakeOpenAI
from tests.served import Served, chdb_row_counts, start_gateway

POLICY = """
server: {{workers: 2, shutdown_timeout_s: 30}}
providers:
  up: {{type: openai, base_url: "{url}", api_key: "sk-upstream-secret-workers"}}
routes:
  chat-default: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
inference_table:
  enabled: true
  clickhouse: "chdb://{chdb}"
  spool_dir: "{spool}"
  flush_interval_ms: 200
"""
REQUESTS = 60


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
            found |= {int(child), *descendants(int(child))}
    return found


def writer_processes(pids: set[int]) -> list[int]:
    """Those of `pids` that are inference writer processes."""
    found = []
    for pid in pids:
        try:
            if b"gateway.inference.child" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


@pytest.fixture
async def served(tmp_path: Path, aiohttp_server) -> AsyncIterator[tuple[Served, Path, Path]]:
    upstream = await aiohttp_server(FakeOpenAI().app())
    chdb, spool = tmp_path / "chdb", tmp_path / "spool"
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(POLICY, url=str(upstream.make_url("/v1")), chdb=str(chdb), spool=str(spool)))
    gateway = await start_gateway(path, ready_timeout_s=120)
    yield gateway, chdb, spool
    if gateway.process.poll() is None:
        for pid in descendants(gateway.process.pid):
            os.kill(pid, signal.SIGKILL)
        gateway.process.kill()
        gateway.process.wait(timeout=30)


async def test_two_workers_on_chdb_leave_one_row_per_request_after_sigterm(served) -> None:
    gateway, chdb, spool = served
    served_by: set[int] = set()
    # A fresh connection each time, so the kernel spreads them over both workers' listening sockets.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for index in range(REQUESTS):
            body = {"model": "chat-default", "messages": [{"role": "user", "content": f"request {index}"}],
                    "stream": bool(index % 2)}
            async with session.post(gateway.make_url("/v1/chat/completions"), json=body,
                                    headers={"Authorization": f"Bearer {ALICE_KEY}"}) as resp:
                assert resp.status == 200, await resp.text()
                assert await resp.read()
            async with session.get(gateway.make_url("/healthz")) as resp:
                served_by.add((await resp.json())["pid"])
    assert len(served_by) == 2, "both workers served"
    writers = writer_processes(descendants(gateway.process.pid))
    assert len(writers) == 1, "one writer process, shared by the workers"

    gateway.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(gateway.process.wait, 90) == 0
    logs = gateway.log_path.read_text(errors="replace")

    assert await asyncio.to_thread(chdb_row_counts, chdb) == (REQUESTS, REQUESTS), logs[-4000:]
    assert sorted(spool.glob("*.jsonl")) == []
    assert "rows in the spool" not in logs and "rows still in memory" not in logs
