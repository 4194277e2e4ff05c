"""The Responses API translated to and from chat completions, checked by the real openai SDK over HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import openai
import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.responses_stream import ResponsesStream
from gateway.api.responses_wire import response_from_chat, translate_request
from gateway.errors import GatewayError

WORDS = ["Sunny", " and", " warm", " in", " Paris", "."]
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}
USAGE = {"prompt_tokens": 40, "completion_tokens": 6, "total_tokens": 46, "prompt_tokens_details": {"cached_tokens": 8},
         "completion_tokens_details": {"reasoning_tokens": 2}}


def answer(chat: dict) -> tuple[dict, str]:
    """What a chat model scripted by the request's model name answers: its message and finish_reason."""
    model, last = chat["model"], chat["messages"][-1]
    if model == "tools" and last["role"] == "user":
        calls = [{"id": f"call_{city}", "type": "function",
                  "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
                 for city in ("Paris", "Oslo")[: 2 if chat.get("parallel_tool_calls") is not False else 1]]
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    if last["role"] == "tool":
        return {"role": "assistant", "content": f"Tool said: {last['content']}"}, "stop"
    if model == "reasoning":
        return {"role": "assistant", "reasoning_content": "Think first.", "content": "".join(WORDS)}, "stop"
    if model == "length":
        return {"role": "assistant", "content": "".join(WORDS[:2])}, "length"
    return {"role": "assistant", "content": "".join(WORDS)}, "stop"


def completion_for(chat: dict) -> dict:
    message, finish = answer(chat)
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "upstream-model",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": USAGE}


def chunks_for(chat: dict, pieces: int = 3) -> list[dict]:
    """The chat stream of the same answer: reasoning, text and each call's arguments cut in `pieces` parts."""
    message, finish = answer(chat)

    def chunk(delta: dict, finish_reason: str | None = None) -> dict:
        return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "upstream-model",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

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
    out.append(chunk({}, finish))
    out.append({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
                "model": "upstream-model", "choices": [], "usage": USAGE})
    return out


class Door:
    """A minimal Responses door: translate, answer from the scripted model, write the answer back."""

    def __init__(self) -> None:
        self.chats: list[dict] = []

    async def responses(self, request: web.Request) -> web.StreamResponse:
        try:
            translated = translate_request(await request.json())
        except GatewayError as err:
            return err.response()
        self.chats.append(translated.chat)
        if not translated.stream:
            return web.json_response(response_from_chat(completion_for(translated.chat), translated))
        stream = ResponsesStream(translated)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"".join(stream.start()))
        chunks = chunks_for(translated.chat)
        if translated.chat["model"] == "fail":
            for chunk in chunks[:2]:
                await response.write(b"".join(stream.feed(chunk)))
            await response.write(b"".join(stream.error("The upstream went away.", "server_error")))
            return response
        for chunk in chunks:
            await response.write(b"".join(stream.feed(chunk)))
        await response.write(b"".join(stream.finish()))
        return response


@pytest.fixture
async def served(aiohttp_server) -> AsyncIterator[tuple[openai.AsyncOpenAI, Door]]:
    door = Door()
    app = web.Application()
    app.router.add_post("/v1/responses", door.responses)
    server = await aiohttp_server(app)
    async with openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="sk-test", max_retries=0) as client:
        yield client, door


