"""Steps 5 and 8 of the pipeline: guardrails on the prompt, on whole answers and on streamed deltas."""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from gateway.errors import GatewayError
from gateway.exchange import Exchange
from guardrails import Finding, GuardrailError, Guardrails, Op, StreamScanner, Verdict, words_to_regex
from policies.schema import DirectionGuardrails, Policy

FINDINGS = Counter("lockgate_guardrail_findings", "Guardrail findings", ["direction", "entity", "action"])
FAILURES = Counter("lockgate_guardrail_failures", "Guardrail checks that failed (the request was refused)")
_STRENGTH = {"": 0, "flag": 1, "mask": 2, "block": 3}


def build_guardrails(policy: Policy) -> Guardrails | None:
    """Runs in a thread (Presidio imports and warms up in seconds); None when nothing would use it."""
    used = any(_active(r.guardrails.input) or _active(r.guardrails.output) for r in policy.routes.values())
    table = policy.inference_table
    if not used and not (table.enabled and table.log_payloads and table.mask_pii):
        return None
    pii = policy.guardrails.pii
    patterns = [(p.name, p.regex if p.regex is not None else words_to_regex(p.words or []))
                for p in policy.guardrails.patterns]
    guard = Guardrails(pii.entities, pii.score_threshold, patterns, pii.ner, pii.language, pii.phone_regions)
    guard.warm_up()
    return guard


def _active(direction: DirectionGuardrails) -> bool:
    return direction.pii != "off" or direction.patterns != "off"


@dataclass(frozen=True, slots=True)
class RouteGuards:
    """A route's guardrail actions, resolved once per policy version."""

    guard: Guardrails | None
    input: DirectionGuardrails
    output: DirectionGuardrails
    check_input: bool
    check_output: bool
    ner: bool


def route_guards(guard: Guardrails | None, input_: DirectionGuardrails, output: DirectionGuardrails,
                 ner: bool) -> RouteGuards:
    return RouteGuards(guard, input_, output, guard is not None and _active(input_),
                       guard is not None and _active(output), ner)


def note_findings(ex: Exchange, findings: Iterable[Finding]) -> None:
    for finding in findings:
        ex.guardrail_findings.append({"direction": finding.direction, "entity": finding.entity_type,
                                      "action": finding.action, "count": finding.count})
        FINDINGS.labels(finding.direction, finding.entity_type, finding.action).inc(finding.count)
        if _STRENGTH[finding.action] > _STRENGTH[ex.guardrail_action]:
            ex.guardrail_action = finding.action


def violation(message: str | None) -> GatewayError:
    return GatewayError(400, message or "The content was blocked by a guardrail.", "invalid_request_error",
                        "content_policy_violation")


def failure(exc: GuardrailError) -> GatewayError:
    FAILURES.inc()
    return GatewayError(500, f"A guardrail check failed, so the content was not let through: {exc}",
                        "api_error", "guardrail_failure")


async def _settle(scan: Awaitable[Verdict], ex: Exchange) -> Any:
    try:
        verdict = await scan
    except GuardrailError as exc:
        raise failure(exc) from None
    note_findings(ex, verdict.findings)
    if verdict.blocked:
        raise violation(verdict.message)
    return verdict.body


async def check_request(guards: RouteGuards, op: Op, body: dict, ex: Exchange) -> dict:
    """Returns the body to forward (masked where the route says so); raises on a block."""
    assert guards.guard is not None
    return await _settle(guards.guard.scan_request(body, op, guards.input.pii, guards.input.patterns), ex)


async def check_response(guards: RouteGuards, op: Op, data: dict, ex: Exchange) -> dict:
    assert guards.guard is not None
    return await _settle(guards.guard.scan_response(data, op, guards.output.pii, guards.output.patterns), ex)


class StreamGuard:
    """Scans streamed deltas per choice; holds back only what could still become a finding."""

    def __init__(self, guards: RouteGuards, field: str) -> None:
        assert guards.guard is not None
        self.guards = guards
        self.field = field
        self.scanners: dict[int, StreamScanner] = {}
        self.message: str | None = None

    def _scanner(self, index: int) -> StreamScanner:
        scanner = self.scanners.get(index)
        if scanner is None:
            assert self.guards.guard is not None
            scanner = self.scanners[index] = StreamScanner(
                self.guards.guard, self.guards.output.pii, self.guards.output.patterns)
        return scanner

    async def filter(self, chunk: dict) -> bool:
        """Rewrites the chunk's text in place; False once the stream must end (a block)."""
        for choice in chunk.get("choices") or ():
            holder = choice.get("delta") if self.field == "content" else choice
            if not isinstance(holder, dict):
                continue
            scanner = self._scanner(int(choice.get("index") or 0))
            text = holder.get(self.field)
            out = ""
            if isinstance(text, str) and text:
                out = await scanner.afeed(text) if self.guards.ner else scanner.feed(text)
            if choice.get("finish_reason") is not None:
                out += await scanner.afinish() if self.guards.ner else scanner.finish()
            if scanner.blocked:
                self.message = scanner.message
                return False
            if isinstance(text, str) or out:
                holder[self.field] = out
        return True

    async def finish(self) -> str:
        """Whatever is still held once the upstream ended without a finish_reason."""
        rest = ""
        for scanner in self.scanners.values():
            rest += await scanner.afinish() if self.guards.ner else scanner.finish()
            if scanner.blocked:
                self.message = scanner.message
        return rest

    def findings(self) -> list[Finding]:
        return [f for scanner in self.scanners.values() for f in scanner.findings]
