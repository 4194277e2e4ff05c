"""What the running gateway holds for its lifetime, reachable from every handler through the app."""

from __future__ import annotations

from aiohttp import web

from gateway.compiled import CompiledPolicy
from gateway.exchange import Exchange
from gateway.inference import InferenceWriter
from gateway.state import PolicyHolder
from gateway.upstream import Resilience


class Gateway:
    def __init__(self, holder: PolicyHolder) -> None:
        self.holder = holder
        self.resilience = Resilience()
        self.writer: InferenceWriter | None = None

    def record(self, ex: Exchange, finished: float) -> None:
        if self.writer is not None:
            self.writer.submit(ex.record(finished))

    @property
    def policy(self) -> CompiledPolicy:
        current = self.holder.current
        assert current is not None, "the gateway serves only after its policy loaded"
        return current


GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)
