"""A streamed answer put back together for the inference table, shaped like the whole answer would have been.

The same shape means the same masking applies to it: every text field the guardrails read in a whole answer
(content, refusal, reasoning, tool calls, the legacy function call, audio transcripts) is kept here.
Logprobs are not kept. Malformed chunks are skipped where they are malformed, never raised on.
"""

from __future__ import annotations

from gateway.providers import Usage

_DELTA_TEXTS = ("content", "refusal", "reasoning_content", "reasoning")
# The delta nearly every chunk is: only text, so only its content needs keeping.
_PLAIN_DELTA = frozenset({"role", "content"})


def _index(value: object) -> int:
    return value if type(value) is int else 0


def _append(parts: dict[str, list[str]], name: str, value: object) -> None:
    if isinstance(value, str) and value:
        parts.setdefault(name, []).append(value)


class _Choice:
    __slots__ = ("calls", "finish", "function_call", "texts", "transcript")

    def __init__(self) -> None:
        self.texts: dict[str, list[str]] = {}
        self.calls: dict[int, dict[str, list[str]]] = {}
        self.function_call: dict[str, list[str]] = {}
        self.transcript: dict[str, list[str]] = {}
        self.finish: str | None = None

    def add_delta(self, delta: dict) -> None:
        if _PLAIN_DELTA.issuperset(delta):
            _append(self.texts, "content", delta.get("content"))
            return
        for name in _DELTA_TEXTS:
            _append(self.texts, name, delta.get(name))
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            if not isinstance(call, dict):
                continue
            parts = self.calls.setdefault(_index(call.get("index")), {})
            for key in ("id", "type"):
                if isinstance(call.get(key), str) and key not in parts:
                    parts[key] = [call[key]]
            function = call.get("function")
            if isinstance(function, dict):
                _append(parts, "name", function.get("name"))
                _append(parts, "arguments", function.get("arguments"))
        function_call = delta.get("function_call")
        if isinstance(function_call, dict):
            _append(self.function_call, "name", function_call.get("name"))
            _append(self.function_call, "arguments", function_call.get("arguments"))
        audio = delta.get("audio")
        if isinstance(audio, dict):
            _append(self.transcript, "transcript", audio.get("transcript"))

    def message(self) -> dict:
        message: dict = {"role": "assistant", "content": "".join(self.texts.get("content", ()))}
        for name in _DELTA_TEXTS[1:]:
            if name in self.texts:
                message[name] = "".join(self.texts[name])
        if self.calls:
            message["tool_calls"] = [
                {"index": index, "id": "".join(parts.get("id", ())), "type": "".join(parts.get("type", ["function"])),
                 "function": {"name": "".join(parts.get("name", ())), "arguments": "".join(parts.get("arguments", ()))}}
                for index, parts in sorted(self.calls.items())]
        if self.function_call:
            message["function_call"] = {key: "".join(value) for key, value in self.function_call.items()}
        if self.transcript:
            message["audio"] = {"transcript": "".join(self.transcript["transcript"])}
        return message


class Transcript:
    """Collects the chunks of one streamed answer; `field` is "content" for chat, "text" for completions."""

    def __init__(self, field: str) -> None:
        self.chat = field == "content"
        self.choices: dict[int, _Choice] = {}

    def add(self, chunk: dict) -> None:
        choices = chunk.get("choices")
        if type(choices) is list and len(choices) == 1 and self.chat:
            # The chunk nearly every stream is made of: one choice's text.
            choice = choices[0]
            if type(choice) is dict and choice.get("finish_reason") is None:
                delta = choice.get("delta")
                if type(delta) is dict and _PLAIN_DELTA.issuperset(delta):
                    state = self.choices.get(_index(choice.get("index")))
                    if state is not None:
                        _append(state.texts, "content", delta.get("content"))
                        return
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            index = _index(choice.get("index"))
            state = self.choices.get(index)
            if state is None:
                state = self.choices[index] = _Choice()
            if self.chat:
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    state.add_delta(delta)
            else:
                _append(state.texts, "text", choice.get("text"))
            finish = choice.get("finish_reason")
            if isinstance(finish, str) and finish:
                state.finish = finish

    def text(self) -> str:
        """Every text of the answer, run together: what the upstream billed as completion tokens."""
        parts: list[str] = []
        for state in self.choices.values():
            for pieces in state.texts.values():
                parts += pieces
            for call in state.calls.values():
                parts += call.get("arguments", ())
            parts += state.function_call.get("arguments", ())
        return "".join(parts)

    def payload(self, usage: Usage | None) -> dict:
        choices = []
        for index, state in sorted(self.choices.items()):
            answer = {"message": state.message()} if self.chat else {"text": "".join(state.texts.get("text", ()))}
            choices.append({"index": index, **answer, "finish_reason": state.finish})
        return {"streamed": True, "choices": choices,
                "usage": None if usage is None else {"prompt_tokens": usage.prompt_tokens,
                                                     "completion_tokens": usage.completion_tokens}}
