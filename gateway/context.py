"""What the running gateway holds for its lifetime, reachable from every handler through the app."""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from aiohttp import web
from prometheus_client import Counter

from gateway.compiled import CompiledPolicy
from gateway.exchange import Exchange
from gateway.inference import InferenceWriter
from gateway.routing.upstream import Resilience
from gateway.state import PolicyHolder
from guardrails import Guardrails, Unscannable

log = logging.getLogger("lockgate.inference")
WITHHELD = "[payload withheld: PII masking failed]"
BACKLOG_FULL = "[payload withheld: the PII masking backlog was full]"
UNREADABLE = "[payload withheld: it holds text the PII masking cannot read]"
# Records waiting for their payloads to be masked: each holds its full payloads, so they are bounded in number.
MAX_MASKING_BACKLOG = 256
WITHHELD_RECORDS = Counter("lockgate_inference_payloads_withheld", "Records stored with their payloads and client "
                           "metadata replaced by a marker because they could not be masked", ["reason"])


class Gateway:
    def __init__(self, holder: PolicyHolder) -> None:
        self.holder = holder
        self.resilience = Resilience()
        self.resilience.shadows.record = lambda ex: self.record(ex, time.perf_counter(), self.policy)
        self.writer: InferenceWriter | None = None
        self.stop_deadline: float | None = None
        self.masking: set[asyncio.Task[None]] = set()
        self._waiting: list[dict] = []

    def record(self, ex: Exchange, finished: float, policy: CompiledPolicy) -> None:
        """Hands the request's record to the writer; payloads and client metadata are masked first, after the
        client has its answer. When the masking backlog is full they are withheld instead, never stored unmasked."""
        if self.writer is None:
            return
        record = ex.record(finished)
        mask_request = policy.mask_payloads and record["request_payload"] is not None and not ex.request_clean
        mask_response = policy.mask_payloads and record["response_payload"] is not None and not ex.response_clean
        if not (mask_request or mask_response) and not (record["metadata"] and _masks_metadata(policy)):
            self._submit_soon(record)
            return
        if len(self.masking) >= MAX_MASKING_BACKLOG:
            _withhold(record, BACKLOG_FULL, "backlog_full")
            self._submit_soon(record)
            return
        task = asyncio.get_running_loop().create_task(self._mask_then_submit(record, policy, mask_request,
                                                                             mask_response))
        self.masking.add(task)
        task.add_done_callback(self.masking.discard)

    def _submit_soon(self, record: dict) -> None:
        """Submitted once the loop is done with what it is at: a non-streamed answer is written after its record is
        made, and encoding the record (~2-11 µs; the writer encodes on submit) would add to the request's latency."""
        if not self._waiting:
            asyncio.get_running_loop().call_soon(self.submit_waiting)
        self._waiting.append(record)

    def submit_waiting(self) -> None:
        """Hands the writer every record _submit_soon holds (also before the writer closes)."""
        records, self._waiting = self._waiting, []
        if self.writer is not None:
            for record in records:
                self.writer.submit(record)

    async def _mask_then_submit(self, record: dict, policy: CompiledPolicy, mask_request: bool,
                                mask_response: bool) -> None:
        guard = policy.guardrails
        assert guard is not None
        try:
            if mask_request or mask_response:
                await _mask_payloads(record, policy, guard, mask_request, mask_response)
            if record["metadata"] and _masks_metadata(policy):
                record["metadata"] = await _masked_metadata(record["metadata"], guard)
        except Unscannable:
            # Token ids no tokenizer here can read, or a body beyond the walk's bounds: the client's doing, not a fault.
            _withhold(record, UNREADABLE, "unreadable")
        except Exception:
            # Never store what could not be masked.
            log.exception("masking the payloads of %s failed; they are withheld", record["request_id"])
            _withhold(record, WITHHELD, "masking_failed")
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


def _masks_metadata(policy: CompiledPolicy) -> bool:
    return policy.guardrails is not None and policy.loaded.policy.inference_table.mask_pii


async def _mask_payloads(record: dict, policy: CompiledPolicy, guard: Guardrails, mask_request: bool,
                         mask_response: bool) -> None:
    # The payloads are canonical requests: the Responses and Messages doors store the chat body they became.
    op = record["endpoint"] if record["endpoint"] in ("completions", "embeddings") else "chat"
    request = record["request_payload"] if mask_request else None
    if request is not None:
        if not isinstance(request, dict):
            raise TypeError(f"a request payload of type {type(request).__name__} cannot be masked")
        route = policy.routes.get(record["route"])
        tokenizer = route.guards.tokenizer if route is not None else None
        record["request_payload"] = (await guard.scan_request(request, op, "mask", "mask", tokenizer)).body
    response = record["response_payload"] if mask_response else None
    if isinstance(response, bytes):
        response = orjson.loads(response)
    if response is not None:
        if not isinstance(response, dict):
            raise TypeError(f"a response payload of type {type(response).__name__} cannot be masked")
        record["response_payload"] = (await guard.scan_response(response, op, "mask", "mask")).body


async def _masked_metadata(metadata: dict[str, str], guard: Guardrails) -> dict[str, str]:
    """Client metadata with keys and values masked: both are the client's own text."""
    pairs = list(metadata.items())
    masked = (await guard.scan_strings([text for pair in pairs for text in pair], "input", "mask", "mask")).body
    return {masked[2 * i]: masked[2 * i + 1] for i in range(len(pairs))}


def _withhold(record: dict, marker: str, reason: str) -> None:
    for column in ("request_payload", "response_payload"):
        if record[column] is not None:
            record[column] = marker
    if record["metadata"]:
        record["metadata"] = {"lockgate.withheld": marker}
    WITHHELD_RECORDS.labels(reason).inc()


GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)
