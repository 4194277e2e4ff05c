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
