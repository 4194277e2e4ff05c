"""Traces: an OTLP/HTTP collector in the test receives one span per request with the GenAI attributes, and child
spans for limits, guardrails and each upstream attempt; the client's traceparent is continued and one goes upstream."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as WireSpan
from prometheus_client import REGISTRY

from gateway import telemetry
from gateway.context import GATEWAY
from policies.loader import PolicyError, parse_policy
from tests.conftest import ALICE_KEY, sdk
from tests.fakes.anthropic_upstream import WORDS as ANTHROPIC_WORDS
from tests.fakes.openai_upstream import WORDS
from tests.served import free_port

POLICY = """
providers:
  up: {{type: openai, base_url: "{url}", api_key: "sk-upstream-secret-123"}}
routes:
  chat-default:
    targets: [{{provider: up, model: gpt-4o-mini}}]
    guardrails: {{input: {{pii: mask}}, output: {{pii: mask}}}}
  chat-failover:
    targets: [{{provider: up, model: fail-503}}]
    fallbacks: [chat-default]
  chat-blocked:
    targets: [{{provider: up, model: gpt-4o-mini}}]
    guardrails: {{input: {{pii: block}}}}
limits:
  - {{scope: user, requests: 1000/minute}}
  - {{scope: user, requests: 1/minute, routes: [chat-limited]}}
"""
LIMITED = """
  chat-limited: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
"""
HI = [{"role": "user", "content": "hello, my email is jane@example.com"}]


TELEMETRY = '\ntelemetry: {{otlp_endpoint: "{otlp}", service_name: lockgate-test, sample_ratio: {ratio}}}\n'
TABLE = '\ninference_table: {{enabled: true, clickhouse: "chdb://{chdb}", spool_dir: "{spool}"}}\n'


def _with_limited_route(policy: str) -> str:
    head, _, tail = policy.partition("limits:")
    return head.rstrip("\n") + LIMITED + "limits:" + tail


@dataclass
class ReceivedSpan:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int
    status: int
    attributes: dict[str, Any]


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, kind) if kind else None


class Collector:
    """An OTLP/HTTP traces endpoint decoding every export with opentelemetry-proto; `hang` makes it never answer."""

    def __init__(self, hang: bool = False) -> None:
        self.hang = hang
        self.released = asyncio.Event()
        self.exports = 0
        self.spans: list[ReceivedSpan] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/traces", self.traces)
        return app

    async def traces(self, request: web.Request) -> web.Response:
        self.exports += 1
        if self.hang:
            await self.released.wait()
        assert request.content_type == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for resource_spans in message.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(ReceivedSpan(
                        resource["service.name"], span.name, span.kind, span.trace_id.hex(), span.span_id.hex(),
                        span.parent_span_id.hex(), span.start_time_unix_nano, span.end_time_unix_nano, span.status.code,
                        {a.key: _value(a.value) for a in span.attributes}))
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf")

    async def request_span(self, request_id: str, timeout_s: float = 30.0) -> ReceivedSpan:
        """The request's span, once it and every span of its trace below it have arrived."""
        async with asyncio.timeout(timeout_s):
            while True:
                found = [s for s in self.spans if s.attributes.get("lockgate.request_id") == request_id]
                if found:
                    return found[0]
                await asyncio.sleep(0.05)

    def children(self, parent: ReceivedSpan) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.parent_id == parent.span_id and s.trace_id == parent.trace_id]


@pytest.fixture
async def collector(aiohttp_server) -> tuple[Collector, TestServer]:
    receiver = Collector()
    return receiver, await aiohttp_server(receiver.app())


