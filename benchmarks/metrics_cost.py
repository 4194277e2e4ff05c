"""What a request's metrics cost: the in-memory registry (one process) next to the multiprocess files (workers).

Each mode runs in a fresh interpreter (prometheus_client picks its value store at import) and repeats what the
gateway records per request: the in-flight count up and down, the upstream histogram, the request counter and
histogram. Prints nanoseconds per request (best of --repeat) and, with --callgrind, instructions per request
counted by valgrind (one run of --iterations, minus a run of none), which the machine's noise does not move.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

RECORD = """
import sys, time
from gateway import metrics

def one_request():
    metrics.IN_FLIGHT.inc()
    metrics.observe_upstream("up", 0.012)
    metrics.IN_FLIGHT.dec()
    metrics.observe_request("chat-default", "chat", 200, 0.015)

iterations, repeat = int(sys.argv[1]), int(sys.argv[2])
one_request()
best = float("inf")
for _ in range(repeat):
    started = time.perf_counter_ns()
    for _ in range(iterations):
        one_request()
    best = min(best, (time.perf_counter_ns() - started) / max(iterations, 1))
print(best)
"""


def run(multiprocess: bool, iterations: int, repeat: int, callgrind: bool) -> float:
    """ns per request; with `callgrind`, the whole run's instruction count."""
    with tempfile.TemporaryDirectory(prefix="lockgate-metrics-cost-") as folder:
        env = {key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"}
        if multiprocess:
            env["PROMETHEUS_MULTIPROC_DIR"] = folder
        command = [sys.executable, "-c", RECORD, str(iterations), str(repeat)]
        if not callgrind:
            return float(subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout)
        out = Path(folder) / "callgrind.out"
        done = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command], env=env,
                              check=True, capture_output=True, text=True)
        return float(re.search(r"Collected : (\d+)", done.stderr)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--callgrind", action="store_true", help="also count instructions (valgrind)")
    args = parser.parse_args(argv)
    print("per request: in-flight count +1/-1, upstream histogram, request counter and histogram")
    for label, multiprocess in (("in-memory registry (1 worker)", False), ("multiprocess files (workers)", True)):
        line = f"{label:32} {run(multiprocess, args.iterations, args.repeat, False) / 1000:.2f} us"
        if args.callgrind:
            few = max(args.iterations // 20, 1)
            counted = run(multiprocess, few, 1, True) - run(multiprocess, 0, 1, True)
            line += f", {counted / few:.0f} instructions"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
