"""The gateway's embedded vLLM engine vs vLLM's own OpenAI server: time to first token and tokens/s, side by side.

Targets, started, measured and stopped here one after the other (`--targets`, in that order), so that only one
engine runs at a time:
  gateway    `python -m gateway.cli serve` on a generated policy whose only provider is the embedded model
  vllm       `python -m vllm.entrypoints.openai.api_server` on the same folder and the same engine arguments
  in-process the runtime package's EmbeddedEngine called directly, no HTTP
`--gateway-url` also measures a gateway that is already running, before the others.

Every request streams a chat completion of exactly --max-tokens tokens (ignore_eos), so all targets do the same
work. The table goes to stdout, every figure to var/bench/runtime.json (`--out`). Example (CPU, after
`lockgate models prepare smollm2-135m-instruct`), gateway first and last to expose drift:

    .venv/bin/python benchmarks/runtime_bench.py --targets gateway vllm gateway
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from policies.keys import hash_key, new_key  # noqa: E402
from runtime import EmbeddedEngine, resolve_model  # noqa: E402
from runtime.engine_args import COMMON_DEFAULTS, CPU_DEFAULTS, build_engine_args, prepare_environment  # noqa: E402

PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle."
SERVED_NAME = "bench"
ROUTE = "bench-embedded"
START_LIMIT_S = 600.0
# Each item: (content delta or "" for a chunk without content, completion tokens when the chunk carries usage).
StreamFactory = Callable[[dict[str, Any]], AsyncIterator[tuple[str, int | None]]]


@dataclass(frozen=True, slots=True)
class Sample:
    ttft_s: float
    total_s: float
    tokens: int


@dataclass(frozen=True, slots=True)
class Level:
    """One concurrency level of one target: the figures of the table, and the CPU the server's processes used."""

    concurrency: int
    requests: int
    tokens_each: list[int]
    ttft_p50_s: float
    ttft_p95_s: float
    tokens_per_s_per_stream: float
    tokens_per_s_total: float
    wall_s: float
    front_cpu_ms_per_token: float | None
    engine_cpu_ms_per_token: float | None
    loadavg_1m: float


@dataclass(slots=True)
class Phase:
    target: str
    start_s: float
    levels: list[Level]
    leftover_processes: list[str]


def summarize(concurrency: int, samples: list[Sample], wall_s: float, cpu: tuple[float, float] | None) -> Level:
    ttfts = sorted(sample.ttft_s for sample in samples)
    tokens = sum(sample.tokens for sample in samples)
    per_stream = statistics.mean((s.tokens - 1) / (s.total_s - s.ttft_s) for s in samples if s.total_s > s.ttft_s)
    return Level(
        concurrency=concurrency,
        requests=len(samples),
        tokens_each=sorted({sample.tokens for sample in samples}),
        ttft_p50_s=statistics.median(ttfts),
        ttft_p95_s=ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
        tokens_per_s_per_stream=per_stream,
        tokens_per_s_total=tokens / wall_s,
        wall_s=wall_s,
        front_cpu_ms_per_token=None if cpu is None else 1000 * cpu[0] / tokens,
        engine_cpu_ms_per_token=None if cpu is None else 1000 * cpu[1] / tokens,
        loadavg_1m=os.getloadavg()[0],
    )


def request_body(model: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def measure(stream: StreamFactory, body: dict[str, Any], concurrency: int, requests: int,
                  server_pid: int | None) -> Level:
    samples: list[Sample] = []
    counter = iter(range(requests))

    async def worker() -> None:
        for _ in counter:
            started = time.perf_counter()
            first = 0.0
            deltas = 0
            reported: int | None = None
            async for text, usage_tokens in stream(body):
                if text:
                    deltas += 1
                    first = first or time.perf_counter() - started
                reported = usage_tokens if usage_tokens is not None else reported
            samples.append(Sample(first, time.perf_counter() - started, deltas if reported is None else reported))

    cpu_before = cpu_seconds(server_pid) if server_pid else None
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    cpu = None
    if cpu_before is not None and server_pid:
        cpu_after = cpu_seconds(server_pid)
        cpu = (cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1])
    return summarize(concurrency, samples, wall, cpu)


