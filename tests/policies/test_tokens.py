from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from unittest import mock

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import tokens
from policies.tokens import count_prompt_tokens, count_text_tokens, encoding_for, install_offline_encodings

# OpenAI cookbook "How to count tokens with tiktoken": these messages are 129 prompt tokens for
# gpt-3.5-turbo and gpt-4 (cl100k_base), as the API reports them.
COOKBOOK_MESSAGES = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon "
                                  "into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch "
                                                          "base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to "
                                                               "do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client "
                                "deliverable."},
]

# The hashes tiktoken checks a cached vocabulary against before it would download it again.
EXPECTED_SHA256 = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}


def test_offline_vocabularies_are_written_where_tiktoken_looks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert install_offline_encodings() == tmp_path
    for name, digest in EXPECTED_SHA256.items():
        url = f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
        cached = tmp_path / hashlib.sha1(url.encode()).hexdigest()
        assert hashlib.sha256(cached.read_bytes()).hexdigest() == digest


def test_chat_prompt_matches_openai_count() -> None:
    assert count_prompt_tokens("gpt-4", "chat", {"messages": COOKBOOK_MESSAGES}) == 129
    assert count_prompt_tokens("gpt-3.5-turbo", "chat", {"messages": COOKBOOK_MESSAGES}) == 129


def test_chat_counts_content_parts_and_names() -> None:
    plain = count_prompt_tokens("gpt-4o", "chat", {"messages": [{"role": "user", "content": "Hello there"}]})
    parts = count_prompt_tokens(
        "gpt-4o", "chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]}
    )
    named = count_prompt_tokens(
        "gpt-4o", "chat", {"messages": [{"role": "user", "name": "al", "content": "Hello there"}]}
    )
    assert parts == plain
    assert named == plain + len(tiktoken.get_encoding("o200k_base").encode("al")) + 1


def test_completions_and_embeddings_inputs() -> None:
    one = count_prompt_tokens("gpt-3.5-turbo-instruct", "completions", {"prompt": "Say this is a test"})
    assert one == len(tiktoken.get_encoding("cl100k_base").encode("Say this is a test"))
    three = {"prompt": ["Say this is a test"] * 3}
    assert count_prompt_tokens("gpt-3.5-turbo-instruct", "completions", three) == 3 * one
    assert count_prompt_tokens("text-embedding-3-small", "embeddings", {"input": [[1, 2, 3], [4, 5]]}) == 5
    assert count_prompt_tokens("text-embedding-3-small", "embeddings", {"input": "hello world"}) == 2


def test_unknown_models_are_estimated_with_o200k() -> None:
    text = "Bonjour, comment allez-vous aujourd'hui ?"
    expected = len(tiktoken.get_encoding("o200k_base").encode(text))
    assert count_text_tokens("SmolLM2-135M-Instruct", text) == expected
    assert count_prompt_tokens("claude-sonnet-4", "completions", {"prompt": text}) == expected


def test_unknown_operation_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown operation"):
        count_prompt_tokens("gpt-4o", "images", {})


def nested(levels: int, inner: object) -> object:
    value = inner
    for _ in range(levels):
        value = [value]
    return value


def test_hostile_nesting_is_counted_without_error() -> None:
    """A prompt or a tool definition nested thousands of levels deep is counted, not a RecursionError (a 500)."""
    assert count_prompt_tokens("gpt-4o", "completions", {"prompt": nested(5_000, "hello world")}) == 2
    assert count_prompt_tokens("gpt-4o", "embeddings", {"input": nested(5_000, [1, 2, 3])}) == 3
    tools = [{"type": "function", "function": {"name": "f", "parameters": nested(1_000, "deep")}}]
    deep = count_prompt_tokens("gpt-4o", "chat", {"messages": [{"role": "user", "content": "hi"}], "tools": tools})
    plain = count_prompt_tokens("gpt-4o", "chat", {"messages": [{"role": "user", "content": "hi"}]})
    assert deep > plain
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}, "x": nested(300, 2**70)}]
    message = {"role": "assistant", "content": None, "tool_calls": calls}
    assert count_prompt_tokens("gpt-4o", "chat", {"messages": [message]}) > 0


def test_an_encoding_kept_without_its_python_ranks_still_pickles_and_decodes() -> None:
    encoding = encoding_for("gpt-4o")
    copy = pickle.loads(pickle.dumps(encoding))
    tokens = encoding.encode("Übermäßig lange Wörter, 東京, and emoji 🎉")
    assert copy.encode("Übermäßig lange Wörter, 東京, and emoji 🎉") == tokens
    assert encoding.decode(tokens) == "Übermäßig lange Wörter, 東京, and emoji 🎉"
    assert encoding.n_vocab == 200_019


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(max_size=300), min_size=1, max_size=12), st.sampled_from(["gpt-4", "gpt-4o"]))
def test_a_prompt_counted_again_counts_what_tiktoken_counts(texts: list[str], model: str) -> None:
    encoding = tiktoken.get_encoding(encoding_for(model).name)
    body = {"messages": [{"role": "user", "content": text} for text in texts]}
    expected = 3 + sum(3 + len(encoding.encode("user")) + len(encoding.encode_ordinary(text)) for text in texts)
    # A bound this small clears the table within most examples: counts read back after a clear must hold too.
    with mock.patch.object(tokens, "_COUNTED_MAX_CHARS", 500):
        for _ in range(3):
            assert count_prompt_tokens(model, "chat", body) == expected
        assert tokens._counted_chars <= 500


def test_remembered_prompts_stay_within_their_bound() -> None:
    texts = [f"prompt number {n} " * 50 for n in range(400)]
    for text in texts:
        count_prompt_tokens("gpt-4o", "chat", {"messages": [{"role": "user", "content": text}]})
    held = sum(len(text) for table in tokens._counted.values() for text in table)
    assert held == tokens._counted_chars <= tokens._COUNTED_MAX_CHARS
    huge = "word " * 20_000
    count_prompt_tokens("gpt-4o", "chat", {"messages": [{"role": "user", "content": huge}]})
    assert huge not in tokens._counted.get("o200k_base", {})
