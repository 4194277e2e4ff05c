"""`/v1/models`: the routes the caller may use, and nothing else."""

from __future__ import annotations

from aiohttp import web

from gateway.api.common import current_policy, json_response
from gateway.compiled import CompiledPolicy, Route
from gateway.errors import GatewayError, model_not_found
from gateway.proxy import authenticate


def _model_entry(policy: CompiledPolicy, route: Route) -> dict:
    entry: dict[str, object] = {
        "id": route.name, "object": "model", "created": int(policy.loaded.loaded_at), "owned_by": "lockgate",
    }
    states = {t.provider.state for t in route.targets}
    if states != {"ready"}:
        entry["state"] = ", ".join(sorted(states))
    return entry


async def list_models(request: web.Request) -> web.Response:
    policy = current_policy(request)
    try:
        principal = await authenticate(request, policy)
    except GatewayError as err:
        return err.response()
    visible = policy.governance.authorizer.visible_routes(principal, list(policy.routes))
    return json_response({"object": "list", "data": [_model_entry(policy, policy.routes[name]) for name in visible]})


async def get_model(request: web.Request) -> web.Response:
    policy = current_policy(request)
    name = request.match_info["model"]
    try:
        principal = await authenticate(request, policy)
        route = policy.routes.get(name)
        # A route the caller may not use looks the same as one that does not exist.
        if route is None or not policy.governance.authorizer.can_call(principal, name):
            raise model_not_found(name)
    except GatewayError as err:
        return err.response()
    return json_response(_model_entry(policy, route))
