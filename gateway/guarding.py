"""Steps 5 and 8 of the pipeline: guardrails on the prompt, on whole answers and on streamed deltas."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter
from tiktoken.model import encoding_name_for_model

from gateway.errors import GatewayError, bad_request
from gateway.exchange import Exchange
from guardrails import (
    Finding,
    GuardrailError,
    Guardrails,
    Op,
    StreamScanner,
    Tokenizer,
    Unscannable,
    Verdict,
    words_to_regex,
)
from policies.schema import DirectionGuardrails, Policy
from policies.tokens import encoding_for

FINDINGS = Counter("lockgate_guardrail_findings", "Guardrail findings", ["direction", "entity", "action"])
FAILURES = Counter("lockgate_guardrail_failures", "Guardrail checks that failed (the request was refused)")
_STRENGTH = {"": 0, "flag": 1, "mask": 2, "block": 3}
# Actions that may change or stop the text: streamed logprobs cannot follow what they do, so they are dropped.
_HIDING = frozenset({"mask", "block"})
_DELTA_TEXTS = ("content", "refusal", "reasoning_content", "reasoning")
_PLAIN_DELTA = frozenset({"role", "content"})
# (holder, field, whole): names are scanned piece by piece as they come, not held back (they come in one piece).
_NESTED_TEXTS = (("function_call", "name", True), ("function_call", "arguments", False), ("audio", "transcript", False))
Slot = tuple[str | int, ...]
_CONTENT_SLOT: Slot = ("content",)


def build_guardrails(policy: Policy) -> Guardrails | None:
    """Runs in a thread; None when nothing would use it. Presidio (seconds to import and warm up) loads in the
    background meanwhile: the policy goes live without waiting for it."""
    used = any(_active(r.guardrails.input) or _active(r.guardrails.output) for r in policy.routes.values())
    table = policy.inference_table
    # Client metadata is kept even when payloads are not, and is masked all the same.
    if not used and not (table.enabled and table.mask_pii):
        return None
    pii = policy.guardrails.pii
    patterns = [(p.name, p.regex if p.regex is not None else words_to_regex(p.words or []))
                for p in policy.guardrails.patterns]
    guard = Guardrails(pii.entities, pii.score_threshold, patterns, pii.ner, pii.language, pii.phone_regions)
    guard.warm_up_in_background()
    return guard


def _active(direction: DirectionGuardrails) -> bool:
    return direction.pii != "off" or direction.patterns != "off"


def routed_models(policy: Policy, name: str) -> tuple[str, ...]:
    """Every model a request to this route may reach: its targets, its fallbacks' and its shadow's."""
    route = policy.routes[name]
    names = [name, *route.fallbacks, *([route.shadow.route] if route.shadow is not None else [])]
    return tuple(dict.fromkeys(target.model or owner for owner in names if owner in policy.routes
                               for target in policy.routes[owner].targets))


@functools.cache
def _shared_encoding(models: tuple[str, ...]) -> Tokenizer | None:
    names = set()
    for model in models:
        try:
            names.add(encoding_name_for_model(model))
        except KeyError:
            return None
    if len(names) != 1:
        return None
    encoding = encoding_for(models[0])
    # encoding_for stands in a successor for encodings not shipped offline; its ids would read as other text.
    return encoding if encoding.name in names else None


class RouteTokenizer:
    """Reads token-id prompts as text with the tiktoken encoding all of a route's models share.

    Looked up on first use (loading a vocabulary takes a while). Models with no tiktoken encoding (Claude, Llama,
    the embedded SmolLM2...) or with different ones have ids the gateway cannot read: those prompts are Unscannable.
    """

    __slots__ = ("models",)

    def __init__(self, models: tuple[str, ...]) -> None:
        self.models = models

    def decode(self, tokens: list[int]) -> str:
        return self._encoding().decode(tokens)

    def encode_ordinary(self, text: str) -> list[int]:
        return self._encoding().encode_ordinary(text)

    def _encoding(self) -> Tokenizer:
        encoding = _shared_encoding(self.models)
        if encoding is None:
            raise Unscannable(f"token ids cannot be read as text for the models {list(self.models)}; send the text")
        return encoding


@dataclass(frozen=True, slots=True)
class RouteGuards:
    """A route's guardrail actions, resolved once per policy version."""

    guard: Guardrails | None
    input: DirectionGuardrails
    output: DirectionGuardrails
    check_input: bool
    check_output: bool
    ner: bool
    tokenizer: RouteTokenizer | None = None


def route_guards(guard: Guardrails | None, input_: DirectionGuardrails, output: DirectionGuardrails,
                 ner: bool, models: tuple[str, ...] = ()) -> RouteGuards:
    return RouteGuards(guard, input_, output, guard is not None and _active(input_),
                       guard is not None and _active(output), ner, RouteTokenizer(models) if models else None)


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


async def _settle(scan: Awaitable[Verdict], ex: Exchange) -> Verdict:
    try:
        verdict = await scan
    except GuardrailError as exc:
        raise failure(exc) from None
    note_findings(ex, verdict.findings)
    if verdict.blocked:
        raise violation(verdict.message)
    return verdict


