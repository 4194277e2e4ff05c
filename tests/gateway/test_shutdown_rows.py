"""`kill -INT -PGID` of a serving gateway (Ctrl-C in a terminal), or SIGTERM to each of its processes (systemd):
every row is in the inference table when it exits, none is left in the spool, and the log names no leftovers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import policy_text, sdk
from tests.fakes.openai_upstream import FakeOpenAI
from tests.served import Served, alive, chdb_row_counts, free_port

# Rows reach ClickHouse only at the stop: the flush interval and batch size are far beyond the test.
POLICY = """
server: {{shutdown_timeout_s: 30}}
providers:
  up: {{type: openai, base_url: "{url}", api_key: "sk-upstream-secret-shutdown"}}
routes:
  chat-default: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
inference_table:
  enabled: true
  clickhouse: "chdb://{chdb}"
  spool_dir: "{spool}"
  flush_interval_ms: 600000
  batch_rows: 100000
"""

REQUESTS = 40


async def start_in_own_process_group(path: Path, ready_timeout_s: float = 60.0) -> Served:
    """`lockgate serve` as the leader of a process group of its own, as a shell starts a foreground job."""
    port = free_port()
    log_path = path.with_suffix(f".{port}.log")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", str(path), "--port", str(port)],
            stderr=log, stdout=subprocess.DEVNULL, env={**os.environ, "LOCKGATE_LOG_LEVEL": "INFO"},
            start_new_session=True,
        )
    served = Served(process, port, path, log_path)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ready_timeout_s
    async with aiohttp.ClientSession() as session:
        while loop.time() < deadline:
            try:
                async with session.get(served.make_url("/readyz")) as resp:
                    if resp.status == 200:
                        return served
            except aiohttp.ClientError:
                pass
            assert process.poll() is None, log_path.read_text(errors="replace")[-4000:]
            await asyncio.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError(f"gateway did not become ready: {log_path.read_text(errors='replace')[-4000:]}")


def writer_processes(parent: int) -> list[int]:
    """The inference writer processes the gateway `parent` started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if b"gateway.inference.child" in cmdline and int(stat.rpartition(")")[2].split()[1]) == parent:
            found.append(int(entry.name))
    return found


@pytest.fixture
async def served(tmp_path: Path, aiohttp_server) -> AsyncIterator[tuple[Served, Path, Path]]:
    upstream = await aiohttp_server(FakeOpenAI().app())
    chdb, spool = tmp_path / "chdb", tmp_path / "spool"
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(POLICY, url=str(upstream.make_url("/v1")), chdb=str(chdb), spool=str(spool)))
    gateway = await start_in_own_process_group(path)
    yield gateway, chdb, spool
    if gateway.process.poll() is None:
        os.killpg(gateway.process.pid, signal.SIGKILL)
        gateway.process.wait(timeout=30)


def ctrl_c(gateway: int, _writer: int) -> None:
    """What a terminal does: SIGINT to the foreground process group."""
    os.killpg(gateway, signal.SIGINT)


def systemd_stop(gateway: int, writer: int) -> None:
    """What systemd's default KillMode=control-group does: SIGTERM to every process of the unit, at once."""
    os.kill(writer, signal.SIGTERM)
    os.killpg(gateway, signal.SIGTERM)


@pytest.mark.parametrize("stop", [ctrl_c, systemd_stop])
async def test_a_stop_signal_to_every_process_leaves_every_row_in_the_table(served, stop) -> None:
    gateway, chdb, spool = served
    client = sdk(gateway)
    for index in range(REQUESTS):
        messages = [{"role": "user", "content": f"request {index}"}]
        if index % 2:
            stream = await client.chat.completions.create(model="chat-default", messages=messages, stream=True)
            assert "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        else:
            reply = await client.chat.completions.create(model="chat-default", messages=messages)
            assert reply.choices[0].message.content
    writers = writer_processes(gateway.process.pid)
    assert len(writers) == 1
    assert os.getpgid(writers[0]) != gateway.process.pid, "the writer is out of the group Ctrl-C signals"

    stop(gateway.process.pid, writers[0])
    assert await asyncio.to_thread(gateway.process.wait, 60) == 0
    logs = gateway.log_path.read_text(errors="replace")

    assert not alive(writers[0])
    assert await asyncio.to_thread(chdb_row_counts, chdb) == (REQUESTS, REQUESTS), logs[-4000:]
    assert sorted(spool.glob("*.jsonl")) == []
    assert "rows in the spool" not in logs and "rows still in memory" not in logs
    assert "stopped" in logs
