"""Finding PII and the admin's patterns in one text, and masking what was found."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import regex

from guardrails.engine import NER_ENTITIES, EngineKey, analyzer_for, anonymizer, supported_entities
from guardrails.prefilter import build_prefilter

Kind = Literal["pii", "pattern"]
CARD_DIGITS_KEPT = 4


class GuardrailError(RuntimeError):
    """A guardrail could not decide; the text must not pass unchecked (answer 5xx, count it)."""


@dataclass(frozen=True, slots=True)
class Span:
    kind: Kind
    entity_type: str
    start: int
    end: int
    score: float


def words_to_regex(words: Sequence[str]) -> str:
    """A case-insensitive regex matching any of these words or phrases as whole words."""
    if not words:
        raise ValueError("a word list needs at least one word")
    alternatives = "|".join(regex.escape(word.strip()) for word in sorted(words, key=len, reverse=True))
    return rf"(?i)(?<!\w)(?:{alternatives})(?!\w)"


class Detector:
    """Everything needed to scan one text under one policy version; safe to share across threads."""

    def __init__(
        self,
        entities: Sequence[str],
        score_threshold: float,
        patterns: Sequence[tuple[str, str]],
        ner: bool,
        language: str,
        phone_regions: Sequence[str],
    ) -> None:
        self.key = EngineKey(language=language, ner=ner, phone_regions=tuple(phone_regions))
        self.entities = list(dict.fromkeys(entities))
        self.score_threshold = score_threshold
        self.patterns = [(name, _compile(name, source)) for name, source in patterns]
        self.ner = ner
        self.prefilter = None if ner else build_prefilter(self.entities, phone_regions)
        unknown = set(self.entities) - supported_entities(self.key)
        if unknown:
            hint = f"; {sorted(unknown & NER_ENTITIES)} need ner: true" if unknown & NER_ENTITIES and not ner else ""
            raise ValueError(f"unknown PII entities {sorted(unknown)}{hint}")

    def may_hold_pii(self, text: str) -> bool:
        """False only when the prefilter proves Presidio would find nothing in this text."""
        return bool(self.entities) and (self.prefilter is None or self.prefilter(text))

    def find_pii(self, text: str) -> list[Span]:
        try:
            results = analyzer_for(self.key).analyze(
                text, language=self.key.language, entities=self.entities, score_threshold=self.score_threshold
            )
        except Exception as exc:
            raise GuardrailError(f"PII analyzer failed: {type(exc).__name__}: {exc}") from exc
        return [Span("pii", r.entity_type, r.start, r.end, r.score) for r in results]

    def find_patterns(self, text: str) -> list[Span]:
        return [
            Span("pattern", name, match.start(), match.end(), 1.0)
            for name, compiled in self.patterns
            for match in compiled.finditer(text)
            if match.end() > match.start()
        ]

    def find(self, text: str, pii: bool, patterns: bool) -> list[Span]:
        spans = self.find_patterns(text) if patterns else []
        if pii and self.may_hold_pii(text):
            spans += self.find_pii(text)
        return spans


def mask(text: str, spans: Sequence[Span]) -> str:
    """The text with each span replaced by <ENTITY_TYPE>; cards keep their last four digits."""
    if not spans:
        return text
    try:
        engine = anonymizer()
        # Only once anonymizer() has imported the package, under the engines' lock: imported here first, from a
        # request's thread while Presidio's warm-up thread imports it, one of the two got a partly initialised module.
        from presidio_anonymizer.entities import OperatorConfig, RecognizerResult

        results = [RecognizerResult(s.entity_type, s.start, s.end, s.score) for s in spans]
        operators = {"CREDIT_CARD": OperatorConfig("custom", {"lambda": _mask_card})}
        return engine.anonymize(text, results, operators).text
    except Exception as exc:
        raise GuardrailError(f"PII anonymizer failed: {type(exc).__name__}: {exc}") from exc


def _mask_card(number: str) -> str:
    digits_seen = sum(c.isdigit() for c in number)
    masked = []
    for char in number:
        if char.isdigit():
            masked.append(char if digits_seen <= CARD_DIGITS_KEPT else "*")
            digits_seen -= 1
        else:
            masked.append(char)
    return "".join(masked)


def _compile(name: str, source: str) -> regex.Pattern[str]:
    try:
        return regex.compile(source)
    except regex.error as exc:
        raise ValueError(f"pattern {name!r}: invalid regex: {exc}") from exc


def pattern_hold_start(detector: Detector, text: str) -> int:
    """Where the earliest admin-pattern match that more text could still extend begins (len(text): none)."""
    start = len(text)
    for _, compiled in detector.patterns:
        for match in compiled.finditer(text, partial=True):
            if match.partial or match.end() == len(text):
                start = min(start, match.start())
    return start
