"""CORS for browsers that call the gateway directly: only the origins the policy lists, nothing by default."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.errors import GatewayError
from policies.schema import CorsConfig

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_METHODS = "GET, POST, DELETE, OPTIONS"
_EXPOSED = ("x-request-id, retry-after, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, "
            "x-ratelimit-reset-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, "
            "x-ratelimit-reset-tokens")


def install_cors(app: web.Application, config: CorsConfig) -> None:
    """Built once from the listener's policy: preflights are answered by a middleware, and every answer (streams
    too, whose head leaves before the handler returns) gets the headers as it is prepared."""
    origins = frozenset(config.allow_origins)
    any_origin = "*" in origins
    exact = frozenset(h.lower() for h in config.allow_headers if not h.endswith("*"))
    prefixes = tuple(h.lower()[:-1] for h in config.allow_headers if h.endswith("*"))
    max_age = str(config.max_age_s)

    def header_allowed(name: str) -> bool:
        name = name.strip().lower()
        return name in exact or name.startswith(prefixes)

    @web.middleware
    async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None or request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return await handler(request)
        asked = [h.strip() for h in request.headers.get("Access-Control-Request-Headers", "").split(",") if h.strip()]
        if not (any_origin or origin in origins) or not all(header_allowed(h) for h in asked):
            return GatewayError(403, "This origin or one of its request headers is not allowed by the gateway's "
                                "CORS policy (server.cors).", "invalid_request_error", "cors_not_allowed").response()
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": _METHODS,
            "Access-Control-Allow-Headers": ", ".join(asked), "Access-Control-Max-Age": max_age, "Vary": "Origin"})

    async def allow_origin(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and (any_origin or origin in origins) and request.method != "OPTIONS":
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = _EXPOSED
            response.headers["Vary"] = "Origin"

    app.middlewares.append(preflight)
    app.on_response_prepare.append(allow_origin)
