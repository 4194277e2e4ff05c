"""Shared fixtures: fake upstreams, a gateway built from a policy text, and the official SDK clients."""

from __future__ import annotations

import os
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from hypothesis import settings
from openai import AsyncOpenAI

from gateway.app import create_app
from policies.keys import hash_key
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI
from tests.redis_server import own_redis, redis_server, redis_url

# Every property test draws the same examples on every run, so CI sees what passed here; LOCKGATE_FUZZ_RANDOM=1
# draws new ones (a local hunt for new cases, not a CI setting).
settings.register_profile("fixed", derandomize=True, database=None)
settings.register_profile("random")
settings.load_profile("random" if os.environ.get("LOCKGATE_FUZZ_RANDOM") else "fixed")

__all__ = ["own_redis", "redis_server", "redis_url"]

ALICE_KEY = "lg-test-alice-key-0001"
BOB_KEY = "lg-test-bob-key-0002"
ADMIN_KEY = "lg-test-admin-key-0003"

KEYS_AND_USERS = f"""
keys:
  - {{id: alice-laptop, sha256: "{hash_key(ALICE_KEY)}", user: alice}}
  - {{id: bob-ci, sha256: "{hash_key(BOB_KEY)}", user: bob}}
  - {{id: root, sha256: "{hash_key(ADMIN_KEY)}", user: root}}
users:
  alice: {{groups: [data-science]}}
  bob: {{groups: [automation]}}
  root: {{groups: [platform]}}
"""

DEFAULT_RBAC = """
roles:
  everything: {models: ["*"]}
  admin: {models: ["*"], admin: true}
bindings:
  - {user: alice, role: everything}
  - {user: bob, role: everything}
  - {user: root, role: admin}
"""

GatewayFactory = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def fake_openai(aiohttp_server) -> tuple[FakeOpenAI, TestServer]:
    fake = FakeOpenAI()
    return fake, await aiohttp_server(fake.app())


@pytest.fixture
async def fake_anthropic(aiohttp_server) -> tuple[FakeAnthropic, TestServer]:
    fake = FakeAnthropic()
    return fake, await aiohttp_server(fake.app())


def policy_text(body: str, **urls: str) -> str:
    """A full policy: the test's own sections plus the standard keys, users and (unless given) RBAC."""
    own = textwrap.dedent(body).format(**urls)
    return "version: 1\n" + KEYS_AND_USERS + ("" if "\nroles:" in "\n" + own else DEFAULT_RBAC) + own


@pytest.fixture
def policy_file(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str) -> Path:
        path = tmp_path / "policy.yaml"
        path.write_text(text)
        return path

    return write


@pytest.fixture
async def make_gateway(aiohttp_server, policy_file) -> GatewayFactory:
    async def start(body: str, **urls: str) -> TestServer:
        path = policy_file(policy_text(body, **urls))
        return await aiohttp_server(create_app(path))

    return start


_clients: list[AsyncOpenAI] = []


def sdk(server: TestServer, key: str = ALICE_KEY) -> AsyncOpenAI:
    """The official client, closed by `_close_clients` after the test (an unclosed one breaks later loops)."""
    client = AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=key, max_retries=0, timeout=20)
    _clients.append(client)
    return client


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _clients:
        await _clients.pop().close()
