"""Counter storage for the limiter: sliding-window counters, parallel slots, spend totals and reservations.

One call checks every counter a request touches and takes them all or none, so a request refused
by one limit never consumes another, and two processes on one Redis admit exactly N of N. The
window is the sliding-window counter that `limits` uses (previous window weighted by the part of
it still in view, plus the current one): two integers per window whatever the cost of a hit.
Redis runs it as one Lua script (atomic, Redis's clock for every host; policies/limiter_redis.py);
memory runs the same steps without an await in between, which makes them atomic on the event loop.

Every admission that holds something until it settles (a parallel slot, a budget reservation) does
so under a lease id of its own that expires after `parallel_lease_s`, so a process that dies frees it.
A call that timed out on our side may still have run on Redis; `release` voids its lease id (in the
background, see `retry_in_background`) so neither a slot nor a reservation stays taken.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

log = logging.getLogger("lockgate.limiter")

VOID_PREFIX = "lg:void:"
# Background retries beyond this many at once are counted lost straight away: an outage must not pile up tasks.
_MAX_PENDING_RETRIES = 2_000
_LOST_LOG_INTERVAL_S = 10.0


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


@dataclass(slots=True)
class Snapshot:
    """Counter values after the call (with this request's amounts when it was admitted)."""

    allowed: bool
    windows: list[WindowCount]
    slots_in_use: list[int]
    spent: list[int]
    reserved: list[int]


class StorageUnavailable(Exception):
    """The shared store could not answer in time; the limiter's `on_error` decides what follows.

    `maybe_applied` is False only when the call provably never left this process (no connection)."""

    def __init__(self, reason: str, maybe_applied: bool = True) -> None:
        super().__init__(reason)
        self.maybe_applied = maybe_applied


def weighted_count(count: WindowCount, window_ms: int) -> int:
    previous, current, elapsed_ms = count
    return previous * (window_ms - elapsed_ms) // window_ms + current


def window_blocks(count: WindowCount, limit: int, window_ms: int, amount: int) -> bool:
    weighted = weighted_count(count, window_ms)
    return weighted + amount > limit or weighted >= limit


def budget_blocks(spent: int, reserved: int, cap: int, estimate: int) -> bool:
    """Spent up, or no room left for this request's estimate next to the reservations of requests in flight."""
    return spent >= cap or spent + reserved + estimate > cap


def redact_dsn(uri: str) -> str:
    """The DSN without its username and password, fit for logs and error messages."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "redis://***"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = ":***@" + netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k.lower() in ("password", "username") else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class CounterStore:
    """Shared by every policy version of one process; counts the times the store failed and the writes it lost."""

    uri: str

    def __init__(
        self, on_error: Callable[[str], None] | None = None, on_lost: Callable[[str], None] | None = None
    ) -> None:
        self.errors = 0
        self.lost = 0
        self.on_error = on_error
        self.on_lost = on_lost
        self._pending: set[asyncio.Task[None]] = set()
        self._lost_logged_at = float("-inf")
        self._closed = False

    async def check_and_take(
        self, windows: Sequence[WindowSpec], amounts: Sequence[int], slots: Sequence[SlotSpec], caps: Sequence[CapSpec],
        member: str, lease_ms: int, estimate: int = 0, take: bool = True,
    ) -> Snapshot:
        """Check every counter; when all pass and `take`, add the amounts, hold a slot and reserve
        `estimate` on every cap as `member` (both until `lease_ms`)."""
        raise NotImplementedError

    async def settle(
        self, windows: Sequence[WindowSpec], amount: int, caps: Sequence[CapSpec], spend: int, cap_ttl_ms: Sequence[int],
        slots: Sequence[SlotSpec], member: str, verify: bool = False,
    ) -> None:
        """Free `member`'s slots and reservations; add `amount` to the windows and `spend` to the caps,
        with `verify` only if `member` still held something (so a retried settle charges once)."""
        raise NotImplementedError

    def settle_soon(
        self, windows: Sequence[WindowSpec], amount: int, caps: Sequence[CapSpec], spend: int, cap_ttl_ms: Sequence[int],
        slots: Sequence[SlotSpec], member: str, on_failure: Callable[[], None],
    ) -> None:
        """`settle` without waiting for it: it lands before `close()` returns, or `on_failure` is called."""
        raise NotImplementedError

    async def release(self, slots: Sequence[SlotSpec], caps: Sequence[CapSpec], member: str, lease_ms: int) -> None:
        """Void `member`: free what it holds now, and make an admission of it that runs later take nothing."""
        raise NotImplementedError

    def retry_in_background(self, kind: str, attempt: Callable[[], Awaitable[None]], delays_s: Sequence[float]) -> None:
        """Tries `attempt` after each delay until one succeeds, off the request's path; counted lost if none does."""
        if self._closed:
            self._count_lost(kind, "the gateway stopped first")
            return
        if len(self._pending) >= _MAX_PENDING_RETRIES:
            self._count_lost(kind, "too many retries pending")
            return
        task = asyncio.get_running_loop().create_task(self._retry(kind, attempt, delays_s))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _retry(self, kind: str, attempt: Callable[[], Awaitable[None]], delays_s: Sequence[float]) -> None:
        reason = ""
        try:
            for delay in delays_s:
                await asyncio.sleep(delay)
                try:
                    await attempt()
                    return
                except StorageUnavailable as exc:
                    reason = str(exc)
        except asyncio.CancelledError:
            self._count_lost(kind, "the gateway stopped first")
            raise
        self._count_lost(kind, reason)

    def _count_lost(self, kind: str, reason: str) -> None:
        self.lost += 1
        if self.on_lost is not None:
            self.on_lost(kind)
        now = time.monotonic()
        if now - self._lost_logged_at >= _LOST_LOG_INTERVAL_S:
            self._lost_logged_at = now
            log.warning("limiter %s not recorded in %s (%d lost so far): %s", kind, self.uri, self.lost, reason)

    async def close(self, grace_s: float = 0.0) -> None:
        """Waits up to `grace_s` for background retries, then cancels the rest (counted lost)."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=grace_s)
            for task in list(self._pending):
                task.cancel()
            await asyncio.gather(*self._pending, return_exceptions=True)
        self._closed = True


@dataclass(slots=True)
class _Budget:
    """One spend total in memory: its spend and expiry, and the reservations of requests in flight."""

    spent: int = 0
    expires_ms: int = 0
    reserved: int = 0
    leases: dict[str, tuple[int, int]] = field(default_factory=dict)  # member -> (amount, expires_ms)
    first_expiry_ms: float = float("inf")

    def sweep(self, now_ms: int) -> None:
        if self.first_expiry_ms > now_ms:
            return
        for member in [m for m, (_, expires) in self.leases.items() if expires <= now_ms]:
            self.reserved -= self.leases.pop(member)[0]
        self.first_expiry_ms = min((expires for _, expires in self.leases.values()), default=float("inf"))

    def free(self, member: str) -> bool:
        lease = self.leases.pop(member, None)
        if lease is None:
            return False
        self.reserved -= lease[0]
        return True


class MemoryCounterStore(CounterStore):
    uri = "memory://"

    def __init__(
        self, on_error: Callable[[str], None] | None = None, on_lost: Callable[[str], None] | None = None
    ) -> None:
        super().__init__(on_error, on_lost)
        self._windows: dict[str, list[int]] = {}
        self._slots: dict[str, dict[str, int]] = {}
        self._budgets: dict[str, _Budget] = {}

    def _window(self, spec: WindowSpec, now_ms: int) -> list[int]:
        index = now_ms // spec.window_ms
        record = self._windows.get(spec.key)
        if record is None:
            record = self._windows[spec.key] = [index, 0, 0]
        elif record[0] != index:
            record[1] = record[2] if record[0] == index - 1 else 0
            record[0], record[2] = index, 0
        return record

    def _budget(self, key: str, now_ms: int) -> _Budget:
        record = self._budgets.get(key)
        if record is None:
            # Spend keys carry their period; old periods go once a new one starts.
            for stale in [k for k, b in self._budgets.items() if b.expires_ms <= now_ms and not b.leases]:
                del self._budgets[stale]
            record = self._budgets[key] = _Budget(expires_ms=now_ms)
        elif record.expires_ms <= now_ms:
            record.spent = 0
        return record

    async def check_and_take(
        self, windows: Sequence[WindowSpec], amounts: Sequence[int], slots: Sequence[SlotSpec], caps: Sequence[CapSpec],
        member: str, lease_ms: int, estimate: int = 0, take: bool = True,
    ) -> Snapshot:
        now_ms = int(time.time() * 1000)
        allowed = True
        counts = []
        records = []
        # _window and window_blocks, inline: this loop runs for every limit of every request.
        known = self._windows
        for spec, amount in zip(windows, amounts, strict=True):
            window_ms, limit = spec.window_ms, spec.limit
            index = now_ms // window_ms
            record = known.get(spec.key)
            if record is None:
                record = known[spec.key] = [index, 0, 0]
            elif record[0] != index:
                record[1] = record[2] if record[0] == index - 1 else 0
                record[0], record[2] = index, 0
            previous, current, elapsed_ms = record[1], record[2], now_ms - index * window_ms
            weighted = previous * (window_ms - elapsed_ms) // window_ms + current
            if weighted + amount > limit or weighted >= limit:
                allowed = False
            counts.append((previous, current, elapsed_ms))
            records.append(record)
        in_use = []
        for slot in slots:
            held = self._slots.setdefault(slot.key, {})
            if len(held) >= slot.limit:
                for expired in [m for m, expires in held.items() if expires <= now_ms]:
                    del held[expired]
            in_use.append(len(held))
            allowed = allowed and len(held) < slot.limit
        spent, reserved, budgets = [], [], []
        for cap in caps:
            budget = self._budgets.get(cap.key)
            if budget is None:
                value = held = 0
            else:
                budget.sweep(now_ms)
                value = budget.spent if budget.expires_ms > now_ms else 0
                held = budget.reserved
            spent.append(value)
            reserved.append(held)
            budgets.append(budget)
            allowed = allowed and not budget_blocks(value, held, cap.cap, estimate)
        if allowed and take:
            for i, (record, amount) in enumerate(zip(records, amounts, strict=True)):
                record[2] += amount
                counts[i] = (record[1], record[2], counts[i][2])
            for slot in slots:
                self._slots[slot.key][member] = now_ms + lease_ms
            if estimate > 0:
                expires = now_ms + lease_ms
                for cap, budget in zip(caps, budgets, strict=True):
                    record = budget if budget is not None else self._budget(cap.key, now_ms)
                    record.leases[member] = (estimate, expires)
                    record.reserved += estimate
                    if expires < record.first_expiry_ms:
                        record.first_expiry_ms = expires
        return Snapshot(allowed, counts, in_use, spent, reserved)

    def _free(self, slots: Sequence[SlotSpec], caps: Sequence[CapSpec], member: str) -> bool:
        held = False
        for cap in caps:
            budget = self._budgets.get(cap.key)
            held = (budget is not None and budget.free(member)) or held
        for slot in slots:
            held = self._slots.get(slot.key, {}).pop(member, None) is not None or held
        return held

    async def settle(
        self, windows: Sequence[WindowSpec], amount: int, caps: Sequence[CapSpec], spend: int, cap_ttl_ms: Sequence[int],
        slots: Sequence[SlotSpec], member: str, verify: bool = False,
    ) -> None:
        self._settle(windows, amount, caps, spend, cap_ttl_ms, slots, member, verify)

    def settle_soon(
        self, windows: Sequence[WindowSpec], amount: int, caps: Sequence[CapSpec], spend: int, cap_ttl_ms: Sequence[int],
        slots: Sequence[SlotSpec], member: str, on_failure: Callable[[], None],
    ) -> None:
        self._settle(windows, amount, caps, spend, cap_ttl_ms, slots, member, False)

    def _settle(
        self, windows: Sequence[WindowSpec], amount: int, caps: Sequence[CapSpec], spend: int, cap_ttl_ms: Sequence[int],
        slots: Sequence[SlotSpec], member: str, verify: bool,
    ) -> None:
        now_ms = int(time.time() * 1000)
        held = self._free(slots, caps, member) if member else False
        if verify and not held:
            return
        if amount > 0:
            for spec in windows:
                self._window(spec, now_ms)[2] += amount
        for cap, ttl_ms in zip(caps if spend > 0 else (), cap_ttl_ms, strict=False):
            budget = self._budget(cap.key, now_ms)
            budget.spent += spend
            budget.expires_ms = now_ms + ttl_ms

    async def release(self, slots: Sequence[SlotSpec], caps: Sequence[CapSpec], member: str, lease_ms: int) -> None:
        # Memory answers every call, so no admission can run after its release: freeing is enough.
        self._free(slots, caps, member)


def open_counter_store(
    uri: str,
    timeout_s: float = 0.5,
    max_connections: int = 64,
    on_error: Callable[[str], None] | None = None,
    on_lost: Callable[[str], None] | None = None,
) -> CounterStore:
    """`memory://` for one process; `redis://host:port/db` (or `rediss://`) shared by many, or a Redis Cluster:
    `redis+cluster://host:port[,host:port...]` (or `rediss+cluster://`).

    `max_connections` is a bound the Redis stores always keep: they pipeline every call over one connection
    (on a cluster, one to the node that owns the limiter's keys)."""
    if uri == "memory://":
        return MemoryCounterStore(on_error, on_lost)
    if uri.startswith(("redis://", "rediss://")):
        from policies.limiter_redis import RedisCounterStore

        return RedisCounterStore(uri, timeout_s, on_error, on_lost)
    if uri.startswith(("redis+cluster://", "rediss+cluster://")):
        from policies.limiter_cluster import ClusterCounterStore

        return ClusterCounterStore(uri, timeout_s, max_connections, on_error, on_lost)
    raise ValueError(
        f"unsupported limiter storage {redact_dsn(uri)!r}: use memory://, redis://host:port or redis+cluster://host:port"
    )


def __getattr__(name: str) -> Any:
    # Importable from here like every store, yet redis-py (~0.3 s, ~9 MB with what it pulls in) loads only for Redis.
    if name == "RedisCounterStore":
        from policies.limiter_redis import RedisCounterStore

        return RedisCounterStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
