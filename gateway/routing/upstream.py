"""Calling a route's targets (split, retries, fallbacks, breakers, shadows); upstream failures mapped for clients."""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, field
from typing import cast

from gateway import metrics, telemetry
from gateway.compiled import CompiledPolicy, Route, Target
from gateway.errors import GatewayError, bad_request
from gateway.exchange import Exchange
from gateway.inference.transcript import Transcript
from gateway.providers import ChunkStream, Completion, Op, UnsupportedOperation, UpstreamError, Usage
from gateway.providers.anthropic import AnthropicProvider
from gateway.providers.anthropic_native import NativeRequest, UntranslatableRequest
from gateway.providers.anthropic_translate import TranslationError
from gateway.routing.breaker import BreakerRegistry, CircuitBreaker
from gateway.routing.shadow import ShadowRunner
from gateway.routing.split import attempt_order, draw_for
from policies.schema import CircuitBreakerConfig, RetryConfig

_CLIENT_FAULTS = {400, 413, 415, 422}


@dataclass(slots=True)
class Resilience:
    """What routing keeps for the app's lifetime, across policy versions: breakers and shadow tasks."""

    breakers: BreakerRegistry = field(default_factory=BreakerRegistry)
    shadows: ShadowRunner = field(default_factory=ShadowRunner)


def upstream_failure(err: UpstreamError) -> GatewayError:
    if err.kind == "timeout":
        return GatewayError(504, err.detail, "api_error", "upstream_timeout")
    if err.kind in ("connect", "reset"):
        # The embedded runtime names why it cannot answer (model_not_ready); HTTP upstreams that cannot be reached say nothing.
        code = (err.error or {}).get("code")
        return GatewayError(502, err.detail, "api_error", code if isinstance(code, str) else "upstream_unavailable")
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


