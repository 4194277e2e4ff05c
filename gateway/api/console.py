"""The console: a page at /console for the people who call models and the admins who govern them, and its API.

The page signs in with a lockgate key (or a JWT) kept in the tab's session storage and calls the same /v1 API as
any client, so RBAC, limits, guardrails and the inference table apply to it unchanged: there is no side door. Its
own API reads the inference table through the writer process's query channel (users see their own rows, admins
everyone's) and, for admins only (checked here, not in the page), what the policy grants and what the limiter
holds now. These are routes of their own: a /v1 request does no work for the console.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from gateway.api.common import current_policy
from gateway.compiled import CompiledPolicy
from gateway.context import GATEWAY
from gateway.errors import GatewayError, bad_request
from gateway.inference import InferenceQueryError, InferenceWriter
from gateway.proxy import authenticate
from policies import StorageUnavailable, explain
from policies.keys import Principal
from policies.schema import Policy

STATIC_DIR = Path(__file__).resolve().parent.parent / "console"
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
# 'self' only: no inline script or style, no eval, nothing fetched from elsewhere, never framed.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}
# Console queries share the writer process with the inserts: a few at a time per worker, each bounded in time.
MAX_QUERIES = 2
QUERY_TIMEOUT_S = 15.0
QUEUE_WAIT_S = 10.0
TOP_ROWS = 50
MAX_EXPLAINED_USERS = 200
MAX_LIMIT_SCOPES = 100
MAX_RANGE = timedelta(days=400)
# Chart buckets (seconds), each dividing a day, so buckets align the same way whatever the range.
BUCKETS_S = (10, 30, 60, 300, 900, 1800, 3600, 10800, 21600, 43200, 86400)
MAX_POINTS = 120
_SPAN = re.compile(r"^(\d{1,6})([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


@dataclass
class ConsoleState:
    assets: dict[str, Asset]
    queries: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_QUERIES))
    # `lockgate check --explain` for every user builds an authorizer each: once per policy version.
    explained: tuple[str, list[dict[str, str]]] | None = None


CONSOLE: web.AppKey[ConsoleState] = web.AppKey("console", ConsoleState)


def load_assets(directory: Path = STATIC_DIR) -> dict[str, Asset]:
    """Every file of the console, read once: the page, its script and style, the vendored chart library."""
    assets = {}
    for path in sorted(directory.rglob("*")):
        content_type = _TYPES.get(path.suffix)
        if content_type is not None and path.is_file():
            body = path.read_bytes()
            assets[path.relative_to(directory).as_posix()] = Asset(body, content_type,
                                                                   f'"{hashlib.sha256(body).hexdigest()[:20]}"')
    return assets


def add_routes(app: web.Application) -> None:
    app[CONSOLE] = ConsoleState(load_assets())
    app.router.add_get("/console", page)
    app.router.add_get("/console/", page)
    app.router.add_get("/console/static/{name:[A-Za-z0-9_./-]+}", static)
    app.router.add_get("/console/api/me", me)
    app.router.add_get("/console/api/usage", usage)
    app.router.add_get("/console/api/governance", governance)


def _asset_response(request: web.Request, asset: Asset) -> web.Response:
    headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache", "ETag": asset.etag}
    if request.headers.get("If-None-Match") == asset.etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, content_type=asset.content_type, charset="utf-8", headers=headers)


async def page(request: web.Request) -> web.Response:
    return _asset_response(request, request.app[CONSOLE].assets["index.html"])


async def static(request: web.Request) -> web.Response:
    asset = request.app[CONSOLE].assets.get(request.match_info["name"])
    if asset is None:
        return _api_error(GatewayError(404, "No such file in the console.", "invalid_request_error", "not_found"))
    return _asset_response(request, asset)


def _api_json(data: object) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json",
                        headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})


def _api_error(err: GatewayError) -> web.Response:
    response = err.response()
    response.headers.update({**SECURITY_HEADERS, "Cache-Control": "no-store"})
    return response


async def _signed_in(request: web.Request) -> tuple[CompiledPolicy, Principal, bool]:
    policy = current_policy(request)
    principal = await authenticate(request, policy)
    return policy, principal, policy.governance.authorizer.is_admin(principal)


def _not_admin() -> GatewayError:
    return GatewayError(403, "This part of the console needs the admin capability.", "invalid_request_error",
                        "not_admin")


async def me(request: web.Request) -> web.Response:
    """Who the key belongs to, whether it is an admin's, and the prices of the models its routes reach."""
    try:
        policy, principal, admin = await _signed_in(request)
    except GatewayError as err:
        return _api_error(err)
    prices = {}
    for name in policy.governance.authorizer.visible_routes(principal, list(policy.routes)):
        for target in policy.routes[name].targets:
            price = policy.governance.prices.get(target.model)
            if price is not None:
                # Each kind's price as the gateway charges it, its defaults resolved (USD per 1M tokens).
                kinds = price.pico(target.provider.name in policy.governance.anthropic_providers)
                prices[target.model] = dict(zip(("input", "output", "cached_input", "cache_write", "cache_write_1h"),
                                                (pico / 1e6 for pico in kinds), strict=True))
    return _api_json({"user": principal.user, "groups": list(principal.groups), "key_id": principal.key_id,
                      "admin": admin, "policy_version": policy.version, "prices": prices})


