"""Chat completion chunks as the Responses API's streamed events, in the order the OpenAI SDKs accumulate them.

Per output item: `response.output_item.added`; for a message or reasoning, per content part (text, then a refusal
when the model refused) `response.content_part.added`, the part's deltas and `.done`, `response.content_part.done`;
for a function call its argument deltas and `.done`; then `response.output_item.done`. Around them
`response.created` and `response.in_progress` first, and `response.completed` (or `response.incomplete`) last,
every event with the next `sequence_number`. Text deltas carry the logprobs of their tokens when the client asked.
"""

from __future__ import annotations

import time

import orjson

from gateway.api.responses_output import (
    function_call_item,
    logprobs_of,
    message_item,
    outcome,
    output_text,
    reasoning_item,
    reasoning_text,
    refusal_part,
    response_object,
    response_usage,
)
from gateway.api.responses_wire import ResponsesRequest
from gateway.api.wire import call_function, first_choice, random_id, reasoning_of, sse, text_of, tool_call_deltas

# Content part types as the stream writes them: the item each lives in and its delta and done events.
_ITEM = {"output_text": "message", "refusal": "message", "reasoning_text": "reasoning"}
_DELTA = {"output_text": "response.output_text.delta", "refusal": "response.refusal.delta",
          "reasoning_text": "response.reasoning_text.delta"}
_DONE = {"output_text": "response.output_text.done", "refusal": "response.refusal.done",
         "reasoning_text": "response.reasoning_text.done"}
# A text delta is nearly every event of a stream: one without logprobs is written from bytes made when its part
# opens, in the key order the dict form would have, instead of building and serializing a dict per event.
_TEXT_DELTA_HEAD = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":'
_TEXT_DELTA_TAIL = b',"logprobs":[]}\n\n'


def _content_part(kind: str, text: str, logprobs: list[dict] | None = None) -> dict:
    if kind == "output_text":
        return output_text(text, logprobs)
    return refusal_part(text) if kind == "refusal" else reasoning_text(text)


