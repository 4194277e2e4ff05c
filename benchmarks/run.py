"""`make bench`: the gateway's added latency, throughput and CPU per request against a mock upstream.

Starts the mock upstream and one gateway worker in their own processes, then drives each scenario twice, once
straight at the mock (direct) and once through the gateway, each time from a fresh load-generator process:
latency at 1 connection, throughput at 32 connections, non-streamed and streamed. The gateway's CPU time per
request comes from /proc/<pid>/stat (utime + stime of the gateway and its children) around each phase. The
Responses and Anthropic Messages doors then ask the same question through the same route, and their CPU per
request is set against chat completions' of the same round.
Prints a table and writes the figures as JSON (default var/bench/latest.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from benchmarks.loadgen import LoadSpec, chat_body, messages_body, responses_body, run_load_subprocess
from policies.keys import hash_key

ROUTE = "bench-chat"
PACED_ROUTE = "bench-chat-paced"
TARGETS = {"added_p50_ms_at_1": 1.0, "cpu_ms_per_request_plain": 0.4, "cpu_ms_per_request_stream": 0.6,
           "door_cpu_ratio_to_chat": 1.3}
# The other front doors, asked the same question through the same route: (label, path, body, extra headers).
DOORS = (("Responses API", "/v1/responses", responses_body, {}),
         ("Anthropic Messages API", "/v1/messages", messages_body, {"anthropic-version": "2023-06-01"}))
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def bench_policy(upstream_url: str, paced_upstream_url: str, key: str) -> str:
    """One key, a route to each mock; everything else at its defaults."""
    return f"""version: 1
keys:
  - {{id: bench, sha256: "{hash_key(key)}", user: bench}}
users:
  bench: {{groups: [bench]}}
roles:
  caller: {{models: ["*"]}}
bindings:
  - {{role: caller, group: bench}}
providers:
  mock: {{type: openai, base_url: "{upstream_url}", api_key: sk-mock}}
  mock-paced: {{type: openai, base_url: "{paced_upstream_url}", api_key: sk-mock}}
