"""`make bench-features`: what governance, guardrails and inference logging cost next to the bare proxy.

One mock upstream serves every variant; each variant runs its own gateway worker on a generated policy, one after
the other, and each load phase runs in a fresh load-generator process (`benchmarks/loadgen.py`): requests/s and
gateway CPU per request at 16 connections, then latency at 1 connection. Every figure is also given as a ratio to
its bare baseline measured in the same run. Prints a table and writes the figures as JSON
(default var/bench/features.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.loadgen import LoadSpec, chat_body, run_load_subprocess
from benchmarks.run import ROUTE, free_port, process_tree_cpu_s, start_gateway, start_mock, stop
from policies.keys import hash_key

MASKED_STREAM_ROUTE = "bench-chat-masked"
TARGETS = {"guardrails_clean_added_p50_ms": 0.3, "governance_memory_cpu_ms_per_request": 0.4,
           "masked_stream_added_ttfb_p50_ms": 5.0}
CLEAN_PROMPT = (
    "Our small bakery wants to write a friendly letter to the people who live on our street, because we plan "
    "to stay open later in the evenings and we would like them to hear it from us first. Please help me draft "
    "it. The letter should explain that we will bake a second batch of bread every afternoon, so that people "
    "coming home from work can still buy something fresh. We also want to mention that the new oven is much "
    "quieter than the old one, since a neighbour once told us that the noise early in the morning kept her "
    "awake. The tone should be warm and modest, not like an advertisement, and it should thank the street for "
    "years of support. I would like the letter to invite everyone to a small tasting on a weekend morning, "
    "where they can try the new rye loaf and the seed rolls, and tell us honestly what they think. Please keep "
    "it short enough to fit on one page, with a clear greeting, two or three paragraphs and a simple closing. "
    "If something in my plan sounds awkward or could be misunderstood, point it out and suggest a gentler way "
    "to say it. Finally, propose a title for the letter that would make people curious enough to read it, "
    "and explain in one sentence why you chose it."
)
PII_PROMPT = CLEAN_PROMPT.replace(
    "and explain in one sentence why you chose it.",
    "and send the draft to marta.vidal@example.org or call me on +1 415-555-0199 if anything is unclear.",
)


@dataclass(frozen=True)
class Load:
    """One row of the table: what is sent, and which row of the bare gateway it is compared with."""

    name: str
    baseline: str
    route: str = ROUTE
    prompt: str = "Say hello in one short sentence."


@dataclass(frozen=True)
class Variant:
    name: str
    policy: Callable[[str, str, Path, str], dict]  # (upstream url, key, temporary folder, redis url) -> policy
    loads: tuple[Load, ...]
    stream_route: str | None = None  # measured for time to first byte at 1 connection
    logs_rows: bool = False
    is_baseline: bool = False
    row_suffix: str = ""


def bench_caller(key: str) -> dict:
    """The policy's version and its one caller, `bench`, allowed every model."""
    return {
        "version": 1,
        "keys": [{"id": "bench", "sha256": hash_key(key), "user": "bench"}],
        "users": {"bench": {"groups": ["bench"]}},
        "roles": {"caller": {"models": ["*"]}},
        "bindings": [{"role": "caller", "group": "bench"}],
    }


def bare_policy(upstream: str, key: str, folder: Path, redis_url: str) -> dict:
    """One route and its caller; every other section at its defaults (no limits, guardrails or table)."""
    return {
        **bench_caller(key),
        "providers": {"mock": {"type": "openai", "base_url": upstream, "api_key": "sk-mock"}},
        "routes": {ROUTE: {"targets": [{"provider": "mock", "model": "mock-model"}]}},
    }


def governance_policy(storage: str) -> Callable[[str, str, Path, str], dict]:
    def build(upstream: str, key: str, folder: Path, redis_url: str) -> dict:
        policy = bare_policy(upstream, key, folder, redis_url)
        teams = [f"team-{n:02d}" for n in range(50)]
        policy["users"] |= {f"user-{team}": {"groups": [team]} for team in teams}
        policy["users"]["bench"]["groups"] += teams[:3]
        policy["roles"] |= {team: {"models": [f"{team}-*"]} for team in teams}
        # Half the roles bound to groups, half to users, as in a real organisation's file.
        policy["bindings"] += [{"role": team, "group": team} for team in teams[::2]]
        policy["bindings"] += [{"role": team, "user": f"user-{team}"} for team in teams[1::2]]
        policy["limiter"] = {"storage": redis_url if storage == "redis" else "memory://"}
        # High enough never to refuse: the figure is the cost of checking and charging, not of refusing.
        policy["limits"] = [{"scope": "user", "requests": "10000000/minute"},
                            {"scope": "user", "tokens": "10000000000/hour"},
                            {"scope": "group:bench", "requests": "10000000/minute"}]
        policy["budgets"] = [{"scope": "user", "usd": 1_000_000, "per": "day"}]
        policy["prices"] = {"mock-model": {"input": 0.15, "output": 0.60}}
        return policy
    return build


