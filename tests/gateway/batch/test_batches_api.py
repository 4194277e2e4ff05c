"""The Batch API through the real `openai` SDK: every line through the whole pipeline as its submitter, results in
OpenAI's output and error files, one inference row per line, each batch its owner's, cancel, and failed inputs."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest

from gateway.app import create_app
from gateway.context import GATEWAY
from policies.keys import hash_key
from tests.conftest import ADMIN_KEY, ALICE_KEY, BOB_KEY, policy_text, sdk
from tests.gateway.batch.conftest import SlowOpenAI, chat_line, finished, jsonl, result_lines, submit

POLICY = """
roles:
  caller: {{models: ["chat-*", "text-*", "embed-*"]}}
  admin: {{models: ["*"], admin: true}}
bindings:
  - {{user: alice, role: caller}}
  - {{user: bob, role: caller}}
  - {{user: root, role: admin}}
providers:
  up: {{type: openai, base_url: "{url}"}}
routes:
  chat-default: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
  chat-guarded: {{targets: [{{provider: up, model: gpt-4o-mini}}], guardrails: {{input: {{pii: block}}}}}}
  chat-slow: {{targets: [{{provider: up, model: gpt-4o-mini}}], batch: {{concurrency: 1}}}}
  text-default: {{targets: [{{provider: up, model: gpt-3.5-turbo-instruct}}]}}
  embed-small: {{targets: [{{provider: up, model: text-embedding-3-small}}]}}
  secret-chat: {{targets: [{{provider: up, model: gpt-4o}}]}}
guardrails:
  pii: {{entities: [EMAIL_ADDRESS]}}