@pytest.fixture(autouse=True)
def _quick_export(monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDK's own setting: spans leave within 50 ms instead of 5 s.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def _upstream_parent(headers: dict[str, str]) -> tuple[str, str]:
    """The trace id and parent span id of the traceparent an upstream request carried."""
    version, trace_id, parent_id, flags = headers["traceparent"].split("-")
    assert version == "00" and int(flags, 16) & 1, "sampled"
    return trace_id, parent_id


async def _row_ids(server: TestServer) -> set[str]:
    writer = server.app[GATEWAY].writer
    assert writer is not None
    assert await asyncio.to_thread(writer.flush, 60)
    return {str(row[0]) for row in await asyncio.to_thread(writer.query, "SELECT request_id FROM lockgate.inference")}


async def test_a_json_chat_completion_is_one_span_continuing_the_clients_trace(make_gateway, fake_openai, collector,
                                                                               tmp_path: Path) -> None:
    fake, upstream = fake_openai
    receiver, otlp = collector
    server = await make_gateway(POLICY + TABLE + TELEMETRY, url=str(upstream.make_url("/v1")), otlp=str(otlp.make_url("/")),
                                ratio="1", chdb=str(tmp_path / "chdb"), spool=str(tmp_path / "spool"))
    traceparent, trace_id, client_span = _traceparent()

    raw = await sdk(server).chat.completions.with_raw_response.create(
        model="chat-default", messages=HI, extra_headers={"traceparent": traceparent})
    answer = raw.parse()
    request_id = raw.headers["x-request-id"]
    span = await receiver.request_span(request_id)

    assert (span.service, span.name, span.kind) == ("lockgate-test", "chat chat-default", WireSpan.SPAN_KIND_SERVER)
    assert (span.trace_id, span.parent_id) == (trace_id, client_span)
    assert answer.usage is not None
    assert span.attributes | {
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "chat-default", "gen_ai.response.model": "gpt-4o-mini",
        "gen_ai.provider.name": "openai", "gen_ai.usage.input_tokens": answer.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": answer.usage.completion_tokens, "lockgate.route": "chat-default",
        "enduser.id": "alice", "http.response.status_code": 200, "lockgate.request_id": request_id,
        "lockgate.endpoint": "chat", "lockgate.streamed": False,
    } == span.attributes
    # The span's request id is the inference row's.
    assert request_id in await _row_ids(server)

    children = {child.name: child for child in receiver.children(span)}
    assert set(children) == {"lockgate.limits", "lockgate.guardrails.input", "lockgate.guardrails.output",
                             "chat gpt-4o-mini"}
    assert children["lockgate.limits"].attributes["lockgate.limits.outcome"] == "ok"
    guard_in = children["lockgate.guardrails.input"].attributes
    assert (guard_in["lockgate.guardrail.outcome"], guard_in["lockgate.guardrail.findings"]) == ("passed", 1)
    assert guard_in["lockgate.guardrail.entities"] == ["EMAIL_ADDRESS"]
    assert children["lockgate.guardrails.output"].attributes["lockgate.guardrail.findings"] == 0
    attempt = children["chat gpt-4o-mini"]
    assert attempt.kind == WireSpan.SPAN_KIND_CLIENT
    assert attempt.attributes | {
        "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o-mini", "gen_ai.response.model": "gpt-4o-mini",
        "lockgate.target": "up/gpt-4o-mini", "lockgate.attempt.outcome": "ok",
        "gen_ai.usage.output_tokens": answer.usage.completion_tokens,
    } == attempt.attributes
    assert span.start_ns <= attempt.start_ns <= attempt.end_ns <= span.end_ns
    # The upstream was called as a child of the attempt's span, in the client's trace.
    assert _upstream_parent(fake.requests[-1][2]) == (trace_id, attempt.span_id)


async def test_a_streamed_chat_completion_span_ends_with_the_stream_and_its_usage(make_gateway, fake_openai,
                                                                                  collector) -> None:
    fake, upstream = fake_openai
    receiver, otlp = collector
    server = await make_gateway(POLICY + TELEMETRY, url=str(upstream.make_url("/v1")),
                                otlp=str(otlp.make_url("/v1/traces")), ratio="1")

    # A traceparent that is not one starts a trace of the gateway's own.
    response = await sdk(server).chat.completions.with_raw_response.create(
        model="chat-default", messages=HI, stream=True, extra_headers={"traceparent": "00-not-a-trace-id-01"})
    request_id = response.headers["x-request-id"]
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in response.parse() if chunk.choices])
    span = await receiver.request_span(request_id)

    assert text == "".join(WORDS)
    assert span.parent_id == "" and span.name == "chat chat-default"
    attributes = span.attributes
    assert attributes["lockgate.streamed"] is True
    assert attributes["gen_ai.usage.output_tokens"] == len(WORDS) and attributes["gen_ai.usage.input_tokens"] > 0
    assert attributes["gen_ai.response.model"] == "gpt-4o-mini" and attributes["http.response.status_code"] == 200
    children = {child.name: child for child in receiver.children(span)}
    assert set(children) == {"lockgate.limits", "lockgate.guardrails.input", "lockgate.guardrails.output",
                             "chat gpt-4o-mini"}
    attempt, guard_out = children["chat gpt-4o-mini"], children["lockgate.guardrails.output"]
    # The attempt lasts until its stream is closed, the output guardrails as long as the relay they scan.
    assert attempt.attributes["gen_ai.usage.output_tokens"] == len(WORDS)
    assert attempt.attributes["lockgate.attempt.outcome"] == "ok"
    assert guard_out.attributes["lockgate.streamed"] is True
    assert attempt.start_ns < guard_out.start_ns <= guard_out.end_ns <= span.end_ns
    assert attempt.end_ns <= span.end_ns
    assert _upstream_parent(fake.requests[-1][2]) == (span.trace_id, attempt.span_id)


