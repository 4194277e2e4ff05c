"""Shadow traffic's cost to the client: the same route with a 100% shadow and without, side by side in one run.

    .venv/bin/python -m benchmarks.shadow_bench [--rate 100] [-c 4] [-d 3] [--rounds 3] [--shadow-delay-ms 200]

The gateway runs in this process (uvloop), the clients and both mock upstreams in their own processes.
`plain` and `mirrored` call the same fast upstream; `mirrored` also mirrors every request to a shadow route whose
upstream answers only after about --shadow-delay-ms. Rounds alternate the two routes so drift on the machine hits both;
the figures are the median over rounds of each round's p50 and p99, and the ratio mirrored / plain.

Two loads: `paced` sends --rate requests per second on a fixed schedule (an open loop, the gateway has idle time:
what a client sees when the gateway is not CPU-bound); `saturated` runs -c closed-loop connections as fast as the
gateway answers, where the shadow's own upstream call (CPU in the same process) shows up as lost throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import uvloop
from aiohttp import web

from benchmarks.loadgen import LoadSpec, chat_body, percentiles, run_load_subprocess
from benchmarks.mock_upstream import build_replies, start_mock_upstream
from policies.keys import hash_key

KEY = "lg-bench-shadow-key-0001"
POLICY = """\
version: 1
keys: [{{id: bench, sha256: "{sha}", user: bench}}]
users: {{bench: {{groups: [bench]}}}}
roles: {{caller: {{models: ["*"]}}}}
bindings: [{{role: caller, user: bench}}]
providers:
  fast: {{type: openai, base_url: "http://127.0.0.1:{fast}/v1", max_connections: 512}}
  slow: {{type: openai, base_url: "http://127.0.0.1:{slow}/v1", max_connections: 2048}}
routes:
  plain: {{targets: [{{provider: fast, model: mock-model}}]}}
  mirrored: {{targets: [{{provider: fast, model: mock-model}}], shadow: {{route: candidate, percent: 100}}}}
  candidate: {{targets: [{{provider: slow, model: mock-model}}]}}
