"""Inference-table writer: its cost to the gateway's event loop and its sustained rows/s into chdb, ~2 KB payloads.

    .venv/bin/python -m benchmarks.inference_bench [--rows 50000] [--batch-rows 1000] [--rate 5000] [--seconds 10]

Two measurements, each in a fresh chdb folder:
- lag: an asyncio loop (uvloop, as the gateway runs) submits records at --rate per second for --seconds while a
  probe task sleeps 1 ms in a loop and records how late it wakes up. The same run without a writer (records go to
  a plain list) is the floor: what the loop's own timer resolution and the machine's noise cost.
- throughput: --rows records submitted as fast as possible, then the time until all of them are in chdb.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop
from prometheus_client import CollectorRegistry

from gateway.inference import InferenceWriter, connect

PAYLOAD = '{"messages":[{"role":"user","content":"' + "lorem ipsum dolor sit amet " * 37 + '"}]}'
PROBE_S = 0.001
PRODUCER_TICK_S = 0.002


def record(index: int) -> dict[str, Any]:
    return {
        "request_id": str(uuid.uuid4()), "ts": time.time(), "key_id": "bench-key", "user": f"user-{index % 50}",
        "groups": ["bench"], "route": f"route-{index % 5}", "provider": "openai", "model": "gpt-4o-mini",
        "endpoint": "chat", "status": 200, "prompt_tokens": 300, "completion_tokens": 120, "cost_micro_usd": 90,
        "latency_ms": 240.0, "upstream_ms": 236.0, "overhead_ms": 4.0, "attempts": 1,
        "split_arm": "openai/gpt-4o-mini", "ratelimit_outcome": "ok", "request_payload": PAYLOAD,
        "response_payload": PAYLOAD, "policy_version": "bench",
    }


def make_writer(folder: Path, batch_rows: int, queue_max: int) -> InferenceWriter:
    return InferenceWriter(f"chdb://{folder / 'chdb'}", "bench", batch_rows=batch_rows, flush_interval_ms=1_000,
                           queue_max=queue_max, spool_dir=folder / "spool", registry=CollectorRegistry())


def stored_rows(folder: Path) -> int:
    client = connect(f"chdb://{folder / 'chdb'}")
    try:
        return client.query("SELECT count() FROM bench.inference").result_rows[0][0]
    finally:
        client.close()


def quantiles(values: list[float]) -> str:
    ordered = sorted(values)
    return (f"p50 {ordered[len(ordered) // 2]:7.3f}  p99 {ordered[int(len(ordered) * 0.99)]:7.3f}  "
            f"max {ordered[-1]:7.3f}")


async def probe(lags_ms: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        before = time.perf_counter()
        await asyncio.sleep(PROBE_S)
        lags_ms.append((time.perf_counter() - before - PROBE_S) * 1_000)


async def produce(submit: Callable[[dict[str, Any]], None], records: list[dict[str, Any]], rate: int,
                  submit_ns: list[int]) -> None:
    started = time.perf_counter()
    sent = 0
    while sent < len(records):
        await asyncio.sleep(PRODUCER_TICK_S)
        due = min(int((time.perf_counter() - started) * rate), len(records))
        for item in records[sent:due]:
            before = time.perf_counter_ns()
            submit(item)
            submit_ns.append(time.perf_counter_ns() - before)
        sent = max(due, sent)


async def lag_under_load(submit: Callable[[dict[str, Any]], None], records: list[dict[str, Any]],
                         rate: int) -> tuple[list[float], list[int]]:
    lags_ms: list[float] = []
    submit_ns: list[int] = []
    stop = asyncio.Event()
    prober = asyncio.create_task(probe(lags_ms, stop))
    await produce(submit, records, rate, submit_ns)
    stop.set()
    await prober
    return lags_ms, submit_ns


def measure_lag(rate: int, seconds: float, batch_rows: int) -> None:
    records = [record(index) for index in range(int(rate * seconds))]
    floor_sink: list[dict[str, Any]] = []
    floor_lags, _ = uvloop.run(lag_under_load(floor_sink.append, records, rate))
    with tempfile.TemporaryDirectory() as folder:
        writer = make_writer(Path(folder), batch_rows, queue_max=len(records) * 2)
        writer.start()
        writer.flush()
        lags, submit_ns = uvloop.run(lag_under_load(writer.submit, records, rate))
        writer.close(timeout=600)
        stored = stored_rows(Path(folder))
    print(f"event-loop lag, {rate:,} records/s for {seconds:g} s, batch_rows {batch_rows}, stored {stored:,}: "
          "overshoot of a 1 ms sleep, ms")
    print(f"  no writer (floor)  {quantiles(floor_lags)}  ({len(floor_lags):,} samples)")
    print(f"  writer             {quantiles(lags)}  ({len(lags):,} samples)")
    print(f"  submit() us        {quantiles([cost / 1_000 for cost in submit_ns])}")


def measure_throughput(rows: int, batch_rows: int) -> None:
    records = [record(index) for index in range(rows)]
    with tempfile.TemporaryDirectory() as folder:
        writer = make_writer(Path(folder), batch_rows, queue_max=rows * 2)
        writer.start()
        writer.flush()
        costs_ns = []
        started = time.perf_counter()
        for item in records:
            before = time.perf_counter_ns()
            writer.submit(item)
            costs_ns.append(time.perf_counter_ns() - before)
        submitted = time.perf_counter()
        writer.flush(timeout=600)
        elapsed = time.perf_counter() - started
        writer.close()
        stored = stored_rows(Path(folder))
    costs_us = sorted(cost / 1_000 for cost in costs_ns)
    print(f"throughput: rows {rows:,}  batch_rows {batch_rows}  payload {len(PAYLOAD)} B x 2  stored {stored:,}")
    print(f"  submit(): mean {statistics.fmean(costs_us):.2f} us  {quantiles(costs_us)} us "
          f"(submitting all took {submitted - started:.2f} s)")
    print(f"  sustained: {rows / elapsed:,.0f} rows/s ({elapsed:.2f} s until all rows were in chdb)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--batch-rows", type=int, default=1_000)
    parser.add_argument("--rate", type=int, default=5_000, help="records per second in the lag measurement")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    measure_lag(args.rate, args.seconds, args.batch_rows)
    if not args.skip_throughput:
        measure_throughput(args.rows, args.batch_rows)


if __name__ == "__main__":
    main()