def cpu_seconds(root: int) -> tuple[float, float]:
    """CPU seconds (user + system) of the server's own process, and of all its descendants (the engine core)."""
    process = psutil.Process(root)
    front = sum(process.cpu_times()[:2])
    engine = 0.0
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            engine += sum(child.cpu_times()[:2])
    return front, engine


def http_stream(session: aiohttp.ClientSession, base_url: str, key: str | None) -> StreamFactory:
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    async def stream(body: dict[str, Any]) -> AsyncIterator[tuple[str, int | None]]:
        async with session.post(f"{base_url}/chat/completions", json=body, headers=headers) as response:
            if response.status != 200:
                raise RuntimeError(f"{base_url}: HTTP {response.status}: {await response.text()}")
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"{base_url}: error in stream: {chunk['error']}")
                for choice in chunk["choices"]:
                    yield choice["delta"].get("content") or "", None
                if chunk.get("usage"):
                    yield "", chunk["usage"]["completion_tokens"]

    return stream


def engine_stream(engine: EmbeddedEngine) -> StreamFactory:
    async def stream(body: dict[str, Any]) -> AsyncIterator[tuple[str, int | None]]:
        async for chunk in engine.stream_chat(body, f"bench-{time.perf_counter_ns()}"):
            for choice in chunk["choices"]:
                yield choice["delta"].get("content") or "", None
            if chunk.get("usage"):
                yield "", chunk["usage"]["completion_tokens"]

    return stream


def explicit_engine_args(overrides: dict[str, object]) -> dict[str, object]:
    """The engine arguments both servers get, spelled out, so neither depends on the other's defaults."""
    import torch

    args: dict[str, object] = {**COMMON_DEFAULTS, **({} if torch.cuda.is_available() else CPU_DEFAULTS)}
    return {**args, **overrides}


def gateway_policy(model_path: Path, engine_args: dict[str, object], key: str, port: int) -> str:
    policy = {
        "version": 1,
        "server": {"host": "127.0.0.1", "port": port},
        "keys": [{"id": "bench", "sha256": hash_key(key), "user": "bench"}],
        "users": {"bench": {"groups": ["bench"]}},
        "roles": {"caller": {"models": [ROUTE]}},
        "bindings": [{"role": "caller", "group": "bench"}],
        "providers": {"local": {"type": "embedded", "model": str(model_path), "engine": engine_args,
                                "served_model_name": SERVED_NAME}},
        "routes": {ROUTE: {"targets": [{"provider": "local"}]}},
    }
    return json.dumps(policy, indent=2)  # JSON is YAML


def vllm_command(model_path: Path, engine_args: dict[str, object], port: int) -> list[str]:
    args = build_engine_args(model_path, engine_args, SERVED_NAME, on_cpu=False)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
               # The gateway logs no access lines either.
               "--disable-uvicorn-access-log"]
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            command.append(flag)
        elif isinstance(value, list):
            command += [flag, *map(str, value)]
        elif value is not False:
            command += [flag, str(value)]
    return command


async def wait_until_ready(session: aiohttp.ClientSession, url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_LIMIT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"{server.args[2]} exited with status {server.returncode}; see {log}")
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url) as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"{url} did not answer 200 within {START_LIMIT_S:.0f} s; see {log}")


