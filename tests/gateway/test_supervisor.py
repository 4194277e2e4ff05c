"""`lockgate serve --workers 2` as an operator meets it: a killed worker is replaced while clients keep being served,
signals reach every worker, one deadline stops them all, and a worker that cannot start makes the supervisor give up."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.context import GATEWAY
from gateway.supervisor import MAX_FAILED_STARTS, backoff_s, exit_cause
from tests.conftest import policy_text
from tests.gateway.supervised import (
    CHAT,
    HEADERS,
    POLICY,
    SlowUpstream,
    children,
    connections_held,
    socket_inodes,
    wait_sockets_closed,
    worker_pids,
)
from tests.served import Served, alive, chdb_row_counts, start_gateway

CLIENTS = 24
HOLD_S = 0.4


@pytest.fixture
async def upstream(aiohttp_server) -> tuple[SlowUpstream, str]:
    slow = SlowUpstream(HOLD_S)
    server = await aiohttp_server(slow.app())
    return slow, str(server.make_url("/v1"))


async def serve_two(tmp_path: Path, url: str, shutdown_s: float = 10) -> Served:
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(POLICY, url=url, shutdown=shutdown_s))
    return await start_gateway(path, "--workers", "2", ready_timeout_s=60)


@pytest.fixture
async def served(tmp_path: Path, upstream) -> AsyncIterator[Served]:
    gateway = await serve_two(tmp_path, upstream[1])
    yield gateway
    if gateway.process.poll() is None:
        gateway.process.terminate()
        gateway.process.wait(timeout=60)


class Load:
    """CLIENTS clients, each sending chat completions one after the other, every one on a new connection."""

    def __init__(self, served: Served) -> None:
        self.url = served.make_url("/v1/chat/completions")
        self.ok = 0
        self.failed = 0
        self.running = True

    async def client(self) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            while self.running:
                try:
                    async with session.post(self.url, json=CHAT, headers=HEADERS) as resp:
                        await resp.read()
                        if resp.status == 200:
                            self.ok += 1
                        else:
                            self.failed += 1
                except (TimeoutError, aiohttp.ClientError):
                    self.failed += 1

    async def until(self, predicate, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, "condition not met in time"
            await asyncio.sleep(0.05)


async def test_a_killed_worker_is_replaced_and_only_its_own_requests_fail(served: Served, upstream) -> None:
    slow, _ = upstream
    workers = await worker_pids(served, 2)
    assert children(served.process.pid) >= workers
    load = Load(served)
    clients = [asyncio.create_task(load.client()) for _ in range(CLIENTS)]
    await load.until(lambda: load.ok >= 2 * CLIENTS and slow.held >= CLIENTS // 2, 60)
    victim = min(workers)
    # Nothing awaits from the count until the victim's sockets are closed. So no client of this loop opens a
    # connection between the count and the kill, nor reconnects while the dying victim still listens (its files close
    # one by one: a reconnect queued on its listener was reset, a failure the count missed). Stopped, the victim
    # accepts nothing between the count's two reads; the pause lets handshakes already begun finish.
    os.kill(victim, signal.SIGSTOP)
    time.sleep(0.05)
    on_victim = connections_held(victim, served.port)
    sockets = socket_inodes(victim)
    failed_before = load.failed
    os.kill(victim, signal.SIGKILL)
    wait_sockets_closed(sockets, timeout_s=10)
    replaced = await worker_pids(served, 2, timeout_s=60)
    assert victim not in replaced and len(replaced - workers) == 1
    served_after = load.ok
    await load.until(lambda: load.ok >= served_after + 2 * CLIENTS, 60)
    load.running = False
    await asyncio.gather(*clients)

    assert failed_before == 0
    assert on_victim > 0, "the killed worker held no request: the test measured nothing"
    assert load.failed <= on_victim, f"{load.failed} requests failed, the killed worker held {on_victim}"
    async with aiohttp.ClientSession() as session, session.get(served.make_url("/metrics")) as resp:
        text = await resp.text()
    assert 'lockgate_worker_restarts_total{cause="SIGKILL"} 1.0' in text
    assert "lockgate_workers_alive 2.0" in text
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=60) == 0
    logs = served.logs()
    assert f"(pid {victim}) exited after serving" in logs and ": SIGKILL; starting it again in" in logs


async def test_sighup_reaches_every_worker(served: Served) -> None:
    workers = await worker_pids(served, 2)
    text = served.path.read_text()
    stat = served.path.stat()
    served.path.write_text(text.replace("routes:\n", "routes:\n  chat-hup: {targets: [{provider: up}]}\n"))
    os.utime(served.path, (stat.st_atime, stat.st_mtime))
    served.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    reloaded: set[int] = set()
    while reloaded != workers:
        assert time.monotonic() < deadline, f"only {reloaded} of {workers} reloaded"
        await asyncio.sleep(0.1)
        lines = served.log_path.read_text().splitlines()
        reloaded = {pid for pid in workers if any(f"pid={pid}]" in line and "active (was" in line for line in lines)}
    assert all(alive(pid) for pid in workers)


async def test_sigterm_stops_every_worker_within_the_deadline(tmp_path: Path, upstream) -> None:
    """One worker holds a request that never ends, the other is frozen (SIGSTOP) and cannot even see its SIGTERM."""
    slow, url = upstream
    served = await serve_two(tmp_path, url, shutdown_s=2)
    workers = await worker_pids(served, 2)
    frozen = min(workers)
    hung = asyncio.create_task(_post(served, "chat-hang"))
    await Load(served).until(lambda: slow.held >= 1, 30)
    os.kill(frozen, signal.SIGSTOP)
    started = time.monotonic()
    served.process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(served.process.wait, 60)
    took = time.monotonic() - started
    assert code == 0
    assert took < 30, f"the stop took {took:.1f} s"
    assert not any(alive(pid) for pid in workers)
    assert (await hung) != 200
    logs = served.logs()
    assert f"(pid {frozen}) still running at the stop deadline: killed" in logs
    assert "all workers stopped" in logs


async def test_a_lost_supervisor_makes_its_workers_stop(served: Served, tmp_path: Path, upstream) -> None:
    """And the next start removes the metrics folder the killed supervisor could not."""
    workers = await worker_pids(served, 2)
    environ = Path(f"/proc/{min(workers)}/environ").read_bytes().split(b"\0")
    folder = Path(next(v for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")).split(b"=", 1)[1].decode())
    served.process.kill()
    served.process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "workers outlived their supervisor"
        await asyncio.sleep(0.1)
    assert "the supervisor is gone: stopping" in served.log_path.read_text()
    assert folder.is_dir()
    (tmp_path / "next").mkdir()
    following = await serve_two(tmp_path / "next", upstream[1])
    try:
        assert not folder.exists()
    finally:
        following.process.send_signal(signal.SIGTERM)
        assert following.process.wait(timeout=60) == 0


async def test_a_worker_that_cannot_start_makes_the_supervisor_exit_non_zero(tmp_path: Path, upstream) -> None:
    """The port is held by a socket without SO_REUSEPORT: every worker fails to bind, again and again."""
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(POLICY, url=upstream[1], shutdown=2))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "serve", str(path), "--port", str(port), "--workers", "2",
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, stderr = await asyncio.wait_for(process.communicate(), 180)
    logs = stderr.decode(errors="replace")
    assert process.returncode == 1, logs[-3000:]
    assert f"{MAX_FAILED_STARTS} times in a row before serving" in logs and "giving up" in logs
    assert "exited before serving: exit code 1; starting it again in 0.5 s" in logs
    assert "starting it again in 1.0 s" in logs


def test_exit_causes_and_backoff_as_the_log_names_them() -> None:
    assert exit_cause(-signal.SIGKILL) == "SIGKILL"
    assert exit_cause(-signal.SIGSEGV) == "SIGSEGV"
    assert exit_cause(3) == "exit code 3"
    assert [backoff_s(n) for n in range(4)] == [0.0, 0.5, 1.0, 2.0]
    assert backoff_s(50) == 30.0


async def _post(served: Served, model: str) -> int:
    async with aiohttp.ClientSession() as session:
        try:
            async with session.post(served.make_url("/v1/chat/completions"), json={**CHAT, "model": model},
                                    headers=HEADERS) as resp:
                await resp.read()
                return resp.status
        except aiohttp.ClientError:
            return 0


async def test_readyz_says_draining_once_this_workers_stop_began(make_gateway, upstream) -> None:
    server = await make_gateway(POLICY, url=upstream[1], shutdown=5)
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/readyz")) as resp:
            ready = await resp.json()
        assert resp.status == 200 and ready["status"] == "ready" and ready["pid"] == os.getpid()
        server.app[GATEWAY].stop_deadline = time.monotonic() + 5
        async with session.get(server.make_url("/readyz")) as resp:
            assert resp.status == 503 and (await resp.json())["status"] == "draining"


CHDB = """
inference_table:
  enabled: true
  clickhouse: "chdb://{chdb}"
  spool_dir: "{spool}"
  flush_interval_ms: 200
