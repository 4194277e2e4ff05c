"""A cheap HTTP/1.1 load generator with latency percentiles: raw asyncio protocol on uvloop, precomputed request bytes.

N keep-alive connections each send one request, read the whole response (Content-Length or chunked, so a stream
counts as done when its last byte arrived), record the latency, and send the next, for a duration or a request
count. Run it in its own process so its CPU does not compete inside the process being measured:

    python -m benchmarks.loadgen http://127.0.0.1:8080/v1/chat/completions --key K --model chat -c 32 -d 5 --stream
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import cast
from urllib.parse import urlsplit

import orjson
import uvloop


@dataclass(frozen=True)
class LoadSpec:
    url: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    connections: int = 1
    duration_s: float | None = 5.0
    requests: int | None = None
    warmup_s: float = 0.5


@dataclass(frozen=True)
class LoadResult:
    """`requests` counts the measured window; `total_requests` includes the warm-up (for CPU-per-request)."""

    requests: int
    total_requests: int
    errors: int
    elapsed_s: float
    rps: float
    latency_ms: dict[str, float]
    ttfb_ms: dict[str, float]  # to the first body byte: for a stream, its first event
    statuses: dict[str, int]
    cpu_s: float = 0.0  # the load generator's own CPU over the whole run (warm-up included, interpreter start not)


def chat_body(model: str, stream: bool, prompt: str = "Say hello in one short sentence.", max_tokens: int = 32) -> bytes:
    body: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def responses_body(model: str, stream: bool, prompt: str = "Say hello in one short sentence.", max_tokens: int = 32) -> bytes:
    """The same question as chat_body, asked through OpenAI's Responses API."""
    body: dict[str, object] = {"model": model, "input": prompt, "max_output_tokens": max_tokens}
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def messages_body(model: str, stream: bool, prompt: str = "Say hello in one short sentence.", max_tokens: int = 32) -> bytes:
    """The same question as chat_body, asked through Anthropic's Messages API."""
    body: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean of seconds, in milliseconds."""
    if not samples:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
    ordered = sorted(samples)
    last = len(ordered) - 1
    return {
        "p50": ordered[round(0.50 * last)] * 1000,
        "p90": ordered[round(0.90 * last)] * 1000,
        "p99": ordered[round(0.99 * last)] * 1000,
        "max": ordered[last] * 1000,
        "mean": sum(ordered) / len(ordered) * 1000,
    }


def request_bytes(spec: LoadSpec) -> tuple[str, int, bytes]:
    parts = urlsplit(spec.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    headers = {"Host": f"{host}:{port}", "Content-Type": "application/json", "Content-Length": str(len(spec.body)),
               **spec.headers}
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return host, port, head.encode() + spec.body


class _Recorder:
    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.started = time.perf_counter()
        self.measure_from = self.started + spec.warmup_s
        self.stop_at = self.measure_from + spec.duration_s if spec.duration_s is not None else float("inf")
        self.remaining = spec.requests if spec.requests is not None else -1
        self.latencies: list[float] = []
        self.ttfbs: list[float] = []
        self.statuses: dict[str, int] = {}
        self.total = 0
        self.errors = 0
        self.done = asyncio.get_running_loop().create_future()
        self.open_connections = 0

    def may_send(self, now: float) -> bool:
        if now >= self.stop_at or self.remaining == 0:
            return False
        if self.remaining > 0 and now >= self.measure_from:
            self.remaining -= 1
        return True

    def record(self, sent: float, first_byte: float, now: float, status: int) -> None:
        self.total += 1
        if sent < self.measure_from:
            return
        key = str(status)
        self.statuses[key] = self.statuses.get(key, 0) + 1
        if status != 200:
            self.errors += 1
            return
        self.latencies.append(now - sent)
        self.ttfbs.append((first_byte or now) - sent)

    def connection_closed(self) -> None:
        self.open_connections -= 1
        if self.open_connections == 0 and not self.done.done():
            self.done.set_result(None)


class _LoadProtocol(asyncio.Protocol):
    """Sends `request`, parses one response at a time, repeats while the recorder allows."""

    def __init__(self, request: bytes, recorder: _Recorder) -> None:
        self.request = request
        self.recorder = recorder
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.sent = 0.0
        self.first_byte = 0.0
        self.status = 0
        self.body_left = -1  # bytes still expected with Content-Length; -1 while reading headers
        self.chunked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self._send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sent:
            self.recorder.errors += 1
        self.recorder.connection_closed()

    def _send_next(self) -> None:
        assert self.transport is not None
        now = time.perf_counter()
        if not self.recorder.may_send(now):
            self.sent = 0.0
            self.transport.close()
            return
        self.sent, self.first_byte, self.status, self.body_left, self.chunked = now, 0.0, 0, -1, False
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.body_left == -1 and not self._read_head():
            return
        if not self.first_byte and self.buffer:
            self.first_byte = time.perf_counter()
        complete = self._read_chunks() if self.chunked else self._read_sized()
        if complete:
            self.recorder.record(self.sent, self.first_byte, time.perf_counter(), self.status)
            self._send_next()

    def _read_head(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.buffer[:end]).lower()
        del self.buffer[:end + 4]
        self.status = int(head[9:12])
        self.chunked = b"transfer-encoding: chunked" in head
        at = head.find(b"content-length:")
        if at < 0:
            self.body_left = 0
            return True
        line_end = head.find(b"\r\n", at)
        self.body_left = int(head[at + 15:line_end if line_end >= 0 else len(head)])
        return True

    def _read_sized(self) -> bool:
        if len(self.buffer) < self.body_left:
            return False
        del self.buffer[:self.body_left]
        return True

    def _read_chunks(self) -> bool:
        while True:
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                return False
            size = int(self.buffer[:line_end].split(b";", 1)[0], 16)
            if size == 0:
                if self.buffer.find(b"\r\n\r\n", line_end) != line_end:
                    return False
                del self.buffer[:line_end + 4]
                return True
            if len(self.buffer) < line_end + 2 + size + 2:
                return False
            del self.buffer[:line_end + 2 + size + 2]


async def run_load(spec: LoadSpec) -> LoadResult:
    """Drives the load from the running loop; prefer `run_load_subprocess` next to a process under test."""
    cpu_before = time.process_time()
    host, port, request = request_bytes(spec)
    loop = asyncio.get_running_loop()
    recorder = _Recorder(spec)
    recorder.open_connections = spec.connections
    await asyncio.gather(*(loop.create_connection(lambda: _LoadProtocol(request, recorder), host, port)
                           for _ in range(spec.connections)))
    await recorder.done
    elapsed = time.perf_counter() - max(recorder.measure_from, recorder.started)
    measured = len(recorder.latencies) + recorder.errors
    return LoadResult(
        requests=measured, total_requests=recorder.total, errors=recorder.errors, elapsed_s=elapsed,
        rps=len(recorder.latencies) / elapsed if elapsed > 0 else 0.0,
        latency_ms=percentiles(recorder.latencies), ttfb_ms=percentiles(recorder.ttfbs), statuses=recorder.statuses,
        cpu_s=time.process_time() - cpu_before,
    )


def run_load_subprocess(spec: LoadSpec, python: str = sys.executable) -> LoadResult:
    """Runs `run_load` in a fresh process (so it has a core's worth of its own) and returns its result."""
    payload = orjson.dumps({**asdict(spec), "body": spec.body.decode()})
    done = subprocess.run([python, "-m", "benchmarks.loadgen", "--spec-json", "-"], input=payload, capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    return LoadResult(**json.loads(done.stdout))


def _spec_from_args(args: argparse.Namespace) -> LoadSpec:
    if args.spec_json:
        raw = json.loads(sys.stdin.read() if args.spec_json == "-" else args.spec_json)
        return LoadSpec(**{**raw, "body": raw["body"].encode()})
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    return LoadSpec(args.url, chat_body(args.model, args.stream), headers, args.connections,
                    None if args.requests else args.duration, args.requests, args.warmup)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", default="http://127.0.0.1:8080/v1/chat/completions")
    parser.add_argument("--key", help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--model", default="chat")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("-c", "--connections", type=int, default=1)
    parser.add_argument("-d", "--duration", type=float, default=5.0, help="seconds measured, after the warm-up")
    parser.add_argument("-n", "--requests", type=int, help="measure this many requests instead of a duration")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of unmeasured requests first")
    parser.add_argument("--spec-json", help="a LoadSpec as JSON ('-' reads stdin); overrides the other options")
    args = parser.parse_args(argv)
    result = uvloop.run(run_load(_spec_from_args(args)))
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
