"""Calling a route's targets, and turning upstream failures into answers the client understands."""

from __future__ import annotations

import time

from gateway import metrics
from gateway.compiled import Route, Target
from gateway.errors import GatewayError, bad_request
from gateway.exchange import Exchange
from gateway.providers import ChunkStream, Completion, Op, UnsupportedOperation, UpstreamError
from gateway.providers.anthropic_translate import TranslationError

_CLIENT_FAULTS = {400, 413, 415, 422}


def upstream_failure(err: UpstreamError) -> GatewayError:
    if err.kind == "timeout":
        return GatewayError(504, err.detail, "api_error", "upstream_timeout")
    if err.kind in ("connect", "reset"):
        return GatewayError(502, err.detail, "api_error", "upstream_unavailable")
    if err.kind == "invalid":
        return GatewayError(502, err.detail, "api_error", "upstream_invalid_response")
    status = err.status or 502
    if status in _CLIENT_FAULTS:
        error = err.error or {}
        return GatewayError(400, str(error.get("message") or err.detail), "invalid_request_error",
                            error.get("code") if isinstance(error.get("code"), str) else None,
                            error.get("param") if isinstance(error.get("param"), str) else None)
    if status == 429:
        return GatewayError(429, err.detail, "rate_limit_error", "upstream_rate_limited")
    return GatewayError(502, f"{err.detail} (upstream HTTP {status})", "api_error", "upstream_error")


def pick_target(route: Route) -> Target:
    for target in route.targets:
        if target.weight > 0:
            return target
    raise GatewayError(503, f"route {route.name!r} has no target that takes traffic", "api_error", "no_target")


def upstream_body(body: dict, target: Target, stream: bool) -> dict:
    out = dict(body)
    out["model"] = target.model
    if stream:
        # Usage must be known for every stream, so it is always asked for upstream.
        out["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return out


def _note_attempt(ex: Exchange, target: Target, started: float) -> None:
    elapsed = time.perf_counter() - started
    ex.upstream_s += elapsed
    ex.attempts += 1
    ex.provider = target.provider.name
    ex.model = target.model
    ex.split_arm = target.label
    metrics.observe_upstream(target.provider.name, elapsed)


async def complete(route: Route, op: Op, body: dict, ex: Exchange) -> Completion:
    target = pick_target(route)
    started = time.perf_counter()
    try:
        return await target.provider.complete(op, upstream_body(body, target, False), target.timeout)
    except UpstreamError as err:
        raise upstream_failure(err) from None
    except (UnsupportedOperation, TranslationError) as exc:
        raise bad_request(str(exc)) from None
    finally:
        _note_attempt(ex, target, started)


async def open_stream(route: Route, op: Op, body: dict, ex: Exchange) -> ChunkStream:
    target = pick_target(route)
    started = time.perf_counter()
    try:
        return await target.provider.stream(op, upstream_body(body, target, True), target.timeout)
    except UpstreamError as err:
        raise upstream_failure(err) from None
    except (UnsupportedOperation, TranslationError) as exc:
        raise bad_request(str(exc)) from None
    finally:
        _note_attempt(ex, target, started)
