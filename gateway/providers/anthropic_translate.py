"""Chat Completions <-> Anthropic Messages: pure translation, no I/O."""

from __future__ import annotations

import time

import orjson

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
    "refusal": "content_filter",
}


class TranslationError(ValueError):
    """The chat request uses something the Messages API cannot express."""


def _text(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise TranslationError("message content must be a string or a list of parts")


def _image(part: dict) -> dict:
    url = (part.get("image_url") or {}).get("url", "")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        media_type = header[5:].split(";")[0]
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _blocks(content: object) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise TranslationError("message content must be a string or a list of parts")
    blocks = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            blocks.append({"type": "text", "text": part.get("text", "")})
        elif kind == "image_url":
            blocks.append(_image(part))
        else:
            raise TranslationError(f"content part type {kind!r} is not supported by this provider")
    return blocks


def _assistant_blocks(message: dict) -> list[dict]:
    blocks = [b for b in ([{"type": "text", "text": _text(message.get("content"))}]) if b["text"]]
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        try:
            arguments = orjson.loads(function.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            raise TranslationError("tool call arguments must be JSON") from None
        blocks.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": arguments})
    return blocks


def _tool_choice(choice: object, parallel: object) -> dict | None:
    if choice is None:
        out: dict | None = None
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        out = {"type": "none"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        out = {"type": "tool", "name": (choice.get("function") or {}).get("name")}
    else:
        raise TranslationError("unsupported tool_choice")
    if parallel is False:
        out = {**(out or {"type": "auto"}), "disable_parallel_tool_use": True}
    return out


def to_messages_request(body: dict, model: str, default_max_tokens: int) -> dict:
    """The Messages API request for a chat request; TranslationError (a 400) for what it cannot express, or for
    fields the client sent in shapes chat completions does not have."""
    try:
        return _messages_request(body, model, default_max_tokens)
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise TranslationError(f"the request cannot be sent to an Anthropic model: a field has an unexpected shape "
                               f"({type(exc).__name__})") from None


def _messages_request(body: dict, model: str, default_max_tokens: int) -> dict:
    system: list[str] = []
    messages: list[dict] = []
    for message in body.get("messages") or []:
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_text(message.get("content")))
            continue
        if role == "user":
            turn = {"role": "user", "content": _blocks(message.get("content"))}
        elif role == "assistant":
            turn = {"role": "assistant", "content": _assistant_blocks(message)}
        elif role == "tool":
            result = {"type": "tool_result", "tool_use_id": message.get("tool_call_id"),
                      "content": _text(message.get("content"))}
            turn = {"role": "user", "content": [result]}
        else:
            raise TranslationError(f"message role {role!r} is not supported")
        if messages and messages[-1]["role"] == turn["role"]:
            messages[-1]["content"].extend(turn["content"])
        else:
            messages.append(turn)
    out: dict = {
        "model": model,
        "messages": messages,
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens,
    }
    if system:
        out["system"] = "\n\n".join(system)
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            out[name] = body[name]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("stream"):
        out["stream"] = True
    tools = body.get("tools")
    if tools:
        out["tools"] = [
            {"name": t["function"]["name"], "description": t["function"].get("description", ""),
             "input_schema": t["function"].get("parameters") or {"type": "object", "properties": {}}}
            for t in tools if t.get("type") == "function"
        ]
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None:
        out["tool_choice"] = choice
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    return out


class InvalidMessage(ValueError):
    """The upstream's message or stream event is not shaped as the Messages API documents."""


def _string(value: object, what: str) -> str:
    if value is None:
        return ""
    if type(value) is not str:
        raise InvalidMessage(f"{what} is not a string")
    return value


def _object(value: object, what: str) -> dict:
    if value is None:
        return {}
    if type(value) is not dict:
        raise InvalidMessage(f"{what} is not an object")
    return value


def _tokens(usage: dict, name: str) -> int:
    value = usage.get(name)
    if value is None:
        return 0
    if type(value) is not int or value < 0:
        raise InvalidMessage(f"usage.{name} is not a token count")
    return value


def usage_from(usage: dict) -> dict:
    """A Messages API usage as OpenAI's: every prompt token in `prompt_tokens`, the cache reads and writes (and the
    writes' 1-hour part, from `cache_creation` where the API splits them by time to live) in its details."""
    cached = _tokens(usage, "cache_read_input_tokens")
    written = _tokens(usage, "cache_creation_input_tokens")
    by_ttl = _object(usage.get("cache_creation"), "usage.cache_creation")
    written_1h = min(_tokens(by_ttl, "ephemeral_1h_input_tokens"), written)
    prompt = _tokens(usage, "input_tokens") + cached + written
    completion = _tokens(usage, "output_tokens")
    details = {"cached_tokens": cached, "cache_write_tokens": written}
    if written_1h:
        details["cache_write_1h_tokens"] = written_1h
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": details,
    }


def _finish_reason(stop_reason: object) -> str:
    return STOP_REASONS.get(_string(stop_reason, "stop_reason"), "stop")


def _index(data: dict) -> int:
    index = data.get("index")
    if type(index) is not int or index < 0:
        raise InvalidMessage("a content block index is not a non-negative integer")
    return index


def from_message(message: dict) -> dict:
    """The chat completion for a Messages API message; InvalidMessage if the message is malformed.

    Thinking blocks become `reasoning_content`, the field chat reasoning models use; blocks chat has no place for
    (redacted thinking, server tools and their results) are left out.
    """
    content = message.get("content")
    if type(content) is not list:
        raise InvalidMessage("content is not a list")
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[dict] = []
    for item in content:
        block = _object(item, "a content block")
        kind = block.get("type")
        if kind == "text":
            texts.append(_string(block.get("text"), "a text block's text"))
        elif kind == "thinking":
            thoughts.append(_string(block.get("thinking"), "a thinking block's thinking"))
            _string(block.get("signature"), "a thinking block's signature")
        elif kind == "redacted_thinking":
            _string(block.get("data"), "a redacted_thinking block's data")
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input")).decode()
            calls.append({"id": _string(block.get("id"), "a tool_use id"), "type": "function",
                          "function": {"name": _string(block.get("name"), "a tool_use name"), "arguments": arguments}})
        elif type(kind) is not str:
            raise InvalidMessage("a content block has no type")
    text = "".join(texts)
    reply: dict = {"role": "assistant", "content": text if text or not calls else None}
    if thoughts:
        reply["reasoning_content"] = "".join(thoughts)
    if calls:
        reply["tool_calls"] = calls
    return {
        "id": f"chatcmpl-{_string(message.get('id'), 'id')}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": _string(message.get("model"), "model"),
        "choices": [{"index": 0, "message": reply, "logprobs": None,
                     "finish_reason": _finish_reason(message.get("stop_reason"))}],
        "usage": usage_from(_object(message.get("usage"), "usage")),
    }


# The streamed text of each delta type, and the chat delta field it becomes.
_DELTA_TEXTS = {"text_delta": ("text", "content"), "thinking_delta": ("thinking", "reasoning_content")}


class StreamTranslator:
    """Turns Messages API stream events into chat.completion.chunk dicts, ending with a usage chunk.

    Content blocks are tracked by index, as the API numbers them: started in order, each delta and stop for a block
    that is open, every block stopped before `message_delta`. An event that breaks this is InvalidMessage.
    """

    def __init__(self) -> None:
        self.id = ""
        self.model = ""
        self.created = int(time.time())
        self.usage: dict = {}
        self.finish_reason: str | None = None
        self.tool_index = -1
        self.finished = False
        self.started = 0
        # index of each open block -> its chat tool call index (tool_use blocks) or -1
        self.open: dict[int, int] = {}

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    def _open_index(self, data: dict) -> int:
        index = _index(data)
        if index not in self.open:
            raise InvalidMessage(f"an event for content block {index}, which is not open")
        return index

    def feed(self, event: str, data: dict) -> list[dict]:
        """The chunks for one event; InvalidMessage if the event is malformed."""
        kind = data.get("type", event)
        if kind == "message_start":
            message = _object(data.get("message"), "message_start.message")
            self.id = f"chatcmpl-{_string(message.get('id'), 'message id')}"
            self.model = _string(message.get("model"), "message model")
            self.usage.update(_object(message.get("usage"), "message usage"))
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            return self._start(data)
        if kind == "content_block_delta":
            return self._delta(data)
        if kind == "content_block_stop":
            del self.open[self._open_index(data)]
            return []
        if kind in ("message_delta", "message_stop") and self.open:
            raise InvalidMessage(f"{kind} before content block {min(self.open)} stopped")
        if kind == "message_delta":
            self.finish_reason = _finish_reason(_object(data.get("delta"), "message_delta.delta").get("stop_reason"))
            usage = _object(data.get("usage"), "message_delta.usage")
            self.usage.update({k: v for k, v in usage.items() if v is not None})
            return []
        if kind == "message_stop":
            self.finished = True
            usage_chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                           "model": self.model, "choices": [], "usage": usage_from(self.usage)}
            return [self._chunk({}, self.finish_reason or "stop"), usage_chunk]
        return []

    def _start(self, data: dict) -> list[dict]:
        index = _index(data)
        if index != self.started:
            raise InvalidMessage(f"content block {index} started where block {self.started} was due")
        self.started += 1
        block = _object(data.get("content_block"), "content_block")
        kind = block.get("type")
        if type(kind) is not str:
            raise InvalidMessage("a content block has no type")
        self.open[index] = -1
        if kind == "tool_use":
            self.tool_index += 1
            self.open[index] = self.tool_index
            call = {"index": self.tool_index, "id": _string(block.get("id"), "a tool_use id"), "type": "function",
                    "function": {"name": _string(block.get("name"), "a tool_use name"), "arguments": ""}}
            return [self._chunk({"tool_calls": [call]})]
        if kind in ("text", "thinking") and (text := _string(block.get(kind), f"a {kind} block's {kind}")):
            return [self._chunk({"content" if kind == "text" else "reasoning_content": text})]
        return []

    def _delta(self, data: dict) -> list[dict]:
        tool = self.open[self._open_index(data)]
        delta = _object(data.get("delta"), "content_block_delta.delta")
        kind = delta.get("type")
        if type(kind) is not str:
            raise InvalidMessage("a content block delta has no type")
        if kind in _DELTA_TEXTS:
            source, field = _DELTA_TEXTS[kind]
            return [self._chunk({field: _string(delta.get(source), f"a {kind}")})]
        if kind == "input_json_delta":
            arguments = _string(delta.get("partial_json"), "an input_json delta")
            # Server tools (web search...) stream their input too; chat has no call for them.
            if tool < 0:
                return []
            return [self._chunk({"tool_calls": [{"index": tool, "function": {"arguments": arguments}}]})]
        if kind == "signature_delta":
            _string(delta.get("signature"), "a signature delta")
        return []