batch: {{data_dir: "{data}", poll_interval_s: 0.1, max_lines: 20, max_line_bytes: 1024}}
inference_table:
  enabled: true
  clickhouse: "chdb://{chdb}"
  spool_dir: "{spool}"
  flush_interval_ms: 50
{extra}
"""


@pytest.fixture
def start(make_gateway, aiohttp_server, tmp_path: Path):
    async def run(extra: str = "", delay_s: float = 0.0):
        fake = SlowOpenAI(delay_s)
        upstream = await aiohttp_server(fake.app())
        server = await make_gateway(POLICY, url=str(upstream.make_url("/v1")), data=tmp_path / "batches",
                                    chdb=tmp_path / "chdb", spool=tmp_path / "spool", extra=extra)
        return fake, server

    return run


async def _rows_of(server, batch_id: str) -> list[tuple[str, int, str]]:
    writer = server.app[GATEWAY].writer
    assert writer is not None and await asyncio.to_thread(writer.flush, 60)
    return await asyncio.to_thread(
        writer.query, "SELECT metadata['custom_id'], status, user FROM lockgate.inference FINAL "
                      f"WHERE metadata['batch_id'] = '{batch_id}' ORDER BY metadata['custom_id']")


async def test_a_chat_batch_completes_with_refused_lines_in_the_error_file(start) -> None:
    _, server = await start()
    alice = sdk(server)
    lines = [chat_line(f"ok-{i}", "chat-default") for i in range(3)]
    lines += [chat_line("not-permitted", "secret-chat"), chat_line("pii", "chat-guarded", "mail jane@example.com"),
              chat_line("no-route", "no-such-route")]
    created = await submit(alice, lines, metadata={"project": "tickets"})
    assert created.status == "validating" and created.id.startswith("batch_")
    assert created.expires_at == created.created_at + 24 * 3600 and created.metadata == {"project": "tickets"}
    batch = await finished(alice, created.id)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (6, 3, 3)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at and batch.errors is None
    output = await result_lines(alice, batch.output_file_id)
    assert sorted(output) == ["ok-0", "ok-1", "ok-2"]
    for line in output.values():
        assert line["id"].startswith("batch_req_") and line["error"] is None
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"]
        assert response["body"]["choices"][0]["message"]["content"] == "Hello from the fake upstream."
    errors = await result_lines(alice, batch.error_file_id)
    assert {cid: line["response"]["status_code"] for cid, line in errors.items()} == {
        "not-permitted": 403, "pii": 400, "no-route": 404}
    assert errors["not-permitted"]["response"]["body"]["error"]["code"] == "model_not_permitted"
    assert set(errors["pii"]["response"]["body"]["error"]) == {"message", "type", "param", "code"}
    assert "EMAIL_ADDRESS" in errors["pii"]["response"]["body"]["error"]["message"]
    for file_id in (batch.output_file_id, batch.error_file_id):
        assert file_id is not None
        file = await alice.files.retrieve(file_id)
        assert file.purpose == "batch_output" and file.bytes > 0
    # The batch's model is its first line's route; its usage the tokens of the answered lines (refused ones have none).
    assert batch.model == "chat-default" and batch.usage is not None
    prompt = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in output.values())
    completion = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in output.values())
    assert prompt > 0 and completion > 0
    assert (batch.usage.input_tokens, batch.usage.output_tokens) == (prompt, completion)
    assert batch.usage.total_tokens == prompt + completion
    assert batch.usage.input_tokens_details.cached_tokens == 0 and batch.usage.output_tokens_details.reasoning_tokens == 0
    on_disk = orjson.loads((Path(server.app[GATEWAY].policy.loaded.policy.batch.data_dir) / "batches" / batch.id
                            / "batch.json").read_bytes())["batch"]
    assert on_disk["usage"] == batch.usage.model_dump() and on_disk["model"] == "chat-default"
    rows = await _rows_of(server, batch.id)
    assert sorted(row[0] for row in rows) == sorted(line["custom_id"] for line in lines)
    assert {row[0]: row[1] for row in rows}["pii"] == 400 and {row[2] for row in rows} == {"alice"}


@pytest.mark.parametrize(("endpoint", "model", "body"), [
    ("/v1/completions", "text-default", {"prompt": "Say hello"}),
    ("/v1/embeddings", "embed-small", {"input": ["first text", "second text"]}),
    ("/v1/responses", "chat-default", {"input": "Say hello"}),
])
async def test_completion_embedding_and_responses_batches_complete(start, endpoint: str, model: str, body: dict) -> None:
    _, server = await start()
    alice = sdk(server)
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": endpoint, "body": {"model": model, **body}}
             for i in range(4)]
    batch = await finished(alice, (await submit(alice, lines, endpoint)).id)
    assert batch.status == "completed" and batch.error_file_id is None, batch
    output = await result_lines(alice, batch.output_file_id)
    assert sorted(output) == ["c0", "c1", "c2", "c3"]
    answers = [line["response"]["body"] for line in output.values()]
    assert batch.model == model and batch.usage is not None and batch.usage.input_tokens > 0
    if endpoint == "/v1/embeddings":
        assert batch.usage.output_tokens == 0
    assert batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens
    if endpoint == "/v1/embeddings":
        assert all(len(answer["data"]) == 2 and answer["object"] == "list" for answer in answers)
    elif endpoint == "/v1/responses":
        assert all(answer["object"] == "response" and answer["output"][0]["content"][0]["text"] ==
                   "Hello from the fake upstream." for answer in answers)
    else:
        assert all(answer["choices"][0]["text"] == "Hello from the fake upstream." for answer in answers)


async def test_an_invalid_input_fails_the_batch_with_openai_errors(start) -> None:
    fake, server = await start()
    alice = sdk(server)
    lines = jsonl([chat_line("a", "chat-default"), chat_line("a", "chat-default"),
                   {**chat_line("b", "text-default"), "url": "/v1/completions"}]) + b"{not json\n"
    lines += jsonl([chat_line("long", "chat-default", "x" * 2000), chat_line("c", "chat-default")])
    batch = await finished(alice, (await submit(alice, lines)).id)
    assert batch.status == "failed" and batch.failed_at and batch.errors is not None
    assert [(e.code, e.line, e.param) for e in batch.errors.data or []] == [
        ("duplicate_custom_id", 2, "custom_id"), ("url_mismatch", 3, "url"), ("invalid_json_line", 4, None),
        ("line_too_long", 5, None)]
    assert batch.output_file_id is None and batch.error_file_id is None
    too_many = await finished(alice, (await submit(alice, [chat_line(f"n{i}", "chat-default")
                                                             for i in range(21)])).id)
    assert too_many.status == "failed" and too_many.errors is not None
    assert [(e.code, e.line) for e in too_many.errors.data or []] == [("too_many_requests", 21)]
    assert fake.requests == []


async def test_bad_batch_requests_are_refused_in_openai_shape(start) -> None:
    _, server = await start()
    alice, bob = sdk(server), sdk(server, BOB_KEY)
    uploaded = await alice.files.create(file=("in.jsonl", io.BytesIO(jsonl([chat_line("a", "chat-default")]))),
                                        purpose="batch")
    with pytest.raises(openai.NotFoundError):
        await bob.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    for changes, param in (({"endpoint": "/v1/moderations"}, "endpoint"), ({"completion_window": "1h"},
                                                                           "completion_window"),
                           ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata")):
        with pytest.raises(openai.BadRequestError) as info:
            await alice.batches.create(**{"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions",
                                          "completion_window": "24h", **changes})  # type: ignore[arg-type]
        assert info.value.param == param
    assert (await alice.batches.list()).data == []


async def test_a_batch_is_its_owners_and_the_admins(start) -> None:
    _, server = await start()
    alice, bob, admin = sdk(server, ALICE_KEY), sdk(server, BOB_KEY), sdk(server, ADMIN_KEY)
    mine = await finished(alice, (await submit(alice, [chat_line("a", "chat-default")])).id)
    bobs = await submit(bob, [chat_line("b", "chat-default")])
    assert mine.output_file_id is not None
    with pytest.raises(openai.NotFoundError):
        await bob.batches.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        await bob.batches.cancel(mine.id)
    with pytest.raises(openai.NotFoundError):
        await bob.files.content(mine.output_file_id)
    assert [b.id for b in (await bob.batches.list()).data] == [bobs.id]
    assert [b.id for b in (await alice.batches.list()).data] == [mine.id]
    assert [b.id for b in (await admin.batches.list()).data] == [bobs.id, mine.id]
    assert (await admin.batches.retrieve(mine.id)).status == "completed"
    assert b'"custom_id":"a"' in (await admin.files.content(mine.output_file_id)).content
    page = await admin.batches.list(limit=1)
    assert [b.id for b in page.data] == [bobs.id] and page.has_more
    assert [b.id async for b in admin.batches.list(limit=1)] == [bobs.id, mine.id]
    with pytest.raises(openai.ConflictError):
        await alice.batches.cancel(mine.id)


async def test_cancel_stops_a_batch_within_seconds(start) -> None:
    fake, server = await start(delay_s=0.2)
    alice = sdk(server)
    created = await submit(alice, [chat_line(f"s{i:02}", "chat-slow") for i in range(20)])
    async with asyncio.timeout(30):
        while not (await alice.batches.retrieve(created.id)).request_counts.completed:  # type: ignore[union-attr]
            await asyncio.sleep(0.05)
    cancelling = await alice.batches.cancel(created.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    batch = await finished(alice, created.id, timeout_s=10)
    assert batch.status == "cancelled" and batch.cancelled_at, batch
    assert batch.request_counts is not None
    ran = batch.request_counts.completed + batch.request_counts.failed
    assert 0 < ran < 20
    assert len(await result_lines(alice, batch.output_file_id)) == batch.request_counts.completed
    await asyncio.sleep(1)
    assert len(fake.requests) <= ran + 1
    assert (await alice.batches.cancel(created.id)).status == "cancelled"


async def test_a_rate_limit_slows_a_batch_without_failing_it(start) -> None:
    fake, server = await start("limits:\n  - {scope: user, requests: 2/second}")
    alice = sdk(server)
    batch = await finished(alice, (await submit(alice, [chat_line(f"r{i}", "chat-default") for i in range(6)])).id)
    assert batch.status == "completed" and batch.error_file_id is None, batch
    assert sorted(await result_lines(alice, batch.output_file_id)) == [f"r{i}" for i in range(6)]
    # Two a second: six lines span at least two seconds, each one upstream request and one row.
    assert batch.completed_at is not None and batch.in_progress_at is not None
    assert batch.completed_at - batch.in_progress_at >= 2
    assert len(fake.requests) == 6
    assert sorted(row[0] for row in await _rows_of(server, batch.id)) == [f"r{i}" for i in range(6)]


@pytest.mark.parametrize("revocation", ["restart", "reload"])
async def test_once_its_key_is_revoked_a_batchs_remaining_lines_fail_with_401(aiohttp_server, tmp_path: Path,
                                                                             revocation: str) -> None:
    fake = SlowOpenAI(0.2)
    upstream = await aiohttp_server(fake.app())
    policy = tmp_path / "policy.yaml"
    text = policy_text(POLICY, url=str(upstream.make_url("/v1")), data=tmp_path / "batches", chdb=tmp_path / "chdb",
                       spool=tmp_path / "spool", extra="")
    policy.write_text(text)
    server = await aiohttp_server(create_app(policy))
    alice = sdk(server)
    created = await submit(alice, [chat_line(f"k{i:02}", "chat-slow") for i in range(10)])
    async with asyncio.timeout(30):
        while not (await alice.batches.retrieve(created.id)).request_counts.completed:  # type: ignore[union-attr]
            await asyncio.sleep(0.05)
    revoked = text.replace(f'  - {{id: alice-laptop, sha256: "{hash_key(ALICE_KEY)}", user: alice}}\n', "")
    assert revoked != text
    if revocation == "restart":
        # A stop leaves the batch in progress; the gateway that resumes it no longer has alice's key.
        await server.close()
        policy.write_text(revoked)
        server = await aiohttp_server(create_app(policy))
    else:
        policy.write_text(revoked)
        async with aiohttp.ClientSession() as session, session.post(
                server.make_url("/admin/reload"), headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
            assert resp.status == 200 and (await resp.json())["reloaded"]
    root = sdk(server, ADMIN_KEY)
    batch = await finished(root, created.id)
    assert batch.status == "completed" and batch.request_counts is not None, batch
    done = batch.request_counts.completed
    assert 0 < done < 10 and batch.request_counts.failed == 10 - done
    refused = await result_lines(root, batch.error_file_id)
    assert len(refused) == 10 - done
    assert {line["response"]["status_code"] for line in refused.values()} == {401}
    assert {line["response"]["body"]["error"]["code"] for line in refused.values()} == {"invalid_api_key"}
    assert sorted([*refused, *await result_lines(root, batch.output_file_id)]) == [f"k{i:02}" for i in range(10)]
    assert len(fake.requests) <= done + 1


async def test_a_batch_past_its_window_expires_with_its_unrun_lines_in_the_error_file(aiohttp_server,
                                                                                      tmp_path: Path) -> None:
    fake = SlowOpenAI(0.0)
    upstream = await aiohttp_server(fake.app())
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(POLICY, url=str(upstream.make_url("/v1")), data=tmp_path / "batches",
                                  chdb=tmp_path / "chdb", spool=tmp_path / "spool", extra=""))
    # A gateway that runs no batches takes the batch; the window closes before one that does starts.
    idle = await aiohttp_server(create_app(policy, run_batches=False))
    created = await submit(sdk(idle), [chat_line(f"e{i}", "chat-default") for i in range(3)])
    await asyncio.sleep(0.5)
    assert (await sdk(idle).batches.retrieve(created.id)).status == "validating"
    await idle.close()
    record_path = tmp_path / "batches" / "batches" / created.id / "batch.json"
    record = orjson.loads(record_path.read_bytes())
    record["batch"]["expires_at"] = int(time.time()) - 1
    record_path.write_bytes(orjson.dumps(record))
    server = await aiohttp_server(create_app(policy))
    alice = sdk(server)
    batch = await finished(alice, created.id)
    assert batch.status == "expired" and batch.expired_at and batch.output_file_id is None, batch
    errors = await result_lines(alice, batch.error_file_id)
    assert sorted(errors) == ["e0", "e1", "e2"]
    assert {line["error"]["code"] for line in errors.values()} == {"batch_expired"}
    assert all(line["response"] is None for line in errors.values())
    assert fake.requests == []


async def test_a_damaged_batch_folder_is_passed_by_and_reads_as_missing(start, tmp_path: Path) -> None:
    _, server = await start()
    damaged = tmp_path / "batches" / "batches" / ("batch_" + "0" * 32)
    damaged.mkdir(parents=True)
    (damaged / "batch.json").write_bytes(b'{"batch": [')
    alice, root = sdk(server), sdk(server, ADMIN_KEY)
    batch = await finished(alice, (await submit(alice, [chat_line("a", "chat-default")])).id)
    assert batch.status == "completed"
    with pytest.raises(openai.NotFoundError):
        await root.batches.retrieve(damaged.name)
    assert [b.id for b in (await root.batches.list()).data] == [batch.id]
