"""Full governance next to the RBAC-only gateway and the bare upstream: CPU, tail latency, memory, start-up, scaling.

One mock upstream and one throw-away redis-server serve the whole run. Each round starts every variant one after the
other (start-up and idle RSS are measured then), runs each phase on all of them in turn, and stops them (the order
reversed every other round, so drift hits all of them): straight at the mock (direct),
RBAC only, full governance with limits in memory, the same with limits in Redis, the Redis one with the inference
table at a ClickHouse server DSN that is down (the writer spools); that last one and the chdb one again with
`--workers 2`. Each load phase runs in a fresh load-generator process. Prints a table (median [min-max] over rounds),
the issue's goals with their verdicts, and the scaling pairs (requests/s and CPU per request, 1 worker next to 2, and
what bounds the 2); writes every figure as JSON (default var/bench/governance.json).
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import http.client
import json
import os
import platform
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from benchmarks.features import bare_policy, full_policy, redis_server
from benchmarks.loadgen import LoadSpec, chat_body, run_load_subprocess
from benchmarks.run import ROUTE, free_port, process_tree_cpu_s, start_mock, stop

ROOT = Path(__file__).resolve().parents[1]
SOURCE_PACKAGES = ("gateway", "policies", "guardrails", "runtime", "dashboards")
PolicyBuilder = Callable[[str, str, Path, str], dict]  # (upstream url, key, temporary folder, redis url) -> policy
GOALS = {"cpu_ratio_memory": 1.6, "cpu_ratio_redis": 2.2, "p99_ratio_at_1": 2.0, "idle_rss_mb": 450.0,
         "idle_rss_mb_server_dsn": 200.0, "start_s": 2.0, "loop_lag_ms": 5.0, "workers_rps_ratio": 1.7}
RSS_SAMPLE_S = 0.05
START_POLL_S = 0.02
SETTLE_TIMEOUT_S = 15.0
ROWS = ("lockgate_inference_rows_written_total", "lockgate_inference_rows_spooled_total")
PHASES = ("json_1", "json_n", "stream_n")
LAG_MAX, LAG_HISTOGRAM = "lockgate_event_loop_lag_max_seconds", "lockgate_event_loop_lag_seconds"


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    policy: PolicyBuilder | None  # None: straight at the mock upstream
    workers: int = 1
    phases: tuple[str, ...] = PHASES
    settle: str = ""  # "rows": after each phase, wait until the writers accounted for every request
    full: bool = False


def server_dsn_policy(dsn: str) -> PolicyBuilder:
    def build(upstream: str, key: str, folder: Path, redis_url: str) -> dict:
        policy = full_policy("redis")(upstream, key, folder, redis_url)
        policy["inference_table"]["clickhouse"] = dsn
        return policy
    return build


def variants(down_dsn: str) -> tuple[Variant, ...]:
    return (
        Variant("direct", "direct", None),
        Variant("rbac", "RBAC only", bare_policy),
        Variant("full-memory", "full, memory", full_policy("memory"), settle="rows", full=True),
        Variant("full-redis", "full, Redis", full_policy("redis"), settle="rows", full=True),
        Variant("full-server-dsn", "full, Redis, CH down", server_dsn_policy(down_dsn), settle="rows", full=True),
        # Under the supervisor one /metrics counts every worker's writer, so the rows settle as with one worker.
        Variant("full-server-dsn-2w", "2 workers", server_dsn_policy(down_dsn), workers=2, phases=("json_n",),
                settle="rows"),
        # The embedded default: the supervisor's one chdb writer serves both workers.
        Variant("full-memory-2w", "2 workers, chdb", full_policy("memory"), workers=2, phases=("json_n",),
                settle="rows"),
    )


# (1 worker, 2 workers, what they run): the scaling tables.
SCALING = (("full-server-dsn", "full-server-dsn-2w", "limits in Redis, inference table at a ClickHouse server DSN that "
            "is down (each worker's writer spools)"),
           ("full-memory", "full-memory-2w", "limits in memory (each worker its own), inference table on chdb (one "
            "writer, the supervisor's)"))


def tree_pids(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    todo.extend(int(child) for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    return pids


def tree_memory_mb(pids: list[int], field: str = "VmRSS") -> float:
    """The sum of one /proc/<pid>/status field (kB) over `pids`, in MB."""
    total_kb = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
            total_kb += next((int(line.split()[1]) for line in status if line.startswith(field + ":")), 0)
    return total_kb / 1024


class PeakRss(threading.Thread):
    """The largest sum of VmRSS over the process tree, sampled every 50 ms; the tree itself is re-read every second."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root, self.peak_mb, self.done = root, 0.0, threading.Event()

    def run(self) -> None:
        pids, samples = tree_pids(self.root), 0
        while True:
            self.peak_mb = max(self.peak_mb, tree_memory_mb(pids))
            if self.done.wait(RSS_SAMPLE_S):
                return
            samples += 1
            if samples % round(1 / RSS_SAMPLE_S) == 0:
                pids = tree_pids(self.root)

    def __enter__(self) -> PeakRss:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        self.join()