class ResponsesStream:
    """Turns one chat stream into Responses events; `feed` each chunk, then `finish` (or `error` on a failure)."""

    def __init__(self, request: ResponsesRequest, response_id: str | None = None) -> None:
        self.request = request
        self.id = response_id or random_id("resp_")
        self.model = text_of(request.chat.get("model"))
        self.created_at = int(time.time())
        self.started = False
        self.finished = False
        self._sequence = 0
        self._items: list[dict] = []
        self._calls: dict[int, int] = {}
        self._arguments: dict[int, list[str]] = {}
        self._usage: object = None
        self._finish_reason: object = None
        self._wants_logprobs = request.logprobs
        # The message or reasoning item being written: its finished parts, and the open part's type and text so far.
        self._open_text: int | None = None
        self._parts: list[dict] = []
        self._part: str | None = None
        self._pieces: list[str] = []
        self._part_logprobs: list[dict] = []
        # Logprobs that came with no text (a token still half a character): they go with the next text delta.
        self._held_logprobs: list[dict] = []
        self._text_delta_fields = b""

    def _event(self, name: str, **fields: object) -> bytes:
        data = {"type": name, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return sse(name, data)

    def _response(self, **state: object) -> dict:
        return response_object(self.request, self.id, self.model, self.created_at, **state)

    def start(self) -> list[bytes]:
        """`response.created` and `response.in_progress`; sent by the first `feed` if not called before."""
        self.started = True
        response = self._response()
        return [self._event("response.created", response=response), self._event("response.in_progress", response=response)]

    def feed(self, chunk: dict) -> list[bytes]:
        """The events for one chat.completion.chunk (a usage-only chunk gives none: its usage waits for `finish`)."""
        out = [] if self.started else self.start()
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        choice = first_choice(chunk)
        delta = choice.get("delta")
        if type(delta) is dict:
            logprobs = logprobs_of(choice.get("logprobs")) if self._wants_logprobs else None
            if len(delta) == 1 and "content" in delta:
                self._text("output_text", text_of(delta["content"]), out, logprobs)
            else:
                self._text("reasoning_text", reasoning_of(delta), out)
                self._text("output_text", text_of(delta.get("content")), out, logprobs)
                self._text("refusal", text_of(delta.get("refusal")), out)
                for index, call in tool_call_deltas(delta):
                    self._call(index, call, out)
        if choice.get("finish_reason") is not None:
            self._finish_reason = choice["finish_reason"]
        return out

    def _open(self, kind: str, out: list[bytes]) -> None:
        """Opens the item and the first part of this content part type."""
        index = len(self._items)
        item_id = random_id("msg_" if _ITEM[kind] == "message" else "rs_")
        item = (message_item if _ITEM[kind] == "message" else reasoning_item)(item_id, [], "in_progress")
        self._items.append(item)
        self._open_text = index
        out.append(self._event("response.output_item.added", output_index=index, item=item))
        self._open_part(kind, out)

    def _open_part(self, kind: str, out: list[bytes]) -> None:
        index = self._open_text
        assert index is not None
        item_id, content_index = self._items[index]["id"], len(self._parts)
        self._part = kind
        if kind == "output_text":
            self._text_delta_fields = b',"item_id":"%s","output_index":%d,"content_index":%d,"delta":' % (
                item_id.encode(), index, content_index)
        out.append(self._event("response.content_part.added", item_id=item_id, output_index=index,
                               content_index=content_index, part=_content_part(kind, "")))

    def _text(self, kind: str, piece: str, out: list[bytes], logprobs: list[dict] | None = None) -> None:
        if not piece:
            if logprobs:
                self._held_logprobs += logprobs
            return
        # An open item always has an open part, so the same part type means the same item too.
        if self._part != kind:
            self._switch(kind, out)
        self._pieces.append(piece)
        if kind == "output_text":
            if not logprobs and not self._held_logprobs:
                out.append(_TEXT_DELTA_HEAD + b"%d" % self._sequence + self._text_delta_fields + orjson.dumps(piece)
                           + _TEXT_DELTA_TAIL)
                self._sequence += 1
                return
            if self._held_logprobs:
                logprobs, self._held_logprobs = [*self._held_logprobs, *(logprobs or ())], []
            self._part_logprobs += logprobs or ()
        index = self._open_text
        assert index is not None
        out.append(self._event(_DELTA[kind], item_id=self._items[index]["id"], output_index=index,
                               content_index=len(self._parts), delta=piece,
                               **({"logprobs": logprobs} if kind == "output_text" else {})))

    def _switch(self, kind: str, out: list[bytes]) -> None:
        """Opens a part of this type: in the open item if it can hold one, else in a new item."""
        index = self._open_text
        if index is not None and self._items[index]["type"] == _ITEM[kind]:
            self._close_part(out)
            self._open_part(kind, out)
            return
        if index is not None:
            self._close_text("completed", out)
        self._open(kind, out)

    def _close_part(self, out: list[bytes]) -> None:
        index, kind = self._open_text, self._part
        assert index is not None and kind is not None
        item_id, content_index, text = self._items[index]["id"], len(self._parts), "".join(self._pieces)
        if kind == "output_text":
            logprobs, self._held_logprobs = [*self._part_logprobs, *self._held_logprobs], []
            part = output_text(text, logprobs)
            out.append(self._event(_DONE[kind], item_id=item_id, output_index=index, content_index=content_index,
                                   text=text, logprobs=logprobs))
        else:
            part = _content_part(kind, text)
            out.append(self._event(_DONE[kind], item_id=item_id, output_index=index, content_index=content_index,
                                   **{"refusal" if kind == "refusal" else "text": text}))
        out.append(self._event("response.content_part.done", item_id=item_id, output_index=index,
                               content_index=content_index, part=part))
        self._parts.append(part)
        self._part, self._pieces, self._part_logprobs = None, [], []

    def _close_text(self, status: str, out: list[bytes]) -> None:
        index = self._open_text
        assert index is not None
        self._close_part(out)
        item = self._items[index]
        item = (message_item if item["type"] == "message" else reasoning_item)(item["id"], self._parts, status)
        self._items[index] = item
        self._open_text, self._parts = None, []
        out.append(self._event("response.output_item.done", output_index=index, item=item))

    def _call(self, chat_index: int, call: dict, out: list[bytes]) -> None:
        name, arguments = call_function(call)
        index = self._calls.get(chat_index)
        if index is None:
            if self._open_text is not None:
                self._close_text("completed", out)
            index = len(self._items)
            self._calls[chat_index] = index
            self._arguments[index] = []
            # The SDKs match a call's added and done events by call_id, so one is needed now even if the upstream sent none.
            item = function_call_item(random_id("fc_"), text_of(call.get("id")) or random_id("call_"), name, "",
                                      "in_progress")
            self._items.append(item)
            out.append(self._event("response.output_item.added", output_index=index, item=item))
        elif name and not self._items[index]["name"]:
            self._items[index]["name"] = name
        if arguments:
            self._arguments[index].append(arguments)
            out.append(self._event("response.function_call_arguments.delta", item_id=self._items[index]["id"],
                                   output_index=index, delta=arguments))

    def finish(self, usage: dict | None = None) -> list[bytes]:
        """The events that end the stream, ending with `response.completed` or `response.incomplete`.

        `usage` is the chat usage when it did not come in a fed chunk.
        """
        out = [] if self.started else self.start()
        self.finished = True
        if usage is not None:
            self._usage = usage
        status, incomplete = outcome(self._finish_reason)
        item_status = "incomplete" if incomplete else "completed"
        if not self._items:
            self._open("output_text", out)
        if self._open_text is not None:
            self._close_text(item_status, out)
        for index in self._calls.values():
            item = self._items[index]
            arguments = "".join(self._arguments.pop(index))
            out.append(self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                   arguments=arguments))
            item.update(arguments=arguments, status=item_status)
            out.append(self._event("response.output_item.done", output_index=index, item=item))
        response = self._response(status=status, incomplete_details=incomplete, output=self._items,
                                  usage=response_usage(self._usage))
        out.append(self._event(f"response.{status}", response=response))
        return out

    def error(self, message: str, code: str = "server_error", type_: str = "server_error") -> list[bytes]:
        """An `error` event and `response.failed`, for a failure after the stream began; the stream ends with them.

        The error event carries its fields both at the top, as documented, and nested under `error`, as OpenAI
        sends them: the openai SDKs raise an APIError for the nested form, and clients that follow the
        documented schema find the flat one.
        """
        out = [] if self.started else self.start()
        self.finished = True
        out.append(self._event("error", code=code, message=message, param=None,
                               error={"type": type_, "code": code, "message": message, "param": None}))
        out.append(self._event("response.failed", response=self._response(
            status="failed", error={"code": code, "message": message}, output=self._partial_output(),
            usage=response_usage(self._usage))))
        return out

    def _partial_output(self) -> list[dict]:
        """The output items as they stand, those still open marked incomplete with what they hold so far."""
        output = []
        for index, item in enumerate(self._items):
            if index == self._open_text:
                parts = [*self._parts]
                if self._part is not None:
                    parts.append(_content_part(self._part, "".join(self._pieces), self._part_logprobs))
                item = (message_item if item["type"] == "message" else reasoning_item)(item["id"], parts, "incomplete")
            elif index in self._arguments:
                item = {**item, "arguments": "".join(self._arguments[index]), "status": "incomplete"}
            output.append(item)
        return output
