"""Counter storage for the limiter: sliding-window counters, parallel slots and spend totals.

One call checks every counter a request touches and takes them all or none, so a request refused
by one limit never consumes another, and two processes on one Redis admit exactly N of N. The
window is the sliding-window counter that `limits` uses (previous window weighted by the part of
it still in view, plus the current one): two integers per window whatever the cost of a hit.
Redis runs it as one Lua script (one round trip, atomic, Redis's clock for every host); memory
runs the same steps without an await in between, which makes them atomic on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from policies.limiter_scripts import CHECK_AND_TAKE, SETTLE

log = logging.getLogger("lockgate.limiter")


@dataclass(frozen=True, slots=True)
class WindowSpec:
    key: str
    limit: int
    window_ms: int


@dataclass(frozen=True, slots=True)
class SlotSpec:
    key: str
    limit: int


@dataclass(frozen=True, slots=True)
class CapSpec:
    key: str
    cap: int


# previous window's count, current window's count, milliseconds since the current window began
WindowCount = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Counter values after the call (with this request's amounts when it was admitted)."""

    allowed: bool
    windows: list[WindowCount]
    slots_in_use: list[int]
    spent: list[int]


class StorageUnavailable(Exception):
    """The shared store could not answer in time; the limiter's `on_error` decides what follows."""


def weighted_count(count: WindowCount, window_ms: int) -> int:
    previous, current, elapsed_ms = count
    return previous * (window_ms - elapsed_ms) // window_ms + current


def window_blocks(count: WindowCount, limit: int, window_ms: int, amount: int) -> bool:
    weighted = weighted_count(count, window_ms)
    return weighted + amount > limit or weighted >= limit


class CounterStore:
    """Shared by every policy version of one process; counts the times the store failed."""

    uri: str

    def __init__(self, on_error: Callable[[str], None] | None = None) -> None:
        self.errors = 0
        self.on_error = on_error

    async def check_and_take(
        self,
        windows: Sequence[WindowSpec],
        amounts: Sequence[int],
        slots: Sequence[SlotSpec],
        caps: Sequence[CapSpec],
        member: str,
        lease_ms: int,
        take: bool = True,
    ) -> Snapshot:
        """Check every counter; when all pass and `take`, add the amounts and hold a slot as `member`."""
        raise NotImplementedError

    async def settle(
        self,
        windows: Sequence[WindowSpec],
        amount: int,
        caps: Sequence[CapSpec],
        spend: int,
        cap_ttl_ms: Sequence[int],
        slots: Sequence[SlotSpec],
        member: str,
    ) -> None:
        """Add `amount` to the windows and `spend` to the caps unconditionally; free `member`'s slots."""
        raise NotImplementedError

    async def close(self) -> None:
        return None


class MemoryCounterStore(CounterStore):
    uri = "memory://"

    def __init__(self, on_error: Callable[[str], None] | None = None) -> None:
        super().__init__(on_error)
        self._windows: dict[str, list[int]] = {}
        self._slots: dict[str, dict[str, int]] = {}
        self._caps: dict[str, list[int]] = {}

    def _window(self, spec: WindowSpec, now_ms: int) -> list[int]:
        index = now_ms // spec.window_ms
        record = self._windows.get(spec.key)
        if record is None:
            record = self._windows[spec.key] = [index, 0, 0]
        elif record[0] != index:
            record[1] = record[2] if record[0] == index - 1 else 0
            record[0], record[2] = index, 0
        return record

    def _cap(self, key: str, now_ms: int) -> list[int]:
        record = self._caps.get(key)
        if record is None:
            # Spend keys carry their period; old periods go once a new one starts.
            for stale in [k for k, (_, expires) in self._caps.items() if expires <= now_ms]:
                del self._caps[stale]
            record = self._caps[key] = [0, now_ms]
        elif record[1] <= now_ms:
            record[0] = 0
        return record

    async def check_and_take(
        self,
        windows: Sequence[WindowSpec],
        amounts: Sequence[int],
        slots: Sequence[SlotSpec],
        caps: Sequence[CapSpec],
        member: str,
        lease_ms: int,
        take: bool = True,
    ) -> Snapshot:
        now_ms = int(time.time() * 1000)
        allowed = True
        counts = []
        records = []
        for spec, amount in zip(windows, amounts, strict=True):
            record = self._window(spec, now_ms)
            count = (record[1], record[2], now_ms - record[0] * spec.window_ms)
            allowed = allowed and not window_blocks(count, spec.limit, spec.window_ms, amount)
            counts.append(count)
            records.append(record)
        in_use = []
        for slot in slots:
            held = self._slots.setdefault(slot.key, {})
            if len(held) >= slot.limit:
                for expired in [m for m, expires in held.items() if expires <= now_ms]:
                    del held[expired]
            in_use.append(len(held))
            allowed = allowed and len(held) < slot.limit
        spent = []
        for cap in caps:
            record = self._caps.get(cap.key)
            value = record[0] if record is not None and record[1] > now_ms else 0
            spent.append(value)
            allowed = allowed and value < cap.cap
        if allowed and take:
            for i, (record, amount) in enumerate(zip(records, amounts, strict=True)):
                record[2] += amount
                counts[i] = (record[1], record[2], counts[i][2])
            for slot in slots:
                self._slots[slot.key][member] = now_ms + lease_ms
        return Snapshot(allowed, counts, in_use, spent)

    async def settle(
        self,
        windows: Sequence[WindowSpec],
        amount: int,
        caps: Sequence[CapSpec],
        spend: int,
        cap_ttl_ms: Sequence[int],
        slots: Sequence[SlotSpec],
        member: str,
    ) -> None:
        now_ms = int(time.time() * 1000)
        if amount > 0:
            for spec in windows:
                self._window(spec, now_ms)[2] += amount
        for cap, ttl_ms in zip(caps if spend > 0 else (), cap_ttl_ms, strict=False):
            record = self._cap(cap.key, now_ms)
            record[0] += spend
            record[1] = now_ms + ttl_ms
        for slot in slots:
            self._slots.get(slot.key, {}).pop(member, None)


