"""`python -m benchmarks.ab --before REV`: gateway CPU per request, before (REV) and after (this tree), side by side.

Shared machines drift by tens of percent within minutes, so one run of each tree, minutes apart, compares the
weather. Here both gateways run at once (REV from a temporary git worktree) against one mock upstream, and each
round measures every scenario on both, alternating which goes first; a figure is the median over rounds of
each phase, and the ratio is the median of the per-round ratios. The Responses and Messages doors are measured
the same way against chat completions, on the after tree only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from benchmarks.loadgen import LoadSpec, chat_body, messages_body, responses_body
from benchmarks.run import ROUTE, bench_policy, free_port, run_phase, start_mock, stop

Scenario = tuple[str, str, Callable[[str, bool], bytes], bool, dict[str, str]]
CHAT: tuple[Scenario, ...] = (
    ("chat, non-streamed", "/v1/chat/completions", chat_body, False, {}),
    ("chat, 20-chunk stream", "/v1/chat/completions", chat_body, True, {}),
)
DOORS: tuple[Scenario, ...] = (
    ("Responses, non-streamed", "/v1/responses", responses_body, False, {}),
    ("Responses, 20-chunk stream", "/v1/responses", responses_body, True, {}),
    ("Messages, non-streamed", "/v1/messages", messages_body, False, {"anthropic-version": "2023-06-01"}),
    ("Messages, 20-chunk stream", "/v1/messages", messages_body, True, {"anthropic-version": "2023-06-01"}),
)


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="lockgate-before-"))
    subprocess.run(["git", "worktree", "add", "--detach", "--force", str(folder), rev], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield folder
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(folder)], check=False)


@contextlib.contextmanager
def gateway(tree: Path, policy: Path) -> Iterator[tuple[int, int]]:
    """A gateway worker running the code of `tree`; yields (pid, port)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(tree), "LOCKGATE_LOG_LEVEL": "WARNING"}
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", str(policy), "--port", str(port)],
                               cwd=tree, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"the gateway of {tree} did not become ready")
            time.sleep(0.2)
        yield process.pid, port
    finally:
        stop(process)


def phase(scenario: Scenario, gateway_pid: int, port: int, key: str, mock_pid: int, args: argparse.Namespace) -> float:
    _, path, body, stream, headers = scenario
    spec = LoadSpec(f"http://127.0.0.1:{port}{path}", body(ROUTE, stream), {"Authorization": f"Bearer {key}", **headers},
                    args.connections, args.duration, None, args.warmup)
    result = run_phase(spec, gateway_pid, mock_pid)
    if result["errors"]:
        print(f"warning: {scenario[0]}: {result['errors']} failed requests {result['statuses']}", file=sys.stderr)
    return result["gateway_cpu_ms_per_request"]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the git revision to compare this tree with")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--duration", type=float, default=1.5, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    key = "lg-bench-" + secrets.token_urlsafe(16)
    mock, mock_port = start_mock(20)
    after_tree = Path(__file__).resolve().parent.parent
    cpu: dict[tuple[str, str], list[float]] = {}
    ratios: dict[str, list[float]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="lockgate-ab-") as folder, worktree(args.before) as before_tree:
            policy = Path(folder) / "policy.yaml"
            upstream = f"http://127.0.0.1:{mock_port}/v1"
            policy.write_text(bench_policy(upstream, upstream, key))
            with gateway(before_tree, policy) as before, gateway(after_tree, policy) as after:
                sides = {"before": before, "after": after}
                for number in range(args.rounds):
                    order = ("before", "after") if number % 2 == 0 else ("after", "before")
                    for scenario in CHAT:
                        figures = {side: phase(scenario, *sides[side], key, mock.pid, args) for side in order}
                        for side, value in figures.items():
                            cpu.setdefault((scenario[0], side), []).append(value)
                        ratios.setdefault(scenario[0], []).append(figures["after"] / figures["before"])
                    for door, chat in zip(DOORS, CHAT * 2, strict=True):
                        pair = (door, chat) if number % 2 == 0 else (chat, door)
                        figures = {scenario[0]: phase(scenario, *after, key, mock.pid, args) for scenario in pair}
                        cpu.setdefault((door[0], "after"), []).append(figures[door[0]])
                        ratios.setdefault(door[0], []).append(figures[door[0]] / figures[chat[0]])
    finally:
        stop(mock)
    print(f"gateway CPU ms/request @{args.connections} conns, median [min-max] of {args.rounds} rounds; before = {args.before}")
    for scenario in CHAT:
        name = scenario[0]
        print(f"  {name:28s} before {spread(cpu[(name, 'before')])}  after {spread(cpu[(name, 'after')])}  "
              f"after/before {spread(ratios[name])}")
    for door, chat in zip(DOORS, CHAT * 2, strict=True):
        print(f"  {door[0]:28s} after {spread(cpu[(door[0], 'after')])}  /{chat[0]} {spread(ratios[door[0]])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
