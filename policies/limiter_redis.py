"""One Redis connection per process that carries every limiter call, the calls of concurrent requests pipelined.

Each call is its own script call (EVALSHA), so each stays atomic on Redis; what is shared is the trip:
the calls queued while a batch is in flight leave together in one write, and their replies are read in
order from one read. So the busier the gateway, the larger the batches and the less each call costs,
while a lone request pays one round trip as before. One batch at a time on one connection also means
that Redis runs this process's calls in the order they were made: a settle sent without waiting for
its answer still runs before any later call of the same process.

Every wait is bounded by the timeout: connecting, and each batch's write and replies (the scripts are
loaded in the first batch on a connection, and again after Redis answered NOSCRIPT). A batch that fails
is failed whole but for the replies already read, and the connection is dropped so that no late reply
can be taken for another call's; a call knows whether it may have reached Redis (`CallFailed.sent`).
A call Redis refuses (a script error) fails alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol
from urllib.parse import unquote, urlsplit

from guardrails.hidden_packages import hidden_packages
from policies.limiter_scripts import CHECK_AND_TAKE, RELEASE, SETTLE
from policies.limiter_storage import (
    VOID_PREFIX,
    CapSpec,
    CounterStore,
    SlotSpec,
    Snapshot,
    StorageUnavailable,
    WindowSpec,
    redact_dsn,
)

# redis-py imports OpenTelemetry's metrics SDK when it is installed (it is, for traces): ~0.12 s and psutil at start
# for redis-py's own client metrics, which the limiter does not turn on. Absent to this import, they stay off.
with hidden_packages(("opentelemetry", "psutil")):
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import NoScriptError, ResponseError

log = logging.getLogger("lockgate.limiter")

# Bounds: calls sent in one write, and calls waiting for a batch (beyond it a call fails at once, unsent).
_MAX_BATCH = 512
_MAX_QUEUED = 20_000

Reply = object
# The encoded pieces of a call that stay the same from call to call, by the ids of the counters' tuples.
_TemplateKey = tuple[object, ...]
_Template = tuple[tuple[Sequence[object], ...], object]
_MAX_TEMPLATES = 10_000
_VOID = VOID_PREFIX.encode()
SCRIPTS = (CHECK_AND_TAKE, SETTLE, RELEASE)
# A future for a caller that awaits the reply; a callback (reply or CallFailed) for one that does not.
Waiter = asyncio.Future[Reply] | Callable[[Reply], None]


class CallFailed(Exception):
    """No reply; `sent` is False only when the call provably never left this process. `refusal` is the error
    Redis answered, if it answered one (on a cluster, a redirect: the call did not run there)."""

    def __init__(self, reason: str, sent: bool, refusal: ResponseError | None = None) -> None:
        super().__init__(reason)
        self.sent = sent
        self.refusal = refusal


def bulks(*parts: bytes) -> bytes:
    """Arguments of a command in RESP (a command is `*N` and its N bulk strings). The pieces of a call that stay
    the same are encoded once (see RedisCounterStore._remember), so a call costs a join more than an encoding."""
    return b"".join([b"$%d\r\n%s\r\n" % (len(part), part) for part in parts])


def pack(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + bulks(*parts)


def digests(scripts: Sequence[str]) -> list[bytes]:
    """What EVALSHA names each script by."""
    return [hashlib.sha1(script.encode()).hexdigest().encode() for script in scripts]


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def deliver(waiter: Waiter, reply: Reply) -> None:
    if isinstance(waiter, asyncio.Future):
        if waiter.done():
            return
        if isinstance(reply, CallFailed):
            waiter.set_exception(reply)
        else:
            waiter.set_result(reply)
        return
    try:
        waiter(reply)
    except Exception:
        log.exception("limiter: a reply's callback failed")


class RedisPipeline:
    def __init__(self, uri: str, timeout_s: float, scripts: Sequence[str]) -> None:
        # No socket timeout of redis-py's own: every wait here has its deadline already, and no retries,
        # so a dead Redis answers within the timeout.
        pool = aioredis.ConnectionPool.from_url(
            uri, socket_timeout=None, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )
        self._connection = pool.make_connection()
        self._timeout_s = timeout_s
        self.shas = digests(scripts)
        self._loads = b"".join([pack(b"SCRIPT", b"LOAD", script.encode()) for script in scripts])
        self._loaded = False
        self._queue: list[tuple[bytes, Waiter, bool]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def call(self, command: bytes) -> Reply:
        """Sends `command` with the next batch and returns its reply; raises CallFailed."""
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._enqueue(command, future)
        return await future

    def send(self, command: bytes, done: Callable[[Reply], None]) -> None:
        """Sends `command` with the next batch without waiting: `done` gets its reply or a CallFailed."""
        self._enqueue(command, done)

    def _enqueue(self, command: bytes, waiter: Waiter) -> None:
        if len(self._queue) >= _MAX_QUEUED:
            deliver(waiter, CallFailed(f"more than {_MAX_QUEUED} limiter calls waiting for Redis", sent=False))
            return
        self._queue.append((command, waiter, False))
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch = self._queue[:_MAX_BATCH]
                del self._queue[:_MAX_BATCH]
                await self._run(batch)
        finally:
            self._flusher = None

    async def _run(self, batch: list[tuple[bytes, Waiter, bool]]) -> None:
        connection = self._connection
        answered = 0
        sent = False
        again: list[tuple[bytes, Waiter, bool]] = []
        try:
            if not connection.is_connected:
                self._loaded = False
                async with asyncio.timeout(self._timeout_s):
                    await connection.connect()
            data = b"".join([command for command, _, _ in batch])
            loading = not self._loaded
            async with asyncio.timeout(self._timeout_s):
                sent = True
                await connection.send_packed_command(self._loads + data if loading else data, check_health=False)
                if loading:
                    for sha in self.shas:
                        if await connection.read_response(disconnect_on_error=False) != sha:
                            raise ResponseError("SCRIPT LOAD answered another digest")
                    self._loaded = True
                for command, waiter, retried in batch:
                    try:
                        reply = await connection.read_response(disconnect_on_error=False)
                    except NoScriptError as exc:
                        # The server lost its scripts (SCRIPT FLUSH, a fail-over): the call did not run. Sent
                        # again first, after the scripts, so the calls still run in the order they were made.
                        self._loaded = False
                        if not retried:
                            answered += 1
                            again.append((command, waiter, True))
                            continue
                        reply = CallFailed(_describe(exc), sent=False)
                    except ResponseError as exc:
                        reply = CallFailed(_describe(exc), sent=True, refusal=exc)
                    answered += 1
                    deliver(waiter, reply)
                self._queue[:0] = again
        except asyncio.CancelledError:
            self._fail(again, "the gateway stopped first", sent=False)
            self._fail(batch[answered:], "the gateway stopped first", sent)
            await self._drop()
            raise
        except Exception as exc:
            # Whatever it was, the connection may hold replies nobody will read: start afresh.
            self._fail(again, _describe(exc), sent=False)
            self._fail(batch[answered:], _describe(exc), sent)
            await self._drop()

    @staticmethod
    def _fail(calls: list[tuple[bytes, Waiter, bool]], reason: str, sent: bool) -> None:
        for _, waiter, _ in calls:
            deliver(waiter, CallFailed(reason, sent))

    async def _drop(self) -> None:
        self._loaded = False
        with contextlib.suppress(Exception):
            await self._connection.disconnect(nowait=True)

    async def drain(self, timeout_s: float) -> None:
        """Waits up to `timeout_s` for the calls queued or in flight to be answered."""
        if self._flusher is not None:
            await asyncio.wait({self._flusher}, timeout=timeout_s)

    async def close(self) -> None:
        """Fails what is still queued or in flight, and closes the connection."""
        flusher = self._flusher
        if flusher is not None:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
        queued, self._queue = self._queue, []
        self._fail(queued, "the gateway stopped first", sent=False)
        await self._drop()


class Pipeline(Protocol):
    """Carries the store's calls: RedisPipeline to one Redis, ClusterPipeline to the node of a cluster that owns them."""

    shas: list[bytes]

    async def call(self, command: bytes) -> Reply: ...

    def send(self, command: bytes, done: Callable[[Reply], None]) -> None: ...

    async def drain(self, timeout_s: float) -> None: ...

    async def close(self) -> None: ...


