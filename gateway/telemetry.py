"""OpenTelemetry traces: one span per request with the GenAI semantic conventions, and child spans for the limits,
the guardrails (in and out) and every upstream attempt; the client's W3C traceparent is continued and one is sent
upstream on every attempt.

opentelemetry is imported only when a policy gives `telemetry.otlp_endpoint`. Until then `TRACING` is None and each
hook in the pipeline is one attribute check. With traces on, ended spans go to the SDK's BatchSpanProcessor: a
bounded queue that its own thread exports over OTLP/HTTP, so the event loop never waits on the collector, and a
collector that is down or slow costs spans (counted in lockgate_trace_spans_dropped_total), never a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from prometheus_client import Counter

from gateway.errors import GatewayError
from gateway.providers.base import ChunkStream, Completion, UpstreamError, Usage

if TYPE_CHECKING:
    from aiohttp import web
    from opentelemetry.trace import Span

    from gateway.compiled import Target
    from gateway.exchange import Exchange
    from policies.limiter import Admission
    from policies.schema import TelemetryConfig

log = logging.getLogger("lockgate")

T = TypeVar("T")

SPANS_DROPPED = Counter("lockgate_trace_spans_dropped", "Spans dropped because the export queue was full (the OTLP "
                        "collector is down or slower than the traffic)")

_OPERATIONS = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}
# gen_ai.provider.name by provider class: the wire format each one speaks. The embedded runtime is vLLM.
_PROVIDER_NAMES = {"OpenAIProvider": "openai", "AzureOpenAIProvider": "azure.ai.openai", "AnthropicProvider": "anthropic",
                   "EmbeddedProvider": "vllm"}
_GUARD_OUTCOMES = {"content_policy_violation": "blocked", "guardrail_failure": "failed",
                   "content_not_checkable": "unscannable", "upstream_invalid_response": "unscannable"}
# Attribute values come from clients and upstreams too (a model name, a user claim): each is cut at this length.
_MAX_ATTRIBUTE_CHARS = 512
_DROPS_LOGGED_EVERY_S = 60.0

# The one instance while a gateway with traces on runs in this process.
TRACING: Tracing | None = None


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL: a bare collector address gets the standard /v1/traces path."""
    return endpoint.rstrip("/") + "/v1/traces" if urlsplit(endpoint).path in ("", "/") else endpoint


class _CountDrops(logging.Filter):
    """The SDK logs a warning per span it drops from a full queue, on the event loop: counted instead, logged once
    a minute."""

    def __init__(self) -> None:
        super().__init__()
        self.logged_at = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Queue full"):
            return True
        SPANS_DROPPED.inc()
        now = time.monotonic()
        if now - self.logged_at < _DROPS_LOGGED_EVERY_S:
            return False
        self.logged_at = now
        log.warning("the trace export queue is full: spans are dropped (the collector is down or too slow)")
        return False


def _usage_attributes(usage: Usage | None, attributes: dict[str, Any]) -> None:
    if usage is not None:
        attributes["gen_ai.usage.input_tokens"] = usage.prompt_tokens
        attributes["gen_ai.usage.output_tokens"] = usage.completion_tokens
        if usage.cached_tokens:
            attributes["gen_ai.usage.cache_read.input_tokens"] = usage.cached_tokens


class RequestTrace:
    """One request's span, and what its children learn that the request span reports."""

    __slots__ = ("attempt", "attempt_failed", "ex", "model", "provider_name", "recording", "span", "token", "tracing")

    def __init__(self, tracing: Tracing, span: Span, ex: Exchange, recording: bool) -> None:
        self.tracing = tracing
        self.span = span
        self.ex = ex
        self.recording = recording
        self.token: object = None
        # The model the upstream says answered, and the provider of the attempt that answered.
        self.model: str | None = None
        self.provider_name: str | None = None
        # The span of a streamed attempt, open until its stream is closed.
        self.attempt: Span | None = None
        self.attempt_failed = False

    def end_attempt(self) -> None:
        span = self.attempt
        if span is None:
            return
        self.attempt = None
        if not self.attempt_failed:
            outcome = "client_closed" if self.ex.status == 499 else "ok"
            attributes: dict[str, Any] = {"lockgate.attempt.outcome": outcome}
            _usage_attributes(self.ex.usage, attributes)
            span.set_attributes(attributes)
        span.end()

    def finish(self) -> None:
        """Ends the request span with what the request came to; the stream, if any, has ended by now."""
        try:
            if self.recording:
                self.end_attempt()
                self._report()
            self.span.end()
        finally:
            self.tracing.detach(self.token)

    def _report(self) -> None:
        ex, span = self.ex, self.span
        # The semantic conventions' attributes and what finds the request's row; the row holds everything else, and
        # every attribute costs on the loop and again in the export.
        attributes: dict[str, Any] = {"http.response.status_code": ex.status, "lockgate.streamed": ex.streamed}
        if ex.route:
            attributes["gen_ai.request.model"] = attributes["lockgate.route"] = ex.route
            span.update_name(f"{_OPERATIONS.get(ex.op, ex.op)} {ex.route}")
        model = self.model or ex.model
        if model:
            attributes["gen_ai.response.model"] = model
        if self.provider_name:
            attributes["gen_ai.provider.name"] = self.provider_name
        if ex.user:
            attributes["enduser.id"] = ex.user
        _usage_attributes(ex.usage, attributes)
        if ex.cost_micro_usd:
            attributes["lockgate.cost_usd"] = ex.cost_micro_usd / 1_000_000
        if ex.fallbacks:
            attributes["lockgate.fallbacks"] = ex.fallbacks
        if ex.guardrail_action:
            attributes["lockgate.guardrail.action"] = ex.guardrail_action
        if ex.status >= 400:
            attributes["error.type"] = ex.error_code or ex.error_type or str(ex.status)
        span.set_attributes(attributes)
        # A server span is in error for the gateway's and upstreams' failures, not for a client's own (4xx).
        if ex.status >= 500:
            span.set_status(self.tracing.error)


