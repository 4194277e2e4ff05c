"""OpenAI Responses API -> Chat Completions: a Responses request as a chat request (answers: responses_output).

Stateless only: nothing is stored, so the fields that name stored state (`previous_response_id`, `conversation`,
`prompt`, item references, `store: true`, `background: true`) are answered with a 400 naming the field.
Unknown top-level fields are a 400 too, as OpenAI answers them; fields OpenAI knows that change nothing once
translated to chat (`truncation`, `service_tier`, `include` values other than `message.output_text.logprobs`...)
are accepted and dropped. Logprobs are asked of chat when `top_logprobs` is given or `include` names them.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.api.responses_output import MAX_TOP_LOGPROBS
from gateway.api.wire import text_of
from gateway.errors import GatewayError, bad_request

_IGNORED = frozenset({
    "truncation", "service_tier", "prompt_cache_key", "prompt_cache_retention", "safety_identifier",
    "stream_options", "max_tool_calls", "store", "background",
})
_STATEFUL = ("previous_response_id", "conversation", "prompt", "context_management")
_TRANSLATED = frozenset({
    "model", "input", "instructions", "tools", "tool_choice", "text", "max_output_tokens", "temperature", "top_p",
    "user", "metadata", "parallel_tool_calls", "stream", "reasoning", "top_logprobs", "include", *_STATEFUL,
})
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_LOGPROBS_INCLUDE = "message.output_text.logprobs"


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    """A Responses request translated: the chat body to send, what every response object repeats of it, and whether
    the client asked for the tokens' logprobs."""

    chat: dict
    echo: dict
    stream: bool
    logprobs: bool


def _type_error(param: str, what: str) -> GatewayError:
    return bad_request(f"Invalid type for '{param}': expected {what}.", param, "invalid_type")


def _unsupported(param: str, message: str) -> GatewayError:
    return bad_request(message, param, "unsupported_parameter")


def _check_fields(body: dict) -> None:
    unknown = [name for name in body if name not in _TRANSLATED and name not in _IGNORED]
    if unknown:
        names = ", ".join(f"'{name}'" for name in unknown)
        raise bad_request(f"Unknown parameter: {names}.", unknown[0], "unknown_parameter")
    for name in _STATEFUL:
        if body.get(name) is not None:
            raise _unsupported(name, f"'{name}' is not supported: this gateway is stateless; send the whole "
                                     "conversation in 'input'.")
    for name in ("store", "background"):
        if body.get(name) is True:
            raise _unsupported(name, f"'{name}: true' is not supported: this gateway stores no responses.")


def _image(part: dict, param: str) -> dict:
    url = part.get("image_url")
    if type(url) is not str or not url:
        raise _unsupported(param, f"'{param}' needs an 'image_url' (a URL or a data URI): files are not stored here.")
    image: dict = {"url": url}
    if type(part.get("detail")) is str:
        image["detail"] = part["detail"]
    return {"type": "image_url", "image_url": image}


def _file(part: dict, param: str) -> dict:
    data = part.get("file_data")
    if type(data) is not str or not data:
        raise _unsupported(param, f"'{param}' needs 'file_data': files are not stored here.")
    file = {"file_data": data}
    if type(part.get("filename")) is str:
        file["filename"] = part["filename"]
    return {"type": "file", "file": file}


def _parts(content: list, param: str) -> list[dict]:
    parts = []
    for i, part in enumerate(content):
        where = f"{param}[{i}]"
        if type(part) is not dict:
            raise _type_error(where, "an object")
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            if type(part.get("text")) is not str:
                raise _type_error(f"{where}.text", "a string")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal":
            parts.append({"type": "text", "text": text_of(part.get("refusal"))})
        elif kind == "input_image":
            parts.append(_image(part, where))
        elif kind == "input_file":
            parts.append(_file(part, where))
        else:
            raise _unsupported(f"{where}.type", f"Content part type {kind!r} is not supported on this route.")
    return parts


def _joined(parts: list[dict], param: str) -> str:
    if any(part["type"] != "text" for part in parts):
        raise _unsupported(param, f"'{param}' may only hold text.")
    return "".join(part["text"] for part in parts)


def _message(item: dict, param: str) -> dict:
    given = item.get("role")
    role = _ROLES.get(given) if type(given) is str else None
    if role is None:
        raise bad_request(f"Invalid value for '{param}.role': {given!r}.", f"{param}.role", "invalid_value")
    content = item.get("content")
    if type(content) is str:
        return {"role": role, "content": content}
    if type(content) is not list:
        raise _type_error(f"{param}.content", "a string or an array of content parts")
    parts = _parts(content, f"{param}.content")
    return {"role": role, "content": parts if role == "user" else _joined(parts, f"{param}.content")}


def _required_string(item: dict, name: str, param: str) -> str:
    value = item.get(name)
    if type(value) is not str or not value:
        raise bad_request(f"Missing required parameter: '{param}.{name}'.", f"{param}.{name}", "missing_required_parameter")
    return value


def _function_call(item: dict, param: str) -> dict:
    arguments = item.get("arguments", "")
    if type(arguments) is not str:
        raise _type_error(f"{param}.arguments", "a string")
    return {"id": _required_string(item, "call_id", param), "type": "function",
            "function": {"name": _required_string(item, "name", param), "arguments": arguments}}


def _function_output(item: dict, param: str) -> dict:
    output = item.get("output")
    if type(output) is list:
        output = _joined(_parts(output, f"{param}.output"), f"{param}.output")
    elif type(output) is not str:
        raise _type_error(f"{param}.output", "a string or an array of text parts")
    return {"role": "tool", "tool_call_id": _required_string(item, "call_id", param), "content": output}