def settled_rss_mb(root: int) -> float:
    """Tree RSS once two readings 0.5 s apart differ by less than 1 MB (or after 5 s)."""
    deadline, last = time.monotonic() + 5, tree_memory_mb(tree_pids(root))
    while True:
        time.sleep(0.5)
        now = tree_memory_mb(tree_pids(root))
        if abs(now - last) < 1 or time.monotonic() > deadline:
            return now
        last = now


def machine_cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of every core since boot, from the first line of /proc/stat."""
    ticks = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def scrape(port: int) -> dict[str, float]:
    """Every sample of the gateway's /metrics, by its name with labels; empty when /metrics did not answer."""
    with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
        return {match[1]: float(match[2]) for match in re.finditer(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$",
                                                                     text, re.MULTILINE)}
    return {}


def metric_values(samples: dict[str, float], name: str) -> list[float]:
    return [value for sample, value in samples.items() if sample == name or sample.startswith(name + "{")]


def rows_accounted(samples: dict[str, float]) -> float:
    """Rows the inference writer wrote or spooled: one per request answered."""
    return sum(sum(metric_values(samples, name)) for name in ROWS)


def lag_over_5ms(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Loop-lag observations above 5 ms between two scrapes, when the histogram has a 5 ms bucket."""
    bucket, count = f'{LAG_HISTOGRAM}_bucket{{le="0.005"}}', f"{LAG_HISTOGRAM}_count"
    if bucket not in after or count not in after:
        return None
    return (after[count] - before.get(count, 0.0)) - (after[bucket] - before.get(bucket, 0.0))


def first_answer(port: int, body: bytes, key: str) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", "/v1/chat/completions", body,
                           {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        reply = connection.getresponse()
        reply.read()
        return reply.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def start_gateway(policy: Path, port: int, workers: int, key: str,
                  log: IO[bytes]) -> tuple[subprocess.Popen, float, float]:
    """Starts `gateway.cli serve`; returns it, the seconds from Popen to the first 200 of a chat completion, and to the
    first 200 of /readyz (a worker answers before Presidio has loaded, but says `starting` until then: a balancer
    sends it traffic only after that, so the measured phases start there too)."""
    env = {**os.environ, "LOCKGATE_LOG_LEVEL": os.environ.get("LOCKGATE_LOG_LEVEL", "WARNING")}
    body = chat_body(ROUTE, False)
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", str(policy), "--port", str(port),
                                "--workers", str(workers)], env=env, stdout=log, stderr=log)
    while not first_answer(port, body, key):
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited with code {process.returncode} before its first answer ({log.name})")
        if time.perf_counter() - started > 120:
            stop_tree(process)
            raise RuntimeError(f"the gateway gave no answer within 120 s ({log.name})")
        time.sleep(START_POLL_S)
    first_answer_s = time.perf_counter() - started
    while not is_ready(port):
        if process.poll() is not None or time.perf_counter() - started > 120:
            stop_tree(process)
            raise RuntimeError(f"the gateway was not ready within 120 s ({log.name})")
        time.sleep(START_POLL_S)
    return process, first_answer_s, time.perf_counter() - started


def is_ready(port: int) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as reply:
        return reply.status == 200
    return False


def stop_tree(process: subprocess.Popen) -> list[int]:
    """Stops the gateway, then kills (and returns) whatever of its tree outlived it by 5 s."""
    pids = tree_pids(process.pid)[1:]
    stop(process)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.1)
    leftover = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    for pid in leftover:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return leftover


@dataclass(frozen=True)
class Target:
    variant: Variant
    root: int  # the gateway's process (for direct: the mock's)
    url: str
    headers: dict[str, str]
    metrics_port: int | None


def run_phase(target: Target, phase: str, pids: dict[str, int], settings: argparse.Namespace) -> dict:
    """One load phase. CPU is counted over the load and the writer's settling after it; the load generator reports its
    own (from the start of its load to the end, its interpreter start left out)."""
    kind, connections = phase.split("_")
    spec = LoadSpec(target.url, chat_body(ROUTE, kind == "stream"), target.headers,
                    1 if connections == "1" else settings.connections, settings.duration, None, settings.warmup)
    port = target.metrics_port
    before = scrape(port) if port is not None else {}
    rows_before = rows_accounted(before)
    cpu_before, machine_before = {name: sum(process_tree_cpu_s(pid)) for name, pid in pids.items()}, machine_cpu_ticks()
    with PeakRss(target.root) as peak:
        result = run_load_subprocess(spec)
        # Over the load alone: the writers' settling after it leaves cores idle, which would hide a machine-bound load.
        machine = [now - then for now, then in zip(machine_cpu_ticks(), machine_before, strict=True)]
        settled: bool | None = None
        lags: list[float] = []  # each scrape resets the gauge to the largest lag since the previous one
        if target.variant.settle == "rows" and port is not None:
            deadline = time.monotonic() + SETTLE_TIMEOUT_S
            while True:
                polled = scrape(port)
                lags += metric_values(polled, LAG_MAX)
                settled = rows_accounted(polled) >= rows_before + result.total_requests
                if settled or time.monotonic() > deadline:
                    break
                time.sleep(0.25)
    cpu = {name: sum(process_tree_cpu_s(pid)) - cpu_before[name] for name, pid in pids.items()}
    after = scrape(port) if port is not None else {}
    if result.errors:
        print(f"warning: {target.variant.name} {phase}: {result.errors} failed requests {result.statuses}", file=sys.stderr)
    if settled is False:
        print(f"warning: {target.variant.name} {phase}: the writer did not account for every row in time", file=sys.stderr)
    per_request_ms = 1000 / max(result.total_requests, 1)
    lag_max = max(lags + metric_values(after, LAG_MAX), default=None)
    return {**asdict(result), "cpu_ms_per_request": cpu["target"] * per_request_ms,
            "redis_cpu_ms_per_request": cpu["redis"] * per_request_ms,
            "mock_cpu_ms_per_request": cpu["mock"] * per_request_ms, "loadgen_cpu_ms_per_request": result.cpu_s * per_request_ms,
            "machine_cores_busy": machine[0] / max(machine[1], 1) * (os.cpu_count() or 1),
            "peak_rss_mb": peak.peak_mb, "writer_settled": settled,
            "loop_lag_max_ms": None if lag_max is None else lag_max * 1000, "loop_lag_over_5ms": lag_over_5ms(before, after)}


@dataclass
class Running:
    """A started variant: where to send its load, the processes whose CPU a phase counts, and its figures so far."""
    target: Target
    pids: dict[str, int]
    figures: dict


@contextlib.contextmanager
def started(variant: Variant, mock: tuple[int, int], redis: tuple[str, int], log_dir: Path) -> Iterator[Running]:
    """Starts the variant's gateway (measuring start-up and idle RSS) and stops it on leaving; direct starts nothing."""
    (mock_pid, mock_port), (redis_url, redis_pid) = mock, redis
    if variant.policy is None:
        target = Target(variant, mock_pid, f"http://127.0.0.1:{mock_port}/v1/chat/completions",
                        {"Authorization": "Bearer sk-mock"}, None)
        yield Running(target, {"target": mock_pid, "redis": redis_pid, "mock": mock_pid},
                      {"start_s": None, "ready_s": None, "idle_rss_mb": settled_rss_mb(mock_pid), "phases": {}})
        return
    key = "lg-bench-" + secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix=f"lockgate-{variant.name}-") as name, \
            open(log_dir / f"governance-{variant.name}.log", "ab") as log:
        folder = Path(name)
        policy = folder / "policy.yaml"
        policy.write_text(json.dumps(variant.policy(f"http://127.0.0.1:{mock_port}/v1", key, folder, redis_url)))
        port = free_port()
        process, start_s, ready_s = start_gateway(policy, port, variant.workers, key, log)
        figures: dict = {"start_s": start_s, "ready_s": ready_s, "phases": {}}
        try:
            figures["idle_rss_mb"] = settled_rss_mb(process.pid)
            target = Target(variant, process.pid, f"http://127.0.0.1:{port}/v1/chat/completions",
                            {"Authorization": f"Bearer {key}"}, port)
            yield Running(target, {"target": process.pid, "redis": redis_pid, "mock": mock_pid}, figures)
        finally:
            figures["leftover_processes"] = stop_tree(process)


