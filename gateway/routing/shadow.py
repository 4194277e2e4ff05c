"""Shadow traffic: mirrored calls run as background tasks, bounded in number, recorded, and never awaited by clients."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Coroutine

from prometheus_client import Counter, Gauge

from gateway.exchange import Exchange

log = logging.getLogger("lockgate.shadow")

SHADOW_REQUESTS = Counter("lockgate_shadow_requests", "Shadow calls by outcome: started, skipped (too many in flight)",
                          ["route", "outcome"])
SHADOW_IN_FLIGHT = Gauge("lockgate_shadow_in_flight", "Shadow calls running", multiprocess_mode="livesum")

Record = Callable[[Exchange], None]


class ShadowRunner:
    """Owns the shadow tasks of the app; `record` receives each shadow call's Exchange once it finished."""

    def __init__(self, max_in_flight: int = 64, record: Record | None = None, start_delay_s: float = 0.005) -> None:
        self.max_in_flight = max_in_flight
        self.record = record
        self.start_delay_s = start_delay_s
        self._tasks: set[asyncio.Task[None]] = set()
        self._counters: dict[tuple[str, str], object] = {}

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def _count(self, route: str, outcome: str) -> None:
        counter = self._counters.get((route, outcome))
        if counter is None:
            counter = self._counters[(route, outcome)] = SHADOW_REQUESTS.labels(route, outcome)
        counter.inc()  # type: ignore[attr-defined]

    @staticmethod
    def wanted(percent: float) -> bool:
        return percent >= 100 or (percent > 0 and random.random() * 100 < percent)

    def start(self, ex: Exchange, call: Callable[[Exchange], Coroutine[None, None, None]]) -> bool:
        """Runs `call(ex)` in the background unless too many shadows are in flight; False when skipped."""
        if len(self._tasks) >= self.max_in_flight:
            self._count(ex.route, "skipped")
            return False
        self._count(ex.route, "started")
        task = asyncio.get_running_loop().create_task(self._run(ex, call))
        self._tasks.add(task)
        SHADOW_IN_FLIGHT.inc()
        task.add_done_callback(self._finished)
        return True

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        SHADOW_IN_FLIGHT.dec()

    async def _run(self, ex: Exchange, call: Callable[[Exchange], Coroutine[None, None, None]]) -> None:
        # The shadow is started once the client's answer is in hand, but the handler still has steps to run
        # (settling limits, writing the response) that may yield; the pause lets them go first (benchmarked).
        await asyncio.sleep(self.start_delay_s)
        try:
            await call(ex)
        except Exception:
            log.exception("shadow call to route %s failed", ex.route)
            ex.status, ex.error_type, ex.error_code = 500, "api_error", "internal_error"
        if self.record is not None:
            try:
                self.record(ex)
            except Exception:
                log.exception("recording shadow call %s failed", ex.request_id)

    async def close(self, grace_s: float = 5.0) -> None:
        """Lets running shadows finish for up to `grace_s`, then cancels the rest and waits for them."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
