from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from policies.limiter_storage import CounterStore, open_counter_store
from tests.redis_server import RedisServer, free_port

__all__ = ["RedisServer", "free_port"]


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[CounterStore]:
    uri = "memory://" if request.param == "memory" else request.getfixturevalue("redis_url")
    counters = open_counter_store(uri)
    yield counters
    await counters.close()


@pytest.fixture
async def slow_store(own_redis: RedisServer) -> AsyncIterator[CounterStore]:
    """A Redis store that gives up after 0.1 s, on a server the test may freeze (resumed before the store closes)."""
    store = open_counter_store(own_redis.url, timeout_s=0.1)
    yield store
    own_redis.resume()
    await store.close()
