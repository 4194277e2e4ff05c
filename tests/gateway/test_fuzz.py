"""Generated client input against a running `lockgate serve`: no 5xx, every error in OpenAI's shape, the process
alive and serving, and one inference row per request that reached the pipeline.

Examples are derandomized so CI sees the same few thousand requests every run; set LOCKGATE_FUZZ_RANDOM=1 to let
hypothesis draw new ones.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ALICE_KEY, BOB_KEY, policy_text
from tests.fakes.tolerant_upstream import TolerantUpstream
from tests.gateway.fuzz_client import Answer, exchange, is_openai_error, request, table_rows
from tests.served import Served, start_gateway

POLICY = """
server: {{max_request_bytes: 65536, header_timeout_s: 2, body_timeout_s: 1}}
providers:
  up: {{type: openai, base_url: "{url}", api_key: "sk-fuzz-upstream-secret",
        timeout: {{connect_ms: 2000, first_byte_ms: 5000, total_ms: 10000}}}}
routes:
  chat-plain: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
  chat-guarded:
    targets: [{{provider: up, model: gpt-4o-mini}}]
    guardrails: {{input: {{pii: block}}, output: {{pii: mask}}}}
limits:
  - {{scope: user, tokens: 100000000/minute, max_parallel: 64}}
budgets:
  - {{scope: user, usd: 100000, per: day}}
prices:
  gpt-4o-mini: {{input: 0.15, output: 0.60}}
inference_table:
  enabled: true
  clickhouse: "chdb://{chdb}"
  spool_dir: "{spool}"
  flush_interval_ms: 100