def upstream_body(body: dict, target: Target, stream: bool) -> dict:
    out = dict(body)
    out["model"] = target.model
    if stream:
        # Usage must be known for every stream, so it is always asked for upstream.
        out["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return out


def backoff_s(retry: RetryConfig, retry_number: int) -> float:
    """Exponential in the retry number, with jitter so clients that failed together do not retry together."""
    return retry.backoff_ms / 1000 * (1 << (retry_number - 1)) * random.uniform(0.5, 1.0)


def _note_attempt(ex: Exchange, target: Target, started: float) -> None:
    elapsed = time.perf_counter() - started
    ex.upstream_s += elapsed
    ex.attempts += 1
    ex.provider = target.provider.name
    ex.model = target.model
    ex.split_arm = target.label
    metrics.observe_upstream(target.provider.name, elapsed)


class _Primed:
    """A stream's chunks with the first one already read; failures after it still reach the target's breaker."""

    __slots__ = ("_breaker", "_config", "_first", "_rest")

    def __init__(self, first: dict, rest: AsyncIterator[dict], breaker: CircuitBreaker | None,
                 config: CircuitBreakerConfig | None) -> None:
        self._first: dict | None = first
        self._rest = rest
        self._breaker = breaker
        self._config = config

    def __aiter__(self) -> _Primed:
        return self

    async def __anext__(self) -> dict:
        first = self._first
        if first is not None:
            self._first = None
            return first
        if self._breaker is None:
            return await self._rest.__anext__()
        try:
            return await self._rest.__anext__()
        except UpstreamError:
            self._breaker.failure(cast(CircuitBreakerConfig, self._config))
            raise


def _call(target: Target, op: Op, body: dict, ex: Exchange, stream: bool,
          native: NativeRequest | None) -> Awaitable[Completion | ChunkStream]:
    """The target's call: the client's own request where the provider speaks the door's API, else the canonical one."""
    provider = target.provider
    if native is not None:
        if isinstance(provider, AnthropicProvider):
            if stream:
                return provider.stream_native(native, target.model, target.timeout)
            return provider.complete_native(native, target.model, target.timeout)
        if native.untranslatable is not None:
            raise UntranslatableRequest(native.untranslatable)
    if stream:
        return provider.stream(op, upstream_body(body, target, True), target.timeout, request_id=ex.request_id,
                               priority=ex.priority)
    return provider.complete(op, upstream_body(body, target, False), target.timeout, request_id=ex.request_id,
                             priority=ex.priority)


async def _open_primed(target: Target, op: Op, body: dict, ex: Exchange, breaker: CircuitBreaker | None,
                       config: CircuitBreakerConfig | None, native: NativeRequest | None) -> ChunkStream:
    """Opens the stream and reads its first chunk, so a stream that dies before it is a failure we can still route around."""
    upstream = cast(ChunkStream, await _call(target, op, body, ex, True, native))
    chunks = upstream.__aiter__()
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        return upstream
    except BaseException:
        await upstream.aclose()
        raise
    # The same kind of stream: a door tells a native stream from a translated one by its type.
    # Nothing is read past the first chunk before the relay asks for it, so the last event still matches its chunk.
    return type(upstream)(_Primed(first, chunks, breaker, config), upstream.aclose, upstream.buffered,
                          upstream.last_event)


async def _attempt(target: Target, op: Op, body: dict, ex: Exchange, stream: bool, breaker: CircuitBreaker | None,
                   config: CircuitBreakerConfig | None, native: NativeRequest | None) -> Completion | ChunkStream:
    started = time.perf_counter()
    try:
        calling = (_open_primed(target, op, body, ex, breaker, config, native) if stream
                   else _call(target, op, body, ex, False, native))
        return await (calling if telemetry.TRACING is None else telemetry.TRACING.attempt(target, ex, calling))
    finally:
        _note_attempt(ex, target, started)


def _is_direct(route: Route) -> bool:
    """One live target and nothing to retry or fall back to: called as it is, with no plan and no priming."""
    config = route.config
    return (len(route.targets) == 1 and route.targets[0].weight > 0 and not config.fallbacks
            and config.retry.attempts == 1 and config.circuit_breaker is None)


async def _direct(target: Target, op: Op, body: dict, ex: Exchange, stream: bool,
                  native: NativeRequest | None) -> Completion | ChunkStream:
    started = time.perf_counter()
    try:
        calling = _call(target, op, body, ex, stream, native)
        return await (calling if telemetry.TRACING is None else telemetry.TRACING.attempt(target, ex, calling))
    except UpstreamError as err:
        raise upstream_failure(err) from None
    except (UnsupportedOperation, TranslationError) as exc:
        raise bad_request(str(exc)) from None
    finally:
        _note_attempt(ex, target, started)


async def _routed(route: Route, op: Op, body: dict, ex: Exchange, routes: Mapping[str, Route],
                  breakers: BreakerRegistry, stream: bool, native: NativeRequest | None) -> Completion | ChunkStream:
    """Tries targets in attempt order, each up to its route's retry attempts, until one answers."""
    last: UpstreamError | None = None
    unsupported: UnsupportedOperation | None = None
    for owner, target in attempt_order(route, routes, draw_for(route, ex)):
        retry = owner.config.retry
        config = owner.config.circuit_breaker
        breaker = breakers.get(owner.name, target.label) if config is not None else None
        reason = "circuit open"
        for number in range(retry.attempts):
            if number:
                await asyncio.sleep(backoff_s(retry, number))
            if breaker is not None and not breaker.allow(cast(CircuitBreakerConfig, config)):
                break
            try:
                result = await _attempt(target, op, body, ex, stream, breaker, config, native)
            except UpstreamError as err:
                if err.kind == "status" and err.status in _CLIENT_FAULTS:
                    if breaker is not None:
                        breaker.success()
                    raise upstream_failure(err) from None
                if breaker is not None:
                    breaker.failure(cast(CircuitBreakerConfig, config))
                last, reason = err, str(err.condition)
                if err.condition not in retry.on:
                    break
                continue
            except UnsupportedOperation as exc:
                if breaker is not None:
                    breaker.abandon()
                unsupported, reason = exc, "unsupported operation"
                break
            except TranslationError as exc:
                if breaker is not None:
                    breaker.abandon()
                raise bad_request(str(exc)) from None
            except BaseException:
                if breaker is not None:
                    breaker.abandon()
                raise
            if breaker is not None:
                breaker.success()
            return result
        ex.fallbacks.append(f"{target.label} -> {reason}")
    if last is not None:
        raise upstream_failure(last)
    if unsupported is not None:
        raise bad_request(str(unsupported))
    if ex.fallbacks:
        raise GatewayError(503, f"every target of route {route.name!r} is unavailable: circuit breakers are open",
                           "api_error", "upstream_unavailable")
    raise GatewayError(503, f"route {route.name!r} has no target that takes traffic", "api_error", "no_target")


async def _serve(route: Route, op: Op, body: dict, ex: Exchange, routes: Mapping[str, Route],
                 breakers: BreakerRegistry, stream: bool, native: NativeRequest | None) -> Completion | ChunkStream:
    if _is_direct(route):
        return await _direct(route.targets[0], op, body, ex, stream, native)
    return await _routed(route, op, body, ex, routes, breakers, stream, native)


async def _drain(stream: ChunkStream, ex: Exchange) -> dict:
    """Reads a shadow stream to its end; returns the answer shaped as the relay records a streamed one."""
    transcript = Transcript("content" if ex.op == "chat" else "text")
    try:
        async for chunk in stream:
            if not ex.first_byte_at:
                ex.first_byte_at = time.perf_counter()
            if chunk.get("usage"):
                ex.usage = Usage.from_openai(chunk["usage"])
            transcript.add(chunk)
    finally:
        await stream.aclose()
    return transcript.payload(ex.usage)


async def _shadow_call(route: Route, op: Op, body: dict, routes: Mapping[str, Route], breakers: BreakerRegistry,
                       stream: bool, log_payloads: bool, native: NativeRequest | None, ex: Exchange) -> None:
    """The mirrored request, with its own Exchange; its answer is kept for the record and goes nowhere else."""
    try:
        result = await _serve(route, op, body, ex, routes, breakers, stream, native)
        if isinstance(result, ChunkStream):
            answer = await _drain(result, ex)
        else:
            ex.usage, answer = result.usage, result.data
        if log_payloads:
            ex.response_payload = answer
    except UpstreamError as err:
        failure = upstream_failure(err)
        ex.status, ex.error_type, ex.error_code = failure.status, failure.type, failure.code or ""
    except GatewayError as err:
        ex.status, ex.error_type, ex.error_code = err.status, err.type, err.code or ""


def _mirror(route: Route, op: Op, body: dict, ex: Exchange, policy: CompiledPolicy, resilience: Resilience,
            stream: bool, native: NativeRequest | None) -> None:
    shadow = route.config.shadow
    if shadow is None or not ShadowRunner.wanted(shadow.percent):
        return
    shadow_route = policy.routes.get(shadow.route)
    if shadow_route is None:
        return
    shadow_ex = Exchange(ex.endpoint, op=ex.op, key_id=ex.key_id, user=ex.user, groups=ex.groups, route=shadow.route,
                         streamed=stream, request_payload=body if policy.log_payloads else None,
                         policy_version=ex.policy_version, is_shadow=True, shadow_of=ex.request_id)
    call = functools.partial(_shadow_call, shadow_route, op, body, policy.routes, resilience.breakers, stream,
                             policy.log_payloads, native)
    resilience.shadows.start(shadow_ex, call)


async def _serve_and_mirror(route: Route, op: Op, body: dict, ex: Exchange, policy: CompiledPolicy,
                            resilience: Resilience, stream: bool, native: NativeRequest | None) -> Completion | ChunkStream:
    if route.config.shadow is None:
        return await _serve(route, op, body, ex, policy.routes, resilience.breakers, stream, native)
    try:
        return await _serve(route, op, body, ex, policy.routes, resilience.breakers, stream, native)
    finally:
        # Launched once the client's answer is in hand, so the shadow's first steps never run ahead of it.
        _mirror(route, op, body, ex, policy, resilience, stream, native)


async def complete(route: Route, op: Op, body: dict, ex: Exchange, policy: CompiledPolicy,
                   resilience: Resilience, native: NativeRequest | None = None) -> Completion:
    """`native`: the client's own request, which targets that speak its door's API get instead of `body`."""
    return cast(Completion, await _serve_and_mirror(route, op, body, ex, policy, resilience, False, native))


async def open_stream(route: Route, op: Op, body: dict, ex: Exchange, policy: CompiledPolicy,
                      resilience: Resilience, native: NativeRequest | None = None) -> ChunkStream:
    """Opens the stream; on a route with somewhere to fall back to, its first chunk has already arrived."""
    return cast(ChunkStream, await _serve_and_mirror(route, op, body, ex, policy, resilience, True, native))
