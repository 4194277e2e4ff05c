"""The Messages API translated to and from chat completions, checked by the real anthropic SDK over HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anthropic
import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.messages_stream import MessagesStream
from gateway.api.messages_wire import count_tokens_answer, error_response, message_from_chat, translate_request
from gateway.errors import GatewayError

WORDS = ["Sunny", " and", " warm", " in", " Paris", "."]
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
USAGE = {"prompt_tokens": 40, "completion_tokens": 6, "total_tokens": 46, "prompt_tokens_details": {"cached_tokens": 8}}


def answer(chat: dict) -> tuple[dict, dict]:
    """What a chat model scripted by the request's model name answers: its message, and the rest of its choice."""
    model = chat["model"]
    results = [message["content"] for message in chat["messages"] if message["role"] == "tool"]
    if results:
        return {"role": "assistant", "content": f"Tool said: {results[-1]}"}, {"finish_reason": "stop"}
    if model == "tools":
        calls = [{"id": f"call_{city}", "type": "function",
                  "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
                 for city in ("Paris", "Oslo")[: 1 if chat.get("parallel_tool_calls") is False else 2]]
        return {"role": "assistant", "content": "Let me look.", "tool_calls": calls}, {"finish_reason": "tool_calls"}
    if model == "stopped":
        return {"role": "assistant", "content": "One, two"}, {"finish_reason": "stop", "stop_reason": "three"}
    if model == "length":
        return {"role": "assistant", "content": "".join(WORDS[:2])}, {"finish_reason": "length"}
    if model == "reasoning":
        return {"role": "assistant", "reasoning_content": "Think first.", "content": "".join(WORDS)}, \
            {"finish_reason": "stop"}
    return {"role": "assistant", "content": "".join(WORDS)}, {"finish_reason": "stop"}


def completion_for(chat: dict) -> dict:
    message, ending = answer(chat)
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "upstream-model",
            "choices": [{"index": 0, "message": message, **ending}], "usage": USAGE}


def chunks_for(chat: dict, pieces: int = 3) -> list[dict]:
    """The chat stream of the same answer: reasoning, text and each call's arguments cut in `pieces` parts."""
    message, ending = answer(chat)

    def chunk(delta: dict, **choice: object) -> dict:
        return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "upstream-model",
                "choices": [{"index": 0, "delta": delta, "finish_reason": None, **choice}]}

    def cut(text: str) -> list[str]:
        size = max(1, -(-len(text) // pieces))
        return [text[i:i + size] for i in range(0, len(text), size)]

    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"reasoning_content": piece}) for piece in cut(message.get("reasoning_content") or "")]
    out += [chunk({"content": piece}) for piece in cut(message.get("content") or "")]
    for index, call in enumerate(message.get("tool_calls") or []):
        out.append(chunk({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                          "function": {"name": call["function"]["name"], "arguments": ""}}]}))
        out += [chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
                for piece in cut(call["function"]["arguments"])]
    out.append(chunk({}, **ending))
    out.append({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
                "model": "upstream-model", "choices": [], "usage": USAGE})
    return out