routes:
  {ROUTE}: {{targets: [{{provider: mock, model: mock-model}}]}}
  {PACED_ROUTE}: {{targets: [{{provider: mock-paced, model: mock-model}}]}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_tree_cpu_s(root: int) -> tuple[float, float]:
    """(utime, stime) of `root` and every live descendant, in seconds."""
    children: dict[int, list[int]] = {}
    times: dict[int, tuple[float, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            pid = int(entry)
            children.setdefault(int(fields[1]), []).append(pid)
            times[pid] = int(fields[11]) / _TICKS_PER_S, int(fields[12]) / _TICKS_PER_S
    user, system, todo = 0.0, 0.0, [root]
    while todo:
        pid = todo.pop()
        user += times.get(pid, (0.0, 0.0))[0]
        system += times.get(pid, (0.0, 0.0))[1]
        todo.extend(children.get(pid, []))
    return user, system


def start_mock(chunks: int, chunk_gap_ms: float = 0.0) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.mock_upstream", "--chunks", str(chunks),
                                "--chunk-gap-ms", str(chunk_gap_ms)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("listening on "):
        process.kill()
        raise RuntimeError(f"mock upstream did not start: {line!r}")
    return process, int(line.split()[-1])


def start_gateway(policy_path: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "LOCKGATE_LOG_LEVEL": os.environ.get("LOCKGATE_LOG_LEVEL", "WARNING")}
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", str(policy_path), "--port", str(port)],
                               env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited with code {process.returncode} before it was ready")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as reply:
            if reply.status == 200:
                return process
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the gateway was not ready within 60 s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def processes(chunks: int, chunk_gap_ms: float) -> Iterator[tuple[int, int, int, int, str]]:
    """Yields (mock pid, mock port, gateway pid, gateway port, key) while the mocks and the gateway run."""
    key = "lg-bench-" + secrets.token_urlsafe(16)
    mock, mock_port = start_mock(chunks)
    paced, paced_port = start_mock(chunks, chunk_gap_ms)
    try:
        with tempfile.TemporaryDirectory(prefix="lockgate-bench-") as folder:
            policy = Path(folder) / "policy.yaml"
            policy.write_text(bench_policy(f"http://127.0.0.1:{mock_port}/v1", f"http://127.0.0.1:{paced_port}/v1", key))
            gateway_port = free_port()
            gateway = start_gateway(policy, gateway_port)
            try:
                yield mock.pid, mock_port, gateway.pid, gateway_port, key
            finally:
                stop(gateway)
    finally:
        stop(paced)
        stop(mock)


def run_phase(spec: LoadSpec, gateway_pid: int, mock_pid: int) -> dict:
    before = process_tree_cpu_s(gateway_pid), process_tree_cpu_s(mock_pid)
    result = run_load_subprocess(spec)
    after = process_tree_cpu_s(gateway_pid), process_tree_cpu_s(mock_pid)
    per_request_ms = 1000 / max(result.total_requests, 1)
    gateway_user, gateway_system = (after[0][0] - before[0][0]) * per_request_ms, (after[0][1] - before[0][1]) * per_request_ms
    return {**asdict(result),
            "gateway_cpu_ms_per_request": gateway_user + gateway_system,
            "gateway_user_ms_per_request": gateway_user, "gateway_system_ms_per_request": gateway_system,
            "mock_cpu_ms_per_request": sum(after[1]) * per_request_ms - sum(before[1]) * per_request_ms}


def _check(name: str, phase: dict) -> dict:
    if phase["errors"]:
        print(f"warning: {name}: {phase['errors']} failed requests {phase['statuses']}", file=sys.stderr)
    return phase


def run_round(chunks: int, chunk_gap_ms: float, duration_s: float, warmup_s: float, connections: int) -> dict[str, dict]:
    """One pass over every scenario; keys are `<plain|stream|paced>/<c1|cN>/<direct|gateway>`."""
    phases: dict[str, dict] = {}
    with processes(chunks, chunk_gap_ms) as (mock_pid, mock_port, gateway_pid, gateway_port, key):
        gateway_url = f"http://127.0.0.1:{gateway_port}/v1/chat/completions"
        gateway_auth = {"Authorization": f"Bearer {key}"}
        for stream in (False, True):
            body = chat_body(ROUTE, stream)
            for conns in (1, connections):
                for path, url, headers in (
                    ("direct", f"http://127.0.0.1:{mock_port}/v1/chat/completions", {"Authorization": "Bearer sk-mock"}),
                    ("gateway", gateway_url, gateway_auth),
                ):
                    spec = LoadSpec(url, body, headers, conns, duration_s, None, warmup_s)
                    name = f"{'stream' if stream else 'plain'}/c{conns}/{path}"
                    phases[name] = _check(name, run_phase(spec, gateway_pid, mock_pid))
        paced = LoadSpec(gateway_url, chat_body(PACED_ROUTE, True), gateway_auth, connections, duration_s, None, warmup_s)
        phases[f"paced/c{connections}/gateway"] = _check("paced", run_phase(paced, gateway_pid, mock_pid))
        for _, path, door_body, door_headers in DOORS:
            for stream in (False, True):
                spec = LoadSpec(f"http://127.0.0.1:{gateway_port}{path}", door_body(ROUTE, stream),
                                {**gateway_auth, **door_headers}, connections, duration_s, None, warmup_s)
                name = f"{path}/{'stream' if stream else 'plain'}/c{connections}"
                phases[name] = _check(name, run_phase(spec, gateway_pid, mock_pid))
    return phases


def summarize(rounds: list[dict[str, dict]], connections: int) -> dict[str, dict[str, float]]:
    """Per figure: the median over rounds, and the min and max as the spread."""
    figures: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        figures.setdefault(name, []).append(value)

    for phases in rounds:
        for kind in ("plain", "stream"):
            one, many = f"{kind}/c1", f"{kind}/c{connections}"
            for path in ("direct", "gateway"):
                add(f"{kind}.p50_ms_at_1.{path}", phases[f"{one}/{path}"]["latency_ms"]["p50"])
                add(f"{kind}.p99_ms_at_1.{path}", phases[f"{one}/{path}"]["latency_ms"]["p99"])
                add(f"{kind}.rps_at_{connections}.{path}", phases[f"{many}/{path}"]["rps"])
            add(f"{kind}.added_p50_ms_at_1", phases[f"{one}/gateway"]["latency_ms"]["p50"]
                - phases[f"{one}/direct"]["latency_ms"]["p50"])
            add(f"{kind}.gateway_cpu_ms_per_request_at_1", phases[f"{one}/gateway"]["gateway_cpu_ms_per_request"])
            add(f"{kind}.gateway_cpu_ms_per_request_at_{connections}",
                phases[f"{many}/gateway"]["gateway_cpu_ms_per_request"])
            add(f"{kind}.mock_cpu_ms_per_request_at_{connections}", phases[f"{many}/direct"]["mock_cpu_ms_per_request"])
        paced = phases[f"paced/c{connections}/gateway"]
        add(f"paced.rps_at_{connections}.gateway", paced["rps"])
        add(f"paced.gateway_cpu_ms_per_request_at_{connections}", paced["gateway_cpu_ms_per_request"])
        for _, path, _, _ in DOORS:
            for kind in ("plain", "stream"):
                cpu = phases[f"{path}/{kind}/c{connections}"]["gateway_cpu_ms_per_request"]
                add(f"{path}.{kind}.gateway_cpu_ms_per_request_at_{connections}", cpu)
                # A ratio per round: both phases ran on the same gateway, minutes apart at most.
                add(f"{path}.{kind}.cpu_ratio_to_chat",
                    cpu / phases[f"{kind}/c{connections}/gateway"]["gateway_cpu_ms_per_request"])
                add(f"{path}.{kind}.rps_at_{connections}", phases[f"{path}/{kind}/c{connections}"]["rps"])
    return {name: {"median": statistics.median(values), "min": min(values), "max": max(values)}
            for name, values in figures.items()}


def _cell(summary: dict[str, dict[str, float]], name: str, digits: int) -> str:
    figure = summary[name]
    text = f"{figure['median']:.{digits}f}"
    if figure["min"] != figure["max"]:
        text += f" [{figure['min']:.{digits}f}-{figure['max']:.{digits}f}]"
    return text


def _verdict(value: float, limit: float, below: bool = False) -> str:
    met = value < limit if below else value <= limit
    return f"{'<' if below else '<='} {limit:g} {'ok' if met else 'MISSED'}"


def table(summary: dict[str, dict[str, float]], connections: int, chunks: int, chunk_gap_ms: float) -> str:
    rows = [("", "direct", "gateway", "target")]
    for kind, label in (("plain", "non-streamed"), ("stream", f"streamed, {chunks} chunks")):
        cpu_target = TARGETS[f"cpu_ms_per_request_{kind}"]
        p50 = summary[f"{kind}.added_p50_ms_at_1"]["median"]
        cpu = summary[f"{kind}.gateway_cpu_ms_per_request_at_{connections}"]["median"]
        rows += [
            (f"{label}", "", "", ""),
            ("  p50 latency @1 conn (ms)", _cell(summary, f"{kind}.p50_ms_at_1.direct", 3),
             _cell(summary, f"{kind}.p50_ms_at_1.gateway", 3), ""),
            ("  p99 latency @1 conn (ms)", _cell(summary, f"{kind}.p99_ms_at_1.direct", 3),
             _cell(summary, f"{kind}.p99_ms_at_1.gateway", 3), ""),
            ("  added p50 @1 conn (ms)", "", _cell(summary, f"{kind}.added_p50_ms_at_1", 3),
             _verdict(p50, TARGETS["added_p50_ms_at_1"], below=True)),
            (f"  requests/s @{connections} conns", _cell(summary, f"{kind}.rps_at_{connections}.direct", 0),
             _cell(summary, f"{kind}.rps_at_{connections}.gateway", 0), ""),
            ("  gateway CPU ms/request @1 conn", "", _cell(summary, f"{kind}.gateway_cpu_ms_per_request_at_1", 3), ""),
            (f"  gateway CPU ms/request @{connections} conns", "",
             _cell(summary, f"{kind}.gateway_cpu_ms_per_request_at_{connections}", 3),
             _verdict(cpu, cpu_target)),
            (f"  mock CPU ms/request @{connections} conns", _cell(summary, f"{kind}.mock_cpu_ms_per_request_at_{connections}", 3),
             "", ""),
        ]
    paced_cpu = summary[f"paced.gateway_cpu_ms_per_request_at_{connections}"]["median"]
    rows += [
        (f"streamed, {chunks} chunks {chunk_gap_ms:g} ms apart", "", "", ""),
        (f"  requests/s @{connections} conns", "", _cell(summary, f"paced.rps_at_{connections}.gateway", 0), ""),
        (f"  gateway CPU ms/request @{connections} conns", "",
         _cell(summary, f"paced.gateway_cpu_ms_per_request_at_{connections}", 3),
         _verdict(paced_cpu, TARGETS["cpu_ms_per_request_stream"])),
    ]
    for label, path, _, _ in DOORS:
        for kind, what in (("plain", "non-streamed"), ("stream", f"streamed, {chunks} chunks")):
            ratio = summary[f"{path}.{kind}.cpu_ratio_to_chat"]["median"]
            rows += [
                (f"{label} ({path}), {what}, same route", "", "", ""),
                (f"  requests/s @{connections} conns", "", _cell(summary, f"{path}.{kind}.rps_at_{connections}", 0), ""),
                (f"  gateway CPU ms/request @{connections} conns", "",
                 _cell(summary, f"{path}.{kind}.gateway_cpu_ms_per_request_at_{connections}", 3), ""),
                ("  CPU per request / chat completions'", "", _cell(summary, f"{path}.{kind}.cpu_ratio_to_chat", 2),
                 _verdict(ratio, TARGETS["door_cpu_ratio_to_chat"])),
            ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each phase")
    parser.add_argument("--connections", type=int, default=32, help="connections of the throughput phases")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per streamed answer")
    parser.add_argument("--chunk-gap-ms", type=float, default=1.0, help="pause between the paced stream's chunks")
    parser.add_argument("--rounds", type=int, default=2, help="repeat everything; figures show median [min-max]")
    parser.add_argument("--out", default="var/bench/latest.json")
    args = parser.parse_args(argv)
    started = time.time()
    rounds = [run_round(args.chunks, args.chunk_gap_ms, args.duration, args.warmup, args.connections)
              for _ in range(args.rounds)]
    summary = summarize(rounds, args.connections)
    print(table(summary, args.connections, args.chunks, args.chunk_gap_ms))
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": {"duration_s": args.duration, "warmup_s": args.warmup, "connections": args.connections,
                     "chunks": args.chunks, "chunk_gap_ms": args.chunk_gap_ms, "rounds": args.rounds, "gateway_workers": 1},
        "targets": TARGETS,
        "summary": summary,
        "rounds": rounds,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {out} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