def guardrails_policy(input_pii: str) -> Callable[[str, str, Path, str], dict]:
    def build(upstream: str, key: str, folder: Path, redis_url: str) -> dict:
        policy = bare_policy(upstream, key, folder, redis_url)
        target = policy["routes"][ROUTE]["targets"]
        policy["routes"][ROUTE]["guardrails"] = {"input": {"pii": input_pii, "patterns": "block"},
                                                 "output": {"pii": "mask"}}
        policy["routes"][MASKED_STREAM_ROUTE] = {"targets": target, "guardrails": {"output": {"pii": "mask"}}}
        policy["guardrails"] = {"patterns": [{"name": "project-codename", "regex": r"\bBLUEBIRD-\d+\b"}]}
        return policy
    return build


def logging_policy(upstream: str, key: str, folder: Path, redis_url: str) -> dict:
    return bare_policy(upstream, key, folder, redis_url) | {"inference_table": {
        "enabled": True, "clickhouse": f"chdb://{folder / 'clickhouse'}", "spool_dir": str(folder / "spool"),
        "log_payloads": True, "mask_pii": True}}


def full_policy(storage: str) -> Callable[[str, str, Path, str], dict]:
    """Every governance feature at once: RBAC over 50 roles, request and token limits, a daily budget, PII
    guardrails on input (block) and output (mask), `max_parallel`, and the inference table (chdb, payloads, masking)."""
    def build(upstream: str, key: str, folder: Path, redis_url: str) -> dict:
        policy = governance_policy(storage)(upstream, key, folder, redis_url)
        policy["routes"][ROUTE]["guardrails"] = {"input": {"pii": "block"}, "output": {"pii": "mask"}}
        policy["limits"].append({"scope": "user", "max_parallel": 1000})
        policy["inference_table"] = logging_policy(upstream, key, folder, redis_url)["inference_table"]
        return policy
    return build


BARE_LOADS = (Load("bare", "bare"), Load("bare, 200-word prompt", "bare, 200-word prompt", prompt=CLEAN_PROMPT))
# Bare runs first and again last: each baseline is the mean of both, and their gap shows the run's drift.
VARIANTS = (
    Variant("bare", bare_policy, BARE_LOADS, stream_route=ROUTE, is_baseline=True),
    Variant("governance-memory", governance_policy("memory"), (Load("governance-memory", "bare"),)),
    Variant("governance-redis", governance_policy("redis"), (Load("governance-redis", "bare"),)),
    Variant("guardrails-clean", guardrails_policy("block"),
            (Load("guardrails-clean", "bare, 200-word prompt", prompt=CLEAN_PROMPT),), stream_route=MASKED_STREAM_ROUTE),
    Variant("guardrails-pii", guardrails_policy("mask"),
            (Load("guardrails-pii", "bare, 200-word prompt", prompt=PII_PROMPT),)),
    Variant("logging-on", logging_policy, (Load("logging-on", "bare"),), logs_rows=True),
    Variant("bare-end", bare_policy, BARE_LOADS, stream_route=ROUTE, is_baseline=True, row_suffix=" (end)"),
)


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, int]]:
    """A throw-away redis-server on a free loopback port, with nothing persisted; yields its URL and pid."""
    port = free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", process.pid
    finally:
        stop(process)


def metric_samples(port: int, name: str) -> dict[str, float]:
    """The samples of one metric on the gateway's /metrics, by their label text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {match[1] or "": float(match[2])
            for match in re.finditer(rf"^{re.escape(name)}(\{{.*\}})? (\S+)$", text, re.MULTILINE)}


def wait_for_rows(port: int, expected: int, timeout_s: float = 20.0) -> float:
    """Rows written to the inference table once `expected` landed, or whatever landed within the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = sum(metric_samples(port, "lockgate_inference_rows_written_total").values())
        if rows >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.25)