class Door:
    """A minimal Messages door: translate, answer from the scripted model, write the answer back."""

    def __init__(self) -> None:
        self.requests: list = []

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body["model"].startswith("status-"):
            return error_response(GatewayError(int(body["model"][7:]), "Refused by the door."))
        try:
            translated = translate_request(body)
        except GatewayError as err:
            return error_response(err)
        self.requests.append(translated)
        if not translated.stream:
            return web.json_response(message_from_chat(completion_for(translated.chat), translated))
        stream = MessagesStream(translated, input_tokens=30)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunks = chunks_for(translated.chat)
        if translated.chat["model"] == "fail":
            for chunk in chunks[:2]:
                await response.write(b"".join(stream.feed(chunk)))
            await response.write(b"".join(stream.error(529, "Overloaded upstream.")))
            return response
        for chunk in chunks:
            await response.write(b"".join(stream.feed(chunk)))
        await response.write(b"".join(stream.finish()))
        return response

    async def count_tokens(self, request: web.Request) -> web.Response:
        translated = translate_request(await request.json(), counting=True)
        self.requests.append(translated)
        return web.json_response(count_tokens_answer(len(orjson.dumps(translated.chat["messages"])) // 4))


@pytest.fixture
async def served(aiohttp_server) -> AsyncIterator[tuple[anthropic.AsyncAnthropic, Door]]:
    door = Door()
    app = web.Application()
    app.router.add_post("/v1/messages", door.messages)
    app.router.add_post("/v1/messages/count_tokens", door.count_tokens)
    server = await aiohttp_server(app)
    async with anthropic.AsyncAnthropic(base_url=str(server.make_url("")), api_key="sk-ant-test",
                                        max_retries=0) as client:
        yield client, door


HI = [{"role": "user", "content": "Weather in Paris?"}]


async def test_text_answer_created_and_streamed(served) -> None:
    client, door = served
    message = await client.messages.create(model="text", max_tokens=100, system="Be brief.", messages=HI,
                                           stop_sequences=["END"], metadata={"user_id": "u-1"},
                                           extra_body={"temperature": 0.2, "top_k": 5})
    assert message.content[0].type == "text" and message.content[0].text == "".join(WORDS)
    assert message.id.startswith("msg_") and message.role == "assistant" and message.model == "text"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert (message.usage.input_tokens, message.usage.output_tokens) == (32, 6)
    assert message.usage.cache_read_input_tokens == 8 and message.usage.cache_creation_input_tokens == 0
    sent = door.requests[-1]
    assert sent.chat == {"model": "text", "max_tokens": 100, "temperature": 0.2, "stop": ["END"], "user": "u-1",
                         "messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Weather in Paris?"}]}
    assert sent.passthrough == {"top_k": 5}

    async with client.messages.stream(model="text", max_tokens=100, messages=HI) as stream:
        texts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(texts) == "".join(WORDS) and len(texts) > 1
    assert final.content[0].text == "".join(WORDS) and final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.cache_read_input_tokens) == (32, 6, 8)
    assert door.requests[-1].chat["stream_options"] == {"include_usage": True}


async def test_streamed_events_come_in_the_documented_order(served) -> None:
    client, _ = served
    events = [event async for event in await client.messages.create(model="text", max_tokens=10, messages=HI,
                                                                     stream=True)]
    names = [event.type for event in events]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"}
    assert events[0].message.usage.input_tokens == 30 and events[0].message.content == []


async def test_tool_use_round_trip(served) -> None:
    client, door = served
    first = await client.messages.create(model="tools", max_tokens=100, messages=HI, tools=[WEATHER],
                                         tool_choice={"type": "tool", "name": "get_weather",
                                                      "disable_parallel_tool_use": True})
    text, call = first.content
    assert text.text == "Let me look." and first.stop_reason == "tool_use"
    assert (call.type, call.id, call.name, call.input) == ("tool_use", "call_Paris", "get_weather", {"city": "Paris"})
    sent = door.requests[-1].chat
    assert sent["tools"] == [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["input_schema"],
                                                               "description": "Weather for a city"}}]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["parallel_tool_calls"] is False

    history = [*HI, {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                             "content": [{"type": "text", "text": "22C"}]},
                                            {"type": "text", "text": "Thanks."}]}]
    second = await client.messages.create(model="tools", max_tokens=100, messages=history, tools=[WEATHER])
    assert door.requests[-1].chat["messages"][1:] == [
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "call_Paris", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_Paris", "content": "22C"},
        {"role": "user", "content": [{"type": "text", "text": "Thanks."}]}]
    assert second.content[0].text == "Tool said: 22C" and second.stop_reason == "end_turn"


