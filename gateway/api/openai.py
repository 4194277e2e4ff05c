"""The OpenAI doors that run the governance pipeline: chat completions, completions, embeddings."""

from __future__ import annotations

from aiohttp import web

from gateway.api.common import current_policy
from gateway.proxy import handle


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await handle(request, "chat", current_policy(request))


async def completions(request: web.Request) -> web.StreamResponse:
    return await handle(request, "completions", current_policy(request))


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await handle(request, "embeddings", current_policy(request))