def measure(spec: LoadSpec, gateway_pid: int, redis_pid: int, settle: Callable[[int], object] | None = None,
            served_before: int = 0) -> dict:
    """Runs one load phase; CPU per request counts the gateway's whole process tree, after `settle` (the inference
    writer's deferred work) returned, and redis-server's apart (it shares the cores, but not every variant uses it)."""
    before = sum(process_tree_cpu_s(gateway_pid)), sum(process_tree_cpu_s(redis_pid))
    result = run_load_subprocess(spec)
    if settle is not None:
        settle(served_before + result.total_requests)
    gateway_s, redis_s = sum(process_tree_cpu_s(gateway_pid)) - before[0], sum(process_tree_cpu_s(redis_pid)) - before[1]
    if result.errors:
        print(f"warning: {result.errors} failed requests {result.statuses}", file=sys.stderr)
    per_request_ms = 1000 / max(result.total_requests, 1)
    return {**asdict(result), "gateway_cpu_ms_per_request": gateway_s * per_request_ms,
            "redis_cpu_ms_per_request": redis_s * per_request_ms}


def run_variant(variant: Variant, upstream: str, redis: tuple[str, int], settings: argparse.Namespace) -> dict:
    key = "lg-bench-" + secrets.token_urlsafe(16)
    redis_url, redis_pid = redis
    figures: dict = {"is_baseline": variant.is_baseline, "loads": {}}
    with tempfile.TemporaryDirectory(prefix=f"lockgate-{variant.name}-") as name:
        folder = Path(name)
        policy_path = folder / "policy.yaml"
        policy_path.write_text(json.dumps(variant.policy(upstream, key, folder, redis_url), indent=1))  # JSON is YAML
        port = free_port()
        gateway = start_gateway(policy_path, port)
        try:
            url, headers = f"http://127.0.0.1:{port}/v1/chat/completions", {"Authorization": f"Bearer {key}"}
            settle = (lambda expected: wait_for_rows(port, expected)) if variant.logs_rows else None
            served = 0
            for load in variant.loads:
                body = chat_body(load.route, False, prompt=load.prompt)
                many = measure(LoadSpec(url, body, headers, settings.connections, settings.duration, None,
                                        settings.warmup), gateway.pid, redis_pid, settle, served)
                served += many["total_requests"]
                one = measure(LoadSpec(url, body, headers, 1, settings.duration, None, settings.warmup),
                              gateway.pid, redis_pid, settle, served)
                served += one["total_requests"]
                figures["loads"][load.name + variant.row_suffix] = {"load": load.name, "baseline": load.baseline,
                                                                    "many": many, "one": one}
            if variant.stream_route is not None:
                spec = LoadSpec(url, chat_body(variant.stream_route, True), headers, 1, settings.duration, None,
                                settings.warmup)
                figures["stream"] = measure(spec, gateway.pid, redis_pid, settle, served)
                served += figures["stream"]["total_requests"]
            if variant.logs_rows:
                figures["requests_served"] = served
                figures["rows_written"] = wait_for_rows(port, served)
            if variant.name == "guardrails-pii":
                figures["findings"] = metric_samples(port, "lockgate_guardrail_findings_total")
        finally:
            stop(gateway)
    return figures


FIGURES: dict[str, tuple[str, Callable[[dict], float]]] = {
    "p50_ms_at_1": ("one", lambda phase: phase["latency_ms"]["p50"]),
    "p99_ms_at_1": ("one", lambda phase: phase["latency_ms"]["p99"]),
    "rps_at_n": ("many", lambda phase: phase["rps"]),
    "cpu_ms_per_request_at_n": ("many", lambda phase: phase["gateway_cpu_ms_per_request"]),
    "redis_cpu_ms_per_request_at_n": ("many", lambda phase: phase["redis_cpu_ms_per_request"]),
}


def summarize(variants: dict[str, dict]) -> dict[str, dict[str, float | str]]:
    """Per table row: its figures, and each one's ratio to the mean of the bare runs' same figure."""
    baselines: dict[str, list[dict]] = {}
    for figures in variants.values():
        if figures["is_baseline"]:
            for load in figures["loads"].values():
                baselines.setdefault(load["load"], []).append(load)
    rows: dict[str, dict[str, float | str]] = {}
    for figures in variants.values():
        for name, load in figures["loads"].items():
            bases = baselines[load["baseline"]]
            row: dict[str, float | str] = {"baseline": load["baseline"]}
            for figure, (phase, value) in FIGURES.items():
                base = sum(value(each[phase]) for each in bases) / len(bases)
                row[figure], row[f"{figure}_baseline"] = value(load[phase]), base
                row[f"{figure}_ratio"] = value(load[phase]) / max(base, 1e-9)
            row["added_p50_ms_at_1"] = float(row["p50_ms_at_1"]) - float(row["p50_ms_at_1_baseline"])
            rows[name] = row
    return rows