def parse_window(query: Mapping[str, str], now: datetime | None = None) -> tuple[datetime, datetime]:
    """`since` (a span back from now such as 15m, 24h, 7d, 2w, or an ISO 8601 time) and `until` (now, or ISO)."""
    now = now or datetime.now(UTC)
    since, until = _time(query.get("since", "24h"), now, "since"), _time(query.get("until", "now"), now, "until")
    if since >= until:
        raise bad_request("`since` must be before `until`.", "since", "invalid_time_range")
    if until - since > MAX_RANGE:
        raise bad_request(f"The time range may span at most {MAX_RANGE.days} days.", "since", "invalid_time_range")
    return since, until


def _time(text: str, now: datetime, name: str) -> datetime:
    text = text.strip()
    if text == "now":
        return now
    try:
        if match := _SPAN.match(text):
            return now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
        parsed = datetime.fromisoformat(text)
    except (ValueError, OverflowError):
        raise bad_request(f"Cannot read `{name}`: give now, 15m, 24h, 7d, 2w or an ISO 8601 time.", name,
                          "invalid_time_range") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def bucket_seconds(since: datetime, until: datetime) -> int:
    span = (until - since).total_seconds()
    return next((b for b in BUCKETS_S if span / b <= MAX_POINTS), BUCKETS_S[-1])


def _filter(since: datetime, until: datetime, user: str | None) -> str:
    window = (f"ts >= fromUnixTimestamp64Milli({int(since.timestamp() * 1000)}) "
              f"AND ts < fromUnixTimestamp64Milli({int(until.timestamp() * 1000)})")
    # The name travels as hex, so no character in it can end the literal.
    return window if user is None else f"{window} AND user = unhex('{user.encode().hex()}')"


_MEASURES = ("count(), countIf(status >= 400), countIf(status = 429), countIf(guardrail_action = 'block'), "
             "sum(prompt_tokens), sum(completion_tokens), sum(cost_micro_usd), "
             "quantile(0.5)(latency_ms), quantile(0.99)(latency_ms)")


def _latency(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 1)


def _measures(row: tuple[Any, ...]) -> dict[str, Any]:
    requests, errors, limited, blocked, prompt, completion, cost, p50, p99 = row
    return {"requests": requests, "errors": errors, "rate_limited": limited, "blocked": blocked,
            "prompt_tokens": prompt, "completion_tokens": completion, "cost_usd": cost / 1e6,
            "p50_ms": _latency(p50) if requests else None, "p99_ms": _latency(p99) if requests else None}


def usage_report(writer: InferenceWriter, since: datetime, until: datetime, user: str | None) -> dict[str, Any]:
    """Totals, a series per chart bucket, and the top routes, models and users; runs in a thread."""
    table, where = f"{writer.database}.inference", _filter(since, until, user)

    def rows(sql: str) -> list[tuple[Any, ...]]:
        return writer.query(sql, QUERY_TIMEOUT_S)

    bucket = bucket_seconds(since, until)
    first = int(since.timestamp()) // bucket * bucket
    points = list(range(first, int(until.timestamp()) + 1, bucket))
    found = {row[0]: _measures(row[1:]) for row in rows(
        f"SELECT intDiv(toUnixTimestamp(ts), {bucket}) * {bucket} AS t, {_MEASURES} FROM {table} WHERE {where} "
        "GROUP BY t ORDER BY t")}
    empty = _measures((0, 0, 0, 0, 0, 0, 0, math.nan, math.nan))
    series: dict[str, list[Any]] = {"t": points}
    for name in ("requests", "errors", "prompt_tokens", "completion_tokens", "cost_usd", "p50_ms", "p99_ms"):
        series[name] = [found.get(t, empty)[name] for t in points]

    def top(dimension: str) -> list[dict[str, Any]]:
        return [{"name": row[0], **_measures(row[1:])} for row in rows(
            f"SELECT {dimension} AS name, {_MEASURES} FROM {table} WHERE {where} GROUP BY name "
            f"ORDER BY count() DESC, name LIMIT {TOP_ROWS}")]

    return {"since": since.isoformat(), "until": until.isoformat(), "bucket_s": bucket, "user": user,
            "totals": _measures(rows(f"SELECT {_MEASURES} FROM {table} WHERE {where}")[0]), "series": series,
            "by_route": top("route"), "by_model": top("concat(provider, '/', model)"), "by_user": top("user")}


