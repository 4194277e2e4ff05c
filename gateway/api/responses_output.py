"""Chat answers as Responses output: the response object, its output items and content parts, and token logprobs.

A message item holds an `output_text` part, then a `refusal` part when the model refused (a refusal alone is the only
part). Logprobs are read from the chat choice's `logprobs.content`; anything not in the documented shape counts as
none, never as a failure of the answer.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from gateway.api.wire import call_function, chat_tokens, first_choice, random_id, reasoning_of, text_of

if TYPE_CHECKING:
    from gateway.api.responses_wire import ResponsesRequest

MAX_TOP_LOGPROBS = 20
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def response_usage(usage: object) -> dict:
    """Chat usage as the Responses API counts it."""
    tokens = chat_tokens(usage)
    return {
        "input_tokens": tokens.prompt,
        "input_tokens_details": {"cached_tokens": tokens.cached, "cache_write_tokens": tokens.cache_write},
        "output_tokens": tokens.completion,
        "output_tokens_details": {"reasoning_tokens": tokens.reasoning},
        "total_tokens": tokens.prompt + tokens.completion,
    }


def outcome(finish_reason: object) -> tuple[str, dict | None]:
    """The response status and incomplete_details for a chat finish_reason."""
    reason = _INCOMPLETE.get(finish_reason) if type(finish_reason) is str else None
    return ("incomplete", {"reason": reason}) if reason else ("completed", None)


def response_object(request: ResponsesRequest, response_id: str, model: str, created_at: int, **state: object) -> dict:
    """A `response` object: the id, model and request echo, then the state given (status, output, usage...)."""
    response = {"id": response_id, "object": "response", "created_at": created_at, "model": model,
                "status": "in_progress", "error": None, "incomplete_details": None, "output": [], "usage": None,
                **request.echo, **state}
    if response["status"] == "completed":
        response["completed_at"] = int(time.time())
    return response


def output_text(text: str, logprobs: list[dict] | None = None) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs if logprobs is not None else []}


def refusal_part(refusal: str) -> dict:
    return {"type": "refusal", "refusal": refusal}


def reasoning_text(text: str) -> dict:
    return {"type": "reasoning_text", "text": text}


def message_item(item_id: str, content: list[dict], status: str) -> dict:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def reasoning_item(item_id: str, content: list[dict], status: str) -> dict:
    return {"id": item_id, "type": "reasoning", "status": status, "summary": [], "content": content}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id, "name": name,
            "arguments": arguments}


def _token(entry: object) -> dict | None:
    """A chat logprob entry's token, logprob and bytes (the token's UTF-8 when the upstream sent none); None if broken."""
    if type(entry) is not dict:
        return None
    token, logprob, given = entry.get("token"), entry.get("logprob"), entry.get("bytes")
    if type(token) is not str or type(logprob) not in (float, int):
        return None
    if given is None:
        given = list(token.encode(errors="replace"))
    elif type(given) is not list or not all(type(b) is int and 0 <= b <= 255 for b in given):
        return None
    return {"token": token, "logprob": logprob, "bytes": given}


def logprobs_of(value: object) -> list[dict]:
    """The Responses logprobs of a chat choice's `logprobs`; [] when absent or not in the documented shape.

    At most MAX_TOP_LOGPROBS alternatives per token are kept, whatever the upstream sent.
    """
    if type(value) is not dict or type(value.get("content")) is not list:
        return []
    out = []
    for entry in value["content"]:
        chosen = _token(entry)
        if chosen is None:
            return []
        given = entry.get("top_logprobs")
        if given is None:
            given = []
        elif type(given) is not list:
            return []
        alternatives = [_token(alternative) for alternative in given[:MAX_TOP_LOGPROBS]]
        if None in alternatives:
            return []
        chosen["top_logprobs"] = alternatives
        out.append(chosen)
    return out


def response_from_chat(completion: dict, request: ResponsesRequest, response_id: str | None = None) -> dict:
    """The Responses `response` object for a chat completion."""
    choice = first_choice(completion)
    message = choice.get("message") if type(choice.get("message")) is dict else {}
    status, incomplete = outcome(choice.get("finish_reason"))
    item_status = "incomplete" if incomplete else "completed"
    output = []
    if reasoning := reasoning_of(message):
        output.append(reasoning_item(random_id("rs_"), [reasoning_text(reasoning)], item_status))
    calls = [call for call in message.get("tool_calls") or [] if type(call) is dict]
    text, refusal = text_of(message.get("content")), text_of(message.get("refusal"))
    if text or refusal or not calls:
        content = []
        if text or not refusal:
            content.append(output_text(text, logprobs_of(choice.get("logprobs")) if request.logprobs else None))
        if refusal:
            content.append(refusal_part(refusal))
        output.append(message_item(random_id("msg_"), content, item_status))
    for call in calls:
        name, arguments = call_function(call)
        output.append(function_call_item(random_id("fc_"), text_of(call.get("id")) or random_id("call_"), name,
                                         arguments, item_status))
    created = completion.get("created")
    created_at = created if type(created) is int else int(time.time())
    return response_object(
        request, response_id or random_id("resp_"), text_of(request.chat.get("model")), created_at,
        status=status, incomplete_details=incomplete, output=output, usage=response_usage(completion.get("usage")),
    )
