"""Embedded vLLM engine vs vLLM's own OpenAI server: time to first token and tokens/s, side by side.

Targets, measured one after the other so they never compete for the CPU:
  gateway    the engine behind lockgate's HTTP API (--gateway-url, a running gateway with an embedded route)
  in-process the runtime package's EmbeddedEngine called directly, no HTTP (--in-process)
  vllm       `python -m vllm.entrypoints.openai.api_server` started here on the same folder and engine args

Every request streams a chat completion of exactly --max-tokens tokens (ignore_eos), so all targets do
the same work. Example (CPU, after `lockgate models prepare smollm2-135m-instruct`):

    .venv/bin/python benchmarks/runtime_bench.py --in-process --vllm-server \\
        --gateway-url http://127.0.0.1:8080/v1 --gateway-key lg-... --gateway-model chat-small
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import EmbeddedEngine, resolve_model
from runtime.engine_args import build_engine_args, prepare_environment

PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle."
StreamFactory = Callable[[dict[str, Any], str], AsyncIterator[str]]


@dataclass(frozen=True, slots=True)
class Sample:
    ttft_s: float
    total_s: float
    tokens: int


@dataclass(frozen=True, slots=True)
class Result:
    target: str
    concurrency: int
    samples: list[Sample]
    wall_s: float

    def row(self) -> str:
        ttfts = sorted(sample.ttft_s for sample in self.samples)
        tokens = sum(sample.tokens for sample in self.samples)
        per_stream = statistics.mean(
            (s.tokens - 1) / (s.total_s - s.ttft_s) for s in self.samples if s.total_s > s.ttft_s and s.tokens > 1
        )
        p95 = ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]
        return (
            f"{self.target:<11} {self.concurrency:>4} {len(self.samples):>5} {statistics.median(ttfts):>9.3f} "
            f"{p95:>9.3f} {per_stream:>11.1f} {tokens / self.wall_s:>11.1f}"
        )


HEADER = f"{'target':<11} {'conc':>4} {'reqs':>5} {'ttft_p50':>9} {'ttft_p95':>9} {'tok/s/strm':>11} {'tok/s_total':>11}"


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


async def measure(target: str, stream: StreamFactory, body: dict[str, Any], concurrency: int, requests: int) -> Result:
    samples: list[Sample] = []
    counter = iter(range(requests))

    async def worker() -> None:
        for number in counter:
            started = time.perf_counter()
            first = 0.0
            tokens = 0
            async for _ in stream(body, f"bench-{target}-{concurrency}-{number}"):
                tokens += 1
                first = first or time.perf_counter() - started
            samples.append(Sample(first, time.perf_counter() - started, tokens))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Result(target, concurrency, samples, time.perf_counter() - started)


def http_stream(session: aiohttp.ClientSession, base_url: str, key: str | None) -> StreamFactory:
    """Content deltas of an OpenAI-compatible streaming chat completion, one item per delta."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    async def stream(body: dict[str, Any], request_id: str) -> AsyncIterator[str]:
        async with session.post(f"{base_url}/chat/completions", json=body, headers=headers) as response:
            if response.status != 200:
                raise RuntimeError(f"{base_url}: HTTP {response.status}: {await response.text()}")
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                for choice in json.loads(line[6:])["choices"]:
                    if choice["delta"].get("content"):
                        yield choice["delta"]["content"]

    return stream


def engine_stream(engine: EmbeddedEngine) -> StreamFactory:
    async def stream(body: dict[str, Any], request_id: str) -> AsyncIterator[str]:
        async for chunk in engine.stream_chat(body, request_id):
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    yield choice["delta"]["content"]

    return stream


def server_command(model_path: Path, engine_args: dict[str, object], port: int) -> list[str]:
    import torch

    args = build_engine_args(model_path, engine_args, "bench", on_cpu=not torch.cuda.is_available())
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port)]
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            command.append(flag)
        elif isinstance(value, list):
            command += [flag, *map(str, value)]
        elif value is not False:
            command += [flag, str(value)]
    return command


async def wait_for_health(session: aiohttp.ClientSession, url: str, server: subprocess.Popen, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with status {server.returncode}")
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(1)
    raise RuntimeError(f"the vLLM server was not healthy after {limit_s:.0f} s")


async def run(options: argparse.Namespace) -> list[Result]:
    levels: list[int] = options.concurrency
    results: list[Result] = []
    engine_args = json.loads(options.engine_args)
    model_path = resolve_model(options.model)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        if options.gateway_url:
            stream = http_stream(session, options.gateway_url.rstrip("/"), options.gateway_key)
            body = request_body(options.gateway_model, options.max_tokens)
            await measure("gateway", stream, {**body, "max_tokens": 2}, 1, 1)
            results += [await measure("gateway", stream, body, c, options.requests * c) for c in levels]
        if options.in_process:
            engine = EmbeddedEngine(str(model_path), engine_args, served_model_name="bench")
            started = time.perf_counter()
            await engine.start()
            print(f"in-process engine started in {time.perf_counter() - started:.1f} s", file=sys.stderr)
            try:
                body = request_body("bench", options.max_tokens)
                await measure("in-process", engine_stream(engine), {**body, "max_tokens": 2}, 1, 1)
                results += [await measure("in-process", engine_stream(engine), body, c, options.requests * c) for c in levels]
            finally:
                await engine.stop()
        if options.vllm_server:
            sockets = prepare_environment()
            command = server_command(model_path, engine_args, options.vllm_port)
            print(" ".join(command), file=sys.stderr)
            server = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL)
            try:
                base = f"http://127.0.0.1:{options.vllm_port}"
                started = time.perf_counter()
                await wait_for_health(session, f"{base}/health", server, 900)
                print(f"vLLM server healthy in {time.perf_counter() - started:.1f} s", file=sys.stderr)
                stream = http_stream(session, f"{base}/v1", None)
                body = request_body("bench", options.max_tokens)
                await measure("vllm", stream, {**body, "max_tokens": 2}, 1, 1)
                results += [await measure("vllm", stream, body, c, options.requests * c) for c in levels]
            finally:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(60)
                shutil.rmtree(sockets, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="catalog name or Hugging Face folder")
    parser.add_argument("--engine-args", default='{"max_model_len": 2048, "max_num_seqs": 16}', help="JSON")
    parser.add_argument("--gateway-url", help="the gateway's OpenAI base URL, e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--gateway-key", default=os.environ.get("LOCKGATE_KEY"))
    parser.add_argument("--gateway-model", default="chat-small", help="the route that targets the embedded model")
    parser.add_argument("--in-process", action="store_true", help="also measure EmbeddedEngine without HTTP")
    parser.add_argument("--vllm-server", action="store_true", help="also start and measure vLLM's OpenAI server")
    parser.add_argument("--vllm-port", type=int, default=8123)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=2, help="requests per concurrent stream")
    parser.add_argument("--max-tokens", type=int, default=64)
    options = parser.parse_args()
    results = asyncio.run(run(options))
    print(HEADER)
    for result in sorted(results, key=lambda r: (r.concurrency, r.target)):
        print(result.row())


if __name__ == "__main__":
    main()
