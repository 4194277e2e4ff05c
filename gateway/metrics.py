"""Prometheus metrics of the gateway; children are cached so the hot path does no label parsing."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter("lockgate_requests", "Requests answered", ["route", "endpoint", "status"])
LATENCY = Histogram("lockgate_request_duration_seconds", "Time from request to last byte", ["route", "endpoint"],
                    buckets=_LATENCY_BUCKETS)
UPSTREAM_LATENCY = Histogram("lockgate_upstream_duration_seconds", "Time spent waiting on the upstream",
                             ["provider"], buckets=_LATENCY_BUCKETS)
IN_FLIGHT = Gauge("lockgate_in_flight_requests", "Requests being served")
ERRORS = Counter("lockgate_errors", "Error answers by error code", ["code", "status"])
RELOADS = Counter("lockgate_policy_reloads", "Policy reload attempts", ["result"])
LOOP_LAG = Histogram("lockgate_event_loop_lag_seconds", "How late the event loop woke a timer: time every request waited",
                     buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
LOOP_LAG_PROBE_S = 0.05

_requests: dict[tuple[str, str, int], object] = {}
_latency: dict[tuple[str, str], object] = {}
_upstream: dict[str, object] = {}
_errors: dict[tuple[str, int], object] = {}


def observe_request(route: str, endpoint: str, status: int, seconds: float) -> None:
    key = (route, endpoint, status)
    counter = _requests.get(key)
    if counter is None:
        counter = _requests[key] = REQUESTS.labels(route, endpoint, str(status))
    counter.inc()  # type: ignore[attr-defined]
    histogram = _latency.get(key[:2])
    if histogram is None:
        histogram = _latency[key[:2]] = LATENCY.labels(route, endpoint)
    histogram.observe(seconds)  # type: ignore[attr-defined]


def observe_upstream(provider: str, seconds: float) -> None:
    histogram = _upstream.get(provider)
    if histogram is None:
        histogram = _upstream[provider] = UPSTREAM_LATENCY.labels(provider)
    histogram.observe(seconds)  # type: ignore[attr-defined]


def count_error(code: str, status: int) -> None:
    counter = _errors.get((code, status))
    if counter is None:
        counter = _errors[(code, status)] = ERRORS.labels(code, str(status))
    counter.inc()  # type: ignore[attr-defined]


class LoopLagWatch:
    """Wakes every LOOP_LAG_PROBE_S and records how late it woke; the gauge shows the worst since the last scrape."""

    def __init__(self) -> None:
        self._worst = 0.0
        Gauge("lockgate_event_loop_lag_max_seconds", "The longest event-loop stall since the last scrape",
              ).set_function(self._take_worst)

    def _take_worst(self) -> float:
        worst, self._worst = self._worst, 0.0
        return worst

    async def run(self) -> None:
        while True:
            expected = time.monotonic() + LOOP_LAG_PROBE_S
            await asyncio.sleep(LOOP_LAG_PROBE_S)
            lag = max(time.monotonic() - expected, 0.0)
            LOOP_LAG.observe(lag)
            if lag > self._worst:
                self._worst = lag


LOOP_LAG_WATCH = LoopLagWatch()
