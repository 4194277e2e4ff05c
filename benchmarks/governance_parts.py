"""What each part of full governance costs: one gateway per policy, all running at once, loads alternating.

    .venv/bin/python -m benchmarks.governance_parts [--rounds 6] [--seconds 4] [--stream] [--parts rbac,limits,...]

Each policy is the benchmark's full-governance policy (`benchmarks/features.py`) with parts taken away, or the
RBAC-only one. Every gateway starts first and stays up; then each round sends every gateway a load of 32
connections in turn (the order reversed every other round), so the machine's drift, which moves CPU per request by
tens of percent within minutes on these shared cores, meets all of them alike. CPU per request counts the
gateway's whole process tree (its inference writer included); after a gateway with the table on, the next load
waits until its writer has settled, so its inserts are counted in its own phases. Prints the median [min-max] of
each policy and its ratio to the first.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.features import bare_policy, full_policy
from benchmarks.governance import SETTLE_TIMEOUT_S, rows_accounted, scrape, start_gateway, stop_tree
from benchmarks.loadgen import LoadSpec, chat_body, run_load_subprocess
from benchmarks.run import ROUTE, free_port, process_tree_cpu_s, start_mock, stop

PolicyBuilder = Callable[[str, str, Path, str], dict]


def _without(*sections: str, table: dict | None = None, guardrails: bool = True) -> PolicyBuilder:
    """The full policy (limits in memory) without the named top-level sections; `table`: inference settings to
    change; `guardrails=False`: the route's guardrails off."""
    def build(upstream: str, key: str, folder: Path, redis_url: str) -> dict:
        policy = full_policy("memory")(upstream, key, folder, redis_url)
        for section in sections:
            policy.pop(section)
        if table is not None and "inference_table" in policy:
            policy["inference_table"] |= table
        if not guardrails:
            policy["routes"][ROUTE].pop("guardrails")
        return policy
    return build


PARTS: dict[str, tuple[str, PolicyBuilder]] = {
    "rbac": ("RBAC only (1 role)", bare_policy),
    "roles": ("RBAC over 51 roles", _without("limits", "budgets", "prices", "limiter", "inference_table",
                                              guardrails=False)),
    "limits": ("+ limits, max_parallel (memory)", _without("budgets", "prices", "inference_table", guardrails=False)),
    "budget": ("+ limits, daily budget", _without("inference_table", guardrails=False)),
    "guardrails": ("+ limits, budget, guardrails", _without("inference_table")),
    "table-bare": ("full, table without payloads", _without(table={"log_payloads": False})),
    "full": ("full governance", _without()),
}


def _settle(port: int, rows_before: float, requests: int) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while rows_accounted(scrape(port)) < rows_before + requests and time.monotonic() < deadline:
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, the first is the base: {list(PARTS)}")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--stream", action="store_true", help="20-chunk streams instead of whole answers")
    args = parser.parse_args(argv)
    names = args.parts.split(",")
    unknown = [name for name in names if name not in PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown}; known: {list(PARTS)}")
    mock, mock_port = start_mock(20)
    gateways: dict[str, tuple] = {}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    try:
        with tempfile.TemporaryDirectory(prefix="lockgate-parts-") as root:
            for name in names:
                folder = Path(root) / name
                folder.mkdir()
                key = "lg-bench-" + secrets.token_urlsafe(16)
                policy = PARTS[name][1](f"http://127.0.0.1:{mock_port}/v1", key, folder, "redis://127.0.0.1:1")
                (folder / "policy.yaml").write_text(json.dumps(policy))
                port = free_port()
                with open(folder / "gateway.log", "ab") as log:
                    process, _, _ = start_gateway(folder / "policy.yaml", port, 1, key, log)
                gateways[name] = (process, port, key, "inference_table" in policy)
            for round_ in range(args.rounds):
                for name in names if round_ % 2 == 0 else names[::-1]:
                    process, port, key, table = gateways[name]
                    rows_before = rows_accounted(scrape(port)) if table else 0.0
                    before = sum(process_tree_cpu_s(process.pid))
                    spec = LoadSpec(f"http://127.0.0.1:{port}/v1/chat/completions", chat_body(ROUTE, args.stream),
                                    {"Authorization": f"Bearer {key}"}, 32, args.seconds, None, 0.5)
                    result = run_load_subprocess(spec)
                    if table:
                        _settle(port, rows_before, result.total_requests)
                    used = sum(process_tree_cpu_s(process.pid)) - before
                    cpu[name].append(used * 1000 / max(result.total_requests, 1))
                print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr)
    finally:
        for process, *_ in gateways.values():
            stop_tree(process)
        stop(mock)
    base = statistics.median(cpu[names[0]])
    print(f"gateway CPU ms/request ({'20-chunk stream' if args.stream else 'JSON'}, 32 connections, whole tree), "
          f"median [min-max] of {args.rounds} alternating rounds")
    for name in names:
        values = cpu[name]
        median = statistics.median(values)
        print(f"{PARTS[name][0]:34} {median:.3f} [{min(values):.3f}-{max(values):.3f}]  {median / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