"""
ROWS_AFTER_RESTART = 30


async def test_a_restarted_worker_hands_its_rows_to_the_supervisors_chdb_writer(tmp_path: Path, upstream) -> None:
    chdb, spool = tmp_path / "chdb", tmp_path / "spool"
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(POLICY + CHDB, url=upstream[1], shutdown=30, chdb=chdb, spool=spool))
    served = await start_gateway(path, "--workers", "2", ready_timeout_s=120)
    try:
        workers = await worker_pids(served, 2)
        os.kill(min(workers), signal.SIGKILL)
        replaced = await worker_pids(served, 2, timeout_s=60)
        (new,) = replaced - workers
        socket_env = [v for v in Path(f"/proc/{new}/environ").read_bytes().split(b"\0")
                      if v.startswith(b"LOCKGATE_INFERENCE_SOCKET=")]
        assert socket_env, "the restarted worker does not know the shared writer"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            for _ in range(ROWS_AFTER_RESTART):
                async with session.post(served.make_url("/v1/chat/completions"), json=CHAT, headers=HEADERS) as resp:
                    assert resp.status == 200, await resp.text()
    finally:
        served.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(served.process.wait, 90) == 0
    assert chdb_row_counts(chdb) == (ROWS_AFTER_RESTART, ROWS_AFTER_RESTART)
    assert not list(spool.glob("*.jsonl")), "rows were left in the spool"