class Tracing:
    """The tracer provider, its exporter and the hooks the pipeline calls; built in a thread (the imports are slow)."""

    def __init__(self, config: TelemetryConfig) -> None:
        from opentelemetry import context
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import SpanLimits, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace import SpanKind, StatusCode, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        assert config.otlp_endpoint is not None
        ratio = TraceIdRatioBased(config.sample_ratio)
        # Every request is sampled on its trace id, a client's own or a new one, so a client cannot force tracing.
        sampler = ParentBased(ratio, remote_parent_sampled=ratio, remote_parent_not_sampled=ratio)
        # One instance per worker process: N workers are N instances of the service.
        resource = Resource.create({"service.name": config.service_name,
                                    "service.instance.id": f"{socket.gethostname()}:{os.getpid()}"})
        self.provider = TracerProvider(sampler=sampler, resource=resource, shutdown_on_exit=False,
                                       span_limits=SpanLimits(max_span_attribute_length=_MAX_ATTRIBUTE_CHARS))
        # The queue, batch size and delay are the SDK's (OTEL_BSP_* variables); collector headers come from
        # OTEL_EXPORTER_OTLP_HEADERS, so no credential sits in the policy file.
        self.exporter = OTLPSpanExporter(endpoint=traces_url(config.otlp_endpoint))
        self.provider.add_span_processor(BatchSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("lockgate")
        self.propagator = TraceContextTextMapPropagator()
        self.server, self.client, self.error = SpanKind.SERVER, SpanKind.CLIENT, StatusCode.ERROR
        self.attach, self.detach, self.get_value, self.set_value = (context.attach, context.detach, context.get_value,
                                                                    context.set_value)
        self.set_span = set_span_in_context
        self.key = context.create_key("lockgate.request")
        self.drops = _CountDrops()
        # First, ahead of the SDK's own filter, which lets one repeated message through every 20 s.
        logging.getLogger("opentelemetry.sdk._shared_internal").filters.insert(0, self.drops)

    async def close(self, timeout_s: float) -> None:
        """Exports what is queued, waiting at most timeout_s; past it the exporter gives up what it still holds (its
        retries end), in a daemon thread, so a collector that is down or hangs holds neither the stop nor the exit."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def stop() -> None:
            try:
                self.provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        threading.Thread(target=stop, name="lockgate-trace-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout_s)
        except TimeoutError:
            log.warning("spans still queued for export at the stop deadline are lost")
            threading.Thread(target=self.exporter.shutdown, name="lockgate-trace-abort", daemon=True).start()
        finally:
            logging.getLogger("opentelemetry.sdk._shared_internal").removeFilter(self.drops)

    def start(self, request: web.Request, ex: Exchange) -> RequestTrace:
        """The request's span, current until finish(); its parent is the client's traceparent, if it sent one."""
        parent = self.propagator.extract(request.headers)
        operation = _OPERATIONS.get(ex.op, ex.op)
        span = self.tracer.start_span(operation, parent, self.server, {
            "gen_ai.operation.name": operation, "lockgate.request_id": ex.request_id, "lockgate.endpoint": ex.endpoint})
        recording = span.is_recording()
        trace = RequestTrace(self, span, ex, recording)
        current = self.set_span(span, parent)
        # An unsampled request keeps only its span context, for the traceparent sent upstream; no child spans.
        trace.token = self.attach(self.set_value(self.key, trace, current) if recording else current)
        return trace

    def _current(self, ex: Exchange) -> RequestTrace | None:
        """The sampled request `ex` belongs to; None for a shadow request, which inherits its original's context."""
        trace = self.get_value(self.key)
        return trace if trace is not None and trace.ex is ex else None  # type: ignore[union-attr]

    def outgoing(self) -> bytes:
        """The current span's traceparent (and the client's tracestate) as header lines for an upstream request.
        Both are the propagator's own validated formats: no line break can reach the request head."""
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier)
        return "".join([f"{name}: {value}\r\n" for name, value in carrier.items()]).encode("latin-1")

    def _finished(self, name: str, started_ns: int, attributes: dict[str, Any], failed: bool) -> None:
        """The span of a step that has ended, made in one call once its outcome is known: a step has no children,
        and a span made whole costs less than one filled in as it goes."""
        span = self.tracer.start_span(name, attributes=attributes, start_time=started_ns)
        if failed:
            span.set_status(self.error)
        span.end()

    async def limits(self, ex: Exchange, pending: Awaitable[Admission]) -> Admission:
        trace = self._current(ex)
        if trace is None:
            return await pending
        started = time.time_ns()
        try:
            admission = await pending
        except BaseException as exc:
            self._finished("lockgate.limits", started, {"lockgate.limits.outcome": "error",
                                                        "error.type": type(exc).__name__}, True)
            raise
        if admission.allowed and admission.plan is None:
            # No limit or budget applies to this request: nothing was checked.
            return admission
        outcome = "unchecked" if admission.degraded else "ok" if admission.allowed else "refused"
        attributes: dict[str, Any] = {"lockgate.limits.outcome": outcome}
        if not admission.allowed:
            attributes["error.type"] = admission.code or "rate_limit_exceeded"
        self._finished("lockgate.limits", started, attributes, False)
        return admission

    async def guard(self, direction: str, ex: Exchange, pending: Awaitable[T]) -> T:
        """The guardrails of one direction; on a stream the span covers the relay, which they scan as it goes."""
        trace = self._current(ex)
        if trace is None:
            return await pending
        started = time.time_ns()
        seen = len(ex.guardrail_findings)
        raised = ""
        try:
            return await pending
        except GatewayError as err:
            raised = err.code or err.type
            raise
        except BaseException as exc:
            raised = type(exc).__name__
            raise
        finally:
            outcome = _GUARD_OUTCOMES.get(raised or ex.error_code) or ("error" if raised else "passed")
            findings = ex.guardrail_findings[seen:]
            attributes: dict[str, Any] = {"lockgate.guardrail.direction": direction, "lockgate.streamed": ex.streamed,
                                          "lockgate.guardrail.outcome": outcome,
                                          "lockgate.guardrail.findings": sum(f["count"] for f in findings)}
            if findings:
                attributes["lockgate.guardrail.entities"] = sorted({f["entity"] for f in findings})
            self._finished(f"lockgate.guardrails.{direction}", started, attributes, outcome in ("failed", "error"))

    async def attempt(self, target: Target, ex: Exchange, pending: Awaitable[T]) -> T:
        """One call to one target, current while it runs so its traceparent goes upstream; a stream's span stays open
        until the stream is closed."""
        trace = self._current(ex)
        if trace is None:
            return await pending
        provider = target.provider
        provider_name = _PROVIDER_NAMES.get(type(provider).__name__, "openai")
        operation = _OPERATIONS.get(ex.op, ex.op)
        span = self.tracer.start_span(f"{operation} {target.model}", kind=self.client, attributes={
            "gen_ai.operation.name": operation, "gen_ai.provider.name": provider_name,
            "gen_ai.request.model": target.model, "lockgate.target": target.label})
        token = self.attach(self.set_span(span))
        try:
            result = await pending
        except BaseException as exc:
            self._failed(span, exc)
            span.end()
            raise
        finally:
            self.detach(token)
        trace.provider_name = provider_name
        if isinstance(result, ChunkStream):
            return self._watched(result, span, trace)  # type: ignore[return-value]
        if isinstance(result, Completion):
            model = result.data.get("model")
            attributes: dict[str, Any] = {"lockgate.attempt.outcome": "ok"}
            if type(model) is str and model:
                trace.model = attributes["gen_ai.response.model"] = model
            _usage_attributes(result.usage, attributes)
            span.set_attributes(attributes)
        span.end()
        return result

    def _failed(self, span: Span, exc: BaseException) -> None:
        if isinstance(exc, UpstreamError):
            attributes: dict[str, Any] = {"lockgate.attempt.outcome": exc.kind, "error.type": str(exc.condition)}
            if exc.status is not None:
                attributes["http.response.status_code"] = exc.status
        else:
            attributes = {"lockgate.attempt.outcome": "error", "error.type": type(exc).__name__}
        span.set_attributes(attributes)
        span.set_status(self.error)

    def _watched(self, stream: ChunkStream, span: Span, trace: RequestTrace) -> ChunkStream:
        """The same stream (of the same type: doors tell native streams apart), noting the model it names and a
        failure mid-stream; its span ends when it is closed."""
        trace.attempt, trace.attempt_failed = span, False

        async def chunks() -> AsyncIterator[dict]:
            iterator = stream.__aiter__()
            try:
                async for chunk in iterator:
                    model = chunk.get("model")
                    if type(model) is str and model:
                        trace.model = model
                        span.set_attribute("gen_ai.response.model", model)
                        yield chunk
                        break
                    yield chunk
                async for chunk in iterator:
                    yield chunk
            except UpstreamError as err:
                if trace.attempt is span:
                    trace.attempt_failed = True
                    self._failed(span, err)
                raise

        async def close() -> None:
            try:
                await stream.aclose()
            finally:
                if trace.attempt is span:
                    trace.end_attempt()

        return type(stream)(chunks(), close, stream.buffered, stream.last_event)
