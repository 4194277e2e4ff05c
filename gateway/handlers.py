"""The endpoints that are not proxied: models, health, readiness, metrics."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.compiled import CompiledPolicy, Route
from gateway.context import GATEWAY
from gateway.errors import GatewayError, model_not_found
from gateway.proxy import authenticate, handle


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _policy(request: web.Request) -> CompiledPolicy:
    return request.app[GATEWAY].policy


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await handle(request, "chat", _policy(request))


async def completions(request: web.Request) -> web.StreamResponse:
    return await handle(request, "completions", _policy(request))


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await handle(request, "embeddings", _policy(request))


def _model_entry(policy: CompiledPolicy, route: Route) -> dict:
    entry: dict[str, object] = {
        "id": route.name, "object": "model", "created": int(policy.loaded.loaded_at), "owned_by": "lockgate",
    }
    states = {t.provider.state for t in route.targets}
    if states != {"ready"}:
        entry["state"] = ", ".join(sorted(states))
    return entry


async def list_models(request: web.Request) -> web.Response:
    policy = _policy(request)
    try:
        principal = authenticate(request, policy)
    except GatewayError as err:
        return err.response()
    visible = policy.governance.authorizer.visible_routes(principal, list(policy.routes))
    return _json({"object": "list", "data": [_model_entry(policy, policy.routes[name]) for name in visible]})


async def get_model(request: web.Request) -> web.Response:
    policy = _policy(request)
    name = request.match_info["model"]
    try:
        principal = authenticate(request, policy)
        route = policy.routes.get(name)
        # A route the caller may not use looks the same as one that does not exist.
        if route is None or not policy.governance.authorizer.can_call(principal, name):
            raise model_not_found(name)
    except GatewayError as err:
        return err.response()
    return _json(_model_entry(policy, route))


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok", "pid": os.getpid()})


async def readyz(request: web.Request) -> web.Response:
    policy = _policy(request)
    states = {name: p.state for name, p in policy.providers.items()}
    engines = {name: {"state": p.state, **p.load()} for name, p in policy.providers.items() if hasattr(p, "load")}
    if any(state not in ("ready", "lazy") for state in states.values()):
        return _json({"status": "not ready", "providers": states, "engines": engines}, 503)
    return _json({"status": "ready", "policy": policy.version, "engines": engines})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _admin(request: web.Request) -> CompiledPolicy:
    policy = _policy(request)
    principal = authenticate(request, policy)
    if not policy.governance.authorizer.is_admin(principal):
        raise GatewayError(403, "This endpoint needs the admin capability.", "invalid_request_error", "not_admin")
    return policy


async def admin_policy(request: web.Request) -> web.Response:
    try:
        policy = _admin(request)
    except GatewayError as err:
        return err.response()
    loaded = policy.loaded
    return _json({"version": policy.version, "sha256": loaded.sha256, "source": loaded.source,
                  "loaded_at": datetime.fromtimestamp(loaded.loaded_at, UTC).isoformat()})


async def admin_reload(request: web.Request) -> web.Response:
    try:
        _admin(request)
    except GatewayError as err:
        return err.response()
    changed, message = await request.app[GATEWAY].holder.reload()
    problems = not changed and "unchanged" not in message
    return _json({"reloaded": changed, "message": message, "version": _policy(request).version},
                 422 if problems else 200)


async def admin_limits(request: web.Request) -> web.Response:
    try:
        policy = _admin(request)
        scope = request.query.get("scope", "")
        kind = scope.partition(":")[0]
        if kind not in ("user", "key", "group", "route", "global") or (kind != "global" and ":" not in scope):
            raise GatewayError(400, "Give scope=user:NAME, key:ID, group:NAME, route:NAME or global.",
                               "invalid_request_error", "invalid_scope", "scope")
    except GatewayError as err:
        return err.response()
    return _json({"scope": scope, "counters": await policy.governance.governor.counters(scope)})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/policy", admin_policy)
    app.router.add_post("/admin/reload", admin_reload)
    app.router.add_get("/admin/limits", admin_limits)
