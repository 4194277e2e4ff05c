"""The inline fast paths of the answer checks (gateway/providers/base.py) agree with the full checks on any input:
an answer they let through unchecked is one the full check accepts, with the same usage."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.providers.base import UpstreamError, Usage, _choices_problem, _count, answer_usage

_VALUES = st.one_of(st.none(), st.integers(-2, 5), st.booleans(), st.text(max_size=2), st.floats(allow_nan=False),
                    st.lists(st.none(), max_size=1))
_DETAILS = st.dictionaries(st.sampled_from(["cached_tokens", "audio_tokens", "cache_write_tokens", "cache_write_1h_tokens",
                                           "reasoning_tokens"]), _VALUES, max_size=3)
_USAGE = st.one_of(st.none(), st.integers(), st.dictionaries(
    st.sampled_from(["prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details",
                     "total_tokens", "prompt_cache_hit_tokens"]),
    st.one_of(_VALUES, _DETAILS), max_size=5))
_MESSAGE = st.dictionaries(st.sampled_from(["role", "content", "refusal", "annotations", "tool_calls", "name"]),
                           _VALUES, max_size=5)
_CHOICE = st.dictionaries(st.sampled_from(["index", "message", "finish_reason", "logprobs", "delta", "text"]),
                          st.one_of(_VALUES, _MESSAGE), max_size=5)


def _outcome(check, *args) -> object:
    try:
        return check(*args)
    except UpstreamError:
        return "invalid"


def _full_usage(usage: object) -> Usage | None:
    if usage is None:
        return None
    if type(usage) is not dict:
        raise UpstreamError("invalid", "usage is not an object")
    details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    for part in (details, completion_details):
        if part is not None and type(part) is not dict:
            raise UpstreamError("invalid", "details are not an object")
    details, completion_details = details or {}, completion_details or {}
    prompt, completion = _count(usage, "prompt_tokens", "p"), _count(usage, "completion_tokens", "p")
    has_cached = details.get("cached_tokens") is not None
    cached = min(_count(details, "cached_tokens", "p") if has_cached else _count(usage, "prompt_cache_hit_tokens", "p"),
                 prompt)
    written = min(_count(details, "cache_write_tokens", "p"), prompt - cached)
    return Usage(prompt, completion, cached, written, min(_count(details, "cache_write_1h_tokens", "p"), written),
                 min(_count(completion_details, "reasoning_tokens", "p"), completion))


def _full_chat_answer(data: dict) -> Usage | None:
    choices = data.get("choices")
    problem = _choices_problem(choices)
    if problem is None and not all(type(choice.get("message")) is dict for choice in choices):
        problem = "a choice has no message"
    if problem is not None:
        raise UpstreamError("invalid", problem)
    return _full_usage(data.get("usage"))


@settings(max_examples=1500, deadline=None)
@given(_USAGE)
def test_usage_fast_path_reads_what_the_full_check_reads(usage: object) -> None:
    assert _outcome(Usage.from_openai, usage) == _outcome(_full_usage, usage)


@settings(max_examples=1500, deadline=None)
@given(st.lists(_CHOICE, max_size=2), _USAGE)
def test_chat_answer_fast_path_accepts_only_what_the_full_check_accepts(choices: list, usage: object) -> None:
    data = {"choices": choices, "usage": usage}
    assert _outcome(answer_usage, data, "chat", "p") == _outcome(_full_chat_answer, data)


def test_the_common_answer_takes_the_fast_path_and_is_read_right() -> None:
    data = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi", "refusal": None},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 4}}}
    assert answer_usage(data, "chat", "p") == Usage(12, 3, 4)
