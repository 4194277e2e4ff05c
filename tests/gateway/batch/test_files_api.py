"""The Files API through the real `openai` SDK: upload, retrieve, content, list, delete, each user their own."""

from __future__ import annotations

import io
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.conftest import ADMIN_KEY, ALICE_KEY, BOB_KEY, sdk
from tests.gateway.batch.conftest import chat_line, jsonl

POLICY = """
providers:
  up: {{type: openai, base_url: "{url}"}}
routes:
  chat-default: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
batch: {{data_dir: "{data}", max_file_bytes: 4096}}
"""


@pytest.fixture
async def server(make_gateway, fake_openai, tmp_path: Path):
    _, upstream = fake_openai
    return await make_gateway(POLICY, url=str(upstream.make_url("/v1")), data=tmp_path / "batches")


async def test_an_uploaded_file_reads_back_whole_and_only_its_owner_and_admins_see_it(server, tmp_path: Path) -> None:
    alice, bob, admin = sdk(server, ALICE_KEY), sdk(server, BOB_KEY), sdk(server, ADMIN_KEY)
    data = jsonl([chat_line(f"line-{i}", "chat-default") for i in range(3)])
    uploaded = await alice.files.create(file=("prompts.jsonl", io.BytesIO(data)), purpose="batch")
    assert uploaded.id.startswith("file-") and uploaded.object == "file"
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose, uploaded.status) == (
        len(data), "prompts.jsonl", "batch", "processed")
    # Kept for the default retention of 30 days.
    assert uploaded.expires_at == uploaded.created_at + 30 * 86400
    assert (await alice.files.retrieve(uploaded.id)).model_dump() == uploaded.model_dump()
    assert (await alice.files.content(uploaded.id)).content == data
    assert [f.id for f in (await alice.files.list()).data] == [uploaded.id]
    for call in (bob.files.retrieve, bob.files.content, bob.files.delete):
        with pytest.raises(openai.NotFoundError):
            await call(uploaded.id)
    assert (await bob.files.list()).data == []
    assert [f.id for f in (await admin.files.list()).data] == [uploaded.id]
    assert (await admin.files.content(uploaded.id)).content == data
    deleted = await alice.files.delete(uploaded.id)
    assert deleted.deleted and deleted.id == uploaded.id
    with pytest.raises(openai.NotFoundError):
        await alice.files.retrieve(uploaded.id)
    assert (await alice.files.list()).data == []
    assert not list((tmp_path / "batches" / "files").glob("file-*"))


async def test_the_list_pages_newest_first_and_filters_by_purpose(server) -> None:
    alice = sdk(server)
    ids = [(await alice.files.create(file=(f"{i}.jsonl", io.BytesIO(b"{}\n")), purpose="batch")).id
           for i in range(3)]
    first = await alice.files.list(limit=2)
    assert [f.id for f in first.data] == ids[::-1][:2] and first.has_more
    rest = await alice.files.list(limit=2, after=first.data[-1].id)
    assert [f.id for f in rest.data] == [ids[0]] and not rest.has_more
    assert [f.id async for f in alice.files.list(limit=1)] == ids[::-1]
    assert [f.id for f in (await alice.files.list(order="asc")).data] == ids
    assert (await alice.files.list(purpose="batch_output")).data == []


async def test_a_file_above_the_limit_is_refused_with_413_and_leaves_nothing(server, tmp_path: Path) -> None:
    alice = sdk(server)
    with pytest.raises(openai.APIStatusError) as info:
        await alice.files.create(file=("big.jsonl", io.BytesIO(b"x" * 5000)), purpose="batch")
    assert info.value.status_code == 413 and info.value.code == "file_too_large"
    assert "4096" in info.value.message
    assert (await alice.files.list()).data == []
    assert not [p for p in (tmp_path / "batches" / "files").rglob("*") if p.is_file()]


async def test_uploads_need_purpose_batch_a_file_and_a_key(server, tmp_path: Path) -> None:
    alice = sdk(server)
    with pytest.raises(openai.BadRequestError) as info:
        await alice.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    assert info.value.param == "purpose" and "fine-tune" in info.value.message
    with pytest.raises(openai.AuthenticationError):
        await sdk(server, "lg-no-such-key").files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
    async with aiohttp.ClientSession() as session:
        form = aiohttp.FormData({"purpose": "batch"}, default_to_multipart=True)
        async with session.post(server.make_url("/v1/files"), data=form,
                                headers={"Authorization": f"Bearer {ALICE_KEY}"}) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["param"] == "file"
        async with session.post(server.make_url("/v1/files"), json={"purpose": "batch"},
                                headers={"Authorization": f"Bearer {ALICE_KEY}"}) as resp:
            assert resp.status == 400 and "multipart" in (await resp.json())["error"]["message"]
        cut_short = (b'--XX\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--XX\r\n'
                     b'Content-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n{"custom_id": ')
        async with session.post(server.make_url("/v1/files"), data=cut_short, headers={
                "Authorization": f"Bearer {ALICE_KEY}", "Content-Type": "multipart/form-data; boundary=XX"}) as resp:
            assert resp.status == 400 and "malformed" in (await resp.json())["error"]["message"]
        async with session.get(server.make_url("/v1/files/../../policy.yaml"),
                               headers={"Authorization": f"Bearer {ALICE_KEY}"}) as resp:
            assert resp.status == 404
    assert (await alice.files.list()).data == []
    assert not [p for p in (tmp_path / "batches" / "files").rglob("*") if p.is_file()]


async def test_a_file_may_be_larger_than_a_request_body(make_gateway, fake_openai, tmp_path: Path) -> None:
    _, upstream = fake_openai
    server = await make_gateway(POLICY.replace("max_file_bytes: 4096", "max_file_bytes: 3000000")
                                + "server: {{max_request_bytes: 65536}}\n",
                                url=str(upstream.make_url("/v1")), data=tmp_path / "batches")
    alice = sdk(server)
    data = jsonl([chat_line(f"line-{i}", "chat-default", "x" * 900) for i in range(2500)])
    assert 2_000_000 < len(data) < 3_000_000
    uploaded = await alice.files.create(file=("big.jsonl", io.BytesIO(data)), purpose="batch")
    assert uploaded.bytes == len(data)
    assert (await alice.files.content(uploaded.id)).content == data