async def test_streamed_parallel_tool_calls(served) -> None:
    client, _ = served
    async with client.messages.stream(model="tools", max_tokens=100, messages=HI, tools=[WEATHER]) as stream:
        json_events = [event async for event in stream if event.type == "input_json"]
        final = await stream.get_final_message()
    assert [block.type for block in final.content] == ["text", "tool_use", "tool_use"]
    assert [block.input for block in final.content[1:]] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert final.stop_reason == "tool_use" and json_events[-1].snapshot == {"city": "Oslo"}


async def test_stop_sequences_and_max_tokens_are_named(served) -> None:
    client, _ = served
    stopped = await client.messages.create(model="stopped", max_tokens=10, messages=HI, stop_sequences=["three"])
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "three")
    async with client.messages.stream(model="stopped", max_tokens=10, messages=HI, stop_sequences=["three"]) as stream:
        final = await stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "three")
    cut = await client.messages.create(model="length", max_tokens=2, messages=HI)
    assert cut.stop_reason == "max_tokens" and cut.content[0].text == "".join(WORDS[:2])


async def test_reasoning_is_a_thinking_block_only_when_thinking_was_asked(served) -> None:
    client, door = served
    plain = await client.messages.create(model="reasoning", max_tokens=2000, messages=HI)
    assert [block.type for block in plain.content] == ["text"]
    thinking = {"type": "enabled", "budget_tokens": 1024}
    asked = await client.messages.create(model="reasoning", max_tokens=2000, messages=HI, thinking=thinking)
    async with client.messages.stream(model="reasoning", max_tokens=2000, messages=HI, thinking=thinking) as stream:
        streamed = await stream.get_final_message()
    for message in (asked, streamed):
        assert [block.type for block in message.content] == ["thinking", "text"]
        assert message.content[0].thinking == "Think first." and message.content[1].text == "".join(WORDS)
    assert door.requests[-1].passthrough == {"thinking": thinking}
    assert "thinking" not in door.requests[-1].chat


async def test_count_tokens(served) -> None:
    client, door = served
    counted = await client.messages.count_tokens(model="text", messages=HI, system="Be brief.", tools=[WEATHER])
    assert counted.input_tokens > 0
    assert "max_tokens" not in door.requests[-1].chat and door.requests[-1].chat["tools"][0]["function"]["name"] == \
        "get_weather"


async def test_a_failure_after_the_start_raises_in_the_sdk(served) -> None:
    client, _ = served
    async with client.messages.stream(model="fail", max_tokens=10, messages=HI) as stream:
        with pytest.raises(anthropic.APIStatusError) as caught:
            await stream.get_final_message()
    assert caught.value.body == {"type": "error", "error": {"type": "overloaded_error",
                                                            "message": "Overloaded upstream."}}


@pytest.mark.parametrize(("status", "error_class", "error_type"), [
    (400, anthropic.BadRequestError, "invalid_request_error"),
    (401, anthropic.AuthenticationError, "authentication_error"),
    (403, anthropic.PermissionDeniedError, "permission_error"),
    (404, anthropic.NotFoundError, "not_found_error"),
    (413, anthropic.ContentTooLargeError, "request_too_large"),
    (429, anthropic.RateLimitError, "rate_limit_error"),
    (500, anthropic.InternalServerError, "api_error"),
    (502, anthropic.InternalServerError, "api_error"),
    (529, anthropic.OverloadedError, "overloaded_error"),
])
async def test_each_error_is_the_sdks_own_exception(served, status: int, error_class: type, error_type: str) -> None:
    client, _ = served
    with pytest.raises(error_class) as caught:
        await client.messages.create(model=f"status-{status}", max_tokens=10, messages=HI)
    assert caught.value.status_code == status
    assert caught.value.body == {"type": "error", "error": {"type": error_type, "message": "Refused by the door."}}


async def test_a_malformed_request_is_an_invalid_request_naming_the_field(served) -> None:
    client, _ = served
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client.messages.create(model="text", max_tokens=10, messages=[{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "document", "source": {"type": "text", "data": "x",
                                                                             "media_type": "text/plain"}}]}])
    assert caught.value.body["error"]["message"].startswith("messages.0.content.1.type: ")