async def check_request(guards: RouteGuards, op: Op, body: dict, ex: Exchange) -> dict:
    """Returns the body to forward (masked where the route says so); raises on a block."""
    assert guards.guard is not None
    try:
        verdict = await _settle(guards.guard.scan_request(body, op, guards.input.pii, guards.input.patterns,
                                                          guards.tokenizer), ex)
    except Unscannable as exc:
        raise bad_request(f"This request cannot pass the route's input guardrails: {exc}.",
                          code="content_not_checkable") from None
    ex.request_clean = verdict.clean
    return verdict.body


async def check_response(guards: RouteGuards, op: Op, data: dict, ex: Exchange) -> dict:
    assert guards.guard is not None
    try:
        verdict = await _settle(guards.guard.scan_response(data, op, guards.output.pii, guards.output.patterns), ex)
        ex.response_clean = verdict.clean
        return verdict.body
    except Unscannable as exc:
        raise GatewayError(502, f"The upstream answer cannot pass the route's output guardrails: {exc}.",
                           "api_error", "upstream_invalid_response") from None


def _index(value: object) -> int:
    """A choice's or tool call's index; a malformed one shares index 0, so its text is still scanned."""
    return value if type(value) is int else 0


class ChunkGuard(Protocol):
    """Output guardrails on a stream as the relay uses them: StreamGuard, or a door's own for its native streams."""

    message: str | None

    async def filter(self, chunk: dict) -> bool: ...

    async def finish(self) -> dict | None: ...

    def findings(self) -> list[Finding]: ...


class StreamGuard:
    """Scans streamed deltas per choice and per text field; holds back only what could still become a finding.

    Chat deltas: `content`, `refusal`, `reasoning_content`, `reasoning`, `audio.transcript`, the legacy
    `function_call` and each `tool_calls[i].function` (arguments held back like content, names scanned as they
    come); completions: `text`. A field of the wrong type cannot be scanned and is removed.
    """

    def __init__(self, guards: RouteGuards, field: str) -> None:
        assert guards.guard is not None
        self.guards = guards
        self.chat = field == "content"
        self.drop_logprobs = guards.output.pii in _HIDING or guards.output.patterns in _HIDING
        self.choices: dict[int, dict[Slot, StreamScanner]] = {}
        self.done: list[StreamScanner] = []
        self.message: str | None = None

    async def filter(self, chunk: dict) -> bool:
        """Rewrites the chunk's text in place; False once the stream must end (a block)."""
        choices = chunk.get("choices")
        if not choices:
            return True
        if type(choices) is list and len(choices) == 1 and not self.guards.ner:
            done = self._filter_plain(choices[0])
            if done is not None:
                return done
        if not isinstance(choices, list):
            chunk["choices"] = []
            return True
        ner = self.guards.ner
        malformed = False
        for choice in choices:
            if not isinstance(choice, dict):
                malformed = True
                continue
            index = choice.get("index")
            if type(index) is not int:
                index = 0
            scanners = self.choices.get(index)
            if scanners is None:
                scanners = self.choices[index] = {}
            # Fed inline rather than through a coroutine per field: this runs for every chunk of every guarded stream.
            for slot, holder, name, whole in _plain_slots(choice) or _text_slots(choice):
                scanner = scanners.get(slot)
                if scanner is None:
                    scanner = scanners[slot] = self._scanner()
                out = await scanner.afeed(holder[name]) if ner else scanner.feed(holder[name])
                if whole and not scanner.blocked:
                    out += await scanner.afinish() if ner else scanner.finish()
                if scanner.blocked:
                    self.message = scanner.message
                    return False
                holder[name] = out
            if self.drop_logprobs and choice.get("logprobs") is not None:
                choice["logprobs"] = None
            if choice.get("finish_reason") is not None:
                await self._finish_choice(index, choice)
                if self.message is not None:
                    return False
        if malformed:
            chunk["choices"] = [choice for choice in choices if isinstance(choice, dict)]
        return True

    def _filter_plain(self, choice: object) -> bool | None:
        """filter() for the chunk nearly every stream is made of: one choice, a text delta, nothing else to do.
        None: the chunk is not that one, and takes the full path."""
        if type(choice) is not dict or choice.get("finish_reason") is not None or choice.get("logprobs") is not None:
            return None
        plain = _plain_content(choice)
        if plain is None or not plain[1]:
            return None
        delta, content = plain
        index = choice.get("index")
        scanners = self.choices.get(index if type(index) is int else 0)
        scanner = scanners.get(_CONTENT_SLOT) if scanners is not None else None
        if scanner is None:
            return None
        out = scanner.feed(content)
        if scanner.blocked:
            self.message = scanner.message
            return False
        delta["content"] = out
        return True

    def _scanner(self) -> StreamScanner:
        assert self.guards.guard is not None
        return StreamScanner(self.guards.guard, self.guards.output.pii, self.guards.output.patterns)

    async def _finish_choice(self, index: int, choice: dict) -> bool:
        """Releases everything the choice's scanners still hold into this choice; True when something was added."""
        scanners = self.choices.pop(index, None)
        added = False
        for slot, scanner in (scanners or {}).items():
            rest = await scanner.afinish() if self.guards.ner else scanner.finish()
            self.done.append(scanner)
            if scanner.blocked:
                self.message = scanner.message
                return False
            if rest:
                _place(choice, slot, rest)
                added = True
        return added

    async def finish(self) -> dict | None:
        """A last chunk with whatever is still held once the upstream ended without a finish_reason (None: nothing)."""
        choices = []
        for index in list(self.choices):
            choice: dict = {"index": index, "delta": {}} if self.chat else {"index": index, "text": ""}
            choice["finish_reason"] = None
            if await self._finish_choice(index, choice):
                choices.append(choice)
            if self.message is not None:
                return None
        if not choices:
            return None
        return {"object": "chat.completion.chunk" if self.chat else "text_completion", "choices": choices}

    def findings(self) -> list[Finding]:
        active = [scanner for scanners in self.choices.values() for scanner in scanners.values()]
        return [f for scanner in (*self.done, *active) for f in scanner.findings]