def run_round(order: tuple[Variant, ...], mock: tuple[int, int], redis: tuple[str, int], log_dir: Path,
              settings: argparse.Namespace, number: int) -> dict[str, dict]:
    """Starts every variant one after the other, then runs each phase on every variant in turn: a phase's loads on the
    variants follow each other within seconds, so the machine's drift (tens of percent within minutes on these
    shared cores) meets them alike, where a variant measured whole before the next moved ratios by up to 2.6x."""
    running: dict[str, Running] = {}
    with contextlib.ExitStack() as stack:
        for variant in order:
            print(f"round {number}/{settings.rounds}: starting {variant.name}", file=sys.stderr, flush=True)
            running[variant.name] = stack.enter_context(started(variant, mock, redis, log_dir))
        for phase in PHASES:
            for variant in order:
                if phase in variant.phases:
                    print(f"round {number}/{settings.rounds}: {phase} {variant.name}", file=sys.stderr, flush=True)
                    one = running[variant.name]
                    one.figures["phases"][phase] = run_phase(one.target, phase, one.pids, settings)
        for one in running.values():
            one.figures["hwm_sum_mb"] = tree_memory_mb(tree_pids(one.target.root), "VmHWM")
            one.figures["table"] = {label: read(one.figures) for label, (_, read) in FIGURES.items()}
    # Read after the stack has stopped them all: each variant's figures then hold its leftover processes too.
    return {name: one.figures for name, one in running.items()}


