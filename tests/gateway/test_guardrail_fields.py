"""PII in every text-bearing field, through the real `openai` SDK: blocked or masked on the wire and in the table."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import REGISTRY, CollectorRegistry

from gateway import context
from gateway.context import BACKLOG_FULL, GATEWAY, UNREADABLE
from gateway.inference import InferenceWriter
from tests.conftest import sdk
from tests.fakes.openai_upstream import Answer, FakeOpenAI
from tests.guardrails.fields import EMAIL, ENCODING, HI, REQUESTS

TABLE = """inference_table:
  enabled: true
  clickhouse: "chdb://{chdb}"
  spool_dir: "{spool}"
  flush_interval_ms: 50
  mask_pii: true
"""

POLICY = """
providers:
  up: {{type: openai, base_url: "{url}"}}
routes:
  chat-block: {{targets: [{{provider: up, model: gpt-4o-mini}}], guardrails: {{input: {{pii: block}}}}}}
  text-block: {{targets: [{{provider: up, model: gpt-4o-mini}}], guardrails: {{input: {{pii: block}}}}}}
  embed-block: {{targets: [{{provider: up, model: gpt-4o-mini}}], guardrails: {{input: {{pii: block}}}}}}
  opaque-block: {{targets: [{{provider: up, model: m}}], guardrails: {{input: {{pii: block}}}}}}
  mixed-block: {{targets: [{{provider: up, model: gpt-4o-mini}}], fallbacks: [legacy],
                guardrails: {{input: {{pii: block}}}}}}
  legacy: {{targets: [{{provider: up, model: text-embedding-3-small}}]}}
  chat-mask: {{targets: [{{provider: up, model: gpt-4o-mini}}], guardrails: {{output: {{pii: mask}}}}}}
  text-mask: {{targets: [{{provider: up, model: gpt-4o-mini}}], guardrails: {{output: {{pii: mask}}}}}}
  open: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
guardrails:
  pii: {{entities: [EMAIL_ADDRESS, CREDIT_CARD]}}