def spend_keys(tag: bytes, caps: Sequence[CapSpec]) -> list[bytes]:
    """The three keys of each spend total (the total, its reservations' expiry times and amounts)."""
    return [tag + cap.key.encode() + suffix for cap in caps for suffix in (b"", b":rz", b":rh")]


class RedisCounterStore(CounterStore):
    # Prepended to every key the scripts touch: a cluster store's hash tag (see policies/limiter_cluster.py).
    key_tag = b""

    def __init__(
        self,
        uri: str,
        timeout_s: float,
        on_error: Callable[[str], None] | None = None,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(on_error, on_lost)
        self.uri = redact_dsn(uri)
        password = urlsplit(uri).password or ""
        # Belt and braces: no driver message is known to quote them, but none may ever reach a log.
        self._secrets = [uri, *{s for s in (password, unquote(password)) if len(s) >= 4}]
        self._timeout_s = timeout_s
        self._pipeline = self._open(uri, timeout_s)
        self._check, self._settle, self._release = self._pipeline.shas
        self._void = self.key_tag + _VOID
        self._healthy = True
        self._templates: dict[_TemplateKey, _Template] = {}

    def _open(self, uri: str, timeout_s: float) -> Pipeline:
        return RedisPipeline(uri, timeout_s, SCRIPTS)

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _failed(self, exc: CallFailed) -> StorageUnavailable:
        self.errors += 1
        reason = self._scrub(str(exc))
        if self._healthy:
            log.warning("limiter storage %s unreachable: %s", self.uri, reason)
            self._healthy = False
        if self.on_error is not None:
            self.on_error(reason)
        return StorageUnavailable(reason, exc.sent)

    def _answered(self) -> None:
        log.warning("limiter storage %s reachable again", self.uri)
        self._healthy = True

    async def _call(self, command: bytes) -> list[int]:
        try:
            reply = await self._pipeline.call(command)
        except CallFailed as exc:
            raise self._failed(exc) from exc
        if not self._healthy:
            self._answered()
        return reply  # type: ignore[return-value]

    def _remember(self, key: _TemplateKey, counters: tuple[Sequence[object], ...], template: object) -> _Template:
        entry = (counters, template)
        if all(type(c) is tuple for c in counters):
            # The entry holds its tuples, so their ids (its key) stay theirs for as long as it lives.
            if len(self._templates) >= _MAX_TEMPLATES:
                self._templates.clear()
            self._templates[key] = entry
        return entry

    def _check_template(
        self, windows: Sequence[WindowSpec], slots: Sequence[SlotSpec], caps: Sequence[CapSpec], lease_ms: int, take: bool
    ) -> tuple[bytes, bytes]:
        tag = self.key_tag
        keys = [tag + w.key.encode() for w in windows] + [tag + s.key.encode() for s in slots] + spend_keys(tag, caps)
        fixed = [b"%d" % len(windows), b"%d" % len(slots), b"%d" % len(caps), b"%d" % lease_ms, b"1" if take else b"0"]
        for spec in windows:
            fixed += (b"%d" % spec.limit, b"%d" % spec.window_ms)
        fixed += [b"%d" % s.limit for s in slots]
        fixed += [b"%d" % c.cap for c in caps]
        # EVALSHA, its digest, the key count, the keys and the void key, the fixed arguments, then member,
        # estimate and the amounts: what goes before and after the void key.
        parts = 3 + len(keys) + 1 + len(fixed) + 2 + len(windows)
        return b"*%d\r\n" % parts + bulks(b"EVALSHA", self._check, b"%d" % (len(keys) + 1), *keys), bulks(*fixed)

    async def check_and_take(
        self, windows: Sequence[WindowSpec], amounts: Sequence[int], slots: Sequence[SlotSpec], caps: Sequence[CapSpec],
        member: str, lease_ms: int, estimate: int = 0, take: bool = True,
    ) -> Snapshot:
        if len(amounts) != len(windows):
            raise ValueError("one amount per window")
        key = (id(windows), id(slots), id(caps), lease_ms, take)
        found = self._templates.get(key)
        if found is None or found[0] != (windows, slots, caps):
            found = self._remember(key, (windows, slots, caps), self._check_template(windows, slots, caps, lease_ms, take))
        head, fixed = found[1]  # type: ignore[misc]
        name = member.encode()
        out = await self._call(b"".join([
            head, b"$%d\r\n%s%s\r\n" % (len(self._void) + len(name), self._void, name), fixed,
            bulks(name, b"%d" % estimate, *[b"%d" % amount for amount in amounts]),
        ]))
        at = 2 + 3 * len(windows)
        counts = [(out[i], out[i + 1], out[i + 2]) for i in range(2, at, 3)]
        totals = out[at + len(slots) :]
        return Snapshot(out[0] == 1, counts, out[at : at + len(slots)], totals[::2], totals[1::2])

    def _settle_command(
        self, windows: Sequence[WindowSpec], amount: int, caps: Sequence[CapSpec], spend: int, cap_ttl_ms: Sequence[int],
        slots: Sequence[SlotSpec], member: str, verify: bool,
    ) -> bytes | None:
        if amount <= 0:
            windows = ()
        if not windows and not caps and not slots:
            return None
        if len(cap_ttl_ms) != len(caps):
            raise ValueError("one ttl per spend total")
        key = (id(windows), id(caps), id(slots))
        found = self._templates.get(key)
        if found is None or found[0] != (windows, caps, slots):
            tag = self.key_tag
            keys = [tag + w.key.encode() for w in windows] + spend_keys(tag, caps) + [tag + s.key.encode() for s in slots]
            parts = 3 + len(keys) + 2 + len(windows) + 4 + len(caps)
            head = b"*%d\r\n" % parts + bulks(b"EVALSHA", self._settle, b"%d" % len(keys), *keys, b"%d" % len(windows),
                                                b"%d" % len(caps), *[b"%d" % w.window_ms for w in windows])
            found = self._remember(key, (windows, caps, slots), head)
        return found[1] + bulks(b"1" if verify else b"0", member.encode(), b"%d" % amount,  # type: ignore[operator]
                                b"%d" % spend, *[b"%d" % ttl for ttl in cap_ttl_ms])

    async def settle(
        self, windows: Sequence[WindowSpec], amount: int, caps: Sequence[CapSpec], spend: int, cap_ttl_ms: Sequence[int],
        slots: Sequence[SlotSpec], member: str, verify: bool = False,
    ) -> None:
        command = self._settle_command(windows, amount, caps, spend, cap_ttl_ms, slots, member, verify)
        if command is not None:
            await self._call(command)

    def settle_soon(
        self, windows: Sequence[WindowSpec], amount: int, caps: Sequence[CapSpec], spend: int, cap_ttl_ms: Sequence[int],
        slots: Sequence[SlotSpec], member: str, on_failure: Callable[[], None],
    ) -> None:
        command = self._settle_command(windows, amount, caps, spend, cap_ttl_ms, slots, member, False)
        if command is None:
            return

        def done(reply: object) -> None:
            if isinstance(reply, CallFailed):
                self._failed(reply)
                on_failure()
            elif not self._healthy:
                self._answered()

        self._pipeline.send(command, done)

    async def release(self, slots: Sequence[SlotSpec], caps: Sequence[CapSpec], member: str, lease_ms: int) -> None:
        tag = self.key_tag
        keys = [tag + s.key.encode() for s in slots] + spend_keys(tag, caps) + [self._void + member.encode()]
        parts = 3 + len(keys) + 3
        await self._call(b"*%d\r\n" % parts + bulks(b"EVALSHA", self._release, b"%d" % len(keys), *keys,
                                                      b"%d" % len(slots), member.encode(), b"%d" % lease_ms))

    async def close(self, grace_s: float | None = None) -> None:
        grace = self._timeout_s * 3 if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        # Settles sent without waiting land first; retries they failed into join the ones already pending.
        await self._pipeline.drain(grace)
        await super().close(max(0.0, deadline - time.monotonic()))
        await self._pipeline.close()