def guardrail_findings(writer: InferenceWriter, since: datetime, until: datetime) -> list[dict[str, Any]]:
    rows = writer.query(
        "SELECT finding.direction, finding.entity, finding.action, sum(finding.count) AS findings, count() "
        f"FROM {writer.database}.inference ARRAY JOIN guardrail_findings AS finding "
        f"WHERE {_filter(since, until, None)} GROUP BY finding.direction, finding.entity, finding.action "
        f"ORDER BY findings DESC LIMIT {TOP_ROWS}", QUERY_TIMEOUT_S)
    return [{"direction": direction, "entity": entity, "action": action, "findings": findings, "requests": requests}
            for direction, entity, action, findings, requests in rows]


async def _read(request: web.Request, read: Callable[[InferenceWriter], Any]) -> Any:
    writer = request.app[GATEWAY].writer
    if writer is None:
        raise GatewayError(503, "The inference table is not enabled on this gateway (inference_table.enabled).",
                           "api_error", "inference_table_unavailable")
    state = request.app[CONSOLE]
    try:
        await asyncio.wait_for(state.queries.acquire(), QUEUE_WAIT_S)
    except TimeoutError:
        raise GatewayError(503, "The console's inference-table queries are all busy; try again shortly.",
                           "api_error", "console_busy") from None
    try:
        return await asyncio.to_thread(read, writer)
    except InferenceQueryError as exc:
        raise GatewayError(503, f"The inference table cannot be read now: {exc}.", "api_error",
                           "inference_table_unavailable") from None
    finally:
        state.queries.release()


async def usage(request: web.Request) -> web.Response:
    """Requests, tokens, cost, errors and latency over a time range: the caller's own, or (admins) anyone's."""
    try:
        policy, principal, admin = await _signed_in(request)
        asked = request.query.get("user", "").strip()
        if admin:
            user = asked or None
        elif asked and asked != principal.user:
            raise _not_admin()
        else:
            user = principal.user
        since, until = parse_window(request.query)
        report = await _read(request, lambda writer: usage_report(writer, since, until, user))
    except GatewayError as err:
        return _api_error(err)
    return _api_json({**report, "admin": admin, "policy_version": policy.version})


def _explanations(policy: Policy) -> list[dict[str, str]]:
    return [{"user": user, "text": explain(policy, user)} for user in list(policy.users)[:MAX_EXPLAINED_USERS]]


def limit_scopes(policy: Policy) -> list[str]:
    """Every concrete scope a limit or budget counts under: one per user and key for the per-user and per-key ones."""
    scopes: dict[str, None] = {}
    for scope in [*(limit.scope for limit in policy.limits), *(budget.scope for budget in policy.budgets)]:
        if scope == "user":
            scopes.update(dict.fromkeys(f"user:{name}" for name in policy.users))
        elif scope == "key":
            scopes.update(dict.fromkeys(f"key:{key.id}" for key in policy.keys))
        else:
            scopes[scope] = None
    return list(scopes)


async def _limits_now(policy: CompiledPolicy) -> list[dict[str, Any]]:
    now = []
    for scope in limit_scopes(policy.loaded.policy)[:MAX_LIMIT_SCOPES]:
        try:
            counters = await policy.governance.governor.counters(scope)
        except StorageUnavailable:
            now.append({"scope": scope, "error": "the rate limiter's shared store cannot be reached"})
            continue
        if counters["windows"] or counters["parallel"] or counters["budgets"]:
            now.append(counters)
    return now


async def governance(request: web.Request) -> web.Response:
    """Admins only: who may call what and why, every limit and budget with what remains now, guardrail findings."""
    try:
        policy, _, admin = await _signed_in(request)
        if not admin:
            raise _not_admin()
        since, until = parse_window(request.query)
        state = request.app[CONSOLE]
        if state.explained is None or state.explained[0] != policy.version:
            state.explained = (policy.version, await asyncio.to_thread(_explanations, policy.loaded.policy))
        limits = await _limits_now(policy)
        try:
            findings, findings_error = await _read(request, lambda w: guardrail_findings(w, since, until)), None
        except GatewayError as err:
            findings, findings_error = None, err.message
    except GatewayError as err:
        return _api_error(err)
    loaded = policy.loaded.policy
    return _api_json({
        "policy_version": policy.version, "since": since.isoformat(), "until": until.isoformat(),
        "users": len(loaded.users), "explained": state.explained[1], "limits": limits,
        "limit_scopes": len(limit_scopes(loaded)), "findings": findings, "findings_error": findings_error,
        "checked_at": datetime.now(UTC).isoformat()})
