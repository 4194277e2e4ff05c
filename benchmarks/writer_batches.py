"""The inference writer process's CPU a row and its peak memory, by batch size, sizes alternating within each round.

    .venv/bin/python -m benchmarks.writer_batches [--sizes 5000,20000] [--rows 60000] [--rounds 2]

Each run is a fresh `InferenceWriter` on its own chdb folder, fed `inference_bench`'s records with the governance
benchmark's payloads (its chat request as the request payload, a chat completion's bytes as the response) in bursts
of 1,000 every 0.2 s, with a flush interval long enough that only `batch_rows` cuts batches. CPU is the writer
process's (utime + stime, its engine's merge threads included) from before the first record to 3 s after the flush;
peak RSS is its VmHWM.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson
from prometheus_client import CollectorRegistry

from benchmarks.inference_bench import record
from benchmarks.loadgen import chat_body
from benchmarks.run import ROUTE, process_tree_cpu_s
from gateway.inference import InferenceWriter

ANSWER = (b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"mock-model","choices":[{"index":0,'
          b'"message":{"role":"assistant","content":"Hello there, this is a short answer from the mock."},'
          b'"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21}}')
BURST_ROWS = 1_000
BURST_GAP_S = 0.2
SETTLE_S = 3.0


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def run_once(batch_rows: int, rows: int) -> tuple[float, float]:
    """(CPU µs a row, peak RSS MB) of the writer process for one size."""
    request = chat_body(ROUTE, False)
    with tempfile.TemporaryDirectory(prefix="lockgate-writer-") as folder:
        writer = InferenceWriter(f"chdb://{folder}/clickhouse", batch_rows=batch_rows, flush_interval_ms=600_000,
                                 spool_dir=f"{folder}/spool", registry=CollectorRegistry())
        writer.start()
        try:
            if not writer.flush(timeout=60) or writer.pid is None:
                raise RuntimeError("the writer process did not start")
            pid = writer.pid
            before = sum(process_tree_cpu_s(pid))
            for index in range(rows):
                writer.submit(record(index) | {"request_payload": orjson.loads(request), "response_payload": ANSWER})
                if index % BURST_ROWS == BURST_ROWS - 1:
                    time.sleep(BURST_GAP_S)
            if not writer.flush(timeout=120):
                raise RuntimeError("the writer did not write every row in time")
            time.sleep(SETTLE_S)
            used = sum(process_tree_cpu_s(pid)) - before
            return used * 1e6 / rows, peak_rss_mb(pid)
        finally:
            writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000,20000", help="comma-separated batch_rows values")
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    figures: dict[int, list[tuple[float, float]]] = {size: [] for size in sizes}
    for round_ in range(args.rounds):
        for size in sizes if round_ % 2 == 0 else sizes[::-1]:
            figures[size].append(run_once(size, args.rows))
        print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr)
    print(f"inference writer process, {args.rows} rows a run, median [min-max] of {args.rounds} rounds "
          f"(load average {os.getloadavg()[0]:.1f})")
    print(f"{'batch_rows':>10}  {'CPU µs/row':>22}  {'peak RSS MB':>22}")
    for size in sizes:
        cpu = [c for c, _ in figures[size]]
        rss = [r for _, r in figures[size]]
        print(f"{size:>10}  {statistics.median(cpu):8.1f} [{min(cpu):.1f}-{max(cpu):.1f}]  "
              f"{statistics.median(rss):8.0f} [{min(rss):.0f}-{max(rss):.0f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
