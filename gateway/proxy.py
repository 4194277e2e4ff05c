"""The request pipeline of the OpenAI endpoints: parse, authenticate, route, call, stream, record."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import orjson
from aiohttp import http_exceptions, web

from gateway import governance, metrics, telemetry
from gateway.api.connections import describe_fault
from gateway.api.doors import CHAT, Door
from gateway.api.signin import SIGN_IN
from gateway.compiled import CompiledPolicy, Route
from gateway.context import GATEWAY, Gateway
from gateway.errors import GatewayError, bad_request, model_not_found, unauthorized
from gateway.exchange import Exchange
from gateway.providers import Completion, Op
from gateway.providers.anthropic_native import NativeRequest
from gateway.routing.upstream import Resilience, complete, open_stream
from gateway.streaming import RelayOptions, relay
from guardrails import clip_text
from policies import Admission
from policies.keys import Principal
from policies.schema import ServerConfig
from policies.tokens import count_prompt_tokens, encoding_ready, load_encoding

log = logging.getLogger("lockgate")

_REQUIRED: dict[str, str] = {"chat": "messages", "completions": "prompt", "embeddings": "input"}
_JSON = "application/json"
_MAX_KEY_CHARS = 512


class SignInNeeded(Exception):
    """The bearer value is a JWT, for the sign-in to check (which may wait for the identity provider's keys). Raised,
    not returned: a try costs nothing until something is raised, so a key pays for no test of what came back."""

    def __init__(self, token: str) -> None:
        super().__init__("a JWT")
        self.token = token


async def authenticate(request: web.Request, policy: CompiledPolicy, door: Door = CHAT) -> Principal:
    try:
        return key_principal(request, policy, door)
    except SignInNeeded as presented:
        return await request.app[SIGN_IN].authenticate(presented.token, policy)


def key_principal(request: web.Request, policy: CompiledPolicy, door: Door) -> Principal:
    """The principal of the key presented; SignInNeeded for a JWT. The pipeline calls it itself, sparing a key the
    coroutine `authenticate` is (~1,500 instructions a request)."""
    token = door.credentials(request)
    if token is None:
        raise unauthorized(door.missing_key_message())
    if not token:
        raise unauthorized("The Authorization header must be 'Bearer <key>'.")
    # A JWT's header is base64url JSON, so it opens with `eyJ` (`{"`); lockgate keys open with `lg-`. The first
    # character alone is indexed before any method is called: a key pays ~370 instructions for the test, not ~900.
    if token[0] == "e" and token.startswith("eyJ") and token.count(".") == 2 and policy.loaded.policy.auth.jwt:
        raise SignInNeeded(token)
    # A key is printable ASCII; anything else cannot match one, and must not reach the hash as text it cannot encode.
    if not token.isascii() or not token.isprintable() or len(token) > _MAX_KEY_CHARS:
        raise unauthorized("Incorrect API key provided.")
    principal = policy.keyring.authenticate(token)
    if principal is None:
        raise unauthorized("Incorrect API key provided.")
    return principal


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"The request body is larger than the limit of {limit} bytes.",
                        "invalid_request_error", "request_too_large")


async def read_body(request: web.Request, server: ServerConfig) -> dict:
    limit = server.max_request_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    try:
        # A body that has all arrived (the common case) needs no timer, and a timer per request is measurable.
        if request.content.is_eof():
            raw = await request.read()
        else:
            async with asyncio.timeout(server.body_timeout_s):
                raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None
    except TimeoutError:
        raise GatewayError(408, f"The request body did not arrive within {server.body_timeout_s:g} s.",
                           "invalid_request_error", "request_timeout") from None
    except http_exceptions.HttpProcessingError as exc:
        status, code, message = describe_fault(exc)
        raise GatewayError(status, message, "invalid_request_error", code) from None
    if len(raw) > limit:
        raise _too_large(limit)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("We could not parse the JSON body of your request: it is not valid JSON.",
                          code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    # Only a body with enough brackets to be that deep is walked.
    max_depth = server.max_json_depth
    if _brackets_exceed(raw, max_depth) and nesting_exceeds(body, max_depth):
        raise bad_request(f"The request body is nested deeper than {max_depth} levels.", code="invalid_json")
    return body


def _brackets_exceed(raw: bytes, limit: int) -> bool:
    """Whether `raw` holds more than `limit` opening brackets. find() is memchr, and a body has few brackets:
    counting them all with count() cost more than the rest of reading a 1 KB body."""
    seen = 0
    for opener in (b"[", b"{"):
        position = raw.find(opener)
        while position >= 0:
            seen += 1
            if seen > limit:
                return True
            position = raw.find(opener, position + 1)
    return False


def nesting_exceeds(value: object, limit: int) -> bool:
    """Whether containers nest deeper than limit; iterative, so a hostile body cannot exhaust the stack."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values() if isinstance(child, dict | list))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item if isinstance(child, dict | list))
    return False


def _validate(body: dict, op: Op) -> bool:
    field = _REQUIRED[op]
    value = body.get(field)
    if value is None:
        raise bad_request(f"Missing required parameter: '{field}'.", field, "missing_required_parameter")
    if op == "chat":
        if not isinstance(value, list) or not value:
            raise bad_request("'messages' must be a non-empty array.", "messages", "invalid_type")
        for i, message in enumerate(value):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise bad_request(f"'messages[{i}]' must be an object with a string 'role'.", f"messages[{i}]",
                                  "invalid_type")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad_request("'stream' must be a boolean.", "stream", "invalid_type")
    if stream and op == "embeddings":
        raise bad_request("Embeddings cannot be streamed.", "stream", "invalid_value")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad_request("'stream_options' must be an object.", "stream_options", "invalid_type")
        if not isinstance(options.get("include_usage", False), bool):
            raise bad_request("'stream_options.include_usage' must be a boolean.", "stream_options.include_usage",
                              "invalid_type")
        if not stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true.", "stream_options",
                              "invalid_value")
    return bool(stream)