class RedisCounterStore(CounterStore):
    def __init__(
        self,
        uri: str,
        timeout_s: float,
        max_connections: int,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(on_error)
        self.uri = uri
        self._timeout_s = timeout_s
        # A blocking pool makes a burst wait for a free connection instead of failing with
        # "Too many connections"; no retries, so a dead Redis answers within the timeout.
        pool = aioredis.BlockingConnectionPool.from_url(
            uri,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._client = aioredis.Redis(connection_pool=pool)
        self._check = self._client.register_script(CHECK_AND_TAKE)
        self._settle = self._client.register_script(SETTLE)
        self._healthy = True

    async def _run(self, script: AsyncScript, keys: list[str], args: list[object]) -> list[int]:
        try:
            # The outer deadline also covers waiting for a pooled connection and a script reload.
            async with asyncio.timeout(self._timeout_s * 3):
                result = await script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            self.errors += 1
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if self._healthy:
                log.warning("limiter storage %s unreachable: %s", self.uri, reason)
                self._healthy = False
            if self.on_error is not None:
                self.on_error(reason)
            raise StorageUnavailable(reason) from exc
        if not self._healthy:
            log.warning("limiter storage %s reachable again", self.uri)
            self._healthy = True
        return result

    async def check_and_take(
        self,
        windows: Sequence[WindowSpec],
        amounts: Sequence[int],
        slots: Sequence[SlotSpec],
        caps: Sequence[CapSpec],
        member: str,
        lease_ms: int,
        take: bool = True,
    ) -> Snapshot:
        keys = [w.key for w in windows] + [s.key for s in slots] + [c.key for c in caps]
        args: list[object] = [len(windows), len(slots), len(caps), member, lease_ms, int(take)]
        for spec, amount in zip(windows, amounts, strict=True):
            args += (spec.limit, spec.window_ms, amount)
        args += [s.limit for s in slots]
        args += [c.cap for c in caps]
        out = await self._run(self._check, keys, args)
        at = 2 + 3 * len(windows)
        counts = [(int(out[i]), int(out[i + 1]), int(out[i + 2])) for i in range(2, at, 3)]
        in_use = [int(v) for v in out[at : at + len(slots)]]
        spent = [int(v) for v in out[at + len(slots) :]]
        return Snapshot(out[0] == 1, counts, in_use, spent)

    async def settle(
        self,
        windows: Sequence[WindowSpec],
        amount: int,
        caps: Sequence[CapSpec],
        spend: int,
        cap_ttl_ms: Sequence[int],
        slots: Sequence[SlotSpec],
        member: str,
    ) -> None:
        if amount <= 0:
            windows = ()
        if spend <= 0:
            caps, cap_ttl_ms = (), ()
        if not windows and not caps and not slots:
            return
        keys = [w.key for w in windows] + [c.key for c in caps] + [s.key for s in slots]
        args: list[object] = [len(windows), len(caps), member]
        for spec in windows:
            args += (spec.window_ms, amount)
        for ttl_ms in cap_ttl_ms:
            args += (spend, ttl_ms)
        await self._run(self._settle, keys, args)

    async def close(self) -> None:
        await self._client.aclose()


def open_counter_store(
    uri: str, timeout_s: float = 0.5, max_connections: int = 64, on_error: Callable[[str], None] | None = None
) -> CounterStore:
    """`memory://` for one process; `redis://host:port/db` (or `rediss://`) shared by many."""
    if uri == "memory://":
        return MemoryCounterStore(on_error)
    if uri.startswith(("redis://", "rediss://")):
        return RedisCounterStore(uri, timeout_s, max_connections, on_error)
    raise ValueError(f"unsupported limiter storage {uri!r}: use memory:// or redis://host:port")
