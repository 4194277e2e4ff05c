"""Anthropic Messages API <-> Chat Completions: a Messages request as a chat request, a chat completion as a Message.

Fields chat cannot carry are not refused. Top-level ones (`thinking`, `top_k`, a new beta's) are left out of the chat
request and kept in `MessagesRequest.passthrough`; `cache_control` on blocks is dropped. Valid content chat has no
form for (documents, server tools, file sources...) is refused with a 400, or, `lenient`, left out with the reason
kept in `MessagesRequest.untranslatable`: the door then serves the request natively on Anthropic targets, as the
client sent it (`MessagesRequest.original`), and refuses it only on targets that speak chat.
Errors on this door are Anthropic's `{"type": "error", "error": {"type", "message"}}`, typed by status.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from aiohttp import web

from gateway.api.wire import call_function, chat_tokens, first_choice, random_id, reasoning_of, sse, text_of
from gateway.errors import GatewayError, bad_request

_TRANSLATED = frozenset({"model", "messages", "system", "max_tokens", "tools", "tool_choice", "stop_sequences",
                         "temperature", "top_p", "metadata", "stream", "output_config"})
_DROPPED_BLOCKS = frozenset({"thinking", "redacted_thinking"})
_STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                 "content_filter": "refusal"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                500: "api_error", 503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}


@dataclass(frozen=True, slots=True)
class MessagesRequest:
    """A Messages request translated: the chat body, the stop sequences (to name the one that ended the answer),
    whether thinking was asked for, the top-level fields chat has no place for, the client's own body, and why chat
    cannot carry all of it (None when it can)."""

    chat: dict
    stream: bool
    stop_sequences: tuple[str, ...]
    thinking: bool
    passthrough: dict
    original: dict
    untranslatable: str | None = None


class _Untranslated:
    """Content that is valid but has no chat form: refused at once, or (lenient) left out, the first reason kept."""

    __slots__ = ("lenient", "reason")

    def __init__(self, lenient: bool) -> None:
        self.lenient = lenient
        self.reason: str | None = None

    def note(self, param: str, message: str) -> None:
        if not self.lenient:
            raise _invalid(param, message)
        if self.reason is None:
            self.reason = f"{param}: {message}"


def _invalid(param: str, message: str) -> GatewayError:
    return bad_request(f"{param}: {message}", param)


def _string(value: object, param: str) -> str:
    if type(value) is not str:
        raise _invalid(param, "Input should be a valid string")
    return value


def _kind(block: object, param: str) -> str:
    kind = block.get("type") if type(block) is dict else None
    if type(kind) is not str:
        raise _invalid(f"{param}.type", "Input should be a content block with a type")
    return kind


def _text_blocks(value: object, param: str) -> str:
    if type(value) is str:
        return value
    if type(value) is not list:
        raise _invalid(param, "Input should be a valid string or a list of text blocks")
    texts = []
    for i, block in enumerate(value):
        if type(block) is not dict or block.get("type") != "text":
            raise _invalid(f"{param}.{i}", "Input should be a text block")
        texts.append(_string(block.get("text"), f"{param}.{i}.text"))
    return "\n\n".join(texts)


def _image(block: dict, param: str, left_out: _Untranslated) -> dict | None:
    source = block.get("source")
    kind = source.get("type") if type(source) is dict else None
    if kind == "base64":
        media_type = _string(source.get("media_type"), f"{param}.source.media_type")
        data = _string(source.get("data"), f"{param}.source.data")
        return {"type": "image_url", "image_url": {"url": f"data:{media_type};base64,{data}"}}
    if kind == "url":
        return {"type": "image_url", "image_url": {"url": _string(source.get("url"), f"{param}.source.url")}}
    if type(kind) is not str:
        raise _invalid(f"{param}.source", "Input should be an image source with a type")
    left_out.note(f"{param}.source", "only base64 and url image sources can be served on this route")
    return None


def _tool_result(block: dict, param: str, left_out: _Untranslated) -> tuple[dict, list[dict]]:
    """The tool message of a tool_result, and its images: a chat tool message holds text only."""
    content = block.get("content", "")
    images: list[dict] = []
    if type(content) is list:
        texts = []
        for i, part in enumerate(content):
            kind = _kind(part, f"{param}.content.{i}")
            if kind == "text":
                texts.append(_string(part.get("text"), f"{param}.content.{i}.text"))
            elif kind == "image":
                if (image := _image(part, f"{param}.content.{i}", left_out)) is not None:
                    images.append(image)
            else:
                left_out.note(f"{param}.content.{i}.type", f"block type {kind!r} cannot be served on this route")
        content = "\n\n".join(texts)
    elif type(content) is not str:
        raise _invalid(f"{param}.content", "Input should be a valid string or a list of blocks")
    call_id = _string(block.get("tool_use_id"), f"{param}.tool_use_id")
    return {"role": "tool", "tool_call_id": call_id, "content": content}, images


def _user_turn(content: list, param: str, left_out: _Untranslated) -> list[dict]:
    tools: list[dict] = []
    parts: list[dict] = []
    for i, block in enumerate(content):
        where = f"{param}.{i}"
        kind = _kind(block, where)
        if kind == "text":
            parts.append({"type": "text", "text": _string(block.get("text"), f"{where}.text")})
        elif kind == "image":
            if (image := _image(block, where, left_out)) is not None:
                parts.append(image)
        elif kind == "tool_result":
            message, images = _tool_result(block, where, left_out)
            tools.append(message)
            parts.extend(images)
        elif kind not in _DROPPED_BLOCKS:
            left_out.note(f"{where}.type", f"block type {kind!r} cannot be served on this route")
    # Tool messages must follow the assistant's calls directly; what else the user sent comes after them.
    return tools + ([{"role": "user", "content": parts}] if parts else [])


def _assistant_turn(content: list, param: str, left_out: _Untranslated) -> dict:
    texts: list[str] = []
    calls: list[dict] = []
    for i, block in enumerate(content):
        where = f"{param}.{i}"
        kind = _kind(block, where)
        if kind == "text":
            texts.append(_string(block.get("text"), f"{where}.text"))
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input", {})).decode()
            calls.append({"id": _string(block.get("id"), f"{where}.id"), "type": "function",
                          "function": {"name": _string(block.get("name"), f"{where}.name"), "arguments": arguments}})
        elif kind not in _DROPPED_BLOCKS:
            left_out.note(f"{where}.type", f"block type {kind!r} cannot be served on this route")
    message: dict = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _messages(body: dict, left_out: _Untranslated) -> list[dict]:
    out: list[dict] = []
    if body.get("system") is not None:
        out.append({"role": "system", "content": _text_blocks(body["system"], "system")})
    given = body.get("messages")
    if type(given) is not list or not given:
        raise _invalid("messages", "Field required: a non-empty list of messages")
    for i, message in enumerate(given):
        param = f"messages.{i}"
        if type(message) is not dict or message.get("role") not in ("user", "assistant"):
            raise _invalid(f"{param}.role", "Input should be 'user' or 'assistant'")
        content = message.get("content")
        if type(content) is str:
            out.append({"role": message["role"], "content": content})
        elif type(content) is not list:
            raise _invalid(f"{param}.content", "Input should be a valid string or a list of blocks")
        elif message["role"] == "user":
            out.extend(_user_turn(content, f"{param}.content", left_out))
        else:
            out.append(_assistant_turn(content, f"{param}.content", left_out))
    return out


def _tools(tools: object, left_out: _Untranslated) -> list[dict]:
    if type(tools) is not list:
        raise _invalid("tools", "Input should be a valid list")
    out = []
    for i, tool in enumerate(tools):
        if type(tool) is not dict:
            raise _invalid(f"tools.{i}", "Input should be a valid object")
        if tool.get("type", "custom") != "custom":
            left_out.note(f"tools.{i}.type", f"tool type {tool['type']!r} cannot be served on this route: "
                                             "only custom tools with an input_schema can")
            continue
        function = {"name": _string(tool.get("name"), f"tools.{i}.name"),
                    "parameters": tool.get("input_schema") or {"type": "object", "properties": {}}}
        if type(tool.get("description")) is str:
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: object, chat: dict) -> None:
    if type(choice) is not dict or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise _invalid("tool_choice.type", "Input should be 'auto', 'any', 'tool' or 'none'")
    kind = choice["type"]
    if kind == "tool":
        chat["tool_choice"] = {"type": "function", "function": {"name": _string(choice.get("name"), "tool_choice.name")}}
    else:
        chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    if choice.get("disable_parallel_tool_use") is True and "tools" in chat:
        chat["parallel_tool_calls"] = False


def _response_format(config: object, left_out: _Untranslated) -> dict | None:
    """Structured output (`output_config.format`) as chat's response_format; the effort level has no chat equivalent."""
    fmt = config.get("format") if type(config) is dict else None
    if fmt is None:
        return None
    kind = fmt.get("type") if type(fmt) is dict else None
    if type(kind) is str and kind != "json_schema":
        left_out.note("output_config.format", "only json_schema formats can be served on this route")
        return None
    if kind != "json_schema" or type(fmt.get("schema")) is not dict:
        raise _invalid("output_config.format", "Input should be a json_schema format with a schema")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True}}


