"""One /metrics for every worker: whichever worker a scrape reaches, it counts the requests of all of them, of the dead
ones too; gauges combine as they mean; a previous run's files are gone."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from tests.conftest import policy_text
from tests.gateway.supervised import CHAT, HEADERS, POLICY, SlowUpstream, connections_held, worker_pids
from tests.served import Served, alive, free_port, start_gateway

K = 40
HANGING = 6
REQUESTS = 'lockgate_requests_total{endpoint="chat",route="chat-default",status="200"}'
INFERENCE = """
inference_table:
  enabled: true
  clickhouse: "http://127.0.0.1:{down}"
  spool_dir: "{spool}"
  flush_interval_ms: 200
"""


@pytest.fixture
async def upstream_url(aiohttp_server) -> str:
    return str((await aiohttp_server(SlowUpstream(0.0).app())).make_url("/v1"))


async def _served(tmp_path: Path, url: str, extra: str = "", **env: str) -> Served:
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(POLICY + extra, url=url, shutdown=5, down=free_port(), spool=tmp_path / "spool"))
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        return await start_gateway(path, "--workers", "2", ready_timeout_s=60)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


@pytest.fixture
async def metrics_dir(tmp_path: Path) -> Path:
    """An operator's PROMETHEUS_MULTIPROC_DIR holding a previous run's counter file (1000 requests)."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    stale = MmapedDict(str(folder / "counter_999999.db"))
    stale.write_value(mmap_key("lockgate_requests", "lockgate_requests_total", ["route", "endpoint", "status"],
                               ["chat-default", "chat", "200"], "Requests answered"), 1000.0, 0.0)
    stale.close()
    return folder


@pytest.fixture
async def served(tmp_path: Path, upstream_url: str, metrics_dir: Path) -> AsyncIterator[Served]:
    gateway = await _served(tmp_path, upstream_url, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    yield gateway
    if gateway.process.poll() is None:
        gateway.process.terminate()
        gateway.process.wait(timeout=60)


async def scrape(served: Served) -> str:
    """One scrape on a fresh connection, so that any worker may answer it."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session, \
            session.get(served.make_url("/metrics")) as resp:
        assert resp.status == 200
        return await resp.text()


def value(text: str, sample: str) -> float | None:
    found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return None if found is None else float(found[1])


async def send(served: Served, count: int) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for _ in range(count):
            async with session.post(served.make_url("/v1/chat/completions"), json=CHAT, headers=HEADERS) as resp:
                assert resp.status == 200, await resp.text()


def requests_by_process(folder: Path) -> dict[int, float]:
    counts = {}
    for path in folder.glob("counter_*.db"):
        merged = MultiProcessCollector.merge([str(path)])
        counts[int(path.stem.split("_")[1])] = sum(s.value for m in merged if m.name == "lockgate_requests"
                                                   for s in m.samples if s.name == "lockgate_requests_total")
    return counts


async def test_one_scrape_counts_every_workers_requests(served: Served, metrics_dir: Path) -> None:
    workers = await worker_pids(served, 2)
    await send(served, K)
    by_process = requests_by_process(metrics_dir)
    assert 999999 not in by_process, "the previous run's file is still there"
    assert all(by_process.get(pid, 0) > 0 for pid in workers), f"one worker served all of them: {by_process}"
    for _ in range(6):
        text = await scrape(served)
        assert value(text, REQUESTS) == K
        assert value(text, "lockgate_workers_alive") == 2
        assert "pid=" not in text, "a gauge is shown per process instead of combined"

    # Requests that never end, on both workers: the in-flight gauge adds up over them, and forgets the dead one's.
    hanging = [asyncio.create_task(_hang(served)) for _ in range(HANGING)]
    await _until(served, lambda text: value(text, "lockgate_in_flight_requests") == HANGING)
    victim = min(workers)
    on_victim = connections_held(victim, served.port)
    os.kill(victim, signal.SIGKILL)
    await worker_pids(served, 2, timeout_s=60)
    assert not list(metrics_dir.glob(f"gauge_live*_{victim}.db")), "the dead worker's gauges still count"
    await _until(served, lambda text: value(text, "lockgate_in_flight_requests") == HANGING - on_victim)
    await send(served, 2)
    text = await scrape(served)
    assert value(text, REQUESTS) == K + 2, "the dead worker's requests are no longer counted"
    assert value(text, 'lockgate_worker_restarts_total{cause="SIGKILL"}') == 1
    for task in hanging:
        task.cancel()
    await asyncio.gather(*hanging, return_exceptions=True)


async def _hang(served: Served) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        await session.post(served.make_url("/v1/chat/completions"), json={**CHAT, "model": "chat-hang"}, headers=HEADERS)


async def _until(served: Served, met, timeout_s: float = 30) -> None:
    """Until a scrape meets `met`: sampled gauges are written every second, by each worker."""
    deadline = time.monotonic() + timeout_s
    while not met(text := await scrape(served)):
        assert time.monotonic() < deadline, text
        await asyncio.sleep(0.2)


async def test_an_event_loop_stall_of_one_worker_shows_in_any_scrape(served: Served) -> None:
    workers = await worker_pids(served, 2)
    stalled = min(workers)
    os.kill(stalled, signal.SIGSTOP)
    await asyncio.sleep(0.5)
    os.kill(stalled, signal.SIGCONT)
    deadline = time.monotonic() + 20
    while (value(await scrape(served), "lockgate_event_loop_lag_max_seconds") or 0.0) < 0.4:
        assert time.monotonic() < deadline, "the stall never showed"
        await asyncio.sleep(0.2)
    assert all(alive(pid) for pid in workers)


async def test_the_writers_gauges_are_sampled_in_every_worker(tmp_path: Path, upstream_url: str) -> None:
    """Nothing listens at the ClickHouse DSN: every worker's writer spools, and the spool gauge shows its rows."""
    served = await _served(tmp_path, upstream_url, INFERENCE)
    try:
        await send(served, 10)
        deadline = time.monotonic() + 60
        while not (value(await scrape(served), "lockgate_inference_spool_rows") or 0.0) > 0:
            assert time.monotonic() < deadline, "the spooled rows never showed"
            await asyncio.sleep(0.25)
        text = await scrape(served)
        assert value(text, "lockgate_inference_queue_depth") is not None
    finally:
        served.process.send_signal(signal.SIGTERM)
        served.process.wait(timeout=60)


async def test_the_supervisors_own_folder_is_removed_at_the_stop(tmp_path: Path, upstream_url: str) -> None:
    served = await _served(tmp_path, upstream_url)
    workers = await worker_pids(served, 2)
    environ = Path(f"/proc/{min(workers)}/environ").read_bytes().split(b"\0")
    folder = Path(next(v for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")).split(b"=", 1)[1].decode())
    assert list(folder.glob("counter_*.db"))
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=60) == 0
    assert not folder.exists()
