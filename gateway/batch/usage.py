"""The Batch object's `usage`: the tokens of its lines, summed as OpenAI's BatchUsage shows them."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.providers.base import Usage


def _count(holder: object, name: str) -> int:
    value = holder.get(name) if isinstance(holder, dict) else None
    return value if type(value) is int and value >= 0 else 0


@dataclass(slots=True)
class UsageSums:
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    def add(self, usage: Usage | None) -> None:
        if usage is not None:
            self.input_tokens += usage.prompt_tokens
            self.cached_tokens += usage.cached_tokens
            self.output_tokens += usage.completion_tokens
            self.reasoning_tokens += usage.reasoning_tokens

    def add_answer(self, body: object) -> None:
        """The usage an answer in a result file carries: chat, completion and embedding answers count
        prompt/completion tokens, a Responses answer input/output tokens; anything else counts nothing."""
        usage = body.get("usage") if isinstance(body, dict) else None
        if not isinstance(usage, dict):
            return
        if "input_tokens" in usage or "output_tokens" in usage:
            self.input_tokens += _count(usage, "input_tokens")
            self.cached_tokens += _count(usage.get("input_tokens_details"), "cached_tokens")
            self.output_tokens += _count(usage, "output_tokens")
            self.reasoning_tokens += _count(usage.get("output_tokens_details"), "reasoning_tokens")
            return
        self.input_tokens += _count(usage, "prompt_tokens")
        self.cached_tokens += _count(usage.get("prompt_tokens_details"), "cached_tokens")
        self.output_tokens += _count(usage, "completion_tokens")
        self.reasoning_tokens += _count(usage.get("completion_tokens_details"), "reasoning_tokens")

    def merge(self, other: UsageSums) -> None:
        self.input_tokens += other.input_tokens
        self.cached_tokens += other.cached_tokens
        self.output_tokens += other.output_tokens
        self.reasoning_tokens += other.reasoning_tokens

    def to_object(self) -> dict[str, object]:
        return {"input_tokens": self.input_tokens, "input_tokens_details": {"cached_tokens": self.cached_tokens},
                "output_tokens": self.output_tokens, "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                "total_tokens": self.input_tokens + self.output_tokens}