"""

RANDOM = bool(os.environ.get("LOCKGATE_FUZZ_RANDOM"))
FUZZ = settings(max_examples=700, deadline=None, derandomize=not RANDOM, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
DOORS = [b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings"]


@dataclass
class Fuzzed:
    served: Served
    chdb: Path
    answered_ids: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    folder = tmp_path_factory.mktemp("fuzz")
    upstream = TolerantUpstream().start()
    path = folder / "policy.yaml"
    path.write_text(policy_text(POLICY, url=upstream.url, chdb=folder / "chdb", spool=folder / "spool"))
    served = asyncio.run(start_gateway(path, ready_timeout_s=90))
    yield Fuzzed(served, folder / "chdb")
    if served.process.poll() is None:
        served.process.kill()
    upstream.stop()


def _send(fuzzed: Fuzzed, raw: bytes) -> Answer | None:
    """One exchange; every answer from the pipeline (it carries x-request-id) is one row to find at the end."""
    answer = exchange(fuzzed.served.port, raw)
    if answer is not None and "x-request-id" in answer.headers:
        fuzzed.answered_ids.append(answer.headers["x-request-id"])
    return answer


def _check(fuzzed: Fuzzed, raw: bytes) -> None:
    answer = _send(fuzzed, raw)
    assert fuzzed.served.process.poll() is None, "the gateway died"
    assert answer is not None, f"no answer to {raw[:300]!r}"
    assert answer.status < 500, f"{answer.status} {answer.body[:500]!r} for {raw[:500]!r}"
    if answer.status >= 400 and not raw.startswith(b"HEAD "):
        assert is_openai_error(answer.body), f"{answer.status} {answer.body[:300]!r} for {raw[:300]!r}"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
roles = st.sampled_from(["user", "system", "assistant", "tool", "developer", "function"]) | st.text(max_size=8)
parts = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_audio"]) | json_values},
                              optional={"text": st.text(max_size=60) | json_values, "image_url": json_values})
messages = st.lists(st.fixed_dictionaries(
    {"role": roles},
    optional={"content": st.text(max_size=80) | st.lists(parts, max_size=3) | json_values, "name": json_values,
              "tool_calls": st.lists(st.fixed_dictionaries({"id": st.text(max_size=8), "type": st.just("function"),
                                                            "function": json_values}), max_size=2) | json_values,
              "tool_call_id": json_values, "refusal": json_values},
) | json_values, max_size=4)


def _deep(depth: int) -> bytes:
    """JSON nested `depth` levels, as bytes: orjson itself refuses to write more than 254."""
    opening = b"".join(b"[" if i % 2 else b'{"a":' for i in range(depth))
    closing = b"".join(b"]" if i % 2 else b"}" for i in reversed(range(depth)))
    return opening + b'"x"' + closing


def _encode(body: dict, depth: int | None) -> bytes:
    # The standard library's encoder, since orjson refuses integers past 64 bits, which clients may still send.
    raw = json.dumps(body, separators=(",", ":")).encode()
    if depth is None:
        return raw
    return raw[:-1] + (b"," if len(raw) > 2 else b"") + b'"deep":' + _deep(depth) + b"}"


bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["chat-plain", "chat-guarded", "nope"]) | json_values,
        "messages": messages,
        "prompt": st.text(max_size=60) | st.lists(st.integers(-5, 300_000), max_size=8) | json_values,
        "input": st.text(max_size=60) | st.lists(st.text(max_size=20), max_size=3) | json_values,
        "stream": st.booleans() | json_values,
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | json_values})
        | json_values,
        "max_tokens": st.integers(-10, 10**12) | json_values,
        "max_completion_tokens": st.integers(-10, 10**12) | json_values,
        "n": st.integers(-2, 200) | json_values,
        "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": json_values}), max_size=2)
        | json_values,
        "user": st.text(max_size=30) | json_values,
        "metadata": st.dictionaries(st.text(max_size=10), st.text(max_size=20) | json_values, max_size=4) | json_values,
        "logprobs": json_values,
        "temperature": json_values,
    },
)
keys = st.sampled_from([ALICE_KEY.encode(), BOB_KEY.encode()])
authorizations = (
    keys.map(lambda key: b"Bearer " + key)
    | st.binary(max_size=40).map(lambda junk: b"Bearer " + junk.replace(b"\r", b"").replace(b"\n", b""))
    | keys.map(lambda key: b"Bearer " + key + b"\x01")
    | st.sampled_from([b"Bearer", b"Basic abc", b"bearer  ", b"Bearer \xff\xfe", b"Bearer lg-" + b"a" * 9000])
)


@FUZZ
@given(door=st.sampled_from(DOORS), body=bodies, depth=st.none() | st.integers(1, 1200), auth=authorizations)
def test_generated_bodies_never_give_a_5xx(fuzzed: Fuzzed, door: bytes, body: dict, depth: int | None,
                                           auth: bytes) -> None:
    _check(fuzzed, request(b"POST", door, [(b"Authorization", auth), (b"Content-Type", b"application/json")],
                           _encode(body, depth)))


header_names = st.sampled_from([b"Content-Type", b"Content-Encoding", b"Transfer-Encoding", b"x-lockgate-tags",
                                b"Authorization", b"Expect", b"Accept-Encoding", b"Content-Length", b"Host",
                                b"Upgrade", b"Connection"]) | st.binary(min_size=1, max_size=20)
header_values = st.binary(max_size=60) | st.sampled_from([b"gzip", b"deflate", b"br", b"chunked", b"gzip, chunked",
                                                           b"100-continue", b"-1", b"99999999999", b"h2c"])
raw_bodies = st.binary(max_size=300) | st.builds(_encode, bodies, st.none() | st.integers(1, 600))
methods = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"HEAD", b"TRACE", b"CONNECT"]) \
    | st.binary(min_size=1, max_size=10)
paths = st.sampled_from([*DOORS, b"/v1/models", b"/v1/models/chat-plain", b"/healthz", b"/admin/limits?scope=x",
                         b"/v1/../admin/policy", b"*", b"/%zz", b"http://evil/"]) | st.binary(max_size=30)


@FUZZ
@given(method=methods, path=paths, headers=st.lists(st.tuples(header_names, header_values), max_size=5),
       body=raw_bodies, content_length=st.booleans(), auth=authorizations)
def test_generated_requests_never_give_a_5xx(fuzzed: Fuzzed, method: bytes, path: bytes,
                                             headers: list[tuple[bytes, bytes]], body: bytes, content_length: bool,
                                             auth: bytes) -> None:
    _check(fuzzed, request(method, path, [(b"Authorization", auth), *headers], body, content_length=content_length))


@pytest.mark.parametrize("raw", [
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"GET /v1/chat/completions HTTP/1.1\r\nExpect: \x80\r\nConnection: close\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nExpect: !\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\nConnection: close\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer " + ALICE_KEY.encode() + b"\x01\r\n"
    b"Connection: close\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nContent-Encoding: gzip\r\nAuthorization: Bearer " + ALICE_KEY.encode()
    + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
])
def test_requests_the_http_parser_refuses_get_openai_errors(fuzzed: Fuzzed, raw: bytes) -> None:
    answer = _send(fuzzed, raw)
    assert answer is not None and 400 <= answer.status < 500
    assert is_openai_error(answer.body)


def test_the_gateway_still_serves_and_every_pipeline_request_is_one_row(fuzzed: Fuzzed) -> None:
    """Runs after the generated requests (pytest keeps the file's order)."""
    body = orjson.dumps({"model": "chat-plain", "messages": [{"role": "user", "content": "hi"}]})
    answer = _send(fuzzed, request(b"POST", b"/v1/chat/completions", [
        (b"Authorization", b"Bearer " + ALICE_KEY.encode()), (b"Content-Type", b"application/json")], body))
    assert answer is not None and answer.status == 200, answer
    assert exchange(fuzzed.served.port, request(b"GET", b"/healthz", [], b"")).status == 200  # type: ignore[union-attr]
    served = fuzzed.served
    served.process.send_signal(signal.SIGTERM)
    logs = served.logs()
    assert served.process.returncode == 0, logs[-3000:]
    assert "Traceback" not in logs, logs[logs.index("Traceback") - 500:][:3000]
    assert ALICE_KEY not in logs and BOB_KEY not in logs and "sk-fuzz-upstream-secret" not in logs
    rows = table_rows(fuzzed.chdb)
    stored = Counter(orjson.loads(row)["request_id"] for row in rows)
    # Every request the pipeline answered is in the table, exactly once.
    assert all(stored[request_id] == 1 for request_id in fuzzed.answered_ids), "an answered request has no row"
    assert len(set(fuzzed.answered_ids)) == len(fuzzed.answered_ids) == len(rows) > 500
    for secret in (ALICE_KEY, BOB_KEY, "sk-fuzz-upstream-secret"):
        assert not any(secret in row for row in rows)
