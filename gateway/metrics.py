"""Prometheus metrics of the gateway; children are cached so the hot path does no label parsing.

Under the supervisor (PROMETHEUS_MULTIPROC_DIR set before this import) every value lives in a per-process file that
any worker's /metrics reads whole: a gauge says how the processes' values combine (its multiprocess_mode), and a
gauge read from a function is written to its file every SAMPLE_S by its process, since the scrape cannot call it.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import time
import weakref
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.values import ValueClass

# prometheus_client chose its value store when first imported, from the same variable.
MULTIPROCESS = bool(getattr(ValueClass, "_multiprocess", False)) and bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
SAMPLE_S = 1.0

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter("lockgate_requests", "Requests answered", ["route", "endpoint", "status"])
LATENCY = Histogram("lockgate_request_duration_seconds", "Time from request to last byte", ["route", "endpoint"],
                    buckets=_LATENCY_BUCKETS)
UPSTREAM_LATENCY = Histogram("lockgate_upstream_duration_seconds", "Time spent waiting on the upstream",
                             ["provider"], buckets=_LATENCY_BUCKETS)
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


class SampledGauge(Gauge):
    """A gauge whose value a function gives. In one process the scrape calls it; under the supervisor the scrape reads
    files, so `sample_gauges` (each worker's loop-lag watch, the supervisor's loop) writes the function's value."""

    def set_function(self, f: Callable[[], float]) -> None:
        if MULTIPROCESS:
            # Read at the next sample only: an owner may register before it holds what the function reads.
            _SAMPLED[self] = f
        else:
            super().set_function(f)


_SAMPLED: weakref.WeakKeyDictionary[SampledGauge, Callable[[], float]] = weakref.WeakKeyDictionary()


def sample_gauges() -> None:
    for gauge, read in list(_SAMPLED.items()):
        gauge.set(read())


class InFlightCount:
    """Under the supervisor: requests being served, counted in the process and written with the sampled gauges, which
    saves every request two file writes (10 k instructions); a scrape sees it at most SAMPLE_S late."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


def _in_flight() -> Gauge | InFlightCount:
    gauge = SampledGauge("lockgate_in_flight_requests", "Requests being served", multiprocess_mode="livesum")
    if not MULTIPROCESS:
        return gauge
    count = InFlightCount()
    gauge.set_function(lambda: count.value)
    return count


IN_FLIGHT = _in_flight()


@functools.cache
def _frozen_objects_gauge() -> Gauge:
    # Made by a worker only: a gauge made by every process that imports this module would hold the supervisor's and
    # the writer's 0 (they freeze nothing), and the workers' minimum would always read 0.
    return Gauge("lockgate_gc_frozen_objects", "Objects of the start-up heap (modules, policy, Presidio) frozen out "
                 "of the cyclic collector's walks (workers: the smallest worker's)", multiprocess_mode="livemin")


def record_frozen_objects() -> None:
    """After each freeze of a worker's heap, never at a scrape or a sample: counting walks the frozen objects one by
    one, ~25 ms with Presidio's, which at every scrape stalled the loop that long."""
    _frozen_objects_gauge().set(gc.get_freeze_count())


class LoopLagWatch:
    """Wakes every LOOP_LAG_PROBE_S and records how late it woke. The gauge shows the worst since the last scrape; under
    the supervisor (the scrape is any worker's) the worst of the last LAG_WINDOW_S to 2 x LAG_WINDOW_S, worst worker."""

    LAG_WINDOW_S = 15.0

    def __init__(self) -> None:
        self._worst = 0.0
        self._previous_window = 0.0
        self._window_ends = time.monotonic() + self.LAG_WINDOW_S
        self._gauge = Gauge("lockgate_event_loop_lag_max_seconds", "The longest event-loop stall since the last scrape "
                            "(one process) or in the last 15 to 30 s (workers: the worst worker's)",
                            multiprocess_mode="livemax")
        if not MULTIPROCESS:
            self._gauge.set_function(self._take_worst)

    def _take_worst(self) -> float:
        worst, self._worst = self._worst, 0.0
        return worst

    def _publish(self, now: float) -> None:
        """Once per sample: the window moves on, the gauge and the sampled gauges are written to this process's file."""
        if now >= self._window_ends:
            self._previous_window, self._worst = self._worst, 0.0
            self._window_ends = now + self.LAG_WINDOW_S
        self._gauge.set(max(self._worst, self._previous_window))
        sample_gauges()

    async def run(self) -> None:
        next_sample = time.monotonic()
        while True:
            expected = time.monotonic() + LOOP_LAG_PROBE_S
            await asyncio.sleep(LOOP_LAG_PROBE_S)
            now = time.monotonic()
            lag = max(now - expected, 0.0)
            LOOP_LAG.observe(lag)
            if lag > self._worst:
                self._worst = lag
            if MULTIPROCESS and now >= next_sample:
                next_sample = now + SAMPLE_S
                self._publish(now)


LOOP_LAG_WATCH = LoopLagWatch()
