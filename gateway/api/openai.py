"""The OpenAI doors that run the governance pipeline: chat completions, completions, embeddings, Responses."""

from __future__ import annotations

from aiohttp import web

from gateway.api.common import current_policy
from gateway.api.doors import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES
from gateway.proxy import handle


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await handle(request, CHAT, current_policy(request))


async def completions(request: web.Request) -> web.StreamResponse:
    return await handle(request, COMPLETIONS, current_policy(request))


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await handle(request, EMBEDDINGS, current_policy(request))


async def responses(request: web.Request) -> web.StreamResponse:
    return await handle(request, RESPONSES, current_policy(request))