async def test_a_native_messages_stream_to_anthropic_is_traced_and_relayed_as_it_came(make_gateway, fake_anthropic,
                                                                                       collector) -> None:
    fake, upstream = fake_anthropic
    receiver, otlp = collector
    policy = """
providers:
  claude: {{type: anthropic, base_url: "{url}", api_key: "sk-ant-test"}}
routes:
  claude:
    targets: [{{provider: claude, model: claude-test-model}}]
    guardrails: {{output: {{pii: mask}}}}
"""
    server = await make_gateway(policy + TELEMETRY, url=str(upstream.make_url("")), otlp=str(otlp.make_url("/")),
                                ratio="1")
    client = anthropic.AsyncAnthropic(base_url=str(server.make_url("")), api_key=ALICE_KEY, max_retries=0, timeout=20)
    try:
        async with client.messages.stream(model="claude", max_tokens=50, messages=HI) as stream:
            final = await stream.get_final_message()
            request_id = stream.response.headers["x-request-id"]
    finally:
        await client.close()
    span = await receiver.request_span(request_id)

    # Anthropic's own message, passed through (its id, not one the gateway made up).
    assert final.id == "msg_fake1"
    assert "".join(block.text for block in final.content if block.type == "text") == "".join(ANTHROPIC_WORDS)
    assert span.attributes | {"lockgate.endpoint": "messages", "gen_ai.operation.name": "chat",
                              "gen_ai.provider.name": "anthropic", "gen_ai.request.model": "claude",
                              "gen_ai.usage.output_tokens": final.usage.output_tokens} == span.attributes
    attempt = next(c for c in receiver.children(span) if c.kind == WireSpan.SPAN_KIND_CLIENT)
    assert attempt.attributes["lockgate.attempt.outcome"] == "ok"
    assert _upstream_parent(fake.requests[-1][1]) == (span.trace_id, attempt.span_id)


