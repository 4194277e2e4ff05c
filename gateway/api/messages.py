"""Anthropic's Messages door: `/v1/messages` through the pipeline, and `/v1/messages/count_tokens`."""

from __future__ import annotations

from aiohttp import web

from gateway.api import messages_wire
from gateway.api.common import current_policy, json_response
from gateway.api.doors import MESSAGES
from gateway.errors import GatewayError, model_not_found
from gateway.proxy import authenticate, handle, read_body
from policies.tokens import count_prompt_tokens, load_encoding


async def create_message(request: web.Request) -> web.StreamResponse:
    return await handle(request, MESSAGES, current_policy(request))


async def count_tokens(request: web.Request) -> web.Response:
    """Counted with the route's tokenizer (tiktoken's, or its o200k estimate): no upstream call, no inference row."""
    policy = current_policy(request)
    try:
        principal = await authenticate(request, policy, MESSAGES)
        # Counted like the request it previews: what chat cannot carry counts for nothing, and is not refused here.
        translated = messages_wire.translate_request(await read_body(request, policy.loaded.policy.server),
                                                     counting=True, lenient=True)
        model = translated.chat["model"]
        route = policy.routes.get(model)
        if route is None or not policy.governance.authorizer.can_call(principal, model):
            raise model_not_found(model)
        # A first count may build the model's encoding (0.3-1 s): in a thread, not on the loop.
        await load_encoding(route.targets[0].model)
        tokens = count_prompt_tokens(route.targets[0].model, "chat", translated.chat)
    except GatewayError as err:
        return messages_wire.error_response(err)
    return json_response(messages_wire.count_tokens_answer(tokens))
