"""PII guardrails through the real `openai` SDK: block, mask and flag, on prompts and on answers."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import sdk
from tests.fakes.openai_upstream import FakeOpenAI

POLICY = """
providers:
  up: {{type: openai, base_url: "{url}"}}
routes:
  chat-block: {{targets: [{{provider: up, model: m}}], guardrails: {{input: {{pii: block, patterns: block}}}}}}
  chat-mask: {{targets: [{{provider: up, model: m}}], guardrails: {{input: {{pii: mask}}, output: {{pii: mask}}}}}}
  chat-flag: {{targets: [{{provider: up, model: m}}], guardrails: {{input: {{pii: flag}}, output: {{pii: flag}}}}}}
  chat-outblock: {{targets: [{{provider: up, model: m}}], guardrails: {{output: {{pii: block}}}}}}
  chat-open: {{targets: [{{provider: up, model: m}}]}}
guardrails:
  pii: {{entities: [EMAIL_ADDRESS, PHONE_NUMBER, CREDIT_CARD, US_SSN]}}
  patterns:
    - {{name: project-codename, regex: "\\\\bBLUEBIRD-\\\\d+\\\\b"}}
"""

# The answer splits an e-mail address and a card number across stream chunks.
PII_WORDS = ["Sure, write to jane.do", "e@example.com or pay with 4111 1111 ", "1111 1111 today."]
CLEAN_ANSWER = "".join(PII_WORDS)


@pytest.fixture
async def setup(make_gateway, aiohttp_server):
    fake = FakeOpenAI(words=PII_WORDS)
    upstream = await aiohttp_server(fake.app())
    server = await make_gateway(POLICY, url=str(upstream.make_url("/v1")))
    return fake, server


def _ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def test_block_on_input_names_types_never_values(setup) -> None:
    fake, server = setup
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(server).chat.completions.create(model="chat-block", messages=_ask("my SSN is 536-22-1234"))
    assert info.value.code == "content_policy_violation"
    assert "US_SSN" in info.value.message and "536-22-1234" not in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(server).chat.completions.create(model="chat-block", messages=_ask("status of BLUEBIRD-42?"))
    assert "project-codename" in info.value.message
    assert fake.requests == []
    assert (await sdk(server).chat.completions.create(model="chat-block", messages=_ask("hello there"))).choices


async def test_mask_on_input_rewrites_what_the_upstream_sees(setup) -> None:
    fake, server = setup
    await sdk(server).chat.completions.create(model="chat-mask", messages=_ask("mail me at bob@corp.example.com"))
    sent = fake.requests[-1][1]["messages"][0]["content"]
    assert "bob@corp.example.com" not in sent and "<EMAIL_ADDRESS>" in sent


async def test_mask_on_a_whole_answer(setup) -> None:
    _, server = setup
    reply = await sdk(server).chat.completions.create(model="chat-mask", messages=_ask("how do I pay?"))
    text = reply.choices[0].message.content
    assert "jane.doe@example.com" not in text and "<EMAIL_ADDRESS>" in text
    assert "4111 1111 1111 1111" not in text and text.endswith("1111 today.")


async def test_mask_on_a_stream_catches_items_split_across_chunks(setup) -> None:
    _, server = setup
    stream = await sdk(server).chat.completions.create(model="chat-mask", messages=_ask("how?"), stream=True)
    pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    text = "".join(pieces)
    assert "jane.doe@example.com" not in text and "<EMAIL_ADDRESS>" in text
    assert "4111 1111 1111 1111" not in text
    assert text.startswith("Sure, write to ") and text.endswith("today.")
    # Released as it flows: the first words arrive before the whole answer is known.
    assert pieces[1].startswith("Sure")


async def test_flag_lets_everything_through(setup) -> None:
    fake, server = setup
    reply = await sdk(server).chat.completions.create(model="chat-flag", messages=_ask("I am bob@corp.example.com"))
    assert reply.choices[0].message.content == CLEAN_ANSWER
    assert "bob@corp.example.com" in fake.requests[-1][1]["messages"][0]["content"]
    stream = await sdk(server).chat.completions.create(model="chat-flag", messages=_ask("x"), stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == CLEAN_ANSWER


async def test_block_on_output(setup) -> None:
    _, server = setup
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(server).chat.completions.create(model="chat-outblock", messages=_ask("how do I pay?"))
    assert info.value.code == "content_policy_violation"
    stream = await sdk(server).chat.completions.create(model="chat-outblock", messages=_ask("x"), stream=True)
    received = ""
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            received += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert "jane.doe@example.com" not in received and "EMAIL_ADDRESS" in info.value.message


async def test_routes_without_guardrails_are_untouched(setup) -> None:
    _, server = setup
    reply = await sdk(server).chat.completions.create(model="chat-open", messages=_ask("bob@corp.example.com"))
    assert reply.choices[0].message.content == CLEAN_ANSWER
