"""Traffic splitting: weighted arms, drained targets, sticky principals, and the order targets are tried in."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from collections import Counter

import aiohttp

from gateway.compiled import Target
from gateway.context import GATEWAY
from gateway.providers import Provider
from gateway.routing.split import attempt_order, choose, stable_draw
from tests.conftest import ADMIN_KEY, ALICE_KEY, BOB_KEY, sdk

HI = [{"role": "user", "content": "hi"}]


def _targets(weights: dict[str, float]) -> tuple[Target, ...]:
    provider = Provider("up")
    return tuple(Target(provider, model, weight, aiohttp.ClientTimeout()) for model, weight in weights.items())


def _shares(targets: tuple[Target, ...], draws: list[float]) -> dict[str, float]:
    counts = Counter(targets[choose(targets, d)].model for d in draws)
    return {model: counts[model] / len(draws) for model in (t.model for t in targets)}


def test_split_shares_follow_the_weights_over_2000_requests() -> None:
    rng = random.Random(7)
    draws = [rng.random() for _ in range(2000)]
    shares = _shares(_targets({"gpt-4o-mini": 90, "local": 10}), draws)
    assert abs(shares["gpt-4o-mini"] - 0.90) <= 0.03 and abs(shares["local"] - 0.10) <= 0.03
    shares = _shares(_targets({"a": 5, "b": 3, "drained": 0, "c": 2}), draws)
    assert abs(shares["a"] - 0.5) <= 0.03 and abs(shares["b"] - 0.3) <= 0.03 and abs(shares["c"] - 0.2) <= 0.03
    assert shares["drained"] == 0


def test_sticky_users_spread_by_the_weights_and_never_switch() -> None:
    targets = _targets({"gpt-4o-mini": 90, "local": 10})
    users = [f"user-{i}" for i in range(2000)]
    shares = _shares(targets, [stable_draw("chat-default", u) for u in users])
    assert abs(shares["local"] - 0.10) <= 0.03
    arms = [choose(targets, stable_draw("chat-default", u)) for u in users]
    assert arms == [choose(targets, stable_draw("chat-default", u)) for u in users]


def test_drained_targets_take_no_traffic_even_at_the_edges() -> None:
    targets = _targets({"drained-first": 0, "live": 1, "drained-last": 0})
    assert {choose(targets, d) for d in (0.0, 0.5, 0.999999999)} == {1}
    assert choose(_targets({"a": 0, "b": 0}), 0.3) == -1


def test_sticky_arm_is_the_same_in_another_process_with_another_hash_seed() -> None:
    code = "from gateway.routing.split import stable_draw; print(repr(stable_draw('chat-default', 'alice')))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert float(out.stdout) == stable_draw("chat-default", "alice")
    assert stable_draw("chat-default", "alice") != stable_draw("chat-other", "alice")


ORDER = """
providers:
  up: {{type: openai, base_url: "{url}"}}
routes:
  chat: {{targets: [{{provider: up, model: a}}, {{provider: up, model: drained, weight: 0}}, {{provider: up, model: b}},
                   {{provider: up, model: c}}], fallbacks: [small]}}
  small: {{targets: [{{provider: up, model: s1}}, {{provider: up, model: s2}}], fallbacks: [chat]}}
"""


async def test_attempt_order_is_arm_then_siblings_then_fallback_routes(make_gateway, fake_openai) -> None:
    _, upstream = fake_openai
    server = await make_gateway(ORDER, url=str(upstream.make_url("/v1")))
    routes = server.app[GATEWAY].policy.routes
    order = [(r.name, t.model) for r, t in attempt_order(routes["chat"], routes, 0.5)]
    # Drained targets are never tried, and a fallback route's own fallbacks are not followed (no cycles).
    assert order == [("chat", "b"), ("chat", "a"), ("chat", "c"), ("small", "s2"), ("small", "s1")]


SPLIT = """
providers:
  up: {{type: openai, base_url: "{url}"}}
routes:
  sticky-ab: {{targets: [{{provider: up, model: arm-a, weight: 50}}, {{provider: up, model: arm-b, weight: 50}}],
              sticky: user}}
  split-90-10: {{targets: [{{provider: up, model: arm-a, weight: 90}}, {{provider: up, model: arm-b, weight: 10}},
                          {{provider: up, model: arm-drained, weight: 0}}]}}
"""


async def test_through_the_sdk_sticky_users_keep_their_arm_and_splits_follow_weights(make_gateway, fake_openai) -> None:
    _, upstream = fake_openai
    server = await make_gateway(SPLIT, url=str(upstream.make_url("/v1")))
    for key in (ALICE_KEY, BOB_KEY, ADMIN_KEY):
        async with sdk(server, key) as client:
            replies = await asyncio.gather(*(client.chat.completions.create(model="sticky-ab", messages=HI)
                                             for _ in range(10)))
        assert len({r.model for r in replies}) == 1
    models: Counter[str] = Counter()
    async with sdk(server) as client:
        for _ in range(4):
            replies = await asyncio.gather(*(client.chat.completions.create(model="split-90-10", messages=HI)
                                             for _ in range(50)))
            models.update(r.model for r in replies)
    # 200 draws at 90/10: a standard deviation of 2.1 points, so 8 points fails only a broken split.
    assert abs(models["arm-a"] / 200 - 0.90) <= 0.08
    assert models["arm-drained"] == 0
