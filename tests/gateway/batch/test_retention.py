"""Retention: files and finished batches older than `batch.retention_days` are deleted by the runner; a batch not
yet finished and its input are kept however old; a File object says when it expires."""

from __future__ import annotations

import asyncio
import io
import os
import time
from pathlib import Path

import openai
import orjson
import pytest

from gateway.batch.store import BatchStore
from tests.conftest import ADMIN_KEY, ALICE_KEY, sdk
from tests.gateway.batch.conftest import chat_line, finished, jsonl

POLICY = """
providers:
  up: {{type: openai, base_url: "{url}"}}
routes:
  chat-default: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
batch: {{data_dir: "{data}", poll_interval_s: 0.1, retention_days: 2}}
"""

DAY_S = 86400
ALICE = {"key_id": "alice-laptop", "user": "alice", "groups": []}


def _id(prefix: str, age_s: float) -> str:
    """An id made `age_s` ago (UUIDv7: the time leads)."""
    ms = int((time.time() - age_s) * 1000)
    return f"{prefix}{ms:012x}7{os.urandom(10).hex()[:19]}"


def _file(store: BatchStore, age_s: float, data: bytes = b"{}\n", purpose: str = "batch") -> str:
    file_id = _id("file-", age_s)
    store.files.mkdir(parents=True, exist_ok=True)
    store.data_path(file_id).write_bytes(data)
    file = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time() - age_s),
            "filename": "f.jsonl", "purpose": purpose, "status": "processed", "status_details": None,
            "expires_at": None}
    (store.files / f"{file_id}.json").write_bytes(orjson.dumps({"file": file, "owner": ALICE}))
    return file_id


def _batch(store: BatchStore, age_s: float, input_file_id: str, status: str, **fields: object) -> str:
    batch_id = _id("batch_", age_s)
    created = int(time.time() - age_s)
    batch = {"id": batch_id, "object": "batch", "endpoint": "/v1/chat/completions", "errors": None,
             "input_file_id": input_file_id, "completion_window": "24h", "status": status, "output_file_id": None,
             "error_file_id": None, "created_at": created, "in_progress_at": None,
             "expires_at": int(time.time()) + 3600, "finalizing_at": None, "completed_at": None, "failed_at": None,
             "expired_at": None, "cancelling_at": None, "cancelled_at": None,
             "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": None, **fields}
    store.create_batch(batch, ALICE, input_file_id)
    return batch_id


async def test_old_files_and_finished_batches_go_and_unfinished_ones_stay(make_gateway, fake_openai,
                                                                          tmp_path: Path) -> None:
    _, upstream = fake_openai
    store = BatchStore(tmp_path / "batches")
    old = 3 * DAY_S
    stale_upload = _file(store, old)
    young_upload = _file(store, DAY_S)
    # Finished three days ago: it and its output file go.
    done_output = _file(store, old, b'{"custom_id": "a"}\n', "batch_output")
    done = _batch(store, old + 60, _file(store, old + 120), "completed", completed_at=int(time.time() - old),
                  output_file_id=done_output)
    # Made three days ago but finished yesterday: it stays.
    late = _batch(store, old, _file(store, old), "cancelled", cancelled_at=int(time.time() - DAY_S))
    # Three days old and not yet run: it and its input stay, and it runs.
    waiting_input = _file(store, old, jsonl([chat_line("w", "chat-default")]))
    waiting = _batch(store, old, waiting_input, "validating")

    server = await make_gateway(POLICY, url=str(upstream.make_url("/v1")), data=tmp_path / "batches")
    admin, alice = sdk(server, ADMIN_KEY), sdk(server, ALICE_KEY)
    async with asyncio.timeout(60):
        while (store.files / f"{stale_upload}.json").exists():
            await asyncio.sleep(0.05)
    for file_id in (stale_upload, done_output):
        with pytest.raises(openai.NotFoundError):
            await admin.files.retrieve(file_id)
    with pytest.raises(openai.NotFoundError):
        await admin.batches.retrieve(done)
    assert not store.folder(done).exists() and not store.data_path(done_output).exists()
    assert (await admin.batches.retrieve(late)).status == "cancelled"
    kept = await alice.files.retrieve(waiting_input)
    assert kept.expires_at == kept.created_at + 2 * DAY_S < time.time()
    ran = await finished(alice, waiting)
    assert ran.status == "completed" and ran.request_counts is not None and ran.request_counts.completed == 1
    young = await alice.files.retrieve(young_upload)
    assert young.expires_at == young.created_at + 2 * DAY_S
    uploaded = await alice.files.create(file=("in.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
    assert uploaded.expires_at == uploaded.created_at + 2 * DAY_S
    assert [f.expires_at for f in (await alice.files.list(limit=1)).data] == [uploaded.expires_at]
