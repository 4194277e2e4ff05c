"""`lockgate serve` in a subprocess, as a user runs it."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, process: subprocess.Popen[str], port: int, path: Path) -> None:
        self.process = process
        self.port = port
        self.path = path

    def make_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def logs(self) -> str:
        self.process.wait(timeout=30)
        assert self.process.stderr is not None
        return self.process.stderr.read()


async def start_gateway(path: Path, *args: str) -> Served:
    port = free_port()
    env = {**os.environ, "LOCKGATE_LOG_LEVEL": "DEBUG"}
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", str(path), "--port", str(port), *args],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    served = Served(process, port, path)
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            try:
                async with session.get(served.make_url("/readyz")) as resp:
                    if resp.status == 200:
                        return served
            except aiohttp.ClientError:
                pass
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            await asyncio.sleep(0.1)
    raise AssertionError("gateway did not become ready")
