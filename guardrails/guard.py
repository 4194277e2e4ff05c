"""Guardrails for one policy version: scan request and response bodies, decide block / mask / flag."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from guardrails.bodies import Op, Path, Texts, Tokenizer, request_texts, response_texts, rewrite
from guardrails.detect import Detector, Span, mask
from guardrails.engine import DEFAULT_PHONE_REGIONS, warm_up_engines

Action = Literal["block", "mask", "flag", "off"]
Direction = Literal["input", "output"]
_ACTIONS = frozenset({"block", "mask", "flag", "off"})
# Actions that may change or stop the text: logprobs that cannot be checked are dropped under them.
_HIDING = frozenset({"block", "mask"})

log = logging.getLogger(__name__)
# Presidio holds the GIL for most of its work, so more threads would add queueing, not throughput.
_WORKERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="guardrails")


@dataclass(frozen=True, slots=True)
class Finding:
    """What the inference record keeps: never the matched value."""

    direction: Direction
    kind: Literal["pii", "pattern"]
    entity_type: str
    action: Action
    count: int
    score: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "direction": self.direction, "kind": self.kind, "entity_type": self.entity_type,
            "action": self.action, "count": self.count, "score": self.score,
        }


@dataclass(slots=True)
class Verdict:
    """blocked: refuse (400 on input, end the stream on output); body: masked copy, or the same object."""

    blocked: bool
    findings: list[Finding]
    body: Any
    message: str | None = None
    # Every text was read for PII and for the patterns and nothing was found: a masking scan of this body would
    # change nothing, so the inference table may store it as it is.
    clean: bool = field(default=False, compare=False)


def summarize(spans: Sequence[Span], direction: Direction, pii: Action, patterns: Action) -> list[Finding]:
    grouped: dict[tuple[str, str], tuple[int, float]] = {}
    for span in spans:
        count, score = grouped.get((span.kind, span.entity_type), (0, 0.0))
        grouped[(span.kind, span.entity_type)] = (count + 1, max(score, span.score))
    return [
        Finding(direction, kind, entity, pii if kind == "pii" else patterns, count, round(score, 3))  # type: ignore[arg-type]
        for (kind, entity), (count, score) in sorted(grouped.items())
    ]


def block_message(findings: Sequence[Finding], direction: Direction) -> str | None:
    blocked = sorted({f.entity_type for f in findings if f.action == "block"})
    if not blocked:
        return None
    where = "the request contains" if direction == "input" else "the response contained"
    return f"Blocked by content policy: {where} {', '.join(blocked)}."


def check_action(action: str) -> None:
    if action not in _ACTIONS:
        raise ValueError(f"unknown guardrail action {action!r}; use one of {sorted(_ACTIONS)}")


class Guardrails:
    """Built once per policy version (the Presidio engine underneath is shared across rebuilds).

    The first construction in a process imports Presidio (seconds): build it off the event loop.
    """

    def __init__(
        self,
        entities: Sequence[str],
        score_threshold: float = 0.5,
        patterns: Sequence[tuple[str, str]] = (),
        ner: bool = False,
        language: str = "en",
        phone_regions: Sequence[str] = DEFAULT_PHONE_REGIONS,
        max_pending: int = 64,
    ) -> None:
        self.detector = Detector(entities, score_threshold, patterns, ner, language, phone_regions)
        self._slots = asyncio.Semaphore(max_pending)
        self._warming: threading.Thread | None = None

    def warm_up(self) -> None:
        """Run one analysis so the first request does not pay Presidio's first-call cost (blocking)."""
        warm_up_engines([self.detector.key], self.detector.entities)

    def warm_up_in_background(self) -> threading.Thread:
        """`warm_up` in a thread of its own, so the gateway serves while Presidio loads: a text the prefilter proves
        clean never needs Presidio, and a scan that does waits for the load (the analyzer is built under a lock),
        so nothing passes unscanned meanwhile."""
        # Not a daemon: a process that ends while Presidio still loads waits for it, since finalizing the
        # interpreter under a thread inside native code aborts the process ("FATAL: exception not rethrown").
        thread = threading.Thread(target=self._warm_up_logged, name="lockgate-guardrails-warm-up", daemon=False)
        self._warming = thread
        thread.start()
        return thread

    @property
    def loading(self) -> bool:
        """Presidio is still loading in the background (scans that need it wait for it)."""
        return self._warming is not None and self._warming.is_alive()

    def _warm_up_logged(self) -> None:
        started = time.perf_counter()
        try:
            self.warm_up()
        except Exception:
            # Scans that need Presidio build it again, and fail closed if that fails too.
            log.exception("guardrails: loading Presidio failed; requests that need a PII scan are refused until it loads")
            return
        log.info("guardrails: Presidio loaded in %.2f s", time.perf_counter() - started)

    def scan_text(self, text: str, direction: Direction, pii: Action, patterns: Action) -> Verdict:
        """Scan one string on the calling thread; Verdict.body is the (masked) text."""
        check_action(pii)
        texts = Texts([(("",), text)])
        verdict = self._judge({"": text}, texts, self._suspects(texts.fields, pii), direction, pii, patterns)
        verdict.body = verdict.body[""]
        return verdict

    async def scan_strings(self, strings: Sequence[str], direction: Direction, pii: Action, patterns: Action) -> Verdict:
        """Scan loose strings (client metadata); Verdict.body is the list, masked where needed."""
        body = {"": list(strings)}
        verdict = await self._scan(body, Texts([(("", i), s) for i, s in enumerate(strings)]), direction, pii, patterns)
        verdict.body = verdict.body[""]
        return verdict

    async def scan_request(self, body: dict[str, Any], op: Op, pii: Action, patterns: Action,
                           tokenizer: Tokenizer | None = None) -> Verdict:
        """Raises Unscannable when the body holds text that cannot be read: token ids without a tokenizer, or too much."""
        return await self._scan(body, request_texts(body, op, tokenizer), "input", pii, patterns)

    async def scan_response(self, body: dict[str, Any], op: Op, pii: Action, patterns: Action) -> Verdict:
        return await self._scan(body, response_texts(body, op), "output", pii, patterns)

    async def run_in_worker(self, fn: Any, *args: Any) -> Any:
        """Run blocking analysis on the guardrail threads; callers wait for a slot when all are taken."""
        async with self._slots:
            return await asyncio.get_running_loop().run_in_executor(_WORKERS, fn, *args)

    async def _scan(self, body: dict[str, Any], texts: Texts, direction: Direction, pii: Action,
                    patterns: Action) -> Verdict:
        check_action(pii)
        check_action(patterns)
        if not texts.fields and not texts.malformed:
            return Verdict(False, [], body, clean=True)
        if pii == "off" and patterns == "off":
            return Verdict(False, [], body)
        suspects = self._suspects(texts.fields, pii)
        if any(suspects):
            return await self.run_in_worker(self._judge, body, texts, suspects, direction, pii, patterns)
        # The common clean text: nothing can be found, so nothing can be blocked, masked or dropped.
        if (patterns == "off" or not self.detector.patterns) and not texts.malformed:
            return Verdict(False, [], body, clean=self._reads_all(pii, patterns))
        return self._judge(body, texts, suspects, direction, pii, patterns)

    def _reads_all(self, pii: Action, patterns: Action) -> bool:
        return pii != "off" and (patterns != "off" or not self.detector.patterns)

    def _suspects(self, fields: Sequence[tuple[Path, str]], pii: Action) -> list[bool]:
        if pii == "off":
            return [False] * len(fields)
        return [self.detector.may_hold_pii(text) for _, text in fields]

    def _judge(
        self,
        body: dict[str, Any],
        texts: Texts,
        suspects: Sequence[bool],
        direction: Direction,
        pii: Action,
        patterns: Action,
    ) -> Verdict:
        check_action(patterns)
        found: list[tuple[Path, str, list[Span]]] = []
        for (path, text), suspect in zip(texts.fields, suspects, strict=True):
            spans = self.detector.find_patterns(text) if patterns != "off" else []
            if suspect:
                spans += self.detector.find_pii(text)
            if spans:
                found.append((path, text, spans))
        findings = summarize([s for _, _, spans in found for s in spans], direction, pii, patterns)
        message = block_message(findings, direction)
        if message is not None:
            return Verdict(True, findings, body, message)
        masked = {}
        for path, text, spans in found:
            to_mask = [s for s in spans if (pii if s.kind == "pii" else patterns) == "mask"]
            if to_mask:
                masked[path] = mask(text, to_mask)
        hides = pii in _HIDING or patterns in _HIDING
        clean = not found and not texts.malformed and self._reads_all(pii, patterns)
        return Verdict(False, findings, rewrite(body, texts, masked, hides), clean=clean)