""" + TABLE

CARD = "4111 1111 1111 1111"
# An e-mail address and a card number, each split across stream pieces.
PIECES = ["Write to jane.do", "e@example.com or pay with 4111 1111 ", "1111 1111 today."]
ARGUMENTS = ['{"to": "jane.do', 'e@example.com", "card": "4111 1111 ', '1111 1111"}']
LEAKS = ("jane.do", "e@example.com", "1111 1111 1111")
ANSWERS = {
    "content": Answer(content=PIECES),
    "refusal": Answer(refusal=PIECES),
    "reasoning_content": Answer(content=["Done."], reasoning_content=PIECES),
    "tool_calls": Answer(tool_arguments=[ARGUMENTS, ARGUMENTS]),
    "logprobs": Answer(content=PIECES, logprobs=True),
}


@pytest.fixture
async def setup(make_gateway, aiohttp_server, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> tuple[FakeOpenAI, TestServer]:
    # Each test's writer gets metrics of its own: the process-wide registry takes one writer's names once.
    from_config = InferenceWriter.from_config
    monkeypatch.setattr(InferenceWriter, "from_config", lambda config: from_config(config, CollectorRegistry()))
    fake = FakeOpenAI()
    upstream = await aiohttp_server(fake.app())
    server = await make_gateway(POLICY, url=str(upstream.make_url("/v1")), chdb=tmp_path / "chdb",
                                spool=tmp_path / "spool")
    return fake, server


async def _rows(server: TestServer, request_ids: list[str]) -> dict[str, dict[str, Any]]:
    gw = server.app[GATEWAY]
    await gw.drain_masking()
    assert gw.writer is not None
    assert await asyncio.to_thread(gw.writer.flush, 60)
    ids = ", ".join(f"'{i}'" for i in request_ids)
    rows = await asyncio.to_thread(gw.writer.query, "SELECT request_id, request_payload, response_payload, metadata "
                                   f"FROM lockgate.inference FINAL WHERE request_id IN ({ids})")
    found = {str(r[0]): {"request": r[1], "response": r[2], "metadata": r[3]} for r in rows}
    assert sorted(found) == sorted(request_ids), "every request has its row"
    return found


def _read_tokens(value: Any) -> Any:
    """A stored payload with its token-id prompts read back as text, as anyone holding the tokenizer could."""
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return ENCODING.decode(value)
    if isinstance(value, list):
        return [_read_tokens(v) for v in value]
    if isinstance(value, dict):
        return {k: _read_tokens(v) for k, v in value.items()}
    return value


def _assert_masked(text: str) -> None:
    for leak in LEAKS:
        assert leak not in text
    assert "<EMAIL_ADDRESS>" in text


async def _send(client: openai.AsyncOpenAI, op: str, route: str, body: dict) -> Any:
    body = {k: v for k, v in body.items() if k != "model"}
    if op == "chat":
        return await client.chat.completions.with_raw_response.create(model=route, **body)
    if op == "completions":
        return await client.completions.with_raw_response.create(model=route, **body)
    return await client.embeddings.with_raw_response.create(model=route, **body)


async def test_pii_in_every_request_field_is_blocked_and_never_stored(setup) -> None:
    fake, server = setup
    client = sdk(server)
    request_ids = []
    for op, name, build in REQUESTS:
        with pytest.raises(openai.BadRequestError) as info:
            await _send(client, op, {"chat": "chat-block", "completions": "text-block", "embeddings": "embed-block"}[op],
                        build(EMAIL))
        assert info.value.code == "content_policy_violation", name
        assert "EMAIL_ADDRESS" in info.value.message and EMAIL not in info.value.message, name
        request_ids.append(info.value.response.headers["x-request-id"])
    assert fake.requests == [], "a blocked request reached the upstream"
    for row in (await _rows(server, request_ids)).values():
        _assert_masked(orjson.dumps(_read_tokens(orjson.loads(row["request"]))).decode())


@pytest.mark.parametrize("route", ["opaque-block", "mixed-block"])
async def test_token_ids_the_gateway_cannot_read_are_refused_on_a_guarded_route(setup, route: str) -> None:
    fake, server = setup
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(server).completions.create(model=route, prompt=ENCODING.encode_ordinary(f"mail {EMAIL}"))
    assert info.value.code == "content_not_checkable" and "cannot be read as text" in info.value.message
    assert fake.requests == []
    request_id = info.value.response.headers["x-request-id"]
    assert (await _rows(server, [request_id]))[request_id]["request"] == UNREADABLE
    reply = await sdk(server).completions.create(model=route, prompt="plain text passes")
    assert reply.choices[0].text


async def _ask_chat(client: openai.AsyncOpenAI, route: str, stream: bool) -> tuple[str, str, list[Any]]:
    """The request id, everything the client received as JSON, and the logprobs it got."""
    raw = await client.chat.completions.with_raw_response.create(model=route, messages=HI, logprobs=True, stream=stream)
    if not stream:
        reply = raw.parse()
        return raw.headers["x-request-id"], reply.model_dump_json(), [c.logprobs for c in reply.choices]
    chunks = [chunk async for chunk in raw.parse()]
    wire = "\n".join(chunk.model_dump_json() for chunk in chunks)
    return raw.headers["x-request-id"], wire, [c.logprobs for chunk in chunks for c in chunk.choices]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_pii_in_every_answer_field_is_masked_on_the_wire_and_in_the_table(setup, stream: bool) -> None:
    fake, server = setup
    client = sdk(server)
    masked_ids, open_ids = [], []
    for name, answer in ANSWERS.items():
        fake.answer = answer
        request_id, wire, logprobs = await _ask_chat(client, "chat-mask", stream)
        _assert_masked(wire)
        assert all(lp is None for lp in logprobs), f"{name}: token logprobs spell the text the mask hid"
        masked_ids.append(request_id)
        request_id, wire, _ = await _ask_chat(client, "open", stream)
        assert "jane.do" in wire, f"{name}: the fake upstream did not send the PII"
        open_ids.append(request_id)
    rows = await _rows(server, masked_ids + open_ids)
    for request_id in masked_ids + open_ids:
        _assert_masked(rows[request_id]["response"])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_completions_text_and_logprobs_are_masked(setup, stream: bool) -> None:
    fake, server = setup
    fake.answer = Answer(content=PIECES, logprobs=True)
    raw = await sdk(server).completions.with_raw_response.create(model="text-mask", prompt="hi", logprobs=2, stream=stream)
    if stream:
        chunks = [chunk async for chunk in raw.parse()]
        wire = "\n".join(chunk.model_dump_json() for chunk in chunks)
        text = "".join(c.text for chunk in chunks for c in chunk.choices)
        assert all(c.logprobs is None for chunk in chunks for c in chunk.choices)
    else:
        reply = raw.parse()
        wire, text = reply.model_dump_json(), reply.choices[0].text
        assert reply.choices[0].logprobs is None
    _assert_masked(wire)
    assert text == "Write to <EMAIL_ADDRESS> or pay with **** **** **** 1111 today."
    request_id = raw.headers["x-request-id"]
    _assert_masked((await _rows(server, [request_id]))[request_id]["response"])


async def test_client_metadata_user_and_tags_are_masked_in_the_table(setup) -> None:
    _, server = setup
    # OpenAI allows 512 characters a value: the cut would fall inside the card number.
    long_value = "x " * 250 + CARD
    raw = await sdk(server).chat.completions.with_raw_response.create(
        model="open", messages=HI, user=EMAIL, metadata={"contact": f"mail {EMAIL}", EMAIL: "owner", "note": long_value},
        extra_headers={"x-lockgate-tags": f"owner={EMAIL}, card={CARD}"})
    request_id = raw.headers["x-request-id"]
    metadata = (await _rows(server, [request_id]))[request_id]["metadata"]
    stored = orjson.dumps(metadata).decode()
    assert EMAIL not in stored and "1111 1111" not in stored and "4111" not in stored
    assert metadata["user"] == "<EMAIL_ADDRESS>" and metadata["contact"] == "mail <EMAIL_ADDRESS>"
    assert metadata["<EMAIL_ADDRESS>"] == "owner" and metadata["tag.owner"] == "<EMAIL_ADDRESS>"
    assert metadata["tag.card"] == "**** **** **** 1111"
    assert metadata["note"].startswith("x x") and len(metadata["note"]) <= 512


async def test_a_full_masking_backlog_withholds_payloads_and_metadata(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    fake, server = setup
    fake.answer = ANSWERS["content"]
    before = REGISTRY.get_sample_value("lockgate_inference_payloads_withheld_total", {"reason": "backlog_full"}) or 0
    monkeypatch.setattr(context, "MAX_MASKING_BACKLOG", 0)
    raw = await sdk(server).chat.completions.with_raw_response.create(
        model="open", messages=[{"role": "user", "content": f"mail {EMAIL}"}], user=EMAIL)
    assert "jane.do" in raw.parse().choices[0].message.content, "the client still gets its answer"
    request_id = raw.headers["x-request-id"]
    row = (await _rows(server, [request_id]))[request_id]
    assert row["request"] == row["response"] == BACKLOG_FULL
    assert row["metadata"] == {"lockgate.withheld": BACKLOG_FULL}
    after = REGISTRY.get_sample_value("lockgate_inference_payloads_withheld_total", {"reason": "backlog_full"})
    assert after == before + 1


PATTERN_POLICY = """
providers:
  up: {{type: openai, base_url: "{url}"}}