def at(phase: str, *path: str) -> Callable[[dict], float | None]:
    """Reads one figure of one phase (None when the variant has no such phase)."""
    def read(figures: dict) -> float | None:
        value = figures["phases"].get(phase)
        for step in path:
            value = None if value is None else value[step]
        return value
    return read


def over_phases(name: str, combine: Callable[[list[float]], float]) -> Callable[[dict], float | None]:
    """One figure of every phase combined (None when no phase has it)."""
    def read(figures: dict) -> float | None:
        known = [phase[name] for phase in figures["phases"].values() if phase[name] is not None]
        return combine(known) if known else None
    return read


CPU_JSON, CPU_STREAM, P99_AT_1 = "gateway CPU ms/req, JSON @N", "gateway CPU ms/req, stream @N", "p99 ms, JSON @1"
REDIS_JSON, REDIS_STREAM = "  redis-server CPU ms/req, JSON @N", "  redis-server CPU ms/req, stream @N"
IDLE_RSS, PEAK_RSS = "idle RSS MB, whole tree", "peak RSS MB, whole tree, under load"
START, LAG = "start to first answer s", "max event-loop lag ms, all phases"
READY = "start to ready (/readyz 200) s"
# At one connection the cores are not all busy, so a late timer is the gateway's own stall, not a wait for a core.
LAG_AT_1 = "max event-loop lag ms, JSON @1"
FIGURES: dict[str, tuple[int, Callable[[dict], float | None]]] = {  # table row: (digits, value)
    CPU_JSON: (3, at("json_n", "cpu_ms_per_request")),
    CPU_STREAM: (3, at("stream_n", "cpu_ms_per_request")),
    REDIS_JSON: (3, at("json_n", "redis_cpu_ms_per_request")),
    REDIS_STREAM: (3, at("stream_n", "redis_cpu_ms_per_request")),
    "p50 ms, JSON @1": (3, at("json_1", "latency_ms", "p50")),
    P99_AT_1: (3, at("json_1", "latency_ms", "p99")),
    "p50 ms, JSON @N": (2, at("json_n", "latency_ms", "p50")),
    "p99 ms, JSON @N": (2, at("json_n", "latency_ms", "p99")),
    "requests/s, JSON @N": (0, at("json_n", "rps")),
    "requests/s, stream @N": (0, at("stream_n", "rps")),
    IDLE_RSS: (0, lambda figures: figures["idle_rss_mb"]),
    PEAK_RSS: (0, over_phases("peak_rss_mb", max)),
    START: (2, lambda figures: figures["start_s"]),
    READY: (2, lambda figures: figures["ready_s"]),
    LAG_AT_1: (2, at("json_1", "loop_lag_max_ms")),
    LAG: (2, over_phases("loop_lag_max_ms", max)),
    "event-loop lags over 5 ms, all phases": (0, over_phases("loop_lag_over_5ms", sum)),
    "load generator CPU ms/req, JSON @N": (3, at("json_n", "loadgen_cpu_ms_per_request")),
    "machine's cores busy, JSON @N": (2, at("json_n", "machine_cores_busy")),
}


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(rounds: list[dict[str, dict]], names: list[str]) -> dict[str, dict[str, dict[str, float] | None]]:
    summary: dict[str, dict[str, dict[str, float] | None]] = {}
    for label in FIGURES:
        summary[label] = {}
        for name in names:
            known = [value for measured in rounds if (value := measured[name]["table"][label]) is not None]
            summary[label][name] = spread(known) if known else None
    return summary


