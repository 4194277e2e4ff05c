"""Listing files and batches reads only the records of the page asked for (and those ownership hides), never more
than MAX_RECORDS_READ, however many the folder holds."""

from __future__ import annotations

import io
import time
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.api.files import BATCH_STORE
from gateway.app import create_app
from gateway.batch.store import MAX_RECORDS_READ, BatchStore, after_cursor, new_batch_id, new_file_id
from tests.conftest import ADMIN_KEY, ALICE_KEY, policy_text, sdk
from tests.gateway.batch.conftest import chat_line, jsonl

POLICY = """
providers:
  up: {{type: openai, base_url: "{url}"}}
routes:
  chat-default: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
batch: {{data_dir: "{data}", poll_interval_s: 0.1}}
"""

BOBS = MAX_RECORDS_READ + 200
BOB = {"key_id": "bob-laptop", "user": "bob", "groups": []}


def _bobs_files(root: Path) -> list[str]:
    """Files of another user, written as the store writes them (many uploads through the API would take long)."""
    (root / "files").mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(BOBS):
        file_id = new_file_id()
        file = {"id": file_id, "object": "file", "bytes": 3, "created_at": int(time.time()), "filename": f"{i}.jsonl",
                "purpose": "batch", "status": "processed", "status_details": None, "expires_at": None}
        (root / "files" / f"{file_id}.json").write_bytes(orjson.dumps({"file": file, "owner": BOB}))
        (root / "files" / f"{file_id}.data").write_bytes(b"{}\n")
        ids.append(file_id)
    return sorted(ids)


def _bobs_batches(root: Path) -> list[str]:
    ids = []
    for _ in range(BOBS):
        batch_id = new_batch_id()
        (root / "batches" / batch_id).mkdir(parents=True)
        batch = {"id": batch_id, "object": "batch", "endpoint": "/v1/chat/completions", "errors": None,
                 "input_file_id": "file-" + "0" * 32, "completion_window": "24h", "status": "completed",
                 "output_file_id": None, "error_file_id": None, "created_at": int(time.time()),
                 "in_progress_at": None, "expires_at": int(time.time()) + 3600, "finalizing_at": None,
                 "completed_at": int(time.time()), "failed_at": None, "expired_at": None, "cancelling_at": None,
                 "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": None}
        (root / "batches" / batch_id / "batch.json").write_bytes(orjson.dumps({"batch": batch, "owner": BOB}))
        ids.append(batch_id)
    return sorted(ids)


class CountingReads:
    def __init__(self, store: BatchStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads = 0
        for name in ("read_file", "read_batch"):
            original = getattr(store, name)

            def counted(record_id: str, original=original) -> dict | None:
                self.reads += 1
                return original(record_id)

            monkeypatch.setattr(store, name, counted)

    def take(self) -> int:
        reads, self.reads = self.reads, 0
        return reads


async def test_a_file_list_reads_its_page_and_at_most_the_cap(make_gateway, fake_openai, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _, upstream = fake_openai
    server = await make_gateway(POLICY, url=str(upstream.make_url("/v1")), data=tmp_path / "batches")
    alice, admin = sdk(server, ALICE_KEY), sdk(server, ADMIN_KEY)
    oldest = await alice.files.create(file=("old.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
    bobs = _bobs_files(tmp_path / "batches")
    newest = await alice.files.create(file=("new.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
    reads = CountingReads(server.app[BATCH_STORE], monkeypatch)

    page = await admin.files.list(limit=5)
    assert [f.id for f in page.data] == [newest.id, *bobs[::-1][:4]] and page.has_more
    assert reads.take() == 6
    after = await admin.files.list(limit=3, after=bobs[10])
    assert [f.id for f in after.data] == bobs[9:6:-1] and reads.take() == 4
    assert [f.id for f in (await admin.files.list(limit=2, order="asc")).data] == [oldest.id, bobs[0]]
    reads.take()
    # Alice's older file lies under more of bob's than one call reads: her page ends early, saying there is more.
    mine = await alice.files.list()
    assert [f.id for f in mine.data] == [newest.id] and mine.has_more
    assert reads.take() == MAX_RECORDS_READ
    assert [f.id for f in (await alice.files.list(order="asc", limit=1)).data] == [oldest.id]


async def test_a_batch_list_reads_its_page_and_at_most_the_cap(aiohttp_server, fake_openai, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _, upstream = fake_openai
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(POLICY, url=str(upstream.make_url("/v1")), data=tmp_path / "batches"))
    # No runner: its poll reads the batches too, and only the list's reads are counted here.
    server = await aiohttp_server(create_app(policy, run_batches=False))
    alice, admin = sdk(server, ALICE_KEY), sdk(server, ADMIN_KEY)
    uploaded = await alice.files.create(file=("in.jsonl", io.BytesIO(jsonl([chat_line("a", "chat-default")]))),
                                        purpose="batch")
    older = await alice.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                       completion_window="24h")
    bobs = _bobs_batches(tmp_path / "batches")
    reads = CountingReads(server.app[BATCH_STORE], monkeypatch)

    page = await admin.batches.list(limit=3)
    assert [b.id for b in page.data] == bobs[::-1][:3] and page.has_more and reads.take() == 4
    mine = await alice.batches.list(limit=1)
    assert mine.data == [] and mine.has_more and reads.take() == MAX_RECORDS_READ
    assert (await admin.batches.list(limit=1, after=bobs[0])).data[0].id == older.id


HEX = "0123456789abcdef"


@given(st.lists(st.text(HEX, min_size=1, max_size=3), unique=True), st.none() | st.text(HEX, max_size=3), st.booleans())
def test_a_cursor_is_a_place_in_the_order_whether_or_not_its_id_exists(ids: list[str], after: str | None,
                                                                      newest_first: bool) -> None:
    ordered = sorted(ids, reverse=newest_first)
    expected = ordered if after is None else [i for i in ordered if (i < after if newest_first else i > after)]
    assert after_cursor(ordered, after, newest_first) == expected