def _client_metadata(request: web.Request, body: dict, ex: Exchange) -> None:
    """OpenAI's `user` and `metadata` fields and the x-lockgate-tags header, kept with the record.

    Long values are cut where no PII item straddles the cut, so the table's masking still recognises what is kept.
    """
    user = body.get("user")
    if isinstance(user, str) and user:
        ex.metadata["user"] = clip_text(user, 256)
    metadata = body.get("metadata")
    if isinstance(metadata, dict):
        for key, value in list(metadata.items())[:16]:
            ex.metadata[clip_text(str(key), 64)] = clip_text(str(value), 512)
    tags = request.headers.get("x-lockgate-tags")
    if tags:
        for tag in tags.split(",", 16)[:16]:
            key, _, value = tag.partition("=")
            if key.strip():
                ex.metadata[f"tag.{clip_text(key.strip(), 64)}"] = clip_text(value.strip(), 512)


async def serve(request: web.Request, door: Door, policy: CompiledPolicy, ex: Exchange) -> web.StreamResponse:
    try:
        principal = key_principal(request, policy, door)
    except SignInNeeded as presented:
        principal = await request.app[SIGN_IN].authenticate(presented.token, policy)
    ex.key_id, ex.user, ex.groups = principal.key_id, principal.user, principal.groups
    op = door.op
    body, state = door.prepare(await read_body(request, policy.loaded.policy.server))
    route = _route_of(policy, principal, body, ex)
    _client_metadata(request, body, ex)
    stream = _validate(body, op)
    ex.streamed = stream
    if policy.log_payloads:
        ex.request_payload = body
    admission = await governance.admit(policy.governance, principal, route, op, body, ex)
    try:
        # Only a stream announces it, in its first event; a whole answer carries the upstream's own count.
        prompt_tokens = 0
        if door.announces_prompt_tokens and ex.streamed:
            model = route.targets[0].model
            if not encoding_ready(model):
                # A first count may build the model's encoding (0.3-1 s): in a thread, not on the loop.
                await load_encoding(model)
            prompt_tokens = count_prompt_tokens(model, op, body)
        return await _forward(request, _Call(door, state, prompt_tokens), policy, route, body, ex,
                              {"x-request-id": ex.request_id, **admission.headers()})
    finally:
        if ex.usage is None and ex.answer_text is not None:
            # Shielded: a handler cancelled while the count runs (its client hung up) still charges the answer.
            await asyncio.shield(_estimate_and_settle(policy, admission, ex, route.targets[0].model, op, body))
        else:
            await governance.settle(policy.governance, admission, ex)


def _route_of(policy: CompiledPolicy, principal: Principal, body: dict, ex: Exchange) -> Route:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("You must provide a model parameter.", "model", "missing_required_parameter")
    route = policy.routes.get(model)
    if route is None:
        raise model_not_found(model)
    ex.route, ex.priority = model, route.config.priority
    if policy.group_priorities:
        ex.priority = min([ex.priority, *(policy.group_priorities.get(g, ex.priority) for g in principal.groups)])
    return route


async def _estimate_and_settle(policy: CompiledPolicy, admission: Admission, ex: Exchange, model: str, op: str,
                               body: dict) -> None:
    ex.usage = await governance.estimate_usage(ex, model, op, body)
    await governance.settle(policy.governance, admission, ex)


@dataclass(frozen=True, slots=True)
class _Call:
    """What the door needs back to write the answer in its own format."""

    door: Door
    state: object
    prompt_tokens: int


