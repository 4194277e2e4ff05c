"""Helpers for the supervisor's tests: a slow upstream that counts what it holds, the processes and sockets of a gateway."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.conftest import ALICE_KEY
from tests.served import Served, alive

POLICY = """
server: {{shutdown_timeout_s: {shutdown}, watch_interval_s: 60}}
providers:
  up: {{type: openai, base_url: "{url}", api_key: "sk-upstream-supervised"}}
routes:
  chat-default: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
  chat-hang: {{targets: [{{provider: up, model: hang}}]}}
"""
CHAT = {"model": "chat-default", "messages": [{"role": "user", "content": "hi"}]}
HEADERS = {"Authorization": f"Bearer {ALICE_KEY}"}


class SlowUpstream:
    """Answers every chat completion after `hold_s` (model `hang`: never); `held` is how many it holds right now."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self.held = 0

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.held += 1
        try:
            await asyncio.sleep(3600 if body["model"] == "hang" else self.hold_s)
        finally:
            self.held -= 1
        return web.json_response({
            "id": "chatcmpl-slow", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        found.update(int(child) for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    return found


async def worker_pids(served: Served, count: int, timeout_s: float = 60.0) -> set[int]:
    """The pids of the workers that answer /healthz on fresh connections, once `count` different ones have."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(served.make_url("/healthz")) as resp:
                    seen.add((await resp.json())["pid"])
            except aiohttp.ClientError:
                pass
            live = {pid for pid in seen if alive(pid)}
            if len(live) >= count:
                return live
            await asyncio.sleep(0.02)
    raise AssertionError(f"only workers {seen} answered")


def _tcp_rows() -> list[list[str]]:
    return [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process `pid` has open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            # Closed since the listing (a scrape's connection, say): not one the process holds.
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def connections_held(pid: int, port: int) -> int:
    """Client connections to `port` that process `pid` holds: the ones it accepted (its open sockets) and the ones
    waiting in its listening socket's accept queue. A SIGKILL cuts exactly these."""
    inodes = socket_inodes(pid)
    held = 0
    for row in _tcp_rows():
        local_port, state, queues, inode = int(row[1].split(":")[1], 16), row[3], row[4], row[9]
        if local_port != port or inode not in inodes:
            continue
        if state == "01":  # ESTABLISHED
            held += 1
        elif state == "0A":  # LISTEN: the receive queue is its accept queue
            held += int(queues.split(":")[1], 16)
    return held


def wait_sockets_closed(inodes: set[str], timeout_s: float) -> None:
    """Blocks, without yielding to the event loop, until no TCP socket of `inodes` is open. A killed process's main
    thread shows as exited before its last thread has closed the files they share, so its state says too little."""
    deadline = time.monotonic() + timeout_s
    while any(row[9] in inodes for row in _tcp_rows()):
        assert time.monotonic() < deadline, f"sockets still open {timeout_s} s after SIGKILL"
        time.sleep(0.001)
