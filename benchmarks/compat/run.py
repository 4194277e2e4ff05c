"""`make compat`: the Vercel AI SDK (Node) against a real `lockgate serve`, in front of fake OpenAI upstreams.

Starts two fake upstreams in this process (one answering text, one answering a `send_mail` tool call), a gateway
on a temporary policy with a route to each, then runs check.mjs against the gateway and prints a pass/fail table.
Exits 1 if any check failed. Needs `npm ci` in benchmarks/compat first (the make target does it).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from aiohttp import web

from policies.keys import hash_key
from tests.fakes.openai_upstream import WORDS, Answer, FakeOpenAI
from tests.served import start_gateway

HERE = Path(__file__).resolve().parent
KEY = "lg-compat-key-000000000001"
NODE_TIMEOUT_S = 90
PACKAGES = ("ai", "@ai-sdk/openai", "@ai-sdk/anthropic")

POLICY = """version: 1
keys:
  - {{id: compat, sha256: "{sha256}", user: dev}}
users:
  dev: {{groups: [compat]}}
roles:
  chatter: {{models: ["chat-*"]}}
bindings:
  - {{user: dev, role: chatter}}
providers:
  up: {{type: openai, base_url: "{url}", api_key: "sk-compat-upstream"}}
  tools: {{type: openai, base_url: "{tools_url}"}}
routes:
  chat-default: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
  chat-tools: {{targets: [{{provider: tools, model: gpt-4o-mini}}]}}
"""


async def serve_fake(fake: FakeOpenAI) -> tuple[web.AppRunner, str]:
    """The fake on a free local port, in this process's loop; its base URL ends in /v1."""
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}/v1"


def versions() -> str:
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    installed = [f"{name} {json.loads((HERE / 'node_modules' / name / 'package.json').read_text())['version']}"
                 for name in PACKAGES]
    return ", ".join([f"node {node}", *installed])


async def run_checks(gateway_url: str) -> tuple[list[dict], str]:
    """Each check's outcome as check.mjs printed it, and its stderr; the fakes keep serving from this loop meanwhile."""
    env = {**os.environ, "LOCKGATE_URL": gateway_url, "LOCKGATE_KEY": KEY,
           "LOCKGATE_EXPECTED_TEXT": "".join(WORDS)}
    node = await asyncio.create_subprocess_exec("node", str(HERE / "check.mjs"), cwd=HERE, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(node.communicate(), NODE_TIMEOUT_S)
    except TimeoutError:
        node.kill()
        raise
    results = [json.loads(line) for line in stdout.decode().splitlines() if line.startswith("{")]
    return results, stderr.decode()


def table(results: list[dict]) -> str:
    width = max(len(result["name"]) for result in results)
    lines = [f"{'check':<{width}}  result  detail", f"{'-' * width}  ------  ------"]
    lines += [f"{r['name']:<{width}}  {'pass' if r['ok'] else 'FAIL':<6}  {r['detail']}" for r in results]
    return "\n".join(lines)


async def main() -> int:
    text_runner, url = await serve_fake(FakeOpenAI())
    tools_runner, tools_url = await serve_fake(FakeOpenAI(answer=Answer(tool_arguments=[['{"to": "a', 'nn"}']])))
    try:
        with tempfile.TemporaryDirectory(prefix="lockgate-compat-") as folder:
            policy = Path(folder) / "policy.yaml"
            policy.write_text(POLICY.format(sha256=hash_key(KEY), url=url, tools_url=tools_url))
            gateway = await start_gateway(policy)
            try:
                results, stderr = await run_checks(gateway.make_url(""))
            finally:
                gateway.process.terminate()
                log = gateway.logs()
    finally:
        await text_runner.cleanup()
        await tools_runner.cleanup()
    print(f"Vercel AI SDK against lockgate ({versions()})\n")
    if not results:
        print(f"check.mjs printed no results:\n{stderr}", file=sys.stderr)
        return 1
    print(table(results))
    failed = [result for result in results if not result["ok"]]
    print(f"\n{len(results) - len(failed)}/{len(results)} passed")
    if failed:
        problems = [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]
        print("\nthe gateway's warnings and errors:\n" + "\n".join(problems[-20:] or ["(none)"]), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
