"""Batch throughput and batch priority: `lockgate batch run` on 1,000 lines against a mock upstream, and an interactive
request's time to first token while a batch saturates the embedded engine.

Throughput (always): the mock upstream (benchmarks/mock_upstream.py) answers every request after a fixed latency
(`--latency-ms`, default 20), so the figure is what concurrency buys: at most concurrency / latency lines per second.
For each `--concurrency` the real command (`python -m gateway.cli batch run IN --route R --out OUT --concurrency N`) runs
the same input into a fresh OUT; its lines per second are its own summary's (from its app being up to its last result),
and the wall time of the whole command (start-up included) is beside them.

Priority (`--priority`, needs `lockgate models prepare smollm2-135m-instruct`): `measure_priority` below, the same
measurement tests/runtime/test_batch_priority.py asserts on.

The table goes to stdout, every figure to var/bench/batch.json (`--out`). Example:

    .venv/bin/python -m benchmarks.batch_bench                  # throughput, ~1 min
    .venv/bin/python -m benchmarks.batch_bench --priority       # and the embedded engine, a few minutes more
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.features import bench_caller  # noqa: E402
from benchmarks.mock_upstream import MockUpstreamProtocol, build_replies  # noqa: E402
from policies.keys import new_key  # noqa: E402

ROUTE = "bench-batch"
_SUMMARY = re.compile(rb"(\d+) in ([\d.]+) s \(([\d.]+) lines/s\), cost \$([\d.]+)")


class DelayedUpstreamProtocol(MockUpstreamProtocol):
    """The mock's precomputed answers, each sent `latency_s` after its request arrived, one at a time per connection
    (HTTP/1.1 without pipelining: the gateway opens a connection per request in flight)."""

    requests = 0

    def __init__(self, latency_s: float) -> None:
        super().__init__(build_replies(), 0.0)
        self.latency_s = latency_s

    def _answer(self, stream: bool) -> None:
        DelayedUpstreamProtocol.requests += 1
        self.pacing = asyncio.get_running_loop().create_task(self._answer_later(stream))

    async def _answer_later(self, stream: bool) -> None:
        await asyncio.sleep(self.latency_s)
        if self.transport is not None and not self.transport.is_closing():
            super()._answer(stream)
        self.pacing = None
        if self.buffer:
            self.data_received(b"")


@dataclass(frozen=True, slots=True)
class ThroughputRow:
    concurrency: int
    lines: int
    lines_per_s: float
    run_s: float
    wall_s: float
    bound_lines_per_s: float
    upstream_requests: int
    cost_usd: float


def upstream_policy(upstream: str, key: str) -> dict:
    return {
        **bench_caller(key),
        "providers": {"mock": {"type": "openai", "base_url": upstream, "api_key": "sk-mock"}},
        "routes": {ROUTE: {"targets": [{"provider": "mock", "model": "mock-model"}]}},
        "prices": {"mock-model": {"input": 0.15, "output": 0.6}},
    }


def batch_lines(count: int) -> bytes:
    return b"".join(orjson.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": {"model": ROUTE, "messages": [{"role": "user", "content": f"Classify ticket {i}"}],
                                           "max_tokens": 20}}) + b"\n" for i in range(count))


async def run_command(policy: Path, input_path: Path, out: Path, key: str, concurrency: int) -> tuple[bytes, float]:
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "batch", "run", str(input_path), "--route", ROUTE, "--out", str(out),
        "--policy", str(policy), "--concurrency", str(concurrency), cwd=ROOT,
        env={**os.environ, "LOCKGATE_API_KEY": key}, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, stderr = await process.communicate()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"lockgate batch run exited with {process.returncode}: {stderr.decode(errors='replace')}")
    return stderr, wall


async def throughput(lines: int, concurrencies: list[int], latency_s: float) -> list[ThroughputRow]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: DelayedUpstreamProtocol(latency_s), "127.0.0.1", 0, backlog=2048)
    port = server.sockets[0].getsockname()[1]
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="lockgate-batch-bench-") as folder:
            key = new_key()
            policy = Path(folder) / "policy.yaml"
            policy.write_text(json.dumps(upstream_policy(f"http://127.0.0.1:{port}/v1", key)))  # JSON is YAML
            input_path = Path(folder) / "in.jsonl"
            input_path.write_bytes(batch_lines(lines))
            for concurrency in concurrencies:
                out = Path(folder) / f"out-{concurrency}.jsonl"
                before = DelayedUpstreamProtocol.requests
                stderr, wall = await run_command(policy, input_path, out, key, concurrency)
                found = _SUMMARY.search(stderr)
                if found is None:
                    raise RuntimeError(f"no summary in the command's output: {stderr.decode(errors='replace')}")
                results = [orjson.loads(line) for line in out.read_bytes().splitlines()]
                ok = sum(row["response"] is not None and row["response"]["status_code"] == 200 for row in results)
                if ok != lines or len({row["custom_id"] for row in results}) != lines:
                    raise RuntimeError(f"concurrency {concurrency}: {ok} of {lines} lines answered 200")
                rows.append(ThroughputRow(concurrency, lines, float(found[3]), float(found[2]), wall,
                                          concurrency / latency_s, DelayedUpstreamProtocol.requests - before,
                                          float(found[4])))
                print(f"[throughput] concurrency {concurrency}: {float(found[3]):.1f} lines/s", file=sys.stderr)
    finally:
        server.close()
    return rows


def throughput_table(rows: list[ThroughputRow], latency_s: float) -> str:
    lines = [f"lockgate batch run, {rows[0].lines} lines, upstream latency {latency_s * 1000:.0f} ms",
             f"{'conc':>4} {'lines/s':>8} {'bound':>7} {'of bound':>8} {'run_s':>6} {'wall_s':>6} {'upstream':>8}"]
    for row in rows:
        lines.append(f"{row.concurrency:>4} {row.lines_per_s:>8.1f} {row.bound_lines_per_s:>7.0f} "
                     f"{row.lines_per_s / row.bound_lines_per_s:>8.0%} {row.run_s:>6.2f} {row.wall_s:>6.2f} "
                     f"{row.upstream_requests:>8}")
    return "\n".join(lines)


# ---- priority on the embedded engine -------------------------------------------------------------------------

PRIORITY_ROUTE = "chat-small"
INTERACTIVE_PROMPT = "What is the capital of France?"


@dataclass(frozen=True, slots=True)
class PriorityFigures:
    """Interactive time to first token (client side, through the gateway's HTTP API), the engine idle and with a
    batch holding `batch_concurrency` of its `max_num_seqs` seats."""

    max_num_seqs: int
    batch_concurrency: int
    batch_priority: int
    idle_ttft_s: list[float]
    busy_ttft_s: list[float]
    batch_running_at_each: list[int]
    batch_waiting_at_each: list[int]
    batch_lines_done: int
    loadavg_1m: float

    @property
    def idle_median_s(self) -> float:
        return statistics.median(self.idle_ttft_s)

    @property
    def busy_median_s(self) -> float:
        return statistics.median(self.busy_ttft_s)

    @property
    def ratio(self) -> float:
        return self.busy_median_s / self.idle_median_s


def priority_policy(model_path: Path, key: str, max_num_seqs: int, batch_concurrency: int, batch_priority: int) -> dict:
    return {
        **bench_caller(key),
        "providers": {"local": {"type": "embedded", "model": str(model_path),
                                "engine": {"max_model_len": 1024, "max_num_seqs": max_num_seqs}}},
        "routes": {PRIORITY_ROUTE: {"targets": [{"provider": "local"}],
                                    "batch": {"concurrency": batch_concurrency, "priority": batch_priority}}},
    }


async def _ttft(session: aiohttp.ClientSession, url: str, key: str, max_tokens: int = 8) -> float:
    body = {"model": PRIORITY_ROUTE, "messages": [{"role": "user", "content": INTERACTIVE_PROMPT}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True}
    started = time.perf_counter()
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as response:
        if response.status != 200:
            raise RuntimeError(f"interactive request: HTTP {response.status}: {await response.text()}")
        async for raw in response.content:
            if raw.startswith(b"data: {"):
                chunk = orjson.loads(raw[6:])
                if any(choice["delta"].get("content") for choice in chunk.get("choices", ())):
                    first = time.perf_counter() - started
                    break
        else:
            raise RuntimeError("the interactive stream ended without content")
    return first


def _batch_line(number: int, max_tokens: int) -> Any:
    from gateway.batch import Line

    body = {"model": PRIORITY_ROUTE, "messages": [{"role": "user", "content": f"Write a long story number {number}."}],
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    return Line(f"story-{number}", "/v1/chat/completions", body)


async def measure_priority(model_path: Path, *, max_num_seqs: int = 4, batch_concurrency: int = 3, samples: int = 5,
                           batch_max_tokens: int = 256, batch_priority: int = 1000, folder: Path) -> PriorityFigures:
    """One gateway app in this process (its HTTP API on a local port for the interactive requests, its batch engine
    `run_job` for the batch: the same engine, as a gateway running the Batch API has it). Idle TTFT, then the
    same request while the batch keeps `batch_concurrency` seats busy with long answers at `batch_priority`: in pairs,
    each busy sample under a batch started for it (and cancelled after it)."""
    from gateway.app import create_app
    from gateway.batch import Slots, run_job
    from gateway.context import GATEWAY

    key = new_key()
    policy = folder / "policy.yaml"
    policy.write_text(json.dumps(priority_policy(model_path, key, max_num_seqs, batch_concurrency, batch_priority)))
    app = create_app(policy, run_batches=False)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    gateway = app[GATEWAY]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    done: list[object] = []
    idle: list[float] = []
    busy: list[float] = []
    running: list[int] = []
    waiting: list[int] = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            await _ttft(session, url, key)  # starts the engine, and warms it
            provider = gateway.policy.providers["local"]
            principal = gateway.policy.keyring.authenticate(key)
            assert principal is not None
            # Idle and busy samples in pairs, close in time, so a neighbour's load on a shared machine hits both.
            for sample in range(samples):
                idle.append(await _ttft(session, url, key))
                stop = asyncio.Event()
                lines = (_batch_line(sample * 1000 + n, batch_max_tokens) for n in range(1000))
                batch = asyncio.get_running_loop().create_task(run_job(
                    gateway, principal, lines, set(), slots=Slots(), batch_id=f"batch_bench_{sample}",
                    expires_at=time.time() + 3600, cancelled=stop.is_set, emit=done.append))
                try:
                    await _until_running(provider, min(batch_concurrency, max_num_seqs))
                    running.append(provider.load()["running"])
                    waiting.append(provider.load()["waiting"])
                    busy.append(await _ttft(session, url, key))
                finally:
                    stop.set()
                    await batch
                # The batch's engine requests were aborted with its lines; a moment for the engine to drop them.
                await asyncio.sleep(0.5)
    finally:
        await runner.cleanup()
    return PriorityFigures(max_num_seqs, batch_concurrency, batch_priority, idle, busy, running, waiting, len(done),
                           os.getloadavg()[0])


async def _until_running(provider: Any, count: int, limit_s: float = 300.0) -> None:
    """Until the engine reports `count` sequences running (its figures come with each step's output)."""
    deadline = time.monotonic() + limit_s
    while provider.load()["running"] < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the batch never filled {count} seats: {provider.load()}")
        await asyncio.sleep(0.05)
    # A moment into the steady state, so the request lands in the middle of a decode step, not at a line's start.
    await asyncio.sleep(0.3)


def priority_table(figures: PriorityFigures) -> str:
    def ms(values: list[float]) -> str:
        return ", ".join(f"{v * 1000:.0f}" for v in values)

    return (f"embedded engine, max_num_seqs {figures.max_num_seqs}, batch concurrency {figures.batch_concurrency} "
            f"(priority {figures.batch_priority}), {figures.batch_lines_done} batch lines finished meanwhile, load average "
            f"{figures.loadavg_1m:.2f} on {os.cpu_count()} cores\n"
            f"interactive TTFT idle:  median {figures.idle_median_s * 1000:.0f} ms ({ms(figures.idle_ttft_s)})\n"
            f"interactive TTFT busy:  median {figures.busy_median_s * 1000:.0f} ms ({ms(figures.busy_ttft_s)}), "
            f"batch running {figures.batch_running_at_each}, waiting in the engine {figures.batch_waiting_at_each}\n"
            f"ratio busy / idle: {figures.ratio:.2f}x (goal <= 2x: {'meets' if figures.ratio <= 2 else 'MISSES'})")


async def run(options: argparse.Namespace) -> dict:
    report: dict[str, Any] = {"command": sys.argv, "cores": os.cpu_count(), "loadavg_start": os.getloadavg(),
                              "latency_ms": options.latency_ms}
    if options.concurrency:
        rows = await throughput(options.lines, options.concurrency, options.latency_ms / 1000)
        print(throughput_table(rows, options.latency_ms / 1000))
        report["throughput"] = [asdict(row) for row in rows]
    if options.priority:
        from runtime import prepare_model

        model = prepare_model("smollm2-135m-instruct")
        with tempfile.TemporaryDirectory(prefix="lockgate-batch-priority-") as folder:
            figures = await measure_priority(model, max_num_seqs=options.max_num_seqs,
                                             batch_concurrency=options.batch_concurrency, samples=options.samples,
                                             batch_max_tokens=options.batch_max_tokens,
                                             batch_priority=options.batch_priority, folder=Path(folder))
        print(priority_table(figures))
        report["priority"] = {**asdict(figures), "idle_median_s": figures.idle_median_s,
                              "busy_median_s": figures.busy_median_s, "ratio": figures.ratio}
    report["loadavg_end"] = os.getloadavg()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32], help="none: no throughput runs")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="the mock upstream's answer time")
    parser.add_argument("--priority", action="store_true", help="also measure TTFT under a batch on the embedded engine")
    parser.add_argument("--samples", type=int, default=5, help="interactive requests idle, and again under the batch")
    parser.add_argument("--max-num-seqs", type=int, default=4, help="the engine's seats")
    parser.add_argument("--batch-concurrency", type=int, default=3,
                        help="the route's batch.concurrency; at max-num-seqs or above, batch lines also wait in the engine")
    parser.add_argument("--batch-max-tokens", type=int, default=256, help="each batch line's answer (ignore_eos)")
    parser.add_argument("--batch-priority", type=int, default=1000,
                        help="the route's batch.priority; 0 (the interactive requests' own) is the control without it")
    parser.add_argument("--out", default=str(ROOT / "var" / "bench" / "batch.json"))
    options = parser.parse_args()
    report = asyncio.run(run(options))
    Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    Path(options.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