def _plain_content(choice: dict) -> tuple[dict, str] | None:
    """The delta and its text of the chunk nearly every stream is made of (a delta of only role and content text)."""
    delta = choice.get("delta")
    if type(delta) is not dict or not _PLAIN_DELTA.issuperset(delta) or "text" in choice:
        return None
    content = delta.get("content")
    return (delta, content) if type(content) is str else None


def _plain_slots(choice: dict) -> list[tuple[Slot, dict, str, bool]] | None:
    """The slots of the plain chunk (see _plain_content), or None for any other."""
    plain = _plain_content(choice)
    if plain is None:
        return None
    return [(_CONTENT_SLOT, plain[0], "content", False)] if plain[1] else []


def _text_slots(choice: dict) -> list[tuple[Slot, dict, str, bool]]:
    """The non-empty texts of a streamed choice as (slot, holder, field, whole); removes what cannot be scanned.

    Both shapes are read whatever the endpoint: text in the other one's field is text all the same.
    """
    slots: list[tuple[Slot, dict, str, bool]] = []
    delta = choice.get("delta")
    if isinstance(delta, dict):
        for name in _DELTA_TEXTS:
            if name in delta:
                _add_slot(slots, (name,), delta, name, False)
        if "function_call" in delta or "audio" in delta:
            for outer, inner, whole in _NESTED_TEXTS:
                holder = delta.get(outer)
                if holder is None:
                    continue
                if not isinstance(holder, dict):
                    del delta[outer]
                elif inner in holder:
                    _add_slot(slots, (outer, inner), holder, inner, whole)
        if delta.get("tool_calls") is not None:
            _tool_call_slots(slots, delta)
    elif delta is not None:
        choice["delta"] = {}
    if "text" in choice:
        _add_slot(slots, ("text",), choice, "text", False)
    return slots


def _tool_call_slots(slots: list[tuple[Slot, dict, str, bool]], delta: dict) -> None:
    calls = delta["tool_calls"]
    if not isinstance(calls, list):
        del delta["tool_calls"]
        return
    if not all(isinstance(call, dict) for call in calls):
        calls = delta["tool_calls"] = [call for call in calls if isinstance(call, dict)]
    for call in calls:
        function = call.get("function")
        if function is None:
            continue
        if not isinstance(function, dict):
            del call["function"]
            continue
        index = _index(call.get("index"))
        for part in ("name", "arguments"):
            if part in function:
                _add_slot(slots, ("tool_calls", index, part), function, part, part == "name")


def _add_slot(slots: list[tuple[Slot, dict, str, bool]], slot: Slot, holder: dict, name: str, whole: bool) -> None:
    text = holder[name]
    if isinstance(text, str):
        if text:
            slots.append((slot, holder, name, whole))
    elif text is not None:
        del holder[name]


def _place(choice: dict, slot: Slot, text: str) -> None:
    """Appends released text to the field `slot` names in this chunk's choice, creating what is missing."""
    if slot == ("text",):
        choice["text"] = (choice.get("text") or "") + text
        return
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        delta = choice["delta"] = {}
    if slot[0] == "tool_calls":
        _, index, part = slot
        calls = delta.get("tool_calls")
        if not isinstance(calls, list):
            calls = delta["tool_calls"] = []
        call = next((c for c in calls if isinstance(c, dict) and _index(c.get("index")) == index), None)
        if call is None:
            call = {"index": index}
            calls.append(call)
        function = call.get("function")
        if not isinstance(function, dict):
            function = call["function"] = {}
        function[part] = (function.get(part) or "") + text
        return
    holder = delta
    for step in slot[:-1]:
        inner = holder.get(step)
        if not isinstance(inner, dict):
            inner = holder[step] = {}
        holder = inner
    holder[slot[-1]] = (holder.get(slot[-1]) or "") + text
