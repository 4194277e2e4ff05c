"""The endpoints that are not proxied: models, health, readiness, metrics."""

from __future__ import annotations

import os

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
        authenticate(request, policy)
    except GatewayError as err:
        return err.response()
    return _json({"object": "list", "data": [_model_entry(policy, r) for r in policy.routes.values()]})


async def get_model(request: web.Request) -> web.Response:
    policy = _policy(request)
    name = request.match_info["model"]
    try:
        authenticate(request, policy)
        route = policy.routes.get(name)
        if route is None:
            raise model_not_found(name)
    except GatewayError as err:
        return err.response()
    return _json(_model_entry(policy, route))


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok", "pid": os.getpid()})


async def readyz(request: web.Request) -> web.Response:
    policy = _policy(request)
    waiting = {name: p.state for name, p in policy.providers.items() if p.state not in ("ready", "lazy")}
    if waiting:
        return _json({"status": "not ready", "providers": waiting}, 503)
    return _json({"status": "ready", "policy": policy.version})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