async def test_text_answer_created_and_streamed(served) -> None:
    client, door = served
    response = await client.responses.create(model="text", input="Weather in Paris?", instructions="Be brief.")
    assert response.output_text == "".join(WORDS)
    assert response.id.startswith("resp_") and response.status == "completed" and response.model == "text"
    assert response.output[0].id.startswith("msg_") and response.output[0].content[0].annotations == []
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (40, 6, 46)
    assert response.usage.input_tokens_details.cached_tokens == 8
    assert response.usage.output_tokens_details.reasoning_tokens == 2
    assert response.instructions == "Be brief." and response.tools == [] and response.tool_choice == "auto"
    assert door.chats[-1]["messages"] == [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Weather in Paris?"}]

    async with client.responses.stream(model="text", input="Weather in Paris?") as stream:
        deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == "".join(WORDS) and len(deltas) > 1
    assert final.output_text == "".join(WORDS) and final.status == "completed"
    assert final.usage is not None and final.usage.input_tokens == 40 and final.usage.output_tokens == 6
    assert door.chats[-1]["stream"] is True and door.chats[-1]["stream_options"] == {"include_usage": True}


async def test_streamed_events_come_in_the_documented_order(served) -> None:
    client, _ = served
    events = [event async for event in await client.responses.create(model="text", input="hi", stream=True)]
    names = [event.type for event in events]
    assert names[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert names[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert set(names[4:-4]) == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert events[-1].response.id == events[0].response.id


async def test_a_function_call_round_trip(served) -> None:
    client, door = served
    first = await client.responses.create(model="tools", input="Weather in Paris?", tools=[WEATHER],
                                          tool_choice={"type": "function", "name": "get_weather"},
                                          parallel_tool_calls=False)
    [call] = first.output
    assert call.type == "function_call" and call.id is not None and call.id.startswith("fc_")
    assert (call.call_id, call.name, json.loads(call.arguments)) == ("call_Paris", "get_weather", {"city": "Paris"})
    sent = door.chats[-1]
    assert sent["tools"] == [{"type": "function", "function": {k: WEATHER[k] for k in
                                                                ("name", "description", "parameters", "strict")}}]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["parallel_tool_calls"] is False
    assert first.parallel_tool_calls is False and first.tools[0].name == "get_weather"

    history = [{"role": "user", "content": "Weather in Paris?"}, *[item.model_dump(exclude_none=True) for item in first.output],
               {"type": "function_call_output", "call_id": call.call_id, "output": "22C"}]
    second = await client.responses.create(model="tools", input=history, tools=[WEATHER])
    assert second.output_text == "Tool said: 22C"
    assert door.chats[-1]["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_Paris", "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": "call_Paris", "content": "22C"}]


async def test_streamed_parallel_function_calls(served) -> None:
    client, _ = served
    async with client.responses.stream(model="tools", input="Weather in Paris and Oslo?", tools=[WEATHER]) as stream:
        argument_deltas = [event async for event in stream if event.type == "response.function_call_arguments.delta"]
        final = await stream.get_final_response()
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(c.call_id, json.loads(c.arguments)) for c in calls] == [("call_Paris", {"city": "Paris"}),
                                                                     ("call_Oslo", {"city": "Oslo"})]
    assert all(c.status == "completed" for c in calls)
    assert argument_deltas[-1].snapshot == calls[1].arguments
    assert final.output_text == ""


async def test_reasoning_comes_as_its_own_item(served) -> None:
    client, _ = served
    created = await client.responses.create(model="reasoning", input="hi")
    async with client.responses.stream(model="reasoning", input="hi") as stream:
        names = [event.type async for event in stream]
        streamed = await stream.get_final_response()
    for response in (created, streamed):
        reasoning, message = response.output
        assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_")
        assert reasoning.content is not None and reasoning.content[0].text == "Think first."
        assert message.type == "message" and response.output_text == "".join(WORDS)
    assert "response.reasoning_text.delta" in names and "response.reasoning_text.done" in names


async def test_a_cut_answer_is_incomplete(served) -> None:
    client, _ = served
    response = await client.responses.create(model="length", input="hi", max_output_tokens=2)
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens" and response.max_output_tokens == 2
    assert response.output[0].status == "incomplete" and response.output_text == "".join(WORDS[:2])
    events = [event async for event in await client.responses.create(model="length", input="hi", stream=True)]
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.output[0].content[0].text == "".join(WORDS[:2])


async def test_a_failure_after_the_start_raises_in_the_sdk(served) -> None:
    client, _ = served
    seen = []
    with pytest.raises(openai.APIError, match=r"The upstream went away\."):
        async for event in await client.responses.create(model="fail", input="hi", stream=True):
            seen.append(event.type)
    assert seen[-1] == "response.output_text.delta"


def test_a_failure_after_the_start_ends_with_error_and_failed() -> None:
    translated = translate_request({"model": "fail", "input": "hi", "stream": True})
    stream = ResponsesStream(translated)
    chunks = chunks_for(translated.chat)
    frames = [frame for chunk in chunks[:2] for frame in stream.feed(chunk)]
    error, failed = _events(frames + stream.error("The upstream went away.", "rate_limit_exceeded", "rate_limit_error"))[-2:]
    assert error == {"type": "error", "sequence_number": error["sequence_number"], "code": "rate_limit_exceeded",
                     "message": "The upstream went away.", "param": None,
                     "error": {"type": "rate_limit_error", "code": "rate_limit_exceeded",
                               "message": "The upstream went away.", "param": None}}
    assert failed["sequence_number"] == error["sequence_number"] + 1
    response = failed["response"]
    assert response["status"] == "failed" and response["id"] == stream.id
    assert response["error"] == {"code": "rate_limit_exceeded", "message": "The upstream went away."}
    [partial] = response["output"]
    assert partial["status"] == "incomplete"
    assert partial["content"][0]["text"] == chunks[1]["choices"][0]["delta"]["content"]


async def test_refusals_reach_the_sdk_as_bad_requests_naming_the_field(served) -> None:
    client, _ = served
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model="text", input="hi", previous_response_id="resp_123")
    assert caught.value.param == "previous_response_id" and "stateless" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model="text", input="hi", tools=[{"type": "web_search"}])
    assert caught.value.param == "tools[0].type"


def _refused(body: dict) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        translate_request({"model": "m", "input": "hi", **body})
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize(("body", "param"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"store": True}, "store"),
    ({"background": True}, "background"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"tools": [WEATHER, {"type": "file_search"}]}, "tools[1].type"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]}, "input[0].content[0]"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": 3}, "input"),
    ({"stream": 1}, "stream"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
    ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
])
def test_what_cannot_be_served_is_a_400_naming_the_field(body: dict, param: str) -> None:
    assert _refused(body).param == param