def translate_request(body: dict, counting: bool = False, lenient: bool = False) -> MessagesRequest:
    """The chat request for a Messages request (`counting`: a count_tokens body, which needs no max_tokens).

    GatewayError (400, naming the field) for what is malformed, and for what chat cannot carry unless `lenient`.
    """
    _string(body.get("model"), "model")
    if body.get("stream") is not None and type(body["stream"]) is not bool:
        raise _invalid("stream", "Input should be a valid boolean")
    max_tokens = body.get("max_tokens")
    if not counting and (type(max_tokens) is not int or max_tokens < 1):
        raise _invalid("max_tokens", "Field required: a positive integer")
    left_out = _Untranslated(lenient)
    # A turn whose every block was left out leaves nothing; the chat view still needs a message to be a request.
    chat: dict = {"model": body["model"], "messages": _messages(body, left_out) or [{"role": "user", "content": ""}]}
    if not counting:
        chat["max_tokens"] = max_tokens
    if body.get("tools") and (tools := _tools(body["tools"], left_out)):
        chat["tools"] = tools
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], chat)
    stops = body.get("stop_sequences") or []
    if type(stops) is not list or any(type(stop) is not str for stop in stops):
        raise _invalid("stop_sequences", "Input should be a list of strings")
    if stops:
        chat["stop"] = stops
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if (response_format := _response_format(body.get("output_config"), left_out)) is not None:
        chat["response_format"] = response_format
    metadata = body.get("metadata")
    if type(metadata) is dict and type(metadata.get("user_id")) is str:
        chat["user"] = metadata["user_id"]
    stream = body.get("stream") is True and not counting
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    thinking = body.get("thinking")
    return MessagesRequest(
        chat, stream, tuple(stops),
        type(thinking) is dict and thinking.get("type") not in (None, "disabled"),
        {name: value for name, value in body.items() if name not in _TRANSLATED},
        body, left_out.reason,
    )


