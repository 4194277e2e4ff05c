"""Per-target circuit breakers: a target that keeps failing is skipped for a cooldown, then probed by one request.

Breakers live in a registry owned by the app and keyed by route name and target label, so a policy reload
keeps the state of every target it did not change; thresholds are read from the route config at each call.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import Gauge

from policies.schema import CircuitBreakerConfig

CLOSED, OPEN, HALF_OPEN = 0, 1, 2

# Each worker keeps its own breakers: under the supervisor, the worst live worker's state (non-zero: some worker avoids it).
BREAKER_STATE = Gauge("lockgate_circuit_breaker_state", "Circuit breaker state: 0 closed, 1 open, 2 half-open",
                      ["route", "target"], multiprocess_mode="livemax")


class CircuitBreaker:
    __slots__ = ("_clock", "_gauge", "failures", "opened_at", "probing", "state")

    def __init__(self, route: str, target: str, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._gauge = BREAKER_STATE.labels(route, target)
        self._gauge.set(CLOSED)
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.probing = False

    def _move(self, state: int) -> None:
        self.state = state
        self._gauge.set(state)

    def allow(self, config: CircuitBreakerConfig) -> bool:
        """Whether a request may go to the target now; once the cooldown is over, exactly one probe may."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if self._clock() - self.opened_at < config.cooldown_s:
                return False
            self._move(HALF_OPEN)
        if self.probing:
            return False
        self.probing = True
        return True

    def success(self) -> None:
        self.failures = 0
        self.probing = False
        if self.state != CLOSED:
            self._move(CLOSED)

    def failure(self, config: CircuitBreakerConfig) -> None:
        self.probing = False
        self.failures += 1
        if self.state == HALF_OPEN or (self.state == CLOSED and self.failures >= config.failures):
            self.opened_at = self._clock()
            self._move(OPEN)

    def abandon(self) -> None:
        """The request ended without a verdict on the target (cancelled, unsupported): let another probe go."""
        self.probing = False


class BreakerRegistry:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._breakers: dict[tuple[str, str], CircuitBreaker] = {}

    def get(self, route: str, target: str) -> CircuitBreaker:
        breaker = self._breakers.get((route, target))
        if breaker is None:
            breaker = self._breakers[(route, target)] = CircuitBreaker(route, target, self._clock)
        return breaker
