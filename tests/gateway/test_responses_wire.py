"""The Responses API translated to and from chat completions, checked by the real openai SDK over HTTP."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

import openai
import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.responses_output import response_from_chat
from gateway.api.responses_stream import ResponsesStream
from gateway.api.responses_wire import translate_request
from gateway.errors import GatewayError
from tests.conftest import sdk
from tests.fakes.openai_upstream import Answer, FakeOpenAI

WORDS = ["Sunny", " and", " warm", " in", " Paris", "."]
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}
REFUSAL = "I can't help with that."
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
    if model == "refusal":
        return {"role": "assistant", "content": None, "refusal": REFUSAL}, "stop"
    if model == "text-then-refusal":
        return {"role": "assistant", "content": "".join(WORDS), "refusal": REFUSAL}, "stop"
    return {"role": "assistant", "content": "".join(WORDS)}, "stop"


def tokens_of(text: str) -> list[str]:
    return [token for token in re.split(r"(?= )", text) if token]


def logprob_entries(chat: dict, tokens: list[str], first: int = 0) -> dict | None:
    """The chat logprobs of these tokens when the request asked; the model `many-top` sends 30 alternatives whatever
    was asked."""
    if not chat.get("logprobs"):
        return None
    alternatives = 30 if chat["model"] == "many-top" else chat.get("top_logprobs", 0)

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**entry(token, -0.125 * (first + i)),
                         "top_logprobs": [entry(f"{token}~{k}", -1.0 - k) for k in range(alternatives)]}
                        for i, token in enumerate(tokens)], "refusal": None}


def completion_for(chat: dict) -> dict:
    message, finish = answer(chat)
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "upstream-model",
            "choices": [{"index": 0, "message": message, "finish_reason": finish,
                         "logprobs": logprob_entries(chat, tokens_of(message.get("content") or ""))}], "usage": USAGE}


def chunks_for(chat: dict, pieces: int = 3) -> list[dict]:
    """The chat stream of the same answer: reasoning, text, refusal and each call's arguments cut in `pieces` parts
    (text with logprobs in groups of whole tokens)."""
    message, finish = answer(chat)

    def chunk(delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
        return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "upstream-model",
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}

    def cut(text: str | list[str]) -> list:
        size = max(1, -(-len(text) // pieces))
        return [text[i:i + size] for i in range(0, len(text), size)]

    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"reasoning_content": piece}) for piece in cut(message.get("reasoning_content") or "")]
    if chat.get("logprobs"):
        groups, done = cut(tokens_of(message.get("content") or "")), 0
        for group in groups:
            out.append(chunk({"content": "".join(group)}, None, logprob_entries(chat, group, done)))
            done += len(group)
    else:
        out += [chunk({"content": piece}) for piece in cut(message.get("content") or "")]
    out += [chunk({"refusal": piece}) for piece in cut(message.get("refusal") or "")]
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
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": -1}, "top_logprobs"),
    ({"top_logprobs": True}, "top_logprobs"),
    ({"include": "message.output_text.logprobs"}, "include"),
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


@settings(max_examples=80, deadline=None)
@given(pieces=st.integers(min_value=1, max_value=40),
       model=st.sampled_from(["text", "tools", "reasoning", "refusal", "text-then-refusal", "many-top"]),
       top_logprobs=st.none() | st.integers(min_value=0, max_value=20))
def test_however_the_upstream_cuts_its_stream_the_events_add_up(pieces: int, model: str, top_logprobs: int | None) -> None:
    translated = translate_request({"model": model, "input": "hi", "tools": [WEATHER], "stream": True,
                                    "top_logprobs": top_logprobs})
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


async def test_a_refusal_is_a_refusal_part_whole_and_streamed(served) -> None:
    client, _ = served
    created = await client.responses.create(model="refusal", input="Help me with something bad.")
    async with client.responses.stream(model="refusal", input="Help me with something bad.") as stream:
        events = [event async for event in stream]
        streamed = await stream.get_final_response()
    for response in (created, streamed):
        [message] = response.output
        assert message.type == "message" and [part.model_dump() for part in message.content] == [
            {"type": "refusal", "refusal": REFUSAL}]
        assert response.output_text == "" and response.status == "completed"
    assert [event.type for event in events][2:5] == ["response.output_item.added", "response.content_part.added",
                                                     "response.refusal.delta"]
    assert events[3].part.model_dump() == {"type": "refusal", "refusal": ""}
    deltas = [event for event in events if event.type == "response.refusal.delta"]
    assert "".join(event.delta for event in deltas) == REFUSAL and len(deltas) > 1
    assert all((event.item_id, event.output_index, event.content_index) == (message.id, 0, 0) for event in deltas)
    tail = events[events.index(deltas[-1]) + 1:]
    assert [event.type for event in tail] == ["response.refusal.done", "response.content_part.done",
                                              "response.output_item.done", "response.completed"]
    assert tail[0].refusal == REFUSAL and tail[1].part.model_dump() == {"type": "refusal", "refusal": REFUSAL}


async def test_text_then_a_refusal_come_as_two_parts_of_one_message(served) -> None:
    client, _ = served
    created = await client.responses.create(model="text-then-refusal", input="hi")
    events = [event async for event in await client.responses.create(model="text-then-refusal", input="hi", stream=True)]
    streamed = events[-1].response
    for response in (created, streamed):
        [message] = response.output
        assert [part.type for part in message.content] == ["output_text", "refusal"]
        assert response.output_text == "".join(WORDS) and message.content[1].refusal == REFUSAL
    parts = [(event.type, event.content_index, event.part.type) for event in events if "content_part" in event.type]
    assert parts == [("response.content_part.added", 0, "output_text"), ("response.content_part.done", 0, "output_text"),
                     ("response.content_part.added", 1, "refusal"), ("response.content_part.done", 1, "refusal")]
    assert {event.content_index for event in events if event.type.startswith("response.refusal.")} == {1}


def _spelled(logprobs: list) -> str:
    return "".join(entry.token for entry in logprobs)


async def test_logprobs_asked_for_come_with_the_text_whole_and_streamed(served) -> None:
    client, door = served
    include = ["message.output_text.logprobs"]
    created = await client.responses.create(model="text", input="hi", top_logprobs=2, include=include)
    assert (door.chats[-1]["logprobs"], door.chats[-1]["top_logprobs"]) == (True, 2)
    [entry, *_] = created.output[0].content[0].logprobs
    assert created.top_logprobs == 2
    assert entry.model_dump() == {"token": "Sunny", "logprob": -0.0, "bytes": list(b"Sunny"), "top_logprobs": [
        {"token": "Sunny~0", "logprob": -1.0, "bytes": list(b"Sunny~0")},
        {"token": "Sunny~1", "logprob": -2.0, "bytes": list(b"Sunny~1")}]}
    assert _spelled(created.output[0].content[0].logprobs) == created.output_text

    async with client.responses.stream(model="text", input="hi", top_logprobs=2, include=include) as stream:
        events = [event async for event in stream]
        streamed = await stream.get_final_response()
    deltas = [event for event in events if event.type == "response.output_text.delta"]
    assert len(deltas) > 1 and all(_spelled(event.logprobs) == event.delta for event in deltas)
    assert all(len(entry.top_logprobs) == 2 for event in deltas for entry in event.logprobs)
    [done] = [event for event in events if event.type == "response.output_text.done"]
    assert [e.token for e in done.logprobs] == [e.token for event in deltas for e in event.logprobs]
    assert [e.model_dump() for e in streamed.output[0].content[0].logprobs] == \
        [e.model_dump() for e in created.output[0].content[0].logprobs]

    await client.responses.create(model="text", input="hi", include=include)
    assert door.chats[-1]["logprobs"] is True and "top_logprobs" not in door.chats[-1]
    plain = await client.responses.create(model="text", input="hi")
    assert "logprobs" not in door.chats[-1] and plain.output[0].content[0].logprobs == []


async def test_logprobs_are_bounded_and_out_of_bounds_is_openais_400(served) -> None:
    client, _ = served
    created = await client.responses.create(model="many-top", input="hi", top_logprobs=3)
    events = [event async for event in await client.responses.create(model="many-top", input="hi", top_logprobs=3,
                                                                      stream=True)]
    deltas = [event for event in events if event.type == "response.output_text.delta"]
    for entries in (created.output[0].content[0].logprobs, *(event.logprobs for event in deltas)):
        assert entries and all(len(entry.top_logprobs) == 20 for entry in entries)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model="text", input="hi", top_logprobs=21)
    assert caught.value.status_code == 400 and caught.value.param == "top_logprobs"
    assert caught.value.body == {"message": "Invalid 'top_logprobs': integer above maximum value. Expected a value <= 20, "
                                            "but got 21 instead.", "type": "invalid_request_error",
                                 "param": "top_logprobs", "code": "integer_above_max_value"}


ENTRY = {"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": []}
MALFORMED_LOGPROBS = [
    "garbage", [ENTRY], {"content": "garbage"}, {"content": [ENTRY, "x"]}, {"content": [{**ENTRY, "token": 5}]},
    {"content": [{**ENTRY, "logprob": "low"}]}, {"content": [{**ENTRY, "logprob": True}]},
    {"content": [{**ENTRY, "bytes": [72, 300]}]}, {"content": [{**ENTRY, "bytes": "Hi"}]},
    {"content": [{**ENTRY, "top_logprobs": {"token": "Hi"}}]}, {"content": [{**ENTRY, "top_logprobs": [None]}]},
    {"content": [{**ENTRY, "top_logprobs": [{"token": "Ho"}]}]},
]


@pytest.mark.parametrize("logprobs", MALFORMED_LOGPROBS)
def test_malformed_upstream_logprobs_count_as_none(logprobs: object) -> None:
    translated = translate_request({"model": "m", "input": "hi", "top_logprobs": 1})
    whole = response_from_chat({"choices": [{"message": {"role": "assistant", "content": "Hi"}, "logprobs": logprobs,
                                             "finish_reason": "stop"}]}, translated)
    assert whole["output"][0]["content"] == [{"type": "output_text", "text": "Hi", "annotations": [], "logprobs": []}]
    stream = ResponsesStream(translate_request({"model": "m", "input": "hi", "top_logprobs": 1, "stream": True}))
    events = _events(stream.feed({"choices": [{"index": 0, "delta": {"content": "Hi"}, "logprobs": logprobs}]})
                     + stream.finish())
    assert [e["logprobs"] for e in events if e["type"].startswith("response.output_text.")] == [[], []]
    assert events[-1]["response"]["output"][0]["content"] == whole["output"][0]["content"]


def test_logprobs_of_a_chunk_without_text_go_with_the_next_delta_and_bytes_default_to_the_tokens() -> None:
    stream = ResponsesStream(translate_request({"model": "m", "input": "hi", "include": ["message.output_text.logprobs"],
                                                "stream": True}))
    half = {"token": "\ufffd", "logprob": -1.0, "bytes": [0xE2, 0x82]}
    frames = stream.feed({"choices": [{"index": 0, "delta": {"content": ""}, "logprobs": {"content": [half]}}]})
    frames += stream.feed({"choices": [{"index": 0, "delta": {"content": "\u20ac!"},
                                        "logprobs": {"content": [{"token": "\u20ac!", "logprob": -0.5, "bytes": None}]}}]})
    [delta] = [e for e in _events(frames + stream.finish()) if e["type"] == "response.output_text.delta"]
    assert delta["logprobs"] == [{**half, "top_logprobs": []},
                                 {"token": "\u20ac!", "logprob": -0.5, "bytes": list("\u20ac!".encode()), "top_logprobs": []}]


GUARDED = """
providers:
  up: {{type: openai, base_url: "{url}"}}