def messages_usage(usage: object) -> dict:
    """Chat usage as Anthropic counts it: input_tokens are the prompt tokens neither read from nor written to the
    cache, and the writes are split by their time to live."""
    tokens = chat_tokens(usage)
    cached = min(tokens.cached, tokens.prompt)
    written = min(tokens.cache_write, tokens.prompt - cached)
    written_1h = min(tokens.cache_write_1h, written)
    return {"input_tokens": tokens.prompt - cached - written, "output_tokens": tokens.completion,
            "cache_creation_input_tokens": written, "cache_read_input_tokens": cached,
            "cache_creation": {"ephemeral_5m_input_tokens": written - written_1h, "ephemeral_1h_input_tokens": written_1h}}


def stop_of(choice: dict, request: MessagesRequest, called: bool = False) -> tuple[str, str | None]:
    """The stop_reason and stop_sequence for a chat choice; `called`: the answer holds tool calls.

    Chat says only "stop"; vLLM adds the matched string as `stop_reason`, which tells a stop sequence from an end.
    A call forced by a named tool_choice ends with "stop" on chat, where Anthropic says "tool_use".
    """
    finish = choice.get("finish_reason")
    if called and finish == "stop":
        return "tool_use", None
    matched = choice.get("stop_reason")
    if finish == "stop" and type(matched) is str and matched in request.stop_sequences:
        return "stop_sequence", matched
    reason = _STOP_REASONS.get(finish, "end_turn") if type(finish) is str else "end_turn"
    return reason, None


def tool_input(arguments: str) -> dict:
    """A tool call's arguments as the object tool_use carries; arguments that are not a JSON object count as none."""
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return {}
    return value if type(value) is dict else {}


def message_from_chat(completion: dict, request: MessagesRequest, message_id: str | None = None) -> dict:
    """The Messages API message for a chat completion."""
    choice = first_choice(completion)
    message = choice.get("message") if type(choice.get("message")) is dict else {}
    content: list[dict] = []
    if request.thinking and (reasoning := reasoning_of(message)):
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    if text := text_of(message.get("content")):
        content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or []:
        if type(call) is dict:
            name, arguments = call_function(call)
            content.append({"type": "tool_use", "id": text_of(call.get("id")) or random_id("toolu_"), "name": name,
                            "input": tool_input(arguments)})
    if not any(block["type"] != "thinking" for block in content):
        content.append({"type": "text", "text": ""})
    stop_reason, stop_sequence = stop_of(choice, request, any(block["type"] == "tool_use" for block in content))
    return {"id": message_id or random_id("msg_"), "type": "message", "role": "assistant",
            "model": text_of(request.chat.get("model")), "content": content, "stop_reason": stop_reason,
            "stop_sequence": stop_sequence, "usage": messages_usage(completion.get("usage"))}


def count_tokens_answer(input_tokens: int) -> dict:
    return {"input_tokens": input_tokens}


def error_type(status: int) -> str:
    """Anthropic's error type for a status; other 4xx are invalid requests, other 5xx API errors, as Anthropic does."""
    return _ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def error_response(err: GatewayError) -> web.Response:
    """A GatewayError answered in Anthropic's shape, with its status and headers (Retry-After, rate-limit headers)."""
    return web.Response(status=err.status, body=orjson.dumps(error_body(err.status, err.message)),
                        content_type="application/json", headers=err.headers)


def error_event(status: int, message: str) -> bytes:
    """The `error` event for a failure after the stream began; the SDKs raise it as an API error."""
    return sse("error", error_body(status, message))
