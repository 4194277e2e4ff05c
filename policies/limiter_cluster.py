"""The limiter on Redis Cluster: every key carries one hash tag, so every call lands on one node, whole and atomic.

Which tag: a request's counters are those of its key, its user, its groups, its route and the global ones,
and each of them is shared with other requests, so any tag that is not the same for all of them would
either split one call across slots or give one counter several keys. Hence one tag, `{lg}`, for every
key: the limiter's keys live on the one node that owns its slot (and on its replicas), which buys the
cluster's fail-over and a shared cluster, not sharding (sharding would split a request's check-and-take
into calls to several nodes: no longer one round trip, or no longer all-or-nothing).

The owner of the slot comes from CLUSTER SLOTS, asked of the nodes in the DSN (and of those learnt since)
on the first call and again in the background after a node failed; calls go to it over one pipelined
connection (RedisPipeline). A MOVED answer switches the owner, an ASK one sends that call alone to the
importing node after ASKING, and TRYAGAIN (the slot is being moved) retries after a short pause: each is a
call that did not run, so sending it again cannot charge twice, and all of them are bounded, in number and
in time. A call that fails otherwise fails as it does on one Redis, and `on_error` decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, MovedError, TryAgainError

from policies.limiter_redis import (
    SCRIPTS,
    CallFailed,
    Pipeline,
    RedisCounterStore,
    RedisPipeline,
    Reply,
    deliver,
    digests,
    pack,
)

log = logging.getLogger("lockgate.limiter")

KEY_TAG = b"{lg}"
SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
# Bounds: redirects of one call in a row (a pause after TRYAGAIN ends a row; the timeout bounds them all),
# the pause after TRYAGAIN, how often the slot's owner is asked again after failures, the nodes talked to,
# and those asked for the slot's owner at once.
_MAX_REDIRECTS = 16
_TRY_AGAIN_S = (0.01, 0.02, 0.05, 0.1)
_REFRESH_INTERVAL_S = 1.0
_MAX_NODES = 64
_MAX_ASKED = 16
_ASKING = pack(b"ASKING")

Address = tuple[str, int]


def _ignore(_reply: Reply) -> None:
    return None


def parse_nodes(uri: str) -> tuple[tuple[str, str], list[Address]]:
    """What goes before and after a node's host:port in its URL, and the nodes the DSN names."""
    parts = urlsplit(uri)
    scheme = SCHEMES.get(parts.scheme)
    if scheme is None:
        raise ValueError("a Redis Cluster DSN starts redis+cluster:// or rediss+cluster://")
    credentials, _, hosts = parts.netloc.rpartition("@")
    nodes: list[Address] = []
    for item in hosts.split(","):
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else rest or "6379"
        else:
            host, colon, port = item.partition(":")
            port = port if colon else "6379"
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("a Redis Cluster DSN names its nodes as host:port[,host:port...]")
        nodes.append((host, int(port)))
    before = f"{scheme}://" + (credentials + "@" if credentials else "")
    return (before, urlunsplit(("", "", "", parts.query, ""))), nodes


def slot_owner(reply: object, slot: int) -> tuple[str, int] | None:
    """The master serving `slot` in a CLUSTER SLOTS reply (its host may be empty: the node that answered)."""
    if not isinstance(reply, list):
        raise ValueError("CLUSTER SLOTS answered no list")
    for entry in reply:
        if not isinstance(entry, list) or len(entry) < 3 or not isinstance(entry[2], list) or len(entry[2]) < 2:
            raise ValueError("CLUSTER SLOTS answered a malformed range")
        start, end, (host, port, *_) = entry[0], entry[1], entry[2]
        if not all(isinstance(n, int) for n in (start, end, port)) or not isinstance(host, bytes | str):
            raise ValueError("CLUSTER SLOTS answered a malformed range")
        if start <= slot <= end:
            name = host.decode(errors="replace") if isinstance(host, bytes) else host
            return ("" if name == "?" else name), port
    return None


