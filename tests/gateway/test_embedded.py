"""The embedded vLLM runtime behind the gateway, driven with the `openai` SDK (real engine on the CPU)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import psutil
import pytest
import pytest_asyncio

from runtime import prepare_model
from tests.conftest import ADMIN_KEY, policy_text, sdk
from tests.served import Served, start_gateway

pytestmark = [pytest.mark.runtime, pytest.mark.asyncio(loop_scope="module")]

REPO = Path(__file__).resolve().parents[2]

POLICY = """
providers:
  local:
    type: embedded
    model: "{model}"
    engine: {{max_model_len: 1024, max_num_seqs: 4}}
routes:
  chat-small: {{targets: [{{provider: local}}]}}
  chat-guarded: {{targets: [{{provider: local}}], guardrails: {{input: {{pii: block}}}}}}
"""

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model_path() -> Path:
    return prepare_model("smollm2-135m-instruct", REPO / "var" / "models" / "smollm2-135m-instruct")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> AsyncIterator[Served]:
    path = tmp_path_factory.mktemp("embedded") / "policy.yaml"
    path.write_text(policy_text(POLICY, model=str(model_path)))
    served = await start_gateway(path, ready_timeout_s=300)
    yield served
    served.process.send_signal(signal.SIGTERM)
    served.process.wait(timeout=60)


async def _engine(gateway: Served) -> dict:
    async with aiohttp.ClientSession() as session, session.get(gateway.make_url("/readyz")) as resp:
        return (await resp.json())["engines"]["local"]


async def test_chat_and_usage_equal_to_the_tokenizer(gateway: Served, model_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    reply = await sdk(gateway).chat.completions.create(model="chat-small", messages=QUESTION, temperature=0,
                                                        max_tokens=30)
    text = reply.choices[0].message.content or ""
    assert "Paris" in text
    prompt_ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens >= len(tokenizer.encode(text, add_special_tokens=False))


async def test_streaming_matches_the_whole_answer(gateway: Served) -> None:
    client = sdk(gateway)
    whole = await client.chat.completions.create(model="chat-small", messages=QUESTION, temperature=0, max_tokens=30)
    stream = await client.chat.completions.create(model="chat-small", messages=QUESTION, temperature=0, max_tokens=30,
                                                  stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


async def test_max_tokens_and_stop_are_honoured(gateway: Served) -> None:
    client = sdk(gateway)
    cut = await client.chat.completions.create(model="chat-small", messages=QUESTION, temperature=0, max_tokens=3)
    assert cut.choices[0].finish_reason == "length" and cut.usage is not None and cut.usage.completion_tokens == 3
    stopped = await client.chat.completions.create(model="chat-small", messages=QUESTION, temperature=0,
                                                   max_tokens=30, stop=["Paris"])
    assert "Paris" not in (stopped.choices[0].message.content or "")
    assert stopped.choices[0].finish_reason == "stop"


async def test_a_client_disconnect_aborts_the_engine_request(gateway: Served) -> None:
    client = sdk(gateway)
    stream = await client.chat.completions.create(
        model="chat-small", messages=[{"role": "user", "content": "Write a very long story about a dragon."}],
        max_tokens=900, stream=True, extra_body={"ignore_eos": True})
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 3:
            break
    await stream.close()
    # 900 tokens take about a minute here: an engine still at work long after the close would show it.
    deadline = time.monotonic() + 20
    while (await _engine(gateway))["running"] and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert (await _engine(gateway))["running"] == 0


async def test_a_second_request_is_not_blocked_by_the_first(gateway: Served) -> None:
    client = sdk(gateway).with_options(timeout=180)
    long_done = asyncio.Event()

    async def long() -> None:
        await client.chat.completions.create(model="chat-small", messages=QUESTION, max_tokens=150,
                                             extra_body={"ignore_eos": True})
        long_done.set()

    task = asyncio.create_task(long())
    await asyncio.sleep(1.0)
    short = await client.chat.completions.create(model="chat-small", messages=QUESTION, max_tokens=5)
    assert short.choices[0].message.content and not long_done.is_set()
    await task


async def test_governance_and_guardrails_apply_to_embedded_models(gateway: Served) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(gateway).chat.completions.create(
            model="chat-guarded", messages=[{"role": "user", "content": "mail jane@example.com"}])
    assert info.value.code == "content_policy_violation"
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(gateway).chat.completions.create(
            model="chat-small", messages=[{"role": "user", "content": "word " * 2000}])
    assert "token" in info.value.message.lower() or "long" in info.value.message.lower()
    models = await sdk(gateway, ADMIN_KEY).models.list()
    assert {"chat-small", "chat-guarded"} <= {m.id for m in models.data}


async def test_sigterm_stops_the_engine_and_leaves_no_process(tmp_path: Path, model_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(POLICY, model=str(model_path)).replace("max_num_seqs: 4", "max_num_seqs: 2"))
    served = await start_gateway(path, ready_timeout_s=300)
    children = psutil.Process(served.process.pid).children(recursive=True)
    assert children, "the engine core runs in a child process"
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=90) == 0
    _, alive = psutil.wait_procs(children, timeout=30)
    assert alive == []
