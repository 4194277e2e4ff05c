"""The admin API: the policy in force, reloads, live limiter counters."""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web

from gateway.api.common import current_policy, json_response
from gateway.compiled import CompiledPolicy
from gateway.context import GATEWAY
from gateway.errors import GatewayError
from gateway.proxy import authenticate
from policies import StorageUnavailable


async def _admin(request: web.Request) -> CompiledPolicy:
    policy = current_policy(request)
    principal = await authenticate(request, policy)
    if not policy.governance.authorizer.is_admin(principal):
        raise GatewayError(403, "This endpoint needs the admin capability.", "invalid_request_error", "not_admin")
    return policy


async def admin_policy(request: web.Request) -> web.Response:
    try:
        policy = await _admin(request)
    except GatewayError as err:
        return err.response()
    loaded = policy.loaded
    return json_response({"version": policy.version, "sha256": loaded.sha256, "source": loaded.source,
                  "loaded_at": datetime.fromtimestamp(loaded.loaded_at, UTC).isoformat()})


async def admin_reload(request: web.Request) -> web.Response:
    try:
        await _admin(request)
    except GatewayError as err:
        return err.response()
    changed, message = await request.app[GATEWAY].holder.reload()
    problems = not changed and "unchanged" not in message
    return json_response({"reloaded": changed, "message": message, "version": current_policy(request).version},
                 422 if problems else 200)


async def admin_limits(request: web.Request) -> web.Response:
    try:
        policy = await _admin(request)
        scope = request.query.get("scope", "")
        kind = scope.partition(":")[0]
        if kind not in ("user", "key", "group", "route", "global") or (kind != "global" and ":" not in scope):
            raise GatewayError(400, "Give scope=user:NAME, key:ID, group:NAME, route:NAME or global.",
                               "invalid_request_error", "invalid_scope", "scope")
        counters = await policy.governance.governor.counters(scope)
    except StorageUnavailable:
        return GatewayError(503, "The rate limiter's shared store cannot be reached; counters are unknown.",
                            "api_error", "limiter_unavailable").response()
    except GatewayError as err:
        return err.response()
    return json_response({"scope": scope, "counters": counters})
