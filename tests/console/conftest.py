"""A gateway for the console's tests: keys for a user, a second user, an admin and a user whose name needs quoting,
routes on fake upstreams (one answering HTML), a guarded route, a limited route, prices, budgets and a chdb table."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from gateway.context import GATEWAY
from policies.keys import hash_key

ALICE_KEY = "lg-console-alice-0001"
BOB_KEY = "lg-console-bob-0002"
ROOT_KEY = "lg-console-root-0003"
ONEIL_KEY = "lg-console-oneil-0004"
# A name a careless query would let out of its string literal.
ONEIL = "o'neil\\' OR 1=1 --"

POLICY = """version: 1
keys:
  - {{id: alice-laptop, sha256: "{alice}", user: alice}}
  - {{id: bob-ci, sha256: "{bob}", user: bob}}
  - {{id: root, sha256: "{root}", user: root}}
  - {{id: oneil, sha256: "{oneil}", user: "{oneil_user}"}}
users:
  alice: {{groups: [data-science]}}
  bob: {{groups: [automation]}}
  root: {{groups: [platform]}}
  "{oneil_user}": {{groups: []}}
roles:
  caller: {{models: ["chat-*"]}}
  admin: {{models: ["*"], admin: true}}
bindings:
  - {{group: data-science, role: caller}}
  - {{group: automation, role: caller}}
  - {{user: "{oneil_user}", role: caller}}
  - {{user: root, role: admin}}
providers:
  up: {{type: openai, base_url: "{up}", api_key: "sk-upstream-secret-123"}}
  html: {{type: openai, base_url: "{html}", api_key: "sk-upstream-secret-456"}}
routes:
  chat-fast: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
  chat-other: {{targets: [{{provider: up, model: gpt-4o}}]}}
  chat-html: {{targets: [{{provider: html, model: gpt-4o-mini}}]}}
  chat-guarded: {{targets: [{{provider: up, model: gpt-4o-mini}}], guardrails: {{input: {{pii: block}}}}}}
  chat-limited: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
  ops-only: {{targets: [{{provider: up, model: gpt-4o}}]}}
limits:
  - {{scope: user, requests: 1000/hour}}
  - {{scope: key, requests: 1/hour, routes: [chat-limited]}}
budgets:
  - {{scope: user, usd: 5, per: day}}
prices:
  gpt-4o-mini: {{input: 0.15, output: 0.60}}
  gpt-4o: {{input: 2.5, output: 10}}
inference_table:
  enabled: {table}
  clickhouse: "chdb://{chdb}"
  spool_dir: "{spool}"
  flush_interval_ms: 50
"""

# The HTML a hostile answer carries: shown as these characters, never run or rendered.
HOSTILE_WORDS = ["<script>window.pwned = 1</script>", "<img src=x onerror=\"window.pwned = 2\">", "<b>bold</b>"]


def console_policy(folder: Path, up: str, html: str, table: bool = True) -> Path:
    path = folder / "policy.yaml"
    escaped = ONEIL.replace("\\", "\\\\").replace('"', '\\"')
    path.write_text(POLICY.format(alice=hash_key(ALICE_KEY), bob=hash_key(BOB_KEY), root=hash_key(ROOT_KEY),
                                  oneil=hash_key(ONEIL_KEY), oneil_user=escaped, up=up, html=html,
                                  table=str(table).lower(), chdb=folder / "chdb", spool=folder / "spool"))
    return path


async def flushed(server: TestServer) -> None:
    """Every row of the requests answered so far is in the inference table."""
    gateway = server.app[GATEWAY]
    await gateway.drain_masking()
    assert gateway.writer is not None
    assert await asyncio.to_thread(gateway.writer.flush, 60)


async def chat(server: TestServer, key: str, route: str, content: str = "Hello there") -> int:
    async with aiohttp.ClientSession() as session, session.post(
            server.make_url("/v1/chat/completions"), headers={"Authorization": f"Bearer {key}"},
            json={"model": route, "messages": [{"role": "user", "content": content}]}) as resp:
        await resp.read()
        return resp.status


async def get(server: TestServer, path: str, key: str | None = None,
              params: Mapping[str, str] | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as session, session.get(server.make_url(path), headers=headers,
                                                              params=params) as resp:
        return resp.status, await resp.json()
