"""Tool requests are checked, planned and read with vLLM's parsers and the real tokenizer, without an engine."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from runtime import InvalidRequestError, RuntimeFailure
from runtime.logprobs import Logprobs
from runtime.tools import ToolSupport, compose_parser, template_takes_tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS_TEMPLATE = ("{% for tool in tools or [] %}{{ tool.function.name }}\n{% endfor %}"
                  "{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}")


def support(tokenizer: Any, parser: str | None = None, takes_tools: bool | None = None) -> ToolSupport:
    takes = template_takes_tools(tokenizer) if takes_tools is None else takes_tools
    return ToolSupport("small", tokenizer, compose_parser(tokenizer, parser, "small"), parser, takes)


def body(**fields: Any) -> dict[str, Any]:
    return {"messages": QUESTION, "tools": [WEATHER, TIME], **fields}


def test_a_request_without_tools_has_no_plan_and_may_not_force_a_call(tokenizer: Any) -> None:
    assert support(tokenizer).plan({"messages": QUESTION}) is None
    assert support(tokenizer).plan({"messages": QUESTION, "tools": [], "tool_choice": "auto"}) is None
    with pytest.raises(InvalidRequestError) as raised:
        support(tokenizer).plan({"messages": QUESTION, "tool_choice": "required"})
    assert raised.value.param == "tool_choice"


def test_the_small_models_template_does_not_take_tools_and_a_tool_template_does(tokenizer: Any) -> None:
    tooled = copy.deepcopy(tokenizer)
    tooled.chat_template = TOOLS_TEMPLATE

    assert template_takes_tools(tokenizer) is False
    assert template_takes_tools(tooled) is True


def test_auto_without_a_tool_parser_is_a_400_naming_the_setting(tokenizer: Any) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        support(tokenizer).plan(body())  # tools without tool_choice mean "auto", as OpenAI reads them

    assert (raised.value.param, raised.value.code) == ("tool_choice", "unsupported_value")
    assert "tool_parser" in raised.value.message


def test_auto_with_a_template_that_cannot_take_tools_is_a_400_naming_the_template(tokenizer: Any) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        support(tokenizer, "hermes").plan(body(tool_choice="auto"))

    assert (raised.value.param, raised.value.code) == ("tool_choice", "unsupported_value")
    assert "chat template" in raised.value.message


def test_auto_with_a_parser_and_a_tool_template_is_planned(tokenizer: Any) -> None:
    plan = support(tokenizer, "hermes", takes_tools=True).plan(body(tool_choice="auto"))

    assert plan is not None and plan.choice == "auto"
    assert plan.tools == [WEATHER, TIME]


def test_a_named_function_is_held_to_its_parameters_schema(tokenizer: Any) -> None:
    plan = support(tokenizer).plan(body(tool_choice={"type": "function", "function": {"name": "get_weather"}}))

    assert plan is not None and plan.choice == "named"
    assert plan.structured.json == WEATHER["function"]["parameters"]


def test_required_is_held_to_a_list_of_calls_of_the_given_functions(tokenizer: Any) -> None:
    plan = support(tokenizer).plan(body(tool_choice="required"))

    schema = plan.structured.json
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert [option["properties"]["name"]["enum"] for option in schema["items"]["anyOf"]] == [["get_weather"], ["get_time"]]


def test_tool_choice_none_passes_the_tools_to_the_template_and_reads_no_calls(tokenizer: Any) -> None:
    plan = support(tokenizer).plan(body(tool_choice="none"))

    assert plan is not None and plan.tools == [WEATHER, TIME]
    assert plan.for_choice([1, 2]) is None and plan.structured is None


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"tool_choice": {"type": "function", "function": {"name": "get_stock"}}}, "tool_choice.function.name",
     "invalid_value"),
    ({"tool_choice": "sometimes"}, "tool_choice", "invalid_value"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]", "unsupported_value"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "none"}}]},
     "tools[0].function.parameters", "invalid_value"),
    ({"tools": [WEATHER] * 129}, "tools", "invalid_value"),
])
def test_bad_tools_and_choices_are_400s_naming_the_field(tokenizer: Any, fields: dict, param: str, code: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        support(tokenizer).plan(body(tool_choice="required") | fields)
    assert (raised.value.param, raised.value.code) == (param, code)


def test_an_unknown_or_unfit_tool_parser_fails_the_start_with_its_reason(tokenizer: Any) -> None:
    with pytest.raises(RuntimeFailure, match=r"unknown tool_parser 'hermes2'.*hermes"):
        compose_parser(tokenizer, "hermes2", "small")
    # Llama 3's parser needs a special token this tokenizer lacks.
    with pytest.raises(RuntimeFailure, match="cannot serve this model"):
        compose_parser(tokenizer, "llama3_json", "small")


def test_required_calls_stream_as_argument_deltas_that_add_up_to_the_whole_call(tokenizer: Any) -> None:
    plan = support(tokenizer).plan(body(tool_choice="required"))
    answer = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]'
    streamed, whole = plan.for_choice([1]), plan.for_choice([1])

    deltas = [streamed.delta(answer[i:i + 4], [0], finished=i + 4 >= len(answer)) for i in range(0, len(answer), 4)]
    content, calls = whole.whole(answer, [0])

    pieces = [call for delta in deltas if delta for call in delta.get("tool_calls", [])]
    assert [(p["index"], p["function"]["name"]) for p in pieces if "id" in p] == [(0, "get_weather"), (1, "get_time")]
    for index, call in enumerate(calls):
        arguments = "".join(p["function"].get("arguments", "") for p in pieces if p["index"] == index)
        assert json.loads(arguments) == json.loads(call["function"]["arguments"])
    assert content is None
    assert [json.loads(call["function"]["arguments"]) for call in calls] == [{"city": "Paris"}, {}]
    assert all(call["id"].startswith("chatcmpl-tool-") and call["type"] == "function" for call in calls)
    assert (whole.finish_reason("stop"), whole.finish_reason("length")) == ("tool_calls", "length")


def test_a_named_call_ends_with_stop_and_parallel_calls_can_be_turned_off(tokenizer: Any) -> None:
    named = support(tokenizer).plan(body(tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    single = support(tokenizer).plan(body(tool_choice="required", parallel_tool_calls=False))

    named_reading = named.for_choice([1])
    _, calls = named_reading.whole('{"city": "Paris"}', [0])
    single_reading = single.for_choice([1])
    _, only = single_reading.whole('[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
                                   '{"name": "get_time", "parameters": {}}]', [0])

    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert named_reading.finish_reason("stop") == "stop"
    assert [call["function"]["name"] for call in only] == ["get_weather"]


def test_logprob_bytes_are_the_tokens_own_even_inside_a_character(tokenizer: Any) -> None:
    from vllm.logprobs import Logprob

    text = "naïve 日本語"
    ids = tokenizer.encode(text, add_special_tokens=False)
    steps = [{token_id: Logprob(-0.5, 1, tokenizer.decode([token_id]))} for token_id in ids]

    content = Logprobs(tokenizer).chat(ids, steps, 0)

    assert b"".join(bytes(entry["bytes"]) for entry in content).decode() == text
    assert any("\ufffd" in entry["token"] for entry in content), "a character spans several tokens"


@pytest.fixture(scope="module")
def logprobs(tokenizer: Any) -> Logprobs:
    return Logprobs(tokenizer)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=40).filter(lambda text: "<" not in text))
def test_logprob_bytes_of_any_text_add_up_to_its_utf8(tokenizer: Any, logprobs: Logprobs, text: str) -> None:
    from vllm.logprobs import Logprob

    ids = tokenizer.encode(text, add_special_tokens=False)
    assume(tokenizer.decode(ids) == text)  # a few rare characters the vocabulary cannot spell are lost on the way
    steps = [{token_id: Logprob(-1.0, 1, tokenizer.decode([token_id]))} for token_id in ids]

    content = logprobs.chat(ids, steps, 0)

    assert b"".join(bytes(entry["bytes"]) for entry in content) == text.encode()


def test_top_logprobs_are_the_most_likely_by_rank_and_special_tokens_are_left_out(tokenizer: Any) -> None:
    from vllm.logprobs import Logprob

    paris, the, a = (tokenizer.encode(word, add_special_tokens=False)[0] for word in (" Paris", " the", " a"))
    end = tokenizer.eos_token_id
    # vLLM puts the chosen token first whatever its rank.
    steps = [{the: Logprob(-2.0, 2, " the"), paris: Logprob(-0.5, 1, " Paris"), a: Logprob(-3.0, 3, " a")},
             {end: Logprob(-0.1, 1, "<|im_end|>")}]

    chat = Logprobs(tokenizer).chat([the, end], steps, 2)
    legacy = Logprobs(tokenizer).legacy([the, end], steps, 1, offset=4)

    assert chat == [{"token": " the", "logprob": -2.0, "bytes": list(b" the"), "top_logprobs": [
        {"token": " Paris", "logprob": -0.5, "bytes": list(b" Paris")},
        {"token": " the", "logprob": -2.0, "bytes": list(b" the")}]}]
    assert legacy == {"tokens": [" the"], "token_logprobs": [-2.0], "top_logprobs": [{" Paris": -0.5, " the": -2.0}],
                      "text_offset": [4]}


def test_tools_whose_shared_definitions_clash_are_a_400(tokenizer: Any) -> None:
    def tool(name: str, kind: str) -> dict[str, Any]:
        return {"type": "function", "function": {"name": name, "parameters": {
            "type": "object", "properties": {"place": {"$ref": "#/$defs/place"}}, "$defs": {"place": {"type": kind}}}}}

    with pytest.raises(InvalidRequestError, match="multiple schemas") as raised:
        support(tokenizer).plan(body(tools=[tool("a", "string"), tool("b", "integer")], tool_choice="required"))
    assert raised.value.param == "tools"
