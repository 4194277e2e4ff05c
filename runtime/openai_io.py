"""OpenAI request bodies in, OpenAI response and chunk dicts out; nothing here touches the engine."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from runtime.errors import InvalidRequestError

# Fields a client may send that this runtime cannot honour; failing loudly beats silently ignoring them.
_UNSUPPORTED = ("tools", "functions", "logprobs", "top_logprobs", "echo", "suffix", "logit_bias")
_MAX_CHOICES = 16
_MAX_STOP_SEQUENCES = 4


@dataclass(frozen=True, slots=True)
class Sampling:
    """The validated sampling fields of a request; `max_tokens` None means "up to the context limit"."""

    max_tokens: int | None
    temperature: float
    top_p: float
    stop: list[str]
    n: int
    seed: int | None
    presence_penalty: float
    frequency_penalty: float
    # vLLM's own extensions to the OpenAI body, which its server accepts too: fixed-length answers for load tests.
    ignore_eos: bool
    min_tokens: int


def parse_sampling(body: dict[str, Any]) -> Sampling:
    for field in _UNSUPPORTED:
        if body.get(field):
            raise InvalidRequestError(f"'{field}' is not supported by the embedded model runtime", field)
    if body.get("best_of") not in (None, 1):
        raise InvalidRequestError("'best_of' is not supported by the embedded model runtime", "best_of")
    response_format = body.get("response_format")
    if response_format and response_format.get("type", "text") != "text":
        raise InvalidRequestError("only the 'text' response_format is supported here", "response_format")
    max_tokens_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return Sampling(
        max_tokens=_integer(body, max_tokens_field, 1),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        stop=_stop_sequences(body.get("stop")),
        n=_integer(body, "n", 1, _MAX_CHOICES) or 1,
        seed=_integer(body, "seed", None),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        ignore_eos=body.get("ignore_eos") is True,
        min_tokens=_integer(body, "min_tokens", 0) or 0,
    )


def parse_chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty list", "messages")
    return [_message(item, position) for position, item in enumerate(messages)]


def parse_completion_prompt(body: dict[str, Any]) -> str | list[int]:
    """One prompt, as text or as token ids (OpenAI also accepts a one-element list of either)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise InvalidRequestError("'prompt' must be one non-empty string or one list of token ids", "prompt")


def finish_reason(vllm_reason: str | None) -> str | None:
    # vLLM reports "abort" for requests it dropped; to an OpenAI client that is a stop it did not ask for.
    return "stop" if vllm_reason == "abort" else vllm_reason


class ResponseShape:
    """Builds the objects of one endpoint (chat or text completions) for one request."""

    def __init__(self, chat: bool, request_id: str, model: str) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.model = model
        self.created = int(time.time())

    def completion(self, texts: dict[int, str], reasons: dict[int, str | None], usage: dict[str, int]) -> dict:
        choices = [self._choice(index, texts[index], reasons.get(index)) for index in sorted(texts)]
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": choices, "usage": usage}

    def role_chunk(self, index: int) -> dict:
        return self._chunk(index, {"role": "assistant", "content": ""}, None)

    def text_chunk(self, index: int, text: str) -> dict:
        return self._chunk(index, {"content": text} if self.chat else text, None)

    def finish_chunk(self, index: int, reason: str | None) -> dict:
        return self._chunk(index, {} if self.chat else "", reason)

    def usage_chunk(self, usage: dict[str, int]) -> dict:
        return {**self._head(self._chunk_object), "choices": [], "usage": usage}

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _choice(self, index: int, text: str, reason: str | None) -> dict:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}

    def _chunk(self, index: int, delta: dict | str, reason: str | None) -> dict:
        if self.chat:
            choice = {"index": index, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": index, "text": delta, "logprobs": None, "finish_reason": reason}
        return {**self._head(self._chunk_object), "choices": [choice]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _message(item: object, position: int) -> dict[str, str]:
    param = f"messages[{position}]"
    if not isinstance(item, dict) or not isinstance(item.get("role"), str):
        raise InvalidRequestError(f"{param} must be an object with a 'role'", param)
    content = item.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):
        content = "".join(_text_part(part, f"{param}.content") for part in content)
    elif not isinstance(content, str):
        raise InvalidRequestError(f"{param}.content must be a string or a list of text parts", f"{param}.content")
    return {"role": item["role"], "content": content}


def _text_part(part: object, param: str) -> str:
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    raise InvalidRequestError(f"{param} may hold only text parts for this model", param)


def _stop_sequences(stop: object) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidRequestError("'stop' must be a non-empty string or a list of them", "stop")
    if len(stop) > _MAX_STOP_SEQUENCES:
        raise InvalidRequestError(f"'stop' takes at most {_MAX_STOP_SEQUENCES} sequences", "stop")
    return stop


def _number(body: dict[str, Any], field: str, default: float, low: float, high: float) -> float:
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise InvalidRequestError(f"'{field}' must be a number from {low:g} to {high:g}, got {value!r}", field)
    return float(value)


def _integer(body: dict[str, Any], field: str, low: int | None, high: int | None = None) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"'{field}' must be an integer, got {value!r}", field)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise InvalidRequestError(f"'{field}' must be {bounds}, got {value}", field)
    return value