def _refused(body: dict) -> str:
    with pytest.raises(GatewayError) as caught:
        translate_request({"model": "m", "max_tokens": 5, "messages": HI, **body})
    assert caught.value.status == 400
    return caught.value.param or ""


@pytest.mark.parametrize(("body", "param"), [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "hi"}]}, "messages.0.role"),
    ({"system": [{"type": "image"}]}, "system.0"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
    ({"stop_sequences": "END"}, "stop_sequences"),
    ({"stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]},
     "messages.0.content.0.source"),
])
def test_what_cannot_be_served_is_a_400_naming_the_field(body: dict, param: str) -> None:
    assert _refused(body) == param


def test_blocks_become_chat_messages() -> None:
    translated = translate_request({
        "model": "m", "max_tokens": 5, "cache_control": {"type": "ephemeral"}, "service_tier": "auto",
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "Be kind."}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Hmm.", "signature": "sig"},
                {"type": "tool_use", "id": "toolu_1", "name": "look", "input": {"zoom": 2}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": False, "content": [
                    {"type": "text", "text": "A cat."},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "BBBB"}}]}]},
        ]})
    assert translated.chat["messages"] == [
        {"role": "system", "content": "Be brief.\n\nBe kind."},
        {"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "look", "arguments": '{"zoom":2}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "A cat."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,BBBB"}}]},
    ]
    assert translated.passthrough == {"cache_control": {"type": "ephemeral"}, "service_tier": "auto"}


def test_structured_output_becomes_a_json_schema_response_format() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    translated = translate_request({"model": "m", "max_tokens": 5, "messages": HI,
                                    "output_config": {"effort": "low", "format": {"type": "json_schema", "schema": schema}}})
    assert translated.chat["response_format"] == {"type": "json_schema",
                                                  "json_schema": {"name": "output", "schema": schema, "strict": True}}
    assert _refused({"output_config": {"format": {"type": "xml"}}}) == "output_config.format"