"""


class _SlowReply(asyncio.Protocol):
    """Answers each request with the mock's completion after 0.5 to 1.5 times the delay: a slow candidate model.

    The spread keeps shadow answers from landing in lockstep with the paced client's next request.
    """

    def __init__(self, reply: bytes, delay_s: float) -> None:
        self.reply, self.delay_s = reply, delay_s
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        # Bodies here are small enough to arrive with their head; one answer per received request.
        if b"\r\n\r\n" in data:
            asyncio.get_running_loop().call_later(self.delay_s * random.uniform(0.5, 1.5), self._answer)

    def _answer(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.reply)


async def _serve_upstreams(delay_s: float) -> None:
    fast = await start_mock_upstream()
    reply = build_replies().completion
    slow = await asyncio.get_running_loop().create_server(lambda: _SlowReply(reply, delay_s), "127.0.0.1", 0,
                                                          backlog=2048)
    print(fast.sockets[0].getsockname()[1], slow.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


async def _paced_client(url: str, route: str, rate: float, duration_s: float) -> None:
    """Sends one request every 1/rate seconds whatever the answers do; prints the latencies in seconds as JSON."""
    latencies: list[float] = []
    body = chat_body(route, False)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one() -> None:
            sent = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status == 200:
                    latencies.append(time.perf_counter() - sent)

        loop = asyncio.get_running_loop()
        start = loop.time() + 0.2
        tasks = []
        for i in range(int(rate * duration_s)):
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    print(json.dumps(latencies))


def _run_paced(url: str, route: str, rate: float, duration_s: float) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-m", "benchmarks.shadow_bench", "--paced-client", url, route,
                           "--rate", str(rate), "-d", str(duration_s)], capture_output=True, text=True, check=True)
    return {**percentiles(json.loads(done.stdout)), "requests": len(json.loads(done.stdout))}


def _run_saturated(url: str, route: str, connections: int, duration_s: float) -> dict[str, float]:
    spec = LoadSpec(url, chat_body(route, False), {"Authorization": f"Bearer {KEY}"}, connections, duration_s)
    result = run_load_subprocess(spec)
    return {**result.latency_ms, "requests": result.requests - result.errors}


def _table(title: str, rounds: dict[str, list[dict[str, float]]]) -> None:
    print(title)
    print(f"  {'route':<10} {'requests':>9} {'p50 ms':>8} {'p99 ms':>8} {'gateway CPU ms/request':>24}")
    figures = {}
    for route, results in rounds.items():
        p50 = statistics.median(r["p50"] for r in results)
        p99 = statistics.median(r["p99"] for r in results)
        figures[route] = (p50, p99)
        requests = sum(r["requests"] for r in results)
        cpu = f"{sum(r['cpu_s'] for r in results) / requests * 1000:.2f}" if "cpu_s" in results[0] else "-"
        print(f"  {route:<10} {int(requests):>9} {p50:>8.2f} {p99:>8.2f} {cpu:>24}")
    (p50, p99), (m50, m99) = figures["plain"], figures["mirrored"]
    print(f"  ratio mirrored/plain: p50 {m50 / p50:.2f}x, p99 {m99 / p99:.2f}x")


async def _bench(args: argparse.Namespace, fast: int, slow: int) -> None:
    # Imported here so the client and upstream processes, which run this module too, start without the gateway.
    from gateway.app import create_app
    from gateway.context import GATEWAY

    folder = Path(tempfile.mkdtemp(prefix="shadow-bench-"))
    policy = folder / "policy.yaml"
    policy.write_text(POLICY.format(sha=hash_key(KEY), fast=fast, slow=slow))
    app = create_app(policy)
    app[GATEWAY].resilience.shadows.max_in_flight = args.max_shadows
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    paced: dict[str, list[dict[str, float]]] = {"plain": [], "mirrored": []}
    saturated: dict[str, list[dict[str, float]]] = {"plain": [], "mirrored": []}
    shadows = app[GATEWAY].resilience.shadows
    try:
        for _ in range(args.rounds):
            for route in paced:
                cpu = time.process_time()
                paced[route].append(await asyncio.to_thread(_run_paced, url, route, args.rate, args.duration))
                paced[route][-1]["cpu_s"] = time.process_time() - cpu
            for route in saturated:
                saturated[route].append(await asyncio.to_thread(_run_saturated, url, route, args.connections,
                                                                args.duration))
        in_flight = shadows.in_flight
    finally:
        await runner.cleanup()
    print(f"{args.rounds} rounds of {args.duration:g} s per route and load; non-streamed chat; the shadow upstream "
          f"answers after {args.shadow_delay_ms:g} ms")
    _table(f"paced, {args.rate:g} requests/s:", paced)
    _table(f"saturated, {args.connections} closed-loop connections:", saturated)
    print(f"shadow calls in flight when the last round ended: {in_flight} (bound {args.max_shadows})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second of the paced load")
    parser.add_argument("-c", "--connections", type=int, default=4, help="connections of the saturating load")
    parser.add_argument("-d", "--duration", type=float, default=3.0, help="seconds measured per route per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shadow-delay-ms", type=float, default=200.0)
    parser.add_argument("--max-shadows", type=int, default=1024, help="shadow calls allowed in flight")
    parser.add_argument("--paced-client", nargs=2, metavar=("URL", "ROUTE"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-upstreams", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.paced_client:
        uvloop.run(_paced_client(*args.paced_client, args.rate, args.duration))
        return 0
    if args.serve_upstreams:
        uvloop.run(_serve_upstreams(args.shadow_delay_ms / 1000))
        return 0
    upstreams = subprocess.Popen([sys.executable, "-m", "benchmarks.shadow_bench", "--serve-upstreams",
                                  "--shadow-delay-ms", str(args.shadow_delay_ms)], stdout=subprocess.PIPE, text=True)
    try:
        assert upstreams.stdout is not None
        fast, slow = (int(p) for p in upstreams.stdout.readline().split())
        uvloop.run(_bench(args, fast, slow))
    finally:
        upstreams.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            upstreams.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