def _messages(body: dict) -> list[dict]:
    messages: list[dict] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if type(instructions) is not str:
            raise _type_error("instructions", "a string")
        messages.append({"role": "system", "content": instructions})
    given = body.get("input")
    if type(given) is str:
        return [*messages, {"role": "user", "content": given}]
    if type(given) is not list:
        raise (_type_error("input", "a string or an array of items") if given is not None
               else bad_request("Missing required parameter: 'input'.", "input", "missing_required_parameter"))
    for i, item in enumerate(given):
        param = f"input[{i}]"
        if type(item) is not dict:
            raise _type_error(param, "an object")
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, param))
        elif kind == "function_call":
            call = _function_call(item, param)
            last = messages[-1] if messages else None
            # One assistant turn in chat: the text the model said, then every call it made at once.
            if last is not None and last["role"] == "assistant" and type(last["content"]) is not list:
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append(_function_output(item, param))
        elif kind == "reasoning":
            continue
        elif kind == "item_reference":
            # The Vercel AI SDK sends earlier answers back as references unless told `store: false`.
            raise _unsupported(f"{param}.type", "Input items of type 'item_reference' cannot be resolved: this gateway "
                                                "stores no responses. Send the item itself (SDKs that refer to earlier "
                                                "output by id send it whole with 'store: false').")
        else:
            raise _unsupported(f"{param}.type", f"Input item type {kind!r} is not supported on this route.")
    return messages


def _tools(tools: object) -> list[dict]:
    if type(tools) is not list:
        raise _type_error("tools", "an array")
    out = []
    for i, tool in enumerate(tools):
        if type(tool) is not dict:
            raise _type_error(f"tools[{i}]", "an object")
        if tool.get("type") != "function":
            raise _unsupported(f"tools[{i}].type", f"Tool type {tool.get('type')!r} is not supported on this route: "
                                                    "only function tools are.")
        function = {"name": _required_string(tool, "name", f"tools[{i}]")}
        for name in ("description", "parameters", "strict"):
            if tool.get(name) is not None:
                function[name] = tool[name]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: object) -> object:
    if choice in ("auto", "none", "required"):
        return choice
    if type(choice) is dict and choice.get("type") == "function" and type(choice.get("name")) is str:
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _unsupported("tool_choice", "'tool_choice' must be 'auto', 'none', 'required' or a function on this route.")


def _response_format(text: object) -> dict | None:
    if type(text) is not dict:
        raise _type_error("text", "an object")
    fmt = text.get("format")
    if fmt is None or (type(fmt) is dict and fmt.get("type") == "text"):
        return None
    if type(fmt) is not dict:
        raise _type_error("text.format", "an object")
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        schema = {"name": _required_string(fmt, "name", "text.format")}
        for name in ("schema", "description", "strict"):
            if fmt.get(name) is not None:
                schema[name] = fmt[name]
        return {"type": "json_schema", "json_schema": schema}
    raise bad_request(f"Invalid value for 'text.format.type': {fmt.get('type')!r}.", "text.format.type", "invalid_value")


def _top_logprobs(body: dict) -> int | None:
    top = body.get("top_logprobs")
    if top is None:
        return None
    if type(top) is not int:
        raise _type_error("top_logprobs", "an integer")
    if top < 0:
        raise bad_request(f"Invalid 'top_logprobs': integer below minimum value. Expected a value >= 0, but got {top} "
                          "instead.", "top_logprobs", "integer_below_min_value")
    if top > MAX_TOP_LOGPROBS:
        raise bad_request(f"Invalid 'top_logprobs': integer above maximum value. Expected a value <= {MAX_TOP_LOGPROBS}, "
                          f"but got {top} instead.", "top_logprobs", "integer_above_max_value")
    return top


def _includes_logprobs(body: dict) -> bool:
    include = body.get("include")
    if include is None:
        return False
    if type(include) is not list or any(type(name) is not str for name in include):
        raise _type_error("include", "an array of strings")
    return _LOGPROBS_INCLUDE in include


def _echo(body: dict) -> dict:
    text = body.get("text") if type(body.get("text")) is dict else {}
    return {
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") or {},
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "previous_response_id": None,
        "reasoning": body.get("reasoning") or {"effort": None, "summary": None},
        "store": False,
        "temperature": body.get("temperature"),
        "text": {**text, "format": text.get("format") or {"type": "text"}},
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": body.get("tools") or [],
        "top_logprobs": body.get("top_logprobs"),
        "top_p": body.get("top_p"),
        "truncation": "disabled",
        "user": body.get("user"),
    }


def translate_request(body: dict) -> ResponsesRequest:
    """The chat request for a Responses request; GatewayError (400, naming the field) for what cannot be served."""
    _check_fields(body)
    if body.get("stream") is not None and type(body["stream"]) is not bool:
        raise _type_error("stream", "a boolean")
    stream = body.get("stream") is True
    messages = _messages(body)
    if not any(message["role"] != "system" for message in messages):
        raise bad_request("'input' must hold at least one message or item.", "input", "invalid_value")
    chat: dict = {"model": body.get("model"), "messages": messages}
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
        if body.get("parallel_tool_calls") is not None:
            chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    if body.get("text") is not None and (response_format := _response_format(body["text"])) is not None:
        chat["response_format"] = response_format
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p", "user", "metadata"):
        if body.get(name) is not None:
            chat[name] = body[name]
    reasoning = body.get("reasoning")
    if type(reasoning) is dict and reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]
    top_logprobs = _top_logprobs(body)
    logprobs = _includes_logprobs(body) or top_logprobs is not None
    if logprobs:
        chat["logprobs"] = True
        if top_logprobs is not None:
            chat["top_logprobs"] = top_logprobs
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return ResponsesRequest(chat, _echo(body), stream, logprobs)
