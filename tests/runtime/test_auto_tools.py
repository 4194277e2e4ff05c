"""tool_choice "auto" with a real tool parser (vLLM's hermes) and a chat template that shows the model its tools.

The small model's own template cannot take tools, so this engine is given one through `chat_template`, and learns
the call syntax from two earlier turns of the conversation.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from runtime import EmbeddedEngine
from tests.runtime.conftest import MAX_MODEL_LEN, MAX_NUM_SEQS
from tests.runtime.tool_answers import finish_reasons, streamed_calls, well_formed_calls

pytestmark = [pytest.mark.runtime, pytest.mark.asyncio(loop_scope="module")]

# SmolLM2's template, plus the tools in the system turn and Hermes-style calls and results.
TOOLS_TEMPLATE = r"""
{%- if tools %}{{ '<|im_start|>system\nYou are a helpful assistant that can call functions. To call one, write '
  '<tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call>. The functions:\n<tools>\n' }}
{%- for tool in tools %}{{ tool | tojson }}{{ '\n' }}{%- endfor %}{{ '</tools><|im_end|>\n' }}
{%- elif messages[0]['role'] != 'system' %}
{{- '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message['role'] == 'assistant' and message.get('tool_calls') %}{{ '<|im_start|>assistant\n' }}
{%- for call in message['tool_calls'] %}{{ '<tool_call>' }}
{{- {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}{{ '</tool_call>' }}
{%- endfor %}{{ '<|im_end|>\n' }}
{%- elif message['role'] == 'tool' %}
{{- '<|im_start|>user\n<tool_response>' + message['content'] + '</tool_response><|im_end|>\n' }}
{%- else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}
"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"]}}}


def earlier_call(number: int, city: str, weather: str) -> list[dict[str, Any]]:
    call = {"id": f"call_{number}", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
    return [{"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{number}", "content": weather},
            {"role": "assistant", "content": f"It is {weather} in {city}."}]


def ask(question: str, **fields: Any) -> dict[str, Any]:
    history = earlier_call(1, "Rome", "21 C and sunny") + earlier_call(2, "Oslo", "3 C and snowing")
    return {"messages": [*history, {"role": "user", "content": question}], "tools": [WEATHER], "temperature": 0,
            "max_tokens": 60, **fields}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tool_engine(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedEngine]:
    template = tmp_path_factory.mktemp("templates") / "tools.jinja"
    template.write_text(TOOLS_TEMPLATE)
    served = EmbeddedEngine(str(model_path), {"max_model_len": MAX_MODEL_LEN, "max_num_seqs": MAX_NUM_SEQS},
                            served_model_name="small-tools", tool_parser="hermes", chat_template=str(template))
    await served.start()
    yield served
    await served.stop()


async def test_the_model_calls_a_tool_of_its_own_accord_whole_and_streamed(tool_engine: EmbeddedEngine) -> None:
    whole = await tool_engine.chat(ask("What is the weather in Paris?"), "auto-call")
    chunks = [chunk async for chunk in tool_engine.stream_chat(ask("What is the weather in Paris?"), "auto-call-s")]

    choice = whole["choices"][0]
    assert well_formed_calls(choice["message"]["tool_calls"], [WEATHER]) == [("get_weather", {"city": "Paris"})]
    assert choice["message"]["content"] is None
    assert choice["finish_reason"] == "tool_calls"
    assert well_formed_calls(streamed_calls(chunks), [WEATHER]) == [("get_weather", {"city": "Paris"})]
    assert finish_reasons(chunks) == {0: ["tool_calls"]}
    assert not any(c["delta"].get("content") for chunk in chunks[1:] for c in chunk["choices"]), \
        "the call's markup never shows as text"


async def test_without_a_call_the_answer_is_plain_text(tool_engine: EmbeddedEngine) -> None:
    body = {"messages": [{"role": "user", "content": "Hello! How are you?"}], "tools": [WEATHER], "temperature": 0,
            "max_tokens": 40}

    whole = await tool_engine.chat(body, "auto-text")

    message = whole["choices"][0]["message"]
    assert message["content"] and "tool_call" not in message["content"]
    assert "tool_calls" not in message
    assert whole["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(("tool_choice", "finish"), [
    ({"type": "function", "function": {"name": "get_weather"}}, "stop"), ("required", "tool_calls")])
async def test_forced_calls_use_the_parsers_own_syntax_held_to_the_schema(
    tool_engine: EmbeddedEngine, tool_choice: Any, finish: str
) -> None:
    body = {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": [WEATHER],
            "tool_choice": tool_choice, "temperature": 0, "max_tokens": 80}

    whole = await tool_engine.chat(body, f"hermes-{finish}")

    calls = well_formed_calls(whole["choices"][0]["message"]["tool_calls"], [WEATHER])
    assert [name for name, _ in calls] == ["get_weather"]
    assert whole["choices"][0]["finish_reason"] == finish