def test_the_fields_that_change_nothing_are_accepted() -> None:
    translated = translate_request({"model": "m", "input": "hi", "store": False, "background": False,
                                    "include": ["reasoning.encrypted_content"], "truncation": "auto",
                                    "service_tier": "auto", "previous_response_id": None})
    assert translated.chat == {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_items_become_chat_messages() -> None:
    translated = translate_request({
        "model": "m", "instructions": "Be brief.", "user": "u-1", "metadata": {"team": "x"}, "temperature": 0.2,
        "top_p": 0.9, "max_output_tokens": 64, "reasoning": {"effort": "low"},
        "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}},
        "input": [
            {"role": "developer", "content": "Answer in JSON."},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "What is this?"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
                {"type": "input_file", "filename": "a.pdf", "file_data": "data:application/pdf;base64,BBBB"}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
             "content": [{"type": "output_text", "text": "A cat.", "annotations": []}]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "ok"}]},
        ]})
    assert translated.chat == {
        "model": "m", "user": "u-1", "metadata": {"team": "x"}, "temperature": 0.2, "top_p": 0.9, "max_tokens": 64,
        "reasoning_effort": "low",
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"},
                                                                   "strict": True}},
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "system", "content": "Answer in JSON."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
                {"type": "file", "file": {"file_data": "data:application/pdf;base64,BBBB", "filename": "a.pdf"}}]},
            {"role": "assistant", "content": "A cat.",
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ]}
    assert translated.echo["text"]["format"]["name"] == "w" and translated.echo["max_output_tokens"] == 64
    assert translate_request({"model": "m", "input": "x", "text": {"format": {"type": "json_object"}}}) \
        .chat["response_format"] == {"type": "json_object"}


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
    translated = translate_request({"model": model, "input": "hi", "tools": [WEATHER], "stream": True})
    stream = ResponsesStream(translated)
    frames = [frame for chunk in chunks_for(translated.chat, pieces) for frame in stream.feed(chunk)]
    events = _events(frames + stream.finish())
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    expected = response_from_chat(completion_for(translated.chat), translated)
    shape = [(item["type"], item.get("content"), item.get("arguments"), item.get("call_id")) for item in final["output"]]
    assert shape == [(item["type"], item.get("content"), item.get("arguments"), item.get("call_id"))
                     for item in expected["output"]]
    assert final["usage"] == expected["usage"] and final["status"] == expected["status"] == "completed"
    done = {e["output_index"]: e["item"] for e in events if e["type"] == "response.output_item.done"}
    assert [done[i] for i in range(len(done))] == final["output"]


def test_a_call_without_an_id_gets_one_that_stays_the_same_and_an_empty_answer_is_an_empty_message() -> None:
    translated = translate_request({"model": "m", "input": "hi", "stream": True})
    stream = ResponsesStream(translated)
    call = {"index": 0, "function": {"name": "f", "arguments": '{"a":'}}
    frames = stream.feed({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
    frames += stream.feed({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]},
                                        "finish_reason": "tool_calls"}]})
    events = _events(frames + stream.finish())
    added, done = (next(e["item"] for e in events if e["type"] == kind)
                   for kind in ("response.output_item.added", "response.output_item.done"))
    assert added["call_id"] == done["call_id"] and added["call_id"].startswith("call_")
    assert done["arguments"] == '{"a":1}' and events[-1]["response"]["usage"]["total_tokens"] == 0

    empty = ResponsesStream(translated)
    events = _events(empty.feed({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": "stop"}]})
                     + empty.finish())
    [item] = events[-1]["response"]["output"]
    [unstreamed] = response_from_chat({"choices": [{"message": {"role": "assistant", "content": ""},
                                                    "finish_reason": "stop"}]}, translated)["output"]
    assert events[-1]["type"] == "response.completed"
    assert (item["type"], item["status"], item["content"]) == (unstreamed["type"], unstreamed["status"],
                                                               unstreamed["content"])
    assert item["content"] == [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]


def test_text_deltas_written_from_prebuilt_bytes_are_the_documented_events() -> None:
    translated = translate_request({"model": "m", "input": "hi", "stream": True})
    stream = ResponsesStream(translated)
    stream.start()
    pieces = ["Hel", 'lo "quoted" \\ \n', "\u00e9\u4e16\U0001f600", ""]
    events = []
    for number, piece in enumerate(pieces):
        delta = {"role": "assistant", "content": piece} if number == 0 else {"content": piece}
        events += stream.feed({"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]})
    parsed = [(block.split(b"\n")[0], orjson.loads(block.split(b"\ndata: ", 1)[1])) for block in events]
    deltas = [data for name, data in parsed if name == b"event: response.output_text.delta"]
    item_id = next(data["item"]["id"] for name, data in parsed if data["type"] == "response.output_item.added")
    first = deltas[0]["sequence_number"]
    assert deltas == [{"type": "response.output_text.delta", "sequence_number": first + number, "item_id": item_id,
                       "output_index": 0, "content_index": 0, "delta": piece, "logprobs": []}
                      for number, piece in enumerate(pieces[:3])]
    assert [list(data) for data in deltas] == [["type", "sequence_number", "item_id", "output_index", "content_index",
                                                "delta", "logprobs"]] * 3
