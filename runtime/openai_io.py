"""OpenAI request bodies read into what the engine needs; nothing here touches the engine.

The answers' shapes are in `runtime.shapes`, tool calling in `runtime.tools`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from runtime.errors import InvalidRequestError

# Fields a client may send that this runtime cannot honour; failing loudly beats silently ignoring them.
_UNSUPPORTED = ("functions", "function_call", "echo", "suffix", "logit_bias")
_MAX_CHOICES = 16
_MAX_STOP_SEQUENCES = 4
# vLLM's own default bound (`max_logprobs`), and OpenAI's for chat's top_logprobs.
MAX_TOP_LOGPROBS = 20
_MAX_TOOL_CALLS_PER_MESSAGE = 128


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
    # None: no logprobs; otherwise how many alternatives per token (0: only the chosen token's).
    logprobs: int | None
    # Keyword arguments of vLLM's StructuredOutputsParams for `response_format`, or None for free text.
    structured: dict[str, Any] | None


def parse_sampling(body: dict[str, Any], chat: bool = True) -> Sampling:
    for field in _UNSUPPORTED:
        if body.get(field):
            raise InvalidRequestError(f"'{field}' is not supported by the embedded model runtime", field,
                                      "unsupported_parameter")
    if body.get("best_of") not in (None, 1):
        raise InvalidRequestError("'best_of' is not supported by the embedded model runtime", "best_of",
                                  "unsupported_parameter")
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
        logprobs=_chat_logprobs(body) if chat else _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS),
        structured=structured_outputs(body.get("response_format")),
    )


def structured_outputs(response_format: object) -> dict[str, Any] | None:
    """vLLM's structured-output constraint for an OpenAI `response_format`, or None for plain text."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise InvalidRequestError("'response_format' must be an object", "response_format")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise InvalidRequestError("'response_format.json_schema.schema' must be a JSON schema object",
                                      "response_format.json_schema")
        return {"json": spec["schema"]}
    raise InvalidRequestError(f"response_format type {kind!r} is not supported here: use 'text', 'json_object' "
                              "or 'json_schema'", "response_format.type", "unsupported_value")


def parse_chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages as chat templates take them: text content, and tool calls with their arguments as objects."""
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


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise InvalidRequestError(f"'logprobs' must be a boolean, got {wanted!r}", "logprobs")
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top and not wanted:
        raise InvalidRequestError("'top_logprobs' needs 'logprobs' set to true", "top_logprobs")
    return (top or 0) if wanted else None


def _message(item: object, position: int) -> dict[str, Any]:
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
    message: dict[str, Any] = {"role": item["role"], "content": content}
    for field in ("name", "tool_call_id"):
        if item.get(field) is not None:
            if not isinstance(item[field], str):
                raise InvalidRequestError(f"{param}.{field} must be a string", f"{param}.{field}")
            message[field] = item[field]
    if item.get("tool_calls"):
        message["tool_calls"] = _tool_calls(item["tool_calls"], f"{param}.tool_calls")
    return message


def _tool_calls(calls: object, param: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list) or len(calls) > _MAX_TOOL_CALLS_PER_MESSAGE:
        raise InvalidRequestError(f"{param} must be a list of at most {_MAX_TOOL_CALLS_PER_MESSAGE} tool calls", param)
    out = []
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(function, dict) or call.get("type", "function") != "function"
                or not isinstance(function.get("name"), str) or not isinstance(function.get("arguments", ""), str)):
            raise InvalidRequestError(f"{param}[{index}] must be a function call with a name and string arguments",
                                      f"{param}[{index}]")
        entry = {"type": "function", "function": {"name": function["name"],
                                                  "arguments": _arguments(function.get("arguments"))}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _arguments(text: str | None) -> dict[str, Any]:
    """Tool-use templates take arguments as a mapping; as vLLM's server does, text that is no JSON object counts as none
    (failing would make every later turn of the conversation fail too)."""
    try:
        value = orjson.loads(text or "{}")
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _text_part(part: object, param: str) -> str:
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    raise InvalidRequestError(f"{param} may hold only text parts for this model", param, "unsupported_value")


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