class ClusterPipeline:
    """Sends each call to the node that owns the hash tag's slot, over that node's RedisPipeline."""

    def __init__(self, uri: str, timeout_s: float, scripts: Sequence[str], max_nodes: int) -> None:
        self._template, self._seeds = parse_nodes(uri)
        self._timeout_s = timeout_s
        self._scripts = scripts
        self._max_nodes = max(1, min(max_nodes, _MAX_NODES))
        self._slot = key_slot(KEY_TAG)
        self._nodes: dict[Address, RedisPipeline] = {}
        self._owner: RedisPipeline | None = None
        self._refresh: asyncio.Task[None] | None = None
        self._refreshed_at = float("-inf")
        self._forwards: set[asyncio.Task[None]] = set()
        self.shas = digests(scripts)

    def _url(self, host: str, port: int) -> str:
        before, after = self._template
        return before + (f"[{host}]:{port}" if ":" in host else f"{host}:{port}") + after

    def _node(self, host: str, port: int) -> RedisPipeline:
        found = self._nodes.get((host, port))
        if found is None:
            if len(self._nodes) >= self._max_nodes:
                raise CallFailed(f"more than {self._max_nodes} Redis Cluster nodes", sent=False)
            found = self._nodes[(host, port)] = RedisPipeline(self._url(host, port), self._timeout_s, self._scripts)
        return found

    def _redirected(self, pipeline: RedisPipeline, refusal: AskError) -> RedisPipeline:
        """The node a MOVED or ASK answer names (no host: the node that answered); MOVED makes it the owner."""
        host = refusal.host
        if not host or host == "?":
            host = next((h for (h, _), node in self._nodes.items() if node is pipeline), "127.0.0.1")
        target = self._node(host, refusal.port)
        if isinstance(refusal, MovedError):
            self._owner = target
        return target

    async def _ask_owner(self, host: str, port: int) -> Address:
        client = aioredis.Redis.from_url(self._url(host, port), socket_timeout=self._timeout_s,
                                         socket_connect_timeout=self._timeout_s, retry=Retry(NoBackoff(), 0))
        try:
            owner = slot_owner(await client.execute_command("CLUSTER", "SLOTS"), self._slot)
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()
        if owner is None:
            raise ValueError(f"slot {self._slot} is served by no node")
        return owner[0] or host, owner[1]

    async def _discover(self) -> None:
        """Asks the nodes at once (those in the DSN first) and takes the first answer."""
        self._refreshed_at = time.monotonic()
        nodes = list(dict.fromkeys([*self._seeds, *self._nodes]))[:_MAX_ASKED]
        asks = {asyncio.ensure_future(self._ask_owner(host, port)): (host, port) for host, port in nodes}
        reasons: list[str] = []
        try:
            async with asyncio.timeout(self._timeout_s * 2):
                for ask in asyncio.as_completed(asks):
                    try:
                        host, port = await ask
                    except Exception as exc:
                        reasons.append(f"{type(exc).__name__}: {exc}")
                        continue
                    pipeline = self._node(host, port)
                    if pipeline is not self._owner:
                        log.info("limiter: Redis Cluster slot %d is served by %s:%d", self._slot, host, port)
                    self._owner = pipeline
                    return
        except TimeoutError:
            reasons.append("no answer in time")
        finally:
            for ask in asks:
                ask.cancel()
            await asyncio.gather(*asks, return_exceptions=True)
        raise CallFailed("no Redis Cluster node told the slot's owner (" + "; ".join(reasons[:4]) + ")", sent=False)

    async def _current_owner(self) -> RedisPipeline:
        if self._owner is None:
            refresh = self._refresh
            if refresh is None:
                refresh = self._refresh = asyncio.get_running_loop().create_task(self._discover())
                refresh.add_done_callback(self._refreshed)
            await asyncio.shield(refresh)
        assert self._owner is not None
        return self._owner

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        self._refresh = None
        if not task.cancelled():
            task.exception()

    def _suspect(self) -> None:
        # The owner failed: perhaps a replica took over. Asked again off the calls' path, and not too often.
        if self._refresh is None and time.monotonic() - self._refreshed_at >= _REFRESH_INTERVAL_S:
            self._refresh = asyncio.get_running_loop().create_task(self._discover())
            self._refresh.add_done_callback(self._refreshed)

    async def call(self, command: bytes) -> Reply:
        started = time.monotonic()
        asking: RedisPipeline | None = None
        pauses = redirects = 0
        while True:
            pipeline = asking if asking is not None else await self._current_owner()
            if asking is not None:
                pipeline.send(_ASKING, _ignore)
            asking = None
            try:
                return await pipeline.call(command)
            except CallFailed as exc:
                refusal = exc.refusal
                if refusal is None or isinstance(refusal, ClusterDownError):
                    self._suspect()
                    raise
                if not isinstance(refusal, AskError | TryAgainError):
                    raise
                failure = CallFailed(str(exc), sent=False, refusal=refusal)
                if isinstance(refusal, AskError):
                    target = self._redirected(pipeline, refusal)
                    asking = None if isinstance(refusal, MovedError) else target
                    redirects += 1
            if redirects > _MAX_REDIRECTS or time.monotonic() - started >= self._timeout_s:
                raise failure
            if isinstance(refusal, TryAgainError):
                await asyncio.sleep(_TRY_AGAIN_S[min(pauses, len(_TRY_AGAIN_S) - 1)])
                pauses += 1
                redirects = 0

    def send(self, command: bytes, done: Callable[[Reply], None]) -> None:
        owner = self._owner
        if owner is None:
            self._forward(command, done)
            return

        def sent(reply: Reply) -> None:
            if isinstance(reply, CallFailed) and isinstance(reply.refusal, AskError | TryAgainError):
                if isinstance(reply.refusal, MovedError):
                    with contextlib.suppress(CallFailed):
                        self._redirected(owner, reply.refusal)
                self._forward(command, done)
                return
            if isinstance(reply, CallFailed) and (reply.refusal is None or isinstance(reply.refusal, ClusterDownError)):
                self._suspect()
            deliver(done, reply)

        owner.send(command, sent)

    def _forward(self, command: bytes, done: Callable[[Reply], None]) -> None:
        # Once redirected (or before the owner is known) the call needs awaits: it goes on in a task of its own.
        async def forward() -> None:
            try:
                reply = await self.call(command)
            except CallFailed as exc:
                reply = exc
            except asyncio.CancelledError:
                deliver(done, CallFailed("the gateway stopped first", sent=True))
                raise
            deliver(done, reply)

        task = asyncio.get_running_loop().create_task(forward())
        self._forwards.add(task)
        task.add_done_callback(self._forwards.discard)

    async def drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        if self._forwards:
            await asyncio.wait(set(self._forwards), timeout=timeout_s)
        for pipeline in list(self._nodes.values()):
            await pipeline.drain(max(0.0, deadline - time.monotonic()))

    async def close(self) -> None:
        tasks = [*self._forwards, *([self._refresh] if self._refresh is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for pipeline in self._nodes.values():
            await pipeline.close()


class ClusterCounterStore(RedisCounterStore):
    key_tag = KEY_TAG

    def __init__(
        self,
        uri: str,
        timeout_s: float,
        max_connections: int,
        on_error: Callable[[str], None] | None = None,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self._max_nodes = max_connections
        super().__init__(uri, timeout_s, on_error, on_lost)

    def _open(self, uri: str, timeout_s: float) -> Pipeline:
        return ClusterPipeline(uri, timeout_s, SCRIPTS, self._max_nodes)