def stop_server(server: subprocess.Popen, whole_group: bool) -> list[str]:
    """SIGTERM, wait for exit; returns what had to be killed: the server itself, or descendants that outlived it."""
    try:
        descendants = psutil.Process(server.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    leftovers = []
    if server.poll() is None:
        if whole_group:
            os.killpg(server.pid, signal.SIGTERM)
        else:
            server.send_signal(signal.SIGTERM)
        try:
            server.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            leftovers.append(f"{server.pid} (the server itself, still running 90 s after SIGTERM)")
    _, alive = psutil.wait_procs(descendants, timeout=10)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            leftovers.append(f"{process.pid} {' '.join(process.cmdline())[:80]}")
            process.kill()
    return leftovers


async def run_levels(stream: StreamFactory, model: str, options: argparse.Namespace, pid: int | None) -> list[Level]:
    body = request_body(model, options.max_tokens)
    warm = max(options.concurrency)
    await measure(stream, {**body, "max_tokens": 4}, warm, warm, None)
    return [await measure(stream, body, c, options.requests * c, pid) for c in options.concurrency]


async def run_server(target: str, number: int, session: aiohttp.ClientSession, options: argparse.Namespace,
                     model_path: Path, engine_args: dict[str, object]) -> Phase:
    out = Path(options.out).parent
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"runtime-{number}-{target}.log"
    port = options.port
    with tempfile.TemporaryDirectory(prefix="lockgate-runtime-bench-") as folder:
        sockets: Path | None = None
        if target == "gateway":
            key = new_key()
            policy = Path(folder) / "policy.yaml"
            policy.write_text(gateway_policy(model_path, engine_args, key, port))
            command = [sys.executable, "-m", "gateway.cli", "serve", str(policy), "--port", str(port)]
            ready_url, base, model = f"http://127.0.0.1:{port}/readyz", f"http://127.0.0.1:{port}/v1", ROUTE
        else:
            sockets, key = prepare_environment(), None
            command = vllm_command(model_path, engine_args, port)
            ready_url, base, model = f"http://127.0.0.1:{port}/health", f"http://127.0.0.1:{port}/v1", SERVED_NAME
        print(f"[{target}] {' '.join(command)}", file=sys.stderr)
        with log.open("w") as log_file:
            server = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "LOCKGATE_LOG_LEVEL": "WARNING"},
                                      stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            started = time.perf_counter()
            await wait_until_ready(session, ready_url, server, log)
            start_s = time.perf_counter() - started
            print(f"[{target}] ready in {start_s:.1f} s", file=sys.stderr)
            levels = await run_levels(http_stream(session, base, key), model, options, server.pid)
        finally:
            leftovers = stop_server(server, whole_group=target == "vllm")
            if sockets is not None:
                shutil.rmtree(sockets, ignore_errors=True)
            if leftovers:
                print(f"[{target}] processes left after it exited: {leftovers}", file=sys.stderr)
    return Phase(target, start_s, levels, leftovers)


async def run_in_process(options: argparse.Namespace, model_path: Path, engine_args: dict[str, object]) -> Phase:
    engine = EmbeddedEngine(str(model_path), engine_args, served_model_name=SERVED_NAME)
    started = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - started
    try:
        levels = await run_levels(engine_stream(engine), SERVED_NAME, options, None)
    finally:
        await engine.stop()
    return Phase("in-process", start_s, levels, [])


