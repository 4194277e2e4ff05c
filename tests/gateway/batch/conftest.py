"""What the Files and Batch API tests share: batch input files, a wait for a batch's end, its result lines."""

from __future__ import annotations

import asyncio
import io

import orjson
from aiohttp import web
from openai import AsyncOpenAI
from openai.types import Batch

from tests.fakes.openai_upstream import FakeOpenAI

FINAL = frozenset({"completed", "failed", "expired", "cancelled"})


def jsonl(lines: list[dict]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def chat_line(custom_id: str, model: str, text: str = "hello there") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": text}]}}


async def submit(client: AsyncOpenAI, lines: list[dict] | bytes, endpoint: str = "/v1/chat/completions",
                 **extra: object) -> Batch:
    data = lines if isinstance(lines, bytes) else jsonl(lines)
    uploaded = await client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")
    return await client.batches.create(input_file_id=uploaded.id, endpoint=endpoint,  # type: ignore[arg-type]
                                       completion_window="24h", **extra)  # type: ignore[arg-type]


async def finished(client: AsyncOpenAI, batch_id: str, timeout_s: float = 60.0) -> Batch:
    async with asyncio.timeout(timeout_s):
        while True:
            batch = await client.batches.retrieve(batch_id)
            if batch.status in FINAL:
                return batch
            await asyncio.sleep(0.1)


async def result_lines(client: AsyncOpenAI, file_id: str | None) -> dict[str, dict]:
    """The lines of an output or error file by custom_id (none when the batch has no such file)."""
    if file_id is None:
        return {}
    content = await client.files.content(file_id)
    lines = [orjson.loads(raw) for raw in content.content.splitlines()]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines), "a custom_id appears twice"
    return by_id


class SlowOpenAI(FakeOpenAI):
    """The fake upstream, each answer `delay_s` late: a batch takes long enough to be cancelled or killed midway."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    async def _scripted(self, request: web.Request, path: str) -> tuple[dict, web.StreamResponse | None]:
        await asyncio.sleep(self.delay_s)
        return await super()._scripted(request, path)
