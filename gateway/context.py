"""What the running gateway holds for its lifetime, reachable from every handler through the app."""

from __future__ import annotations

from aiohttp import web

from gateway.compiled import CompiledPolicy
from gateway.state import PolicyHolder


class Gateway:
    def __init__(self, holder: PolicyHolder) -> None:
        self.holder = holder

    @property
    def policy(self) -> CompiledPolicy:
        current = self.holder.current
        assert current is not None, "the gateway serves only after its policy loaded"
        return current


GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)