async def run(options: argparse.Namespace) -> list[Phase]:
    engine_args = explicit_engine_args(json.loads(options.engine_args))
    model_path = resolve_model(options.model)
    phases: list[Phase] = []
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        if options.gateway_url:
            stream = http_stream(session, options.gateway_url.rstrip("/"), options.gateway_key)
            phases.append(Phase("gateway-url", 0.0, await run_levels(stream, options.gateway_model, options, None), []))
        for number, target in enumerate(options.targets, len(phases) + 1):
            if target == "in-process":
                phases.append(await run_in_process(options, model_path, engine_args))
            else:
                phases.append(await run_server(target, number, session, options, model_path, engine_args))
            print(f"[{target}] done, load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    return phases


def comparison(phases: list[Phase]) -> list[dict[str, float | int]]:
    """Per concurrency, gateway over vLLM: the means of every run of each, and the best run of each (on a shared
    machine the least disturbed one)."""
    rows = []
    for concurrency in sorted({level.concurrency for phase in phases for level in phase.levels}):
        def values(target: str, field: str, c: int = concurrency) -> list[float]:
            return [getattr(lv, field) for p in phases if p.target == target for lv in p.levels if lv.concurrency == c]

        gateway, vllm = values("gateway", "tokens_per_s_total"), values("vllm", "tokens_per_s_total")
        gateway_stream, vllm_stream = values("gateway", "tokens_per_s_per_stream"), values("vllm", "tokens_per_s_per_stream")
        if gateway and vllm:
            rows.append({"concurrency": concurrency, "gateway_tokens_per_s": statistics.mean(gateway),
                         "vllm_tokens_per_s": statistics.mean(vllm),
                         "throughput_ratio": statistics.mean(gateway) / statistics.mean(vllm),
                         "best_throughput_ratio": max(gateway) / max(vllm),
                         "per_stream_ratio": statistics.mean(gateway_stream) / statistics.mean(vllm_stream)})
    return rows


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(phases: list[Phase], compared: list[dict[str, float | int]], bar: float) -> str:
    lines = [f"{'run':<13} {'conc':>4} {'reqs':>4} {'ttft_p50':>9} {'ttft_p95':>9} {'tok/s/strm':>10} "
             f"{'tok/s_total':>11} {'front_ms/tok':>12} {'engine_ms/tok':>13} {'load1':>5}"]
    for concurrency in sorted({level.concurrency for phase in phases for level in phase.levels}):
        for number, phase in enumerate(phases, 1):
            for lv in (lv for lv in phase.levels if lv.concurrency == concurrency):
                lines.append(
                    f"{f'{number}.{phase.target}':<13} {lv.concurrency:>4} {lv.requests:>4} {lv.ttft_p50_s:>9.3f} "
                    f"{lv.ttft_p95_s:>9.3f} {lv.tokens_per_s_per_stream:>10.1f} {lv.tokens_per_s_total:>11.1f} "
                    f"{_ms(lv.front_cpu_ms_per_token):>12} {_ms(lv.engine_cpu_ms_per_token):>13} {lv.loadavg_1m:>5.2f}")
    for row in compared:
        verdict = "meets" if row["throughput_ratio"] >= bar else "MISSES"
        lines.append(f"concurrency {row['concurrency']}: gateway {row['gateway_tokens_per_s']:.1f} tok/s vs vLLM "
                     f"{row['vllm_tokens_per_s']:.1f} tok/s = {row['throughput_ratio']:.1%} "
                     f"(best run of each {row['best_throughput_ratio']:.1%}, per stream {row['per_stream_ratio']:.1%}); "
                     f"{verdict} the {bar:.0%} bar")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="*", default=["gateway", "vllm", "gateway"],
                        choices=["gateway", "vllm", "in-process"], help="started and measured in this order")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="catalog name or Hugging Face folder")
    parser.add_argument("--engine-args", default='{"max_model_len": 2048, "max_num_seqs": 16}',
                        help="JSON, on top of the gateway's defaults for this platform (runtime/engine_args.py)")
    parser.add_argument("--port", type=int, default=8123, help="for the gateway and vLLM's server in turn")
    parser.add_argument("--gateway-url", help="also measure a running gateway, e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--gateway-key", default=os.environ.get("LOCKGATE_KEY"))
    parser.add_argument("--gateway-model", default="chat-small", help="its route to an embedded model")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=2, help="requests per concurrent stream")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--bar", type=float, default=0.95, help="the gateway/vLLM throughput ratio to reach")
    parser.add_argument("--out", default=str(ROOT / "var" / "bench" / "runtime.json"))
    options = parser.parse_args()
    loadavg_start = os.getloadavg()
    started = time.time()
    phases = asyncio.run(run(options))
    compared = comparison(phases)
    print(f"load average at start {loadavg_start[0]:.2f} {loadavg_start[1]:.2f}, at end {os.getloadavg()[0]:.2f} "
          f"{os.getloadavg()[1]:.2f} ({os.cpu_count()} cores); {options.max_tokens} tokens per request")
    print(table(phases, compared, options.bar))
    report = {
        "command": sys.argv, "started": started, "duration_s": time.time() - started, "cores": os.cpu_count(),
        "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg(), "max_tokens": options.max_tokens,
        "engine_args": explicit_engine_args(json.loads(options.engine_args)), "bar": options.bar,
        "phases": [asdict(phase) for phase in phases], "comparison": compared,
        "bar_met": bool(compared) and all(row["throughput_ratio"] >= options.bar for row in compared),
    }
    Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    Path(options.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