async def _forward(
    request: web.Request, call: _Call, policy: CompiledPolicy, route: Route, body: dict, ex: Exchange,
    headers: dict[str, str],
) -> web.StreamResponse:
    door, state = call.door, call.state
    op = door.op
    guards = route.guards
    resilience = request.app[GATEWAY].resilience
    if guards.check_input:
        checking = door.check_input(guards, body, state, ex)
        body, state = await (checking if telemetry.TRACING is None else telemetry.TRACING.guard("input", ex, checking))
        if policy.log_payloads:
            ex.request_payload = body
    native = door.native(state, request)
    if ex.streamed:
        upstream = await open_stream(route, op, body, ex, policy, resilience, native)
        encoder = door.encoder(state, call.prompt_tokens, upstream)
        # A door that writes its own events reads usage from the chunks; OpenAI clients get it only when they asked.
        wants_usage = encoder is not None or bool((body.get("stream_options") or {}).get("include_usage"))
        scan = door.stream_guard(guards, upstream) if guards.check_output else None
        relaying = relay(request, upstream, ex, RelayOptions(wants_usage, headers, scan, policy.log_payloads, encoder))
        if scan is not None and telemetry.TRACING is not None:
            return await telemetry.TRACING.guard("output", ex, relaying)
        return await relaying
    completion = await _complete_and_check(resilience, door, policy, route, body, ex, native)
    headers["Content-Type"] = _JSON
    return web.Response(body=door.whole(completion, state), headers=headers)


async def _complete_and_check(resilience: Resilience, door: Door, policy: CompiledPolicy, route: Route, body: dict,
                              ex: Exchange, native: NativeRequest | None) -> Completion:
    """A whole answer from the route, through the output guardrails."""
    op = door.op
    completion = await complete(route, op, body, ex, policy, resilience, native)
    ex.usage = completion.usage
    if completion.usage is None:
        ex.answer_text = governance.answer_text(completion.data, op)
    if route.guards.check_output and op != "embeddings":
        checking = door.check_output(route.guards, completion, ex)
        await (checking if telemetry.TRACING is None else telemetry.TRACING.guard("output", ex, checking))
    if policy.log_payloads:
        ex.response_payload = completion.body or completion.data
    return completion


async def answer_line(gateway: Gateway, policy: CompiledPolicy, principal: Principal, door: Door, body: dict,
                      ex: Exchange, priority: int) -> bytes:
    """One batch line through the whole pipeline as its submitter (RBAC, limits, budgets, guardrails, routing,
    settle), without an HTTP request: never streamed, and at `priority` or lower on embedded engines. The answer's
    body, or a GatewayError; the caller records the row."""
    ex.key_id, ex.user, ex.groups = principal.key_id, principal.user, principal.groups
    body, state = door.prepare(body)
    route = _route_of(policy, principal, body, ex)
    ex.priority = max(ex.priority, priority)
    if _validate(body, door.op):
        raise bad_request("A batch line cannot be streamed: remove 'stream'.", "stream", "invalid_value")
    if policy.log_payloads:
        ex.request_payload = body
    admission = await governance.admit(policy.governance, principal, route, door.op, body, ex)
    try:
        if route.guards.check_input:
            body, state = await door.check_input(route.guards, body, state, ex)
            if policy.log_payloads:
                ex.request_payload = body
        completion = await _complete_and_check(gateway.resilience, door, policy, route, body, ex, None)
        return door.whole(completion, state)
    finally:
        if ex.usage is None and ex.answer_text is not None:
            await asyncio.shield(_estimate_and_settle(policy, admission, ex, route.targets[0].model, door.op, body))
        else:
            await governance.settle(policy.governance, admission, ex)


async def handle(request: web.Request, door: Door, policy: CompiledPolicy) -> web.StreamResponse:
    ex = Exchange(door.endpoint, op=door.op, policy_version=policy.version)
    trace = None if telemetry.TRACING is None else telemetry.TRACING.start(request, ex)
    metrics.IN_FLIGHT.inc()
    try:
        try:
            response = await serve(request, door, policy, ex)
        except GatewayError:
            raise
        except Exception:
            # Still answered in OpenAI's shape, and still recorded: every request is one row.
            log.exception("request %s failed inside the gateway", ex.request_id)
            raise GatewayError(500, "The gateway failed to handle the request.", "api_error", "internal_error") from None
    except GatewayError as err:
        ex.status, ex.error_type, ex.error_code = err.status, err.type, err.code or ""
        metrics.count_error(err.code or err.type, err.status)
        response = door.error_response(err)
        response.headers["x-request-id"] = ex.request_id
        if err.status in (408, 413):
            # The body was not read to its end, so the connection cannot carry another request.
            response.force_close()
    except asyncio.CancelledError:
        # Cut off at the drain deadline: the client gets no answer, but the table still gets the row.
        ex.status, ex.error_type, ex.error_code = 503, "api_error", "gateway_stopping"
        metrics.count_error("gateway_stopping", 503)
        request.app[GATEWAY].record(ex, time.perf_counter(), policy)
        raise
    finally:
        metrics.IN_FLIGHT.dec()
        if trace is not None:
            trace.finish()
    finished = time.perf_counter()
    metrics.observe_request(ex.route or "-", door.endpoint, ex.status, finished - ex.started)
    request.app[GATEWAY].record(ex, finished, policy)
    return response
