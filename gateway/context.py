"""What the running gateway holds for its lifetime, reachable from every handler through the app."""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from aiohttp import web

from gateway.compiled import CompiledPolicy
from gateway.exchange import Exchange
from gateway.inference import InferenceWriter
from gateway.state import PolicyHolder
from gateway.routing.upstream import Resilience
from guardrails import Guardrails

log = logging.getLogger("lockgate.inference")
WITHHELD = "[payload withheld: PII masking failed]"


class Gateway:
    def __init__(self, holder: PolicyHolder) -> None:
        self.holder = holder
        self.resilience = Resilience()
        self.resilience.shadows.record = lambda ex: self.record(ex, time.perf_counter(), self.policy)
        self.writer: InferenceWriter | None = None
        self.masking: set[asyncio.Task[None]] = set()

    def record(self, ex: Exchange, finished: float, policy: CompiledPolicy) -> None:
        """Hands the request's record to the writer; payloads are masked first, after the client has its answer."""
        if self.writer is None:
            return
        record = ex.record(finished)
        if policy.mask_payloads and policy.guardrails is not None and (
                record["request_payload"] is not None or record["response_payload"] is not None):
            task = asyncio.get_running_loop().create_task(self._mask_then_submit(record, policy.guardrails))
            self.masking.add(task)
            task.add_done_callback(self.masking.discard)
        else:
            self.writer.submit(record)

    async def _mask_then_submit(self, record: dict, guard: Guardrails) -> None:
        op = record["endpoint"]
        try:
            request = record["request_payload"]
            if isinstance(request, dict):
                record["request_payload"] = (await guard.scan_request(request, op, "mask", "mask")).body
            response = record["response_payload"]
            if isinstance(response, bytes):
                response = orjson.loads(response)
            if isinstance(response, dict):
                record["response_payload"] = (await guard.scan_response(response, op, "mask", "mask")).body
        except Exception:
            # Never store what could not be masked.
            log.exception("masking the payloads of %s failed; they are withheld", record["request_id"])
            record["request_payload"] = record["response_payload"] = WITHHELD
        if self.writer is not None:
            self.writer.submit(record)

    async def drain_masking(self) -> None:
        if self.masking:
            await asyncio.gather(*self.masking, return_exceptions=True)

    @property
    def policy(self) -> CompiledPolicy:
        current = self.holder.current
        assert current is not None, "the gateway serves only after its policy loaded"
        return current


GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)