async def test_each_upstream_attempt_is_a_span_with_its_outcome_and_its_own_traceparent(make_gateway, fake_openai,
                                                                                        collector) -> None:
    fake, upstream = fake_openai
    receiver, otlp = collector
    server = await make_gateway(POLICY + TELEMETRY, url=str(upstream.make_url("/v1")), otlp=str(otlp.make_url("/")),
                                ratio="1")

    raw = await sdk(server).chat.completions.with_raw_response.create(model="chat-failover", messages=HI)
    span = await receiver.request_span(raw.headers["x-request-id"])

    attempts = sorted((c for c in receiver.children(span) if c.kind == WireSpan.SPAN_KIND_CLIENT), key=lambda c: c.start_ns)
    assert [a.name for a in attempts] == ["chat fail-503", "chat gpt-4o-mini"]
    failed, served = attempts
    assert failed.attributes | {"lockgate.attempt.outcome": "status", "error.type": "503",
                                "http.response.status_code": 503, "lockgate.target": "up/fail-503"} == failed.attributes
    assert failed.status == 2  # STATUS_CODE_ERROR
    assert served.attributes["lockgate.attempt.outcome"] == "ok" and served.attributes["lockgate.target"] == "up/gpt-4o-mini"
    assert span.attributes["gen_ai.request.model"] == "chat-failover"
    assert span.attributes["lockgate.fallbacks"] == ["up/fail-503 -> 503"]
    sent = [_upstream_parent(headers) for _, _, headers in fake.requests[-2:]]
    assert sent == [(span.trace_id, failed.span_id), (span.trace_id, served.span_id)]

    # Each request has its own traceparent, yet the provider's request head is still built once and kept once.
    for _ in range(3):
        await sdk(server).chat.completions.create(model="chat-default", messages=HI)
    assert len({headers["traceparent"] for _, _, headers in fake.requests}) == len(fake.requests) == 5
    client = server.app[GATEWAY].policy.providers["up"].transport.client
    assert client is not None and len(client._heads) == 1


async def test_refusals_are_on_the_span_of_the_step_that_refused(make_gateway, fake_openai, collector) -> None:
    _, upstream = fake_openai
    receiver, otlp = collector
    server = await make_gateway(_with_limited_route(POLICY) + TELEMETRY, url=str(upstream.make_url("/v1")),
                                otlp=str(otlp.make_url("/")), ratio="1")
    client = sdk(server)

    with pytest.raises(openai.BadRequestError) as blocked:
        await client.chat.completions.create(model="chat-blocked", messages=HI)
    # A second request within the minute is refused; a third covers a window that turned between the first two.
    with pytest.raises(openai.RateLimitError) as limited:
        for _ in range(3):
            await client.chat.completions.create(model="chat-limited", messages=[{"role": "user", "content": "hi"}])

    span = await receiver.request_span(blocked.value.response.headers["x-request-id"])
    assert span.attributes["http.response.status_code"] == 400
    assert span.attributes["error.type"] == "content_policy_violation" and span.status != 2
    guard = next(c for c in receiver.children(span) if c.name == "lockgate.guardrails.input")
    assert guard.attributes["lockgate.guardrail.outcome"] == "blocked"
    assert not [c for c in receiver.children(span) if c.kind == WireSpan.SPAN_KIND_CLIENT]

    span = await receiver.request_span(limited.value.response.headers["x-request-id"])
    assert span.attributes["http.response.status_code"] == 429
    limits = next(c for c in receiver.children(span) if c.name == "lockgate.limits")
    assert limits.attributes["lockgate.limits.outcome"] == "refused"
    assert limits.attributes["error.type"] == "rate_limit_exceeded"


async def test_an_unsampled_request_exports_nothing_but_still_sends_a_traceparent(make_gateway, fake_openai,
                                                                                  collector) -> None:
    fake, upstream = fake_openai
    receiver, otlp = collector
    server = await make_gateway(POLICY + TELEMETRY, url=str(upstream.make_url("/v1")), otlp=str(otlp.make_url("/")),
                                ratio="0")
    traceparent, trace_id, _ = _traceparent()

    await sdk(server).chat.completions.create(model="chat-default", messages=HI, extra_headers={"traceparent": traceparent})
    await server.close()

    version, sent_trace, _, flags = fake.requests[-1][2]["traceparent"].split("-")
    assert (version, sent_trace) == ("00", trace_id) and not int(flags, 16) & 1, "not sampled"
    assert receiver.spans == []