routes:
  open: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
  masked: {{targets: [{{provider: up, model: gpt-4o-mini}}], guardrails: {{output: {{pii: mask}}}}}}
guardrails:
  pii: {{entities: [EMAIL_ADDRESS]}}
"""
PII_PIECES = ["Write to jane.do", "e@example.com", " today."]


async def test_a_masking_route_answers_with_no_logprobs_through_the_gateway(make_gateway, aiohttp_server) -> None:
    fake = FakeOpenAI(answer=Answer(content=PII_PIECES, logprobs=True))
    upstream = await aiohttp_server(fake.app())
    client = sdk(await make_gateway(GUARDED, url=str(upstream.make_url("/v1"))))
    include = ["message.output_text.logprobs"]
    for route, kept in (("open", True), ("masked", False)):
        whole = await client.responses.create(model=route, input="hi", top_logprobs=1, include=include)
        assert fake.requests[-1][1]["logprobs"] is True and fake.requests[-1][1]["top_logprobs"] == 1
        async with client.responses.stream(model=route, input="hi", include=include) as stream:
            deltas = [event.logprobs async for event in stream if event.type == "response.output_text.delta"]
            streamed = await stream.get_final_response()
        assert ("jane.doe@example.com" in whole.output_text) is kept and whole.output_text == streamed.output_text
        assert [_spelled(entries) for entries in deltas] == (PII_PIECES if kept else [""] * len(deltas))
        for response in (whole, streamed):
            assert _spelled(response.output[0].content[0].logprobs) == ("".join(PII_PIECES) if kept else "")
