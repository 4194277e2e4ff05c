"""Scanning a streamed completion as it flows: release at once all text that no match can still reach.

The held tail is the word still being written, or the trailing run of tokens that could join into one
PII item: tokens holding a digit, short all-caps groups (IBAN), punctuation runs (phone separators),
linked by spaces; and any admin-pattern match the next delta could extend. With NER on, a
trailing run of capitalised words is held as well, so a name split across deltas is seen whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from guardrails.detect import Span, mask, pattern_hold_start
from guardrails.guard import Action, Direction, Finding, block_message, check_action, summarize

if TYPE_CHECKING:
    from guardrails.guard import Guardrails

# Each token is matched one way only: an atomic group around alternatives that must each reach the token's end.
# With plain groups a run of tokens holding several digits each (`-41809, -41809, ...`) could be split in
# exponentially many ways before a failed match gave up (ten tokens took 50 s). Every alternative that matches
# ends where the token ends, so committing to the first one changes nothing that matches.
_JOINABLE_FORMS = r"\S*\d\S*|[A-Z0-9]{1,4}|[^\w\s]{1,4}"
_TOKEN_END = r"(?=[ \u00a0]|\Z)"
_SEP = r"[ \u00a0]{1,2}"
_NAME_WORD = r"[A-Z][\w'\u2019.-]*"


@dataclass(frozen=True, slots=True)
class _TailRule:
    pattern: re.Pattern[str]
    # Whole-word test: can the buffer's last word be a token of a held run?
    joinable_word: re.Pattern[str]


def _tail(forms: str) -> _TailRule:
    joinable = rf"(?>(?:{forms}){_TOKEN_END})"
    return _TailRule(re.compile(rf"(?:{joinable}{_SEP})*{joinable}[ \u00a0]{{0,2}}\Z|\S*\Z"), re.compile(forms))


_TAIL = _tail(_JOINABLE_FORMS)
_NER_TAIL = _tail(f"{_JOINABLE_FORMS}|{_NAME_WORD}")
# Enough released text in front of the buffer for \b and look-behinds to see what the full text shows.
CONTEXT_CHARS = 16
# A held tail never grows past this unless a finding straddles it: a run without spaces (a long URL,
# base64) is released in pieces, so one PII item longer than this could be missed across deltas.
MAX_HOLD_CHARS = 256


def _tail_start(tail: _TailRule, buffer: str) -> int:
    """Where the held tail begins, looked for only near the end: a hold is capped at MAX_HOLD_CHARS anyway, and the
    search costs the square of the text it tries (a 64 KB delta of digit tokens took 90 s), so one delta costs
    bounded time."""
    start = max(0, len(buffer) - 2 * MAX_HOLD_CHARS)
    if buffer and not buffer[-1].isspace():
        word = buffer.rsplit(None, 1)[-1]
        if tail.joinable_word.fullmatch(word) is None:
            # A run of joinable tokens ends in one, so only the last word is held. Most deltas end this way, and
            # the search tries the run at every position: 6 of the 9 µs a clean delta's scan took.
            return max(len(buffer) - len(word), start)
    match = tail.pattern.search(buffer, start)
    return match.start() if match is not None else len(buffer)


def clip_text(text: str, limit: int) -> str:
    """At most `limit` characters of text, cut before any trailing run that could be part of a PII item.

    A value cut in the middle of a card number or an e-mail address keeps a piece no recogniser finds any more;
    dropping the tail a stream scanner would hold back means what is kept masks like the whole text would.
    """
    if len(text) <= limit:
        return text
    head = text[:limit]
    return head[: _tail_start(_NER_TAIL, head)]


class StreamScanner:
    """One per streamed choice: feed each content delta, send what comes back, then send finish()."""

    def __init__(self, guard: Guardrails, pii: Action, patterns: Action, direction: Direction = "output") -> None:
        check_action(pii)
        check_action(patterns)
        self._guard = guard
        self._detector = guard.detector
        self._pii = pii
        self._patterns = patterns
        self._direction = direction
        self._tail = _NER_TAIL if self._detector.ner else _TAIL
        # PII is looked for and patterns are not (or none are set): the case feed() takes a short path for.
        self._plain = pii != "off" and not (patterns != "off" and self._detector.patterns)
        self._pending = ""
        self._context = ""
        self._spans: list[Span] = []
        self.blocked = False
        self.message: str | None = None

    @property
    def findings(self) -> list[Finding]:
        return summarize(self._spans, self._direction, self._pii, self._patterns)

    def feed(self, delta: str) -> str:
        """The text safe to send now (possibly empty); '' for ever once blocked."""
        if self.blocked:
            return ""
        buffer = self._pending + delta
        text = self._context + buffer
        if self._plain and not self._detector.may_hold_pii(text):
            # No PII candidate and no patterns to look for: release up to the tail that could still become one.
            cut = max(_tail_start(self._tail, buffer), len(buffer) - MAX_HOLD_CHARS)
            out = buffer[:cut]
            self._context = text[: len(self._context) + cut][-CONTEXT_CHARS:]
            self._pending = buffer[cut:]
            return out
        return self._settle(delta, False, self._detector.find_pii(text) if self._suspect(text) else [])

    def finish(self) -> str:
        """Everything still held, checked and masked; call once at the end of the choice."""
        if self.blocked:
            return ""
        text = self._context + self._pending
        return self._settle("", True, self._detector.find_pii(text) if self._suspect(text) else [])

    async def afeed(self, delta: str) -> str:
        """feed() with any Presidio work on the guardrail threads (use this when NER is on)."""
        return await self._aadvance(delta, final=False)

    async def afinish(self) -> str:
        return await self._aadvance("", final=True)

    async def _aadvance(self, delta: str, final: bool) -> str:
        if self.blocked:
            return ""
        text = self._context + self._pending + delta
        pii_spans = await self._guard.run_in_worker(self._detector.find_pii, text) if self._suspect(text) else []
        return self._settle(delta, final, pii_spans)

    def _suspect(self, text: str) -> bool:
        return self._pii != "off" and self._detector.may_hold_pii(text)

    def _settle(self, delta: str, final: bool, pii_spans: list[Span]) -> str:
        buffer = self._pending + delta
        offset = len(self._context)
        text = self._context + buffer
        spans = self._detector.find_patterns(text) if self._patterns != "off" and self._detector.patterns else []
        cut = len(buffer) if final else self._cut(buffer, text, offset)
        if not spans and not pii_spans:
            # The common delta: nothing found, so nothing to hold for a finding, block or mask.
            out = buffer[:cut]
            self._context = (self._context + out)[-CONTEXT_CHARS:]
            self._pending = buffer[cut:]
            return out
        spans = [_shift(s, offset) for s in (*spans, *pii_spans) if s.end > offset]
        moved = True
        while moved:
            moved = False
            for span in spans:
                if span.start < cut <= span.end and not final:
                    cut, moved = span.start, True
        blocking = [s for s in spans if self._action(s) == "block"]
        if blocking:
            self._spans.extend(blocking)
            self.blocked = True
            self.message = block_message(self.findings, self._direction)
            self._pending = ""
            return ""
        released = [s for s in spans if s.end <= cut]
        self._spans.extend(released)
        out = mask(buffer[:cut], [s for s in released if self._action(s) == "mask"])
        self._context = (self._context + buffer[:cut])[-CONTEXT_CHARS:]
        self._pending = buffer[cut:]
        return out

    def _cut(self, buffer: str, text: str, offset: int) -> int:
        cut = max(_tail_start(self._tail, buffer), len(buffer) - MAX_HOLD_CHARS)
        if self._patterns != "off" and self._detector.patterns:
            cut = min(cut, max(0, pattern_hold_start(self._detector, text) - offset))
        return cut

    def _action(self, span: Span) -> Action:
        return self._pii if span.kind == "pii" else self._patterns


def _shift(span: Span, offset: int) -> Span:
    return Span(span.kind, span.entity_type, max(0, span.start - offset), span.end - offset, span.score)
