"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import os

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.api.common import current_policy, json_response


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "pid": os.getpid()})


async def readyz(request: web.Request) -> web.Response:
    policy = current_policy(request)
    states = {name: p.state for name, p in policy.providers.items()}
    engines = {name: {"state": p.state, **p.load()} for name, p in policy.providers.items() if hasattr(p, "load")}
    if any(state not in ("ready", "lazy") for state in states.values()):
        return json_response({"status": "not ready", "providers": states, "engines": engines}, 503)
    return json_response({"status": "ready", "policy": policy.version, "engines": engines})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})