async def test_with_telemetry_off_nothing_is_sent(make_gateway, fake_openai, collector) -> None:
    fake, upstream = fake_openai
    receiver, _ = collector
    server = await make_gateway(POLICY, url=str(upstream.make_url("/v1")))
    traceparent, _, _ = _traceparent()

    assert telemetry.TRACING is None
    client = sdk(server)
    await client.chat.completions.create(model="chat-default", messages=HI, extra_headers={"traceparent": traceparent})
    stream = await client.chat.completions.create(model="chat-default", messages=HI, stream=True)
    assert [chunk async for chunk in stream]
    await server.close()

    assert receiver.exports == 0
    assert all("traceparent" not in {name.lower() for name in headers} for _, _, headers in fake.requests)


def test_with_telemetry_off_opentelemetry_is_not_even_imported(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nroutes: {}\n")
    script = textwrap.dedent(f"""
        import asyncio, sys
        from aiohttp.test_utils import TestClient, TestServer
        from gateway.app import create_app

        async def main():
            async with TestClient(TestServer(create_app({str(policy)!r}))) as client:
                for path in ("/readyz", "/v1/chat/completions"):
                    await (await client.post(path) if path.startswith("/v1") else await client.get(path)).read()
                print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))

        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[2], env={**os.environ, "LOCKGATE_LOG_LEVEL": "WARNING"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("collector_state", ["down", "hanging"])
async def test_a_collector_that_is_down_or_hangs_changes_nothing_for_clients(make_gateway, fake_openai, aiohttp_server,
                                                                             monkeypatch: pytest.MonkeyPatch,
                                                                             collector_state: str) -> None:
    fake, upstream = fake_openai
    if collector_state == "down":
        endpoint = f"http://127.0.0.1:{free_port()}"
        hanging = None
    else:
        hanging = Collector(hang=True)
        endpoint = str((await aiohttp_server(hanging.app())).make_url("/"))
    # A small queue, so that it fills and drops spans while requests go on.
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "8")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4")
    dropped_before = REGISTRY.get_sample_value("lockgate_trace_spans_dropped_total") or 0.0
    server = await make_gateway(POLICY + TELEMETRY, url=str(upstream.make_url("/v1")), otlp=endpoint, ratio="1")
    client = sdk(server)

    async def one(i: int) -> str:
        if i % 4:
            reply = await client.chat.completions.create(model="chat-default", messages=HI)
            return reply.choices[0].message.content or ""
        stream = await client.chat.completions.create(model="chat-default", messages=HI, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async with asyncio.timeout(120):
        answers = await asyncio.gather(*(one(i) for i in range(40)))
        await server.close()
    if hanging is not None:
        hanging.released.set()

    assert answers == ["".join(WORDS)] * 40
    assert len(fake.requests) == 40
    assert (REGISTRY.get_sample_value("lockgate_trace_spans_dropped_total") or 0.0) > dropped_before
    if hanging is not None:
        assert hanging.exports >= 1


@pytest.mark.parametrize(("section", "where"), [
    ("{sample_ratio: 1.5}", "telemetry.sample_ratio"),
    ('{otlp_endpoint: "collector:4318"}', "telemetry.otlp_endpoint"),
    ("{service_name: ''}", "telemetry.service_name"),
    ("{endpoint: http://collector:4318}", "telemetry.endpoint"),
])
def test_a_bad_telemetry_section_names_its_yaml_path(section: str, where: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(f"version: 1\ntelemetry: {section}\n", "policy.yaml")
    assert f"policy.yaml:2: {where}:" in info.value.format()


def test_telemetry_is_off_unless_an_endpoint_is_given() -> None:
    assert parse_policy("version: 1\n").policy.telemetry.otlp_endpoint is None
    assert telemetry.traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert telemetry.traces_url("https://otel.example.com/custom/traces") == "https://otel.example.com/custom/traces"
