"""`lockgate serve` in a subprocess, as a user runs it."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie nobody has reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


_COUNT_ROWS = ("import sys\nfrom gateway.inference import connect\nclient = connect('chdb://' + sys.argv[1])\n"
               "print(*client.query('SELECT count(), uniqExact(request_id) FROM lockgate.inference').result_rows[0])\n"
               "client.close()\n")


def chdb_row_counts(folder: Path) -> tuple[int, int]:
    """Rows and distinct request ids in a chdb folder's inference table, read by a process of its own: only once
    the gateway that held the folder has exited."""
    done = subprocess.run([sys.executable, "-c", _COUNT_ROWS, str(folder)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-4000:]
    rows, ids = done.stdout.split()
    return int(rows), int(ids)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, process: subprocess.Popen[bytes], port: int, path: Path, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.path = path
        self.log_path = log_path

    def make_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def logs(self) -> str:
        """Everything the gateway logged; waits for it to exit first."""
        self.process.wait(timeout=60)
        return self.log_path.read_text(errors="replace")


async def start_gateway(path: Path, *args: str, ready_timeout_s: float = 20.0) -> Served:
    """Starts `lockgate serve` and waits until /readyz answers 200; its log goes to a file beside the policy."""
    port = free_port()
    env = {**os.environ, "LOCKGATE_LOG_LEVEL": "DEBUG"}
    log_path = path.with_suffix(f".{port}.log")
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", str(path), "--port", str(port), *args],
                                   stderr=log, stdout=subprocess.DEVNULL, env=env)
    served = Served(process, port, path, log_path)
    deadline = asyncio.get_running_loop().time() + ready_timeout_s
    async with aiohttp.ClientSession() as session:
        while asyncio.get_running_loop().time() < deadline:
            try:
                async with session.get(served.make_url("/readyz")) as resp:
                    if resp.status == 200:
                        return served
            except aiohttp.ClientError:
                pass
            assert process.poll() is None, log_path.read_text(errors="replace")[-4000:]
            await asyncio.sleep(0.1)
    process.kill()
    raise AssertionError(f"gateway did not become ready: {log_path.read_text(errors='replace')[-4000:]}")
