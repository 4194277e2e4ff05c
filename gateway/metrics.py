"""Prometheus metrics of the gateway; children are cached so the hot path does no label parsing."""

from __future__ import annotations

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