def test_arguments_that_are_not_a_json_object_become_an_empty_input() -> None:
    translated = translate_request({"model": "m", "max_tokens": 5, "messages": HI})
    completion = {"choices": [{"finish_reason": "tool_calls", "message": {"role": "assistant", "content": None,
               "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}},
                              {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "[1]"}}]}}]}
    message = message_from_chat(completion, translated)
    assert [(block["name"], block["input"]) for block in message["content"]] == [("f", {}), ("g", {})]
    assert message["usage"] == {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0,
                                "cache_read_input_tokens": 0,
                                "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}}


def _events(frames: list[bytes]) -> list[dict]:
    events = []
    for frame in b"".join(frames).split(b"\n\n")[:-1]:
        name_line, data_line = frame.split(b"\n")
        data = orjson.loads(data_line.removeprefix(b"data: "))
        assert name_line == b"event: " + data["type"].encode()
        events.append(data)
    return events


@settings(max_examples=60, deadline=None)
@given(pieces=st.integers(min_value=1, max_value=40), model=st.sampled_from(["text", "tools", "reasoning"]))
def test_however_the_upstream_cuts_its_stream_the_events_add_up(pieces: int, model: str) -> None:
    translated = translate_request({"model": model, "max_tokens": 50, "messages": HI, "tools": [WEATHER],
                                    "thinking": {"type": "enabled", "budget_tokens": 1024}, "stream": True})
    stream = MessagesStream(translated)
    events = _events([frame for chunk in chunks_for(translated.chat, pieces) for frame in stream.feed(chunk)]
                     + stream.finish())
    assert [event["type"] for event in events[:2]] == ["message_start", "ping"]
    blocks: list[dict] = []
    json_parts: dict[int, list[str]] = {}
    open_index = None
    for event in events:
        if event["type"] == "content_block_start":
            assert open_index is None and event["index"] == len(blocks)
            blocks.append(dict(event["content_block"]))
            open_index = event["index"]
        elif event["type"] == "content_block_delta":
            assert event["index"] == open_index
            delta, block = event["delta"], blocks[event["index"]]
            if delta["type"] == "input_json_delta":
                json_parts.setdefault(event["index"], []).append(delta["partial_json"])
            else:
                key = "text" if delta["type"] == "text_delta" else "thinking"
                block[key] += delta[key]
        elif event["type"] == "content_block_stop":
            assert event["index"] == open_index
            open_index = None
    for index, parts in json_parts.items():
        blocks[index]["input"] = json.loads("".join(parts))
    expected = message_from_chat(completion_for(translated.chat), translated)
    assert blocks == expected["content"]
    assert events[-2]["delta"]["stop_reason"] == expected["stop_reason"]
    assert events[-2]["usage"] == expected["usage"]


def test_a_call_without_an_id_gets_one_and_an_empty_answer_is_an_empty_text_block() -> None:
    translated = translate_request({"model": "m", "max_tokens": 5, "messages": HI, "stream": True})
    stream = MessagesStream(translated)
    frames = stream.feed({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"name": "f", "arguments": "{}"}}]}, "finish_reason": "tool_calls"}]})
    events = _events(frames + stream.finish())
    [start] = [event for event in events if event["type"] == "content_block_start"]
    assert start["content_block"]["id"].startswith("toolu_") and start["content_block"]["name"] == "f"
    assert events[-2]["delta"]["stop_reason"] == "tool_use" and events[-2]["usage"] == {"output_tokens": 0}

    empty = MessagesStream(translated)
    events = _events(empty.feed({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": "stop"}]})
                     + empty.finish())
    assert [event["type"] for event in events] == ["message_start", "ping", "content_block_start", "content_block_stop",
                                                   "message_delta", "message_stop"]
    assert events[2]["content_block"] == {"type": "text", "text": ""}


def test_a_call_forced_by_a_named_tool_choice_stops_as_tool_use() -> None:
    # Chat ends a call forced by a named tool_choice with "stop"; Anthropic clients wait for "tool_use" to run it.
    translated = translate_request({"model": "m", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}],
                                    "tools": [{"name": "weather", "input_schema": {"type": "object"}}],
                                    "tool_choice": {"type": "tool", "name": "weather"}})
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}
    completion = {"choices": [{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": None, "tool_calls": [call]}}]}
    assert message_from_chat(completion, translated)["stop_reason"] == "tool_use"
    plain = {"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hello"}}]}
    assert message_from_chat(plain, translated)["stop_reason"] == "end_turn"
    stream = MessagesStream(translated, input_tokens=3)
    events = stream.feed({"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}]})
    events += stream.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    events += stream.finish({"prompt_tokens": 3, "completion_tokens": 5})
    deltas = [orjson.loads(block.split(b"\ndata: ", 1)[1]) for block in events if block.startswith(b"event: message_delta")]
    assert deltas[0]["delta"]["stop_reason"] == "tool_use"


def test_text_deltas_written_from_prebuilt_bytes_are_the_documented_events() -> None:
    translated = translate_request({"model": "m", "max_tokens": 50, "stream": True,
                                    "messages": [{"role": "user", "content": "hi"}]})
    stream = MessagesStream(translated, input_tokens=3)
    pieces = ["Hel", 'lo "quoted" \\ \n', "\u00e9\u4e16\U0001f600", ""]
    events = []
    for number, piece in enumerate(pieces):
        delta = {"role": "assistant", "content": piece} if number == 0 else {"content": piece}
        events += stream.feed({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
    deltas = [orjson.loads(block.split(b"\ndata: ", 1)[1]) for block in events
              if block.startswith(b"event: content_block_delta\n")]
    assert deltas == [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
                      for piece in pieces[:3]]
    assert [list(data) for data in deltas] == [["type", "index", "delta"]] * 3
