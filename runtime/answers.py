"""The engine's outputs for one request written as OpenAI answers: whole, or chunk by chunk."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from runtime.logprobs import Logprobs
from runtime.tools import ChoiceTools


def finish_reason(vllm_reason: str | None) -> str | None:
    # vLLM reports "abort" for requests it dropped; to an OpenAI client that is a stop it did not ask for.
    return "stop" if vllm_reason == "abort" else vllm_reason


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage; `cached_tokens` are the prompt tokens vLLM's prefix cache already held."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": min(cached_tokens, prompt_tokens)},
    }


class ResponseShape:
    """Builds the objects of one endpoint (chat or text completions) for one request."""

    def __init__(self, chat: bool, request_id: str, model: str) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.model = model
        self.created = int(time.time())

    def completion(self, choices: list[dict], usage: dict[str, int]) -> dict:
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": choices, "usage": usage}

    def choice(self, index: int, body: dict | str, reason: str | None, logprobs: dict | None = None,
               stop: object = None) -> dict:
        """A whole answer's choice: `body` is the chat message, or the text of a completion."""
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            choice["message"] = body
            if logprobs is not None:
                choice["logprobs"] = logprobs
        else:
            choice["text"] = body
            choice["logprobs"] = logprobs
        choice["finish_reason"] = reason
        return _with_stop_string(choice, stop)

    def role_chunk(self, index: int) -> dict:
        return self.chunk(index, {"role": "assistant", "content": ""})

    def chunk(self, index: int, delta: dict | str, reason: str | None = None, logprobs: dict | None = None,
              stop: object = None) -> dict:
        if self.chat:
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": reason}
            if logprobs is not None:
                choice["logprobs"] = logprobs
        else:
            choice = {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": reason}
        return {**self._head(self._chunk_object), "choices": [_with_stop_string(choice, stop)]}

    def finish_chunk(self, index: int, reason: str | None, stop: object = None) -> dict:
        return self.chunk(index, {} if self.chat else "", reason, None, stop)

    def usage_chunk(self, usage: dict[str, Any]) -> dict:
        return {**self._head(self._chunk_object), "choices": [], "usage": usage}

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def _with_stop_string(choice: dict, stop: object) -> dict:
    # vLLM's server names the stop sequence that ended a choice; the Messages door answers it as `stop_sequence`.
    if isinstance(stop, str):
        choice["stop_reason"] = stop
    return choice


class Answer:
    """One request's answer: `top_logprobs` None when logprobs were not asked for."""

    def __init__(self, shape: ResponseShape, prompt_ids: list[int], n: int, tools: list[ChoiceTools | None] | None,
                 logprobs: Logprobs, top_logprobs: int | None) -> None:
        self.shape = shape
        self.n = n
        self.prompt_tokens = len(prompt_ids)
        self.generated = 0
        self.cached_tokens = 0
        self._logprobs = logprobs
        self._top = top_logprobs
        self._tools = tools or [None] * n
        self._text_offsets = [0] * n

    def whole(self, outputs: Iterable[Any]) -> dict:
        """The chat.completion or text_completion from each choice's final output."""
        choices = []
        for output in sorted(outputs, key=lambda output: output.index):
            self.generated += len(output.token_ids)
            reason = finish_reason(output.finish_reason)
            tools = self._tools[output.index]
            if not self.shape.chat:
                choices.append(self.shape.choice(output.index, output.text, reason, self._legacy(output),
                                                 output.stop_reason))
                continue
            if tools is None:
                message: dict[str, Any] = {"role": "assistant", "content": output.text}
            else:
                content, calls = tools.whole(output.text, list(output.token_ids))
                message = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
                reason = tools.finish_reason(reason)
            choices.append(self.shape.choice(output.index, message, reason, self._chat_logprobs(output),
                                             output.stop_reason))
        return self.shape.completion(choices, self.usage())

    def chunks(self, output: Any, first: bool) -> list[dict]:
        """The chunks for one delta output of the engine (`first`: the request's first, which opens every choice)."""
        chunks = [self.shape.role_chunk(index) for index in range(self.n)] if first and self.shape.chat else []
        self.note_cached(output)
        for choice in output.outputs:
            self.generated += len(choice.token_ids)
            finished = choice.finish_reason is not None
            tools = self._tools[choice.index]
            if self.shape.chat:
                logprobs = self._chat_logprobs(choice)
                if tools is not None:
                    delta = tools.delta(choice.text, choice.token_ids, finished)
                else:
                    delta = {"content": choice.text} if choice.text else None
                if delta is not None or (logprobs is not None and logprobs["content"]):
                    chunks.append(self.shape.chunk(choice.index, delta or {}, None, logprobs))
            else:
                logprobs = self._legacy(choice)
                if choice.text or (logprobs is not None and logprobs["tokens"]):
                    chunks.append(self.shape.chunk(choice.index, choice.text, None, logprobs))
            if finished:
                reason = finish_reason(choice.finish_reason)
                if tools is not None:
                    reason = tools.finish_reason(reason)
                chunks.append(self.shape.finish_chunk(choice.index, reason, choice.stop_reason))
        return chunks

    def note_cached(self, output: Any) -> None:
        """Keeps the prefix-cache hits a RequestOutput reports (vLLM sets them once the prompt is scheduled)."""
        cached = getattr(output, "num_cached_tokens", None)
        if type(cached) is int and cached > self.cached_tokens:
            self.cached_tokens = cached

    def usage(self) -> dict[str, Any]:
        return usage(self.prompt_tokens, self.generated, self.cached_tokens)

    def _chat_logprobs(self, output: Any) -> dict | None:
        if self._top is None or output.logprobs is None:
            return None
        return {"content": self._logprobs.chat(output.token_ids, output.logprobs, self._top), "refusal": None}

    def _legacy(self, output: Any) -> dict | None:
        if self._top is None or output.logprobs is None:
            return None
        legacy = self._logprobs.legacy(output.token_ids, output.logprobs, self._top, self._text_offsets[output.index])
        if legacy["tokens"]:
            self._text_offsets[output.index] = legacy["text_offset"][-1] + len(legacy["tokens"][-1])
        return legacy
