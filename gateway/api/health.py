"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import os

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.api.common import current_policy, json_response
from gateway.context import GATEWAY
from gateway.metrics import MULTIPROCESS


def _every_process() -> CollectorRegistry | None:
    """Under the supervisor a scrape reaches one worker at random: it answers for all, from their metric files."""
    if not MULTIPROCESS:
        return None
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry


_REGISTRY = _every_process()


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "pid": os.getpid()})


async def readyz(request: web.Request) -> web.Response:
    """This worker's own state, whatever the others' (a worker listens once its policy is active, so a starting one
    answers only while its engines load): draining once its stop began, starting while an engine or Presidio loads."""
    if request.app[GATEWAY].stop_deadline is not None:
        return json_response({"status": "draining", "pid": os.getpid()}, 503)
    policy = current_policy(request)
    states = {name: p.state for name, p in policy.providers.items()}
    engines = {name: {"state": p.state, **p.load()} for name, p in policy.providers.items() if hasattr(p, "load")}
    if any(state not in ("ready", "lazy") for state in states.values()):
        status = "starting" if "starting" in states.values() else "not ready"
        return json_response({"status": status, "pid": os.getpid(), "providers": states, "engines": engines}, 503)
    if policy.guardrails is not None and policy.guardrails.loading:
        # Requests are served meanwhile (a text that needs Presidio waits for it); a balancer waits for the warm-up.
        return json_response({"status": "starting", "pid": os.getpid(), "guardrails": "loading"}, 503)
    return json_response({"status": "ready", "pid": os.getpid(), "policy": policy.version, "engines": engines})


async def metrics(request: web.Request) -> web.Response:
    # In a thread: formatting every sample (~600, reading every worker's files under the supervisor) takes several
    # milliseconds, which the loop then gets back every switch interval instead of waiting for all of it.
    body = await asyncio.to_thread(generate_latest, REGISTRY if _REGISTRY is None else _REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