routes:
  pii-only: {{targets: [{{provider: up, model: gpt-4o-mini}}],
             guardrails: {{input: {{pii: block}}, output: {{pii: mask}}}}}}
  both: {{targets: [{{provider: up, model: gpt-4o-mini}}],
         guardrails: {{input: {{pii: block, patterns: flag}}, output: {{pii: mask, patterns: flag}}}}}}
guardrails:
  pii: {{entities: [EMAIL_ADDRESS, CREDIT_CARD]}}
  patterns: [{{name: codename, regex: "BLUEBIRD-\\\\d+"}}]
""" + TABLE


async def test_only_what_the_route_read_whole_skips_masking_in_the_table(
        make_gateway, aiohttp_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A route that scanned for PII but not for the patterns proves nothing about them: its row is still masked.
    A route that read everything and found nothing stores the payloads as they are, with no masking to wait for."""
    from_config = InferenceWriter.from_config
    monkeypatch.setattr(InferenceWriter, "from_config", lambda config: from_config(config, CollectorRegistry()))
    fake = FakeOpenAI()
    fake.answer = Answer(content=["The plan is BLUEBIRD-7, ", "nothing else."])
    upstream = await aiohttp_server(fake.app())
    server = await make_gateway(PATTERN_POLICY, url=str(upstream.make_url("/v1")), chdb=tmp_path / "chdb",
                                spool=tmp_path / "spool")
    client = sdk(server)
    message = [{"role": "user", "content": "What is BLUEBIRD-7 about?"}]
    unread = await client.chat.completions.with_raw_response.create(model="pii-only", messages=message)
    assert "BLUEBIRD-7" in unread.parse().choices[0].message.content
    fake.answer = Answer(content=["Nothing to hide ", "here."])
    clean = [{"role": "user", "content": "Say something plain."}]
    # With no room to mask, whatever must be masked is withheld: a proven-clean row is not among them.
    monkeypatch.setattr(context, "MAX_MASKING_BACKLOG", 0)
    proven = await client.chat.completions.with_raw_response.create(model="both", messages=clean)
    monkeypatch.setattr(context, "MAX_MASKING_BACKLOG", 256)
    rows = await _rows(server, [unread.headers["x-request-id"], proven.headers["x-request-id"]])
    stored = rows[unread.headers["x-request-id"]]
    assert "BLUEBIRD-7" not in stored["request"] and "<codename>" in stored["request"]
    assert "BLUEBIRD-7" not in stored["response"] and "<codename>" in stored["response"]
    kept = rows[proven.headers["x-request-id"]]
    assert orjson.loads(kept["request"])["messages"] == clean
    assert orjson.loads(kept["response"])["choices"][0]["message"]["content"] == "Nothing to hide here."