def stream_summary(variants: dict[str, dict]) -> dict[str, float]:
    bares = [figures["stream"] for figures in variants.values() if figures["is_baseline"]]
    masked = variants["guardrails-clean"]["stream"]
    summary = {f"bare_{figure}_{stat}_ms": sum(bare[f"{figure}_ms"][stat] for bare in bares) / len(bares)
               for figure in ("ttfb", "latency") for stat in ("p50", "p99")}
    summary |= {f"masked_{figure}_{stat}_ms": masked[f"{figure}_ms"][stat] for figure in ("ttfb", "latency")
                for stat in ("p50", "p99")}
    summary["added_ttfb_p50_ms"] = summary["masked_ttfb_p50_ms"] - summary["bare_ttfb_p50_ms"]
    return summary


def _verdict(value: float, limit: float, what: str) -> str:
    return f"{what} {value:.3f} < {limit:g} {'ok' if value < limit else 'MISSED'}"


def table(rows: dict[str, dict], stream: dict[str, float], logging: dict, connections: int) -> str:
    notes = {
        "guardrails-clean": _verdict(rows["guardrails-clean"]["added_p50_ms_at_1"],
                                     TARGETS["guardrails_clean_added_p50_ms"], "added p50"),
        "governance-memory": _verdict(rows["governance-memory"]["cpu_ms_per_request_at_n"],
                                      TARGETS["governance_memory_cpu_ms_per_request"], "CPU"),
        "governance-redis": f"+ redis-server {rows['governance-redis']['redis_cpu_ms_per_request_at_n']:.3f} CPU ms/req",
    }
    lines = [("", "p50 @1 conn (ms)", "p99 @1 conn (ms)", "added p50", f"req/s @{connections}",
              f"gateway CPU ms/req @{connections}", "target / note")]
    for name, row in rows.items():
        lines.append((name, f"{row['p50_ms_at_1']:.3f} x{row['p50_ms_at_1_ratio']:.2f}",
                      f"{row['p99_ms_at_1']:.3f} x{row['p99_ms_at_1_ratio']:.2f}", f"{row['added_p50_ms_at_1']:+.3f}",
                      f"{row['rps_at_n']:.0f} x{row['rps_at_n_ratio']:.2f}",
                      f"{row['cpu_ms_per_request_at_n']:.3f} x{row['cpu_ms_per_request_at_n_ratio']:.2f}",
                      notes.get(name, "")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ("xN: ratio to the same figure of the bare gateway (mean of its first and last run) with the same prompt; "
            "added p50: the difference\n\n")
    text += "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in lines)
    text += (f"\n\nstreamed, 20 chunks, 1 conn: time to first byte p50 bare {stream['bare_ttfb_p50_ms']:.3f} ms, "
             f"output pii: mask {stream['masked_ttfb_p50_ms']:.3f} ms "
             f"(p99 {stream['bare_ttfb_p99_ms']:.3f} / {stream['masked_ttfb_p99_ms']:.3f}; whole stream p50 "
             f"{stream['bare_latency_p50_ms']:.3f} / {stream['masked_latency_p50_ms']:.3f}); "
             + _verdict(stream["added_ttfb_p50_ms"], TARGETS["masked_stream_added_ttfb_p50_ms"], "added")
             + f"\nlogging-on: {logging['rows_written']:.0f} rows written of {logging['requests_served']} requests "
             "served (lockgate_inference_rows_written_total)")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each phase")
    parser.add_argument("--connections", type=int, default=16, help="connections of the throughput phases")
    parser.add_argument("--out", default="var/bench/features.json")
    args = parser.parse_args(argv)
    started, load_before = time.time(), os.getloadavg()
    variants: dict[str, dict] = {}
    mock, mock_port = start_mock(20)
    try:
        with redis_server() as redis:
            for variant in VARIANTS:
                variants[variant.name] = run_variant(variant, f"http://127.0.0.1:{mock_port}/v1", redis, args)
    finally:
        stop(mock)
    rows, stream = summarize(variants), stream_summary(variants)
    logging = {key: variants["logging-on"][key] for key in ("rows_written", "requests_served")}
    load_after = os.getloadavg()
    print(table(rows, stream, logging, args.connections))
    print(f"guardrails-pii findings: {variants['guardrails-pii']['findings']}")
    print(f"load average (1, 5, 15 min): before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": load_after},
        "settings": {"duration_s": args.duration, "warmup_s": args.warmup, "connections": args.connections,
                     "chunks": 20, "gateway_workers": 1},
        "targets": TARGETS, "rows": rows, "stream": stream, "logging": logging, "variants": variants,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {out} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
