"""A fake OpenAI upstream with the failures routing must survive, on top of FakeOpenAI's scripts.

Model names: `reset-before-first` (event stream opened, connection dropped before any event), `empty-stream`
(event stream opened and closed with no event and no [DONE]), `slow-<ms>` (answers after <ms>). Beyond the
model name: `down` makes every request answer 503, `fail_next` makes that many next requests answer 503.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from tests.fakes.openai_upstream import FakeOpenAI


class FlakyOpenAI(FakeOpenAI):
    def __init__(self, chunk_delay_s: float = 0.0) -> None:
        super().__init__(chunk_delay_s)
        self.down = False
        self.fail_next = 0

    def models(self) -> list[str]:
        return [body.get("model", "") for _, body, _ in self.requests]

    async def _scripted(self, request: web.Request, path: str) -> tuple[dict, web.StreamResponse | None]:
        body, scripted = await super()._scripted(request, path)
        if scripted is not None:
            return body, scripted
        if self.down or self.fail_next > 0:
            self.fail_next = max(self.fail_next - 1, 0)
            error = {"message": "scripted outage", "type": "server_error", "param": None, "code": None}
            return body, web.json_response({"error": error}, status=503)
        model = str(body.get("model", ""))
        if model.startswith("slow-"):
            await asyncio.sleep(int(model.split("-")[1]) / 1000)
        if model in ("reset-before-first", "empty-stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            if model == "reset-before-first":
                assert request.transport is not None
                request.transport.abort()
            return body, response
        return body, None