def cell(figure: dict[str, float] | None, digits: int) -> str:
    if figure is None:
        return "n/a"
    low, high = f"{figure['min']:.{digits}f}", f"{figure['max']:.{digits}f}"
    return f"{figure['median']:.{digits}f}" + ("" if low == high else f" [{low}-{high}]")


def render(lines: list[tuple[str, ...]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(text.ljust(widths[i]) for i, text in enumerate(line)).rstrip() for line in lines)


def main_table(summary: dict, shown: tuple[Variant, ...], connections: int) -> str:
    lines = [("", *(variant.label for variant in shown))]
    for label, (digits, _) in FIGURES.items():
        blank = {variant.name for variant in shown if label in (REDIS_JSON, REDIS_STREAM) and "Redis" not in variant.label}
        lines.append((label.replace("@N", f"@{connections}"),
                      *("" if variant.name in blank else cell(summary[label][variant.name], digits) for variant in shown)))
    return render(lines)


@dataclass(frozen=True)
class Goal:
    label: str
    value: Callable[[dict[str, dict]], float | None]  # one round's figure, from its variants' figures
    limit: float
    unit: str
    every_round: bool = False  # met only if met in every round; otherwise judged on the median
    at_least: bool = False
    info: bool = False  # shown next to a goal, judged by none


def goals(full_names: dict[str, str], connections: int) -> list[Goal]:
    def ratio(name: str, label: str, extra: str = "") -> Callable[[dict[str, dict]], float | None]:
        return lambda measured: ((measured[name]["table"][label] + (measured[name]["table"][extra] if extra else 0.0))
                                 / measured["rbac"]["table"][label])

    def own(name: str, figure: str) -> Callable[[dict[str, dict]], float | None]:
        return lambda measured: measured[name]["table"][figure]

    listed = [Goal(f"CPU {full_names[name]} / RBAC only, {what} @{connections}", ratio(name, label), GOALS[goal], "x")
              for name, goal in (("full-memory", "cpu_ratio_memory"), ("full-redis", "cpu_ratio_redis"))
              for what, label in (("JSON", CPU_JSON), ("stream", CPU_STREAM))]
    listed += [Goal(f"  the same with redis-server's CPU, {what}", ratio("full-redis", label, extra), GOALS["cpu_ratio_redis"],
                    "x", info=True)
               for what, label, extra in (("JSON", CPU_JSON, REDIS_JSON), ("stream", CPU_STREAM, REDIS_STREAM))]
    listed += [Goal(f"p99 @1 {label} / RBAC only", ratio(name, P99_AT_1), GOALS["p99_ratio_at_1"], "x", every_round=True)
               for name, label in full_names.items()]
    listed += [Goal(f"idle RSS MB, {label}", own(name, IDLE_RSS),
                    GOALS["idle_rss_mb_server_dsn" if name == "full-server-dsn" else "idle_rss_mb"], " MB")
               for name, label in full_names.items()]
    listed += [Goal(f"start to first answer s, {label}", own(name, START), GOALS["start_s"], " s")
               for name, label in {"rbac": "RBAC only", **full_names}.items()]
    listed += [Goal(f"max event-loop lag ms @1, {label}", own(name, LAG_AT_1),
                    GOALS["loop_lag_ms"], " ms", every_round=True) for name, label in full_names.items()]
    listed.append(Goal(f"requests/s 2 workers / 1 worker, JSON @{connections}",
                       lambda measured: measured["full-server-dsn-2w"]["phases"]["json_n"]["rps"]
                       / measured["full-server-dsn"]["phases"]["json_n"]["rps"], GOALS["workers_rps_ratio"], "x",
                       at_least=True))
    return listed


def judge(goal: Goal, rounds: list[dict[str, dict]]) -> dict:
    values = [goal.value(measured) for measured in rounds]
    known = [value for value in values if value is not None]
    worst = min if goal.at_least else max
    judged = None if not known else worst(known) if goal.every_round else statistics.median(known)
    met = None if judged is None or goal.info else judged >= goal.limit if goal.at_least else judged <= goal.limit
    return {"label": goal.label, "rounds": values, "median": statistics.median(known) if known else None,
            "limit": goal.limit, "unit": goal.unit, "at_least": goal.at_least, "every_round": goal.every_round, "met": met,
            "info": goal.info}


def goals_table(verdicts: list[dict]) -> str:
    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    lines = [("goal", *(f"round {n + 1}" for n in range(len(verdicts[0]["rounds"]))), "median", "goal", "verdict")]
    for verdict in verdicts:
        met = {None: "n/a", True: "ok", False: "MISSED"}[verdict["met"]]
        lines.append((verdict["label"], *(number(value) for value in verdict["rounds"]), number(verdict["median"]),
                      f"{'>=' if verdict['at_least'] else '<='} {verdict['limit']:g}{verdict['unit']}",
                      "(information)" if verdict["info"] else f"{met} ({'every round' if verdict['every_round'] else 'median'})"))
    return render(lines)


def scaling_table(rounds: list[dict[str, dict]], connections: int, one: str, two: str, what: str) -> str:
    cpus = os.cpu_count() or 1
    costs = ("cpu_ms_per_request", "loadgen_cpu_ms_per_request", "mock_cpu_ms_per_request", "redis_cpu_ms_per_request")

    def all_four(figures: dict) -> float:
        return sum(figures["phases"]["json_n"][cost] for cost in costs)

    rows: dict[str, tuple[Callable[[dict], float | None], int]] = {
        "requests/s": (at("json_n", "rps"), 0),
        "gateway CPU ms/req (whole tree)": (at("json_n", "cpu_ms_per_request"), 3),
        "load generator CPU ms/req": (at("json_n", "loadgen_cpu_ms_per_request"), 3),
        "mock CPU ms/req": (at("json_n", "mock_cpu_ms_per_request"), 3),
        "redis-server CPU ms/req": (at("json_n", "redis_cpu_ms_per_request"), 3),
        "all four, CPU ms/req": (all_four, 3),
        "cores busy (requests/s x all four)": (lambda figures: figures["phases"]["json_n"]["rps"] * all_four(figures) / 1000, 2),
        f"requests/s {cpus} cores allow at these costs": (lambda figures: cpus * 1000 / all_four(figures), 0),
        "machine's cores busy (every process)": (at("json_n", "machine_cores_busy"), 2),
        IDLE_RSS: (lambda figures: figures["table"][IDLE_RSS], 0),
        PEAK_RSS: (lambda figures: figures["table"][PEAK_RSS], 0),
    }
    names = (one, two)
    lines = [("", "1 worker", "2 workers", "2 / 1")]
    for label, (value, digits) in rows.items():
        per_round = {name: [v for r in rounds if (v := value(r[name])) is not None] for name in names}
        ratio = (f"{statistics.median(per_round[names[1]]) / statistics.median(per_round[names[0]]):.2f}x"
                 if all(per_round.values()) and statistics.median(per_round[names[0]]) else "")
        lines.append((label, *(cell(spread(per_round[name]), digits) for name in names), ratio))
    return (f"scaling: full governance, {what}; JSON @{connections}; requests/s and the CPU each request costs, 1 worker "
            "next to 2 under the supervisor (its CPU and the writers' included).\n" + render(lines) + "\n"
            + scaling_bound([measured[two] for measured in rounds], cpus, all_four)
            + f"\nThe load generator (Python), the mock and redis-server share the {cpus} cores with the workers: 'cores allow' "
            "is the most requests/s this machine gives at those costs; the machine's cores busy (/proc/stat, over the load "
            "phase) include whatever else runs.")


def scaling_bound(two: list[dict], cpus: int, all_four: Callable[[dict], float]) -> str:
    """What bounds the 2-worker figure, from its medians: the machine's cores when they are all busy, else the load."""
    busy = statistics.median(figures["phases"]["json_n"]["machine_cores_busy"] for figures in two)
    gateway = statistics.median(figures["phases"]["json_n"]["cpu_ms_per_request"] for figures in two)
    total = statistics.median(all_four(figures) for figures in two)
    ours = statistics.median(figures["phases"]["json_n"]["rps"] * all_four(figures) / 1000 for figures in two)
    if busy >= 0.9 * cpus:
        others = (f" {busy - ours:.2f} of the busy cores went to processes outside this benchmark."
                  if busy - ours > 0.25 else "")
        return (f"bound: the machine's {cpus} cores ({busy:.2f} busy). The gateway is {gateway / total:.0%} of the CPU a "
                f"request costs on this machine, so its workers get about {cpus * gateway / total:.2f} cores: 2 workers "
                "cannot double 1 here, the rest goes to the load generator, the mock and redis-server." + others)
    return (f"bound: not the cores ({busy:.2f} of {cpus} busy) but the load: its connections each wait for an answer "
            "before sending the next request.")


def compile_sources() -> None:
    """Starts measured as an installed gateway's: pip compiles a package's modules once, at install, but a source
    tree under PYTHONDONTWRITEBYTECODE (this machine's default) compiles ~100 of them again at every start."""
    for package in SOURCE_PACKAGES:
        compileall.compile_dir(ROOT / package, quiet=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="repeat every variant; figures show median [min-max]")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each phase")
    parser.add_argument("--connections", type=int, default=32, help="connections of the throughput phases")
    parser.add_argument("--quick", action="store_true", help="one round of 1 s phases")
    parser.add_argument("--out", default="var/bench/governance.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 1.0, 0.2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compile_sources()
    started, load_before = time.time(), os.getloadavg()
    down_dsn = f"http://127.0.0.1:{free_port()}"  # nothing listens there: the writer spools
    every = variants(down_dsn)
    rounds: list[dict[str, dict]] = []
    mock, mock_port = start_mock(20)
    try:
        with redis_server() as redis:
            for number in range(args.rounds):
                order = every if number % 2 == 0 else every[::-1]
                measured = run_round(order, (mock.pid, mock_port), redis, out.parent, args, number + 1)
                rounds.append({variant.name: measured[variant.name] for variant in every})
    finally:
        stop(mock)
    shown = tuple(variant for variant in every if variant.workers == 1)
    summary = summarize(rounds, [variant.name for variant in shown])
    verdicts = [judge(goal, rounds) for goal in goals({v.name: v.label for v in shown if v.full}, args.connections)]
    load_after = os.getloadavg()
    print(main_table(summary, shown, args.connections))
    print(f"\ndirect: the mock upstream's own process (CPU, RSS). 'full' = RBAC over 51 roles, request and token limits, "
          "max_parallel, a daily budget, PII guardrails (input block, output mask), the inference table (payloads, masking; "
          f"chdb, or for 'CH down' a ClickHouse server DSN {down_dsn} nothing listens on). Stream: 20 chunks. RSS: sum of "
          "VmRSS over the process tree (worker + inference writer); peak: the largest such sum sampled every 50 ms during "
          f"the load phases. Event-loop lag: the largest {LAG_MAX} of the scrapes during each phase, and the observations of "
          f"{LAG_HISTOGRAM} (a probe every 50 ms) above 5 ms; n/a: the gateway does not expose them. Machine's cores busy: "
          "/proc/stat over the phase, every process on the machine.\n")
    print(goals_table(verdicts))
    print()
    for one, two, what in SCALING:
        print(scaling_table(rounds, args.connections, one, two, what), end="\n\n")
    print(f"\nload average (1, 5, 15 min): before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": load_after},
        "settings": {"rounds": args.rounds, "duration_s": args.duration, "warmup_s": args.warmup,
                     "connections": args.connections, "chunks": 20, "down_clickhouse_dsn": down_dsn,
                     "rss": "sum of VmRSS over the process tree, sampled every 50 ms (hwm_sum_mb: VmHWM summed, at the end)",
                     "variants": {variant.name: {"label": variant.label, "workers": variant.workers} for variant in every}},
        "goals": GOALS, "summary": summary, "verdicts": verdicts, "rounds": rounds,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {out} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
