"""Small helpers the doors share."""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway.compiled import CompiledPolicy
from gateway.context import GATEWAY


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def current_policy(request: web.Request) -> CompiledPolicy:
    return request.app[GATEWAY].policy
