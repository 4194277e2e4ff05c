"""Request bodies are read the way OpenAI reads them, without an engine."""

from __future__ import annotations

import pytest

from runtime import InvalidRequestError
from runtime.openai_io import parse_chat_messages, parse_completion_prompt, parse_sampling


def test_text_parts_are_joined_and_null_content_is_empty() -> None:
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]},
            {"role": "assistant", "content": None},
        ]
    }

    assert parse_chat_messages(body) == [{"role": "user", "content": "Hello, world"}, {"role": "assistant", "content": ""}]


def test_tool_calls_and_tool_results_reach_the_template_with_arguments_as_objects() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    body = {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "18 C"}]},
    ]}

    messages = parse_chat_messages(body)

    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert messages[2] == {"role": "tool", "content": "18 C", "tool_call_id": "call_1"}


@pytest.mark.parametrize("arguments", ["not json", "[1, 2]", "", "42"])
def test_arguments_that_are_no_json_object_count_as_none(arguments: str) -> None:
    call = {"type": "function", "function": {"name": "f", "arguments": arguments}}

    messages = parse_chat_messages({"messages": [{"role": "assistant", "content": "", "tool_calls": [call]}]})

    assert messages[0]["tool_calls"][0]["function"]["arguments"] == {}


@pytest.mark.parametrize("calls", [{"a": 1}, [{"type": "function"}], [{"type": "function", "function": {"name": 3}}],
                                   [{"type": "custom", "function": {"name": "f", "arguments": ""}}],
                                   [{"type": "function", "function": {"name": "f", "arguments": {}}}] * 129])
def test_malformed_tool_calls_in_history_are_refused(calls: object) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        parse_chat_messages({"messages": [{"role": "assistant", "content": "", "tool_calls": calls}]})
    assert raised.value.param is not None and raised.value.param.startswith("messages[0].tool_calls")


@pytest.mark.parametrize(("prompt", "expected"), [("hi", "hi"), (["hi"], "hi"), ([1, 2, 3], [1, 2, 3]), ([[1, 2]], [1, 2])])
def test_one_prompt_is_accepted_in_each_openai_form(prompt: object, expected: object) -> None:
    assert parse_completion_prompt({"prompt": prompt}) == expected


def test_batched_prompts_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match="one non-empty string"):
        parse_completion_prompt({"prompt": ["a", "b"]})


def test_max_completion_tokens_wins_over_max_tokens_and_defaults_follow_openai() -> None:
    sampling = parse_sampling({"max_tokens": 100, "max_completion_tokens": 7, "stop": "END"})

    assert sampling.max_tokens == 7
    assert sampling.stop == ["END"]
    assert (sampling.temperature, sampling.top_p, sampling.n) == (1.0, 1.0, 1)
    assert (sampling.logprobs, sampling.structured) == (None, None)


@pytest.mark.parametrize(("response_format", "structured"), [
    (None, None),
    ({"type": "text"}, None),
    ({"type": "json_object"}, {"json_object": True}),
    ({"type": "json_schema", "json_schema": {"name": "city", "schema": {"type": "object"}}}, {"json": {"type": "object"}}),
])
def test_response_formats_become_structured_outputs(response_format: object, structured: object) -> None:
    assert parse_sampling({"response_format": response_format}).structured == structured


@pytest.mark.parametrize(("response_format", "param", "code"), [
    ({"type": "json_schema"}, "response_format.json_schema", "invalid_value"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "object"}}, "response_format.json_schema",
     "invalid_value"),
    ({"type": "grammar"}, "response_format.type", "unsupported_value"),
    ("json", "response_format", "invalid_value"),
])
def test_bad_response_formats_are_refused_with_a_code(response_format: object, param: str, code: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        parse_sampling({"response_format": response_format})
    assert (raised.value.param, raised.value.code) == (param, code)


@pytest.mark.parametrize(("fields", "logprobs"), [
    ({"logprobs": True}, 0),
    ({"logprobs": True, "top_logprobs": 20}, 20),
    ({"logprobs": False}, None),
    ({"logprobs": False, "top_logprobs": 0}, None),
])
def test_chat_logprobs_say_how_many_alternatives(fields: dict, logprobs: int | None) -> None:
    assert parse_sampling(fields).logprobs == logprobs


@pytest.mark.parametrize(("fields", "chat", "param"), [
    ({"logprobs": True, "top_logprobs": 21}, True, "top_logprobs"),
    ({"top_logprobs": 3}, True, "top_logprobs"),
    ({"logprobs": 2}, True, "logprobs"),
    ({"logprobs": 21}, False, "logprobs"),
    ({"logprobs": True}, False, "logprobs"),
])
def test_logprobs_are_bounded(fields: dict, chat: bool, param: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        parse_sampling(fields, chat)
    assert (raised.value.param, raised.value.code) == (param, "invalid_value")


def test_completions_take_logprobs_as_a_count() -> None:
    assert parse_sampling({"logprobs": 5}, chat=False).logprobs == 5
    assert parse_sampling({"logprobs": 0}, chat=False).logprobs == 0


@pytest.mark.parametrize("field", ["functions", "echo", "suffix", "logit_bias"])
def test_unsupported_features_are_refused_not_ignored(field: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        parse_sampling({field: {"x": 1}})
    assert (raised.value.param, raised.value.code) == (field, "unsupported_parameter")
