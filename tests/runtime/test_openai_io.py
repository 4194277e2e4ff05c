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


def test_unsupported_features_are_refused_not_ignored() -> None:
    with pytest.raises(InvalidRequestError) as raised:
        parse_sampling({"response_format": {"type": "json_schema"}})
    assert raised.value.param == "response_format"
